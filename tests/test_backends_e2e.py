"""Every agent backend drives a 3-experiment run of the real GPT lab (tiny preset, seconds per run):
the OpenAI and Anthropic SDKs against a scripted 127.0.0.1 server, and fake `claude` / `codex`
executables that edit train.py like the real assistants would."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from autoresearch.ledger import Ledger
from conftest import run_cli
from fake_llm import FakeLLM, Reply

pytestmark = pytest.mark.slow
FAKE = Path(__file__).parent / "fakes" / "fake_assistant.py"
KEY = "sk-e2e-secret-4242"


@pytest.fixture
def lab(tmp_path: Path, shared_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(shared_cache))
    assert run_cli("init", "lab", "--preset", "tiny", "--budget", "2", cwd=tmp_path).returncode == 0
    proc = run_cli("prepare", cwd=tmp_path / "lab")
    assert proc.returncode == 0, proc.stderr
    toml = tmp_path / "lab" / "autoresearch.toml"  # the judge's repeats are tested elsewhere: keep these short
    toml.write_text(toml.read_text().replace('mode = "noise"', 'mode = "strict"'))
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "strict judge"],
                   cwd=tmp_path / "lab", check=True)
    return tmp_path / "lab"


def lr_edit(train: str, name: str, factor: float) -> str:
    """A reply scaling one constant; each reply edits a different one, so it applies to any champion."""
    line = re.search(rf"^{name} = ([0-9.e-]+).*$", train, re.M)
    assert line is not None
    new = line.group(0).replace(line.group(1), f"{float(line.group(1)) * factor:.4g}", 1)
    return (f"DESCRIPTION: {name} x{factor}\nRATIONALE: a tiny model tolerates a larger step.\n\n"
            f"train.py\n<<<<<<< SEARCH\n{line.group(0)}\n=======\n{new}\n>>>>>>> REPLACE\n")


def check(lab: Path, tag: str, agent: str) -> None:
    with Ledger(lab / ".autoresearch" / "ledger.db") as ledger:
        rows = [e for e in ledger.experiments(tag) if e.kind != "repeat"]  # repeats measure noise
    assert [e.kind for e in rows] == ["baseline", "experiment", "experiment", "experiment"]
    assert all(e.status in ("keep", "discard") for e in rows), [(e.status, e.reason) for e in rows]
    assert all(e.metric is not None and 0 < e.metric < 9 for e in rows)
    assert all(e.agent == agent for e in rows[1:]) and all("_LR = " in (e.patch or "") for e in rows[1:])
    for e in rows:
        ref = subprocess.run(["git", "rev-parse", f"refs/autoresearch/experiments/{e.id}"], cwd=lab,
                             capture_output=True, text=True).stdout.strip()
        assert ref == e.commit_sha
    kept = [e for e in rows if e.status == "keep"]
    branch = subprocess.run(["git", "rev-parse", f"autoresearch/{tag}"], cwd=lab, capture_output=True, text=True)
    assert branch.stdout.strip() == kept[-1].commit_sha
    logs = "".join(p.read_text(errors="replace") for p in (lab / ".autoresearch" / "logs").glob("*.log"))
    assert KEY not in logs


@pytest.mark.parametrize("spec", ["openai:fake", "anthropic:fake"])
def test_llm_backends_on_the_gpt_lab(lab: Path, spec: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    train = (lab / "train.py").read_text()
    names = ("MATRIX_LR", "EMBEDDING_LR", "UNEMBEDDING_LR", "SCALAR_LR", "WEIGHT_DECAY")
    replies = [Reply(lr_edit(train, n, f)) for n, f in zip(names, (1.25, 0.8, 1.5, 0.7, 1.1))]
    with FakeLLM(script=replies, key=KEY) as server:
        url = server.openai_base_url if spec.startswith("openai") else server.anthropic_base_url
        toml = lab / "autoresearch.toml"
        # the replies are SEARCH/REPLACE blocks; `auto` would ask the 127.0.0.1 server for JSON
        toml.write_text(toml.read_text().replace(
            "[agent]\n", f'[agent]\nbase_url = "{url}"\nbackoff_base = 0.01\nreply_format = "blocks"\n'))
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "agent settings"],
                       cwd=lab, check=True)
        proc = run_cli("run", "--agent", spec, "--max-experiments", "3", "--plain", "--tag", "e2e", cwd=lab)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check(lab, "e2e", spec)


@pytest.mark.parametrize("spec,program", [("claude-code", "claude"), ("codex", "codex")])
def test_coding_assistants_on_the_gpt_lab(lab: Path, tmp_path: Path, spec: str, program: str,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    exe = bin_dir / program
    exe.write_text(f"#!{sys.executable}\n" + FAKE.read_text())
    exe.chmod(0o755)
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_MODE": "lab",
           "FAKE_RECORD": str(tmp_path / "record"), "FAKE_FORBIDDEN": str(lab), "ANTHROPIC_API_KEY": KEY,
           "OPENAI_API_KEY": KEY}
    proc = run_cli("run", "--agent", spec, "--max-experiments", "3", "--plain", "--tag", "e2e", cwd=lab, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    check(lab, "e2e", spec)
    transcripts = list((lab / ".autoresearch" / "transcripts").glob("e2e-*"))
    assert len(transcripts) >= 3 and all(KEY not in t.read_text() for t in transcripts)
    status = subprocess.run(["git", "status", "--porcelain"], cwd=lab, capture_output=True, text=True).stdout
    assert status.strip() in ("", "?? results.tsv") or "autoresearch.toml" not in status
