"""Shared fixtures. Every test gets its own cache directory and HOME, so nothing touches the user's."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _isolated_state(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point the cache at a fresh temporary directory and strip AUTORESEARCH_* settings."""
    for name in list(os.environ):
        if name.startswith("AUTORESEARCH_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.setenv("AUTORESEARCH_DEVICE", "cpu")


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache directory shared by the slow tests, so the sotu tokenizer is trained once per session."""
    return tmp_path_factory.mktemp("shared-cache")


def run_cli(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run `python -m autoresearch ARGS` as a user would, in a subprocess."""
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + full_env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "autoresearch", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def prepared_tiny_lab(root: Path, cache: Path) -> Path:
    """A tiny-preset sotu lab made and prepared with the CLI in `root`, its data in `cache`."""
    env = {"AUTORESEARCH_CACHE": str(cache)}
    proc = run_cli("init", "lab", "--preset", "tiny", "--budget", "1", cwd=root, env=env)
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("prepare", cwd=root / "lab", env=env)
    assert proc.returncode == 0, proc.stderr
    return root / "lab"


def import_prepare(lab: Path, name: str) -> types.ModuleType:
    """The lab's frozen prepare.py, imported in this process under a name of its own."""
    spec = importlib.util.spec_from_file_location(name, lab / "prepare.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
