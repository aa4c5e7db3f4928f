"""`claude-code` and `codex` agents against fake command lines that check the real flags, in a real git lab."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from autoresearch.agents.base import AgentError, ResearchContext
from autoresearch.agents.coding_cli import CodingCLIAgent, build_prompt, format_history, parse_message
from autoresearch.errors import AgentAuthFailed, AgentUnavailable
from autoresearch.gitrepo import Git
from autoresearch.ledger import Experiment, Ledger

FAKE = Path(__file__).parent / "fakes" / "fake_assistant.py"
KINDS = ["claude-code", "codex"]
TRAIN = '"""A toy training file."""\nDEPTH = 4\nLR = 0.1\nprint("---")\nprint("val_bpb: 1.0")\n'
PREPARE = '"""Fixed: data and evaluation."""\nEVAL_TOKENS = 1000\n'


@pytest.fixture
def lab(tmp_path: Path) -> Path:
    root = tmp_path / "lab"
    root.mkdir()
    git = Git(root)
    git.init()
    for name, text in {"train.py": TRAIN, "prepare.py": PREPARE, "program.md": "# Brief\nMake val_bpb lower.\n",
                       ".gitignore": ".autoresearch/\n"}.items():
        (root / name).write_text(text)
    git.commit_all("baseline")
    return root


@pytest.fixture
def fakes(tmp_path: Path, lab: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`claude` and `codex` on PATH; returns the directory where they record what they saw."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("claude", "codex"):
        exe = bin_dir / name
        exe.write_text(f"#!{sys.executable}\n" + FAKE.read_text())
        exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_RECORD", str(tmp_path / "record"))
    monkeypatch.setenv("FAKE_FORBIDDEN", str(lab))
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test-secret-value-123")
    return tmp_path / "record"


def context(lab: Path, history: list[Experiment] | None = None, **extra: object) -> ResearchContext:
    git = Git(lab)
    return ResearchContext(program=(lab / "program.md").read_text(), files={"train.py": TRAIN}, history=history or [],
                           champion_commit=git.head(), champion_metric=1.0, metric_name="val_bpb", direction="min",
                           budget=300.0, extra=dict(extra))


def untouched(lab: Path, head: str) -> None:
    git = Git(lab)
    assert git.head() == head and git.is_clean()
    assert (lab / "train.py").read_text() == TRAIN and (lab / "prepare.py").read_text() == PREPARE


@pytest.mark.parametrize("kind", KINDS)
def test_good_edit_becomes_a_patch_that_applies(kind: str, lab: Path, fakes: Path, tmp_path: Path) -> None:
    head = Git(lab).head()
    agent = CodingCLIAgent(kind, lab, "mar5", model="some-model")
    proposal = agent.propose(context(lab))
    assert proposal is not None and proposal.patch
    assert proposal.description == "raise LR from 0.1 to 0.2"
    assert proposal.rationale.startswith("the loss curve is still falling") and "larger step" in proposal.rationale
    assert "-LR = 0.1" in proposal.patch and "+LR = 0.2" in proposal.patch and "prepare.py" not in proposal.patch
    meta = proposal.meta
    assert meta["assistant"] == kind and meta["exit_code"] == 0 and meta["changed"] == ["train.py"]
    assert "outside_editable" not in meta and meta["seconds"] > 0
    transcript = Path(meta["transcript"])
    assert transcript.parent == lab / ".autoresearch" / "transcripts" and transcript.name.startswith("mar5-")
    assert transcript.name.endswith(f"-{kind}.txt")
    saved = transcript.read_text()
    assert "=== prompt ===" in saved and "DESCRIPTION: raise LR" in saved and "--model some-model" in saved
    assert "sk-test-secret-value-123" not in saved
    # The assistant ran in its scratch worktree, with the prompt on stdin.
    assert Path((fakes / "cwd.txt").read_text()).resolve() == (lab / ".autoresearch/agent-worktrees/mar5").resolve()
    prompt = (fakes / "prompt.txt").read_text()
    assert "Make val_bpb lower." in prompt and "Do NOT run training" in prompt and "lower is better" in prompt
    # The patch applies to a fresh clone at the champion, and the person's checkout is untouched.
    fresh = tmp_path / "fresh"
    subprocess.run(["git", "clone", "-q", str(lab), str(fresh)], check=True)
    check = subprocess.run(["git", "apply", "--check", "-"], cwd=fresh, input=proposal.patch, text=True,
                           capture_output=True)
    assert check.returncode == 0, check.stderr
    untouched(lab, head)


def test_claude_flags_and_reported_cost(lab: Path, fakes: Path) -> None:
    proposal = CodingCLIAgent("claude-code", lab, "t").propose(context(lab))
    assert proposal is not None
    argv = json.loads((fakes / "argv.json").read_text())[1:]
    assert argv[:5] == ["-p", "--output-format", "json", "--permission-mode", "acceptEdits"]
    assert "--model" not in argv
    assert proposal.meta["cost_usd"] == pytest.approx(0.0123) and proposal.meta["session_id"] == "0f1e2d3c"
    assert proposal.meta["input_tokens"] == 1200 and proposal.meta["output_tokens"] == 80


def test_codex_flags_and_usage(lab: Path, fakes: Path) -> None:
    proposal = CodingCLIAgent("codex", lab, "t", extra_args=["--skip-git-repo-check"]).propose(context(lab))
    assert proposal is not None
    argv = json.loads((fakes / "argv.json").read_text())[1:]
    assert argv[0] == "exec" and argv[-1] == "-" and "--json" in argv
    assert argv[argv.index("--sandbox") + 1] == "workspace-write"
    assert proposal.meta["output_tokens"] == 60 and proposal.meta["session_id"] == "th_1"


@pytest.mark.parametrize("kind", KINDS)
def test_frozen_file_edit_stays_in_the_patch(kind: str, lab: Path, fakes: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_MODE", "frozen")
    proposal = CodingCLIAgent(kind, lab, "t").propose(context(lab))
    assert proposal is not None and proposal.patch
    assert "+EVAL_TOKENS = 1" in proposal.patch and "+LR = 0.2" in proposal.patch
    assert proposal.meta["outside_editable"] == ["prepare.py"]
    assert (lab / "prepare.py").read_text() == PREPARE


@pytest.mark.parametrize("kind", KINDS)
def test_hang_is_killed_at_the_timeout(kind: str, lab: Path, fakes: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_MODE", "hang")
    agent = CodingCLIAgent(kind, lab, "t", timeout=2, grace_seconds=0.5)
    start = time.monotonic()
    with pytest.raises(AgentUnavailable, match="did not finish within 2 s") as err:
        agent.propose(context(lab))
    assert time.monotonic() - start < 10
    assert "transcript:" in str(err.value)
    pids = [int(p) for p in (fakes / "pids.txt").read_text().split()]
    deadline = time.monotonic() + 5
    while any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids):
        assert time.monotonic() < deadline, "the assistant or its child survived"
        time.sleep(0.05)
    transcripts = list((lab / ".autoresearch" / "transcripts").iterdir())
    assert len(transcripts) == 1 and "timed out" in transcripts[0].read_text()


@pytest.mark.parametrize("kind", KINDS)
def test_auth_failure_is_transient_with_a_clear_message(kind: str, lab: Path, fakes: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_MODE", "auth")
    with pytest.raises(AgentAuthFailed, match="could not authenticate: Error: authentication failed") as err:
        CodingCLIAgent(kind, lab, "t").propose(context(lab))
    assert isinstance(err.value, AgentUnavailable)
    assert ("claude" if kind == "claude-code" else "codex login") in str(err.value)


@pytest.mark.parametrize("kind", KINDS)
def test_error_reply_is_unavailable(kind: str, lab: Path, fakes: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_MODE", "overloaded")
    with pytest.raises(AgentUnavailable, match="529 Overloaded") as err:
        CodingCLIAgent(kind, lab, "t").propose(context(lab))
    assert not isinstance(err.value, AgentAuthFailed)


def test_codex_recovered_error_event_is_not_a_failure(lab: Path, fakes: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_MODE", "notice")
    proposal = CodingCLIAgent("codex", lab, "t").propose(context(lab))
    assert proposal is not None and proposal.patch and proposal.meta["errors"] == ["Reconnecting... 1/5"]


def test_other_failure_is_unavailable(lab: Path, fakes: Path) -> None:
    # A flag the fake does not know: the CLI exits 2, like the real one on a bad option.
    agent = CodingCLIAgent("codex", lab, "t", extra_args=["--no-such-flag"])
    with pytest.raises(AgentUnavailable, match=r"codex failed \(exit code 2\)") as err:
        agent.propose(context(lab))
    assert not isinstance(err.value, AgentAuthFailed)


@pytest.mark.parametrize("kind", KINDS)
def test_missing_executable(kind: str, lab: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    program = "claude" if kind == "claude-code" else "codex"
    with pytest.raises(AgentError, match=f"{program} is not installed or not on PATH") as err:
        CodingCLIAgent(kind, lab, "t")  # type: ignore[arg-type]
    assert "npm install -g @" in str(err.value) and "--agent openai:<model>" in str(err.value)
    with pytest.raises(AgentError, match="unknown coding assistant"):
        CodingCLIAgent("cursor", lab, "t")  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", KINDS)
def test_repeated_proposals_start_from_the_champion(kind: str, lab: Path, fakes: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    head = Git(lab).head()
    agent = CodingCLIAgent(kind, lab, "t")
    monkeypatch.setenv("FAKE_MODE", "newfile")
    first = agent.propose(context(lab))
    assert first is not None and first.patch and "+++ b/helpers.py" in first.patch  # new files are included
    # The fake refuses to work unless train.py is the champion's again and helpers.py is gone.
    second = agent.propose(context(lab))
    assert second is not None and second.patch == first.patch
    monkeypatch.setenv("FAKE_MODE", "good")
    third = agent.propose(context(lab))
    assert third is not None and third.patch and "helpers.py" not in third.patch
    untouched(lab, head)
    assert len(list((lab / ".autoresearch" / "transcripts").iterdir())) == 3


def test_a_broken_scratch_worktree_is_recreated(lab: Path, fakes: Path) -> None:
    agent = CodingCLIAgent("claude-code", lab, "t")
    assert agent.propose(context(lab)) is not None
    (agent.worktree / ".git").unlink()  # e.g. a half-deleted directory
    (agent.worktree / "junk.txt").write_text("x")
    proposal = agent.propose(context(lab))
    assert proposal is not None and proposal.patch and "junk" not in proposal.patch


def test_no_change_is_still_a_proposal(lab: Path, fakes: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_MODE", "noop")
    proposal = CodingCLIAgent("codex", lab, "t").propose(context(lab))
    assert proposal is not None and proposal.patch is None and not proposal.files
    assert proposal.description.startswith("(codex made no change) raise LR")


def test_repair_request_reaches_the_prompt(lab: Path, fakes: Path) -> None:
    repair = {"failed_description": "swap in GELU", "reason": "crash: NameError: gelu",
              "log_tail": "Traceback ...\nNameError: name 'gelu' is not defined", "diff": "--- a/train.py\n"}
    proposal = CodingCLIAgent("claude-code", lab, "t").propose(context(lab, repair=repair))
    assert proposal is not None
    prompt = (fakes / "prompt.txt").read_text()
    assert "REPAIR" in prompt and "swap in GELU" in prompt and "NameError: name 'gelu'" in prompt


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    with Ledger(tmp_path / "ledger.db") as opened:
        yield opened


def test_repair_in_place_returns_full_files(lab: Path, fakes: Path, ledger: Ledger) -> None:
    git = Git(lab)
    champion = git.head()
    # A failed experiment that added a helper module: the fix must keep it.
    git.run("checkout", "-q", "-b", "exp")
    (lab / "notes.py").write_text("X = 1\n")
    failed_commit = git.commit_all("add notes")
    git.run("checkout", "-q", "main")
    eid = ledger.add(run_id=None, tag="t", kind="experiment", parent_commit=champion, commit_sha=failed_commit,
                     agent="claude-code", description="add notes", status="crash", reason="crash: boom",
                     patch="--- a/notes.py\n")
    failed = ledger.get(eid)
    ctx = ResearchContext(program="", files={"train.py": TRAIN}, history=[failed], champion_commit=champion,
                          champion_metric=1.0, metric_name="val_bpb", direction="min", budget=60.0)
    proposal = CodingCLIAgent("claude-code", lab, "t").repair(ctx, failed, "boom", 1, 2)
    assert proposal is not None and proposal.patch is None
    assert proposal.files == {"notes.py": "X = 1\n", "train.py": TRAIN.replace("LR = 0.1", "LR = 0.2")}
    assert proposal.meta["repair_of"] == eid
    assert "already applied in this directory" in (fakes / "prompt.txt").read_text()


def test_history_lines(ledger: Ledger) -> None:
    ids = []
    for i in range(70):
        status = "keep" if i in (0, 3) else "discard"
        ids.append(ledger.add(run_id=None, tag="t", kind="experiment", parent_commit="c", agent="a",
                              description=f"idea {i}\nsecond line", status=status, metric=1.0 - i / 1000,
                              champion_metric=1.0))
    history = ledger.experiments("t")
    lines = format_history(history).splitlines()
    assert len(lines) == 62  # the last 60, plus the two kept ones before them
    assert lines[0] == f"#{ids[0]} keep 1 (+0) idea 0 second line"
    assert lines[1].startswith(f"#{ids[3]} keep 0.997 (-0.003)")
    assert lines[-1].startswith(f"#{ids[-1]} discard")
    prompt = build_prompt(ResearchContext(program="brief", files={"b.py": "", "a.py": ""}, history=history,
                                          champion_commit="abc", champion_metric=None, metric_name="ndcg",
                                          direction="max", budget=60), None, applied=False)
    assert "Editable files: a.py, b.py." in prompt and "ndcg, higher is better" in prompt
    assert "not measured yet" in prompt
    assert prompt.rstrip().endswith("RATIONALE: <short: why you expect it to improve the metric>")


@pytest.mark.parametrize(("message", "expected"), [
    ("Done.\n\nDESCRIPTION: use RMSNorm\nRATIONALE: cheaper", ("use RMSNorm", "cheaper")),
    ("**DESCRIPTION:** halve warmup\n**RATIONALE:** warmup wastes\nsteps", ("halve warmup", "warmup wastes\nsteps")),
    ("Raised the depth to 6\nbecause deeper helps", ("Raised the depth to 6", "because deeper helps")),
    ("x" * 300, ("x" * 120, "")),
    ("", ("(no description given)", "")),
])
def test_parse_message(message: str, expected: tuple[str, str]) -> None:
    assert parse_message(message) == expected
