"""The ratchet on a non-ML target: a small program whose score comes from its constants.

Real git, real SQLite, real subprocesses. Patches exercise every path of the check step.
"""

from __future__ import annotations

import difflib
import subprocess
from pathlib import Path

import pytest

from autoresearch.agents import make_agent
from autoresearch.cli import main
from autoresearch.lab import find_lab, init_target
from autoresearch.ledger import Ledger
from autoresearch.loop import Loop, RunOptions, ledger_path
from autoresearch.view import PlainView

BENCH = '''"""A toy target: the score is how far the constants are from a hidden optimum."""
import time

# Hyperparameters
WIDTH = 10        # an integer knob
RATE = 0.5        # a float knob
PAUSE = 0.0       # seconds to sleep, for tests of the limit

time.sleep(PAUSE)
score = abs(WIDTH - 17) + abs(RATE - 0.25) * 10
print("---")
print(f"score: {score:.4f}")
'''


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def make_target(tmp_path: Path, bench: str = BENCH, judge: str = "strict", sandbox: str = "none") -> Path:
    repo = tmp_path / "target"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    (repo / "bench.py").write_text(bench)
    (repo / "data.txt").write_text("frozen input\n")
    (repo / "notes.md").write_text("my notes\n")
    git(repo, "add", "-A")
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"], cwd=repo, check=True)
    init_target(repo, run="python bench.py", editable=["bench.py", "extra/*.py"], metric="score",
                direction="min", budget=5, frozen=["data.txt"])
    # The toy target is deterministic, so most tests check the plain ratchet; and its fault scripts
    # write marker files outside the worktree, which the sandbox (tested on its own) would forbid.
    toml = repo / "autoresearch.toml"
    toml.write_text(toml.read_text().replace('mode = "noise"', f'mode = "{judge}"')
                    .replace('sandbox = "auto"', f'sandbox = "{sandbox}"'))
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", f"judge {judge}, sandbox {sandbox}")
    return repo


def diff(path: str, old: str, new: str, description: str) -> str:
    body = "".join(difflib.unified_diff(old.splitlines(True), new.splitlines(True), f"a/{path}", f"b/{path}"))
    return f"{description}\n\n{body}"


def write_patches(directory: Path, patches: list[str]) -> Path:
    directory.mkdir()
    for i, text in enumerate(patches):
        (directory / f"{i:02d}.patch").write_text(text)
    return directory


def run_loop(repo: Path, agent: str, tag: str = "t1", **options: object) -> Loop:
    lab = find_lab(repo)
    with Ledger(ledger_path(lab)) as ledger:
        loop = Loop(lab, make_agent(agent, repo), RunOptions(tag=tag, **options), ledger, PlainView())  # type: ignore[arg-type]
        loop.run()
    return loop


def experiments(repo: Path, tag: str = "t1") -> list:
    with Ledger(repo / ".autoresearch" / "ledger.db") as ledger:
        return ledger.experiments(tag)


def test_patches_exercise_every_check(tmp_path: Path) -> None:
    repo = make_target(tmp_path)
    better = BENCH.replace("WIDTH = 10 ", "WIDTH = 15 ")
    patches = write_patches(tmp_path / "patches", [
        diff("bench.py", BENCH, better, "WIDTH 10 -> 15"),  # 0: keep (9.5 -> 4.5)
        diff("bench.py", better, better.replace("RATE = 0.5 ", "RATE = 0.9 "), "RATE 0.5 -> 0.9"),  # 1: discard
        diff("bench.py", better, better.replace("score = abs", "score = = abs"), "syntax error"),  # 2: invalid
        diff("data.txt", "frozen input\n", "changed\n", "edit a frozen file"),  # 3: invalid
        diff("notes.md", "my notes\n", "agent notes\n", "edit outside the editable set"),  # 4: invalid
        diff("bench.py", better, better.replace("RATE = 0.5 ", "RATE = 0.9 "), "RATE again"),  # 5: duplicate
        diff("bench.py", better, better.replace('print("---")', 'print("---"); 1/0'), "raise"),  # 6: crash
        "an empty patch\n",  # 7: invalid (nothing to apply)
        diff("bench.py", better, better.replace("RATE = 0.5 ", "RATE = 0.25"), "RATE 0.5 -> 0.25"),  # 8: keep
    ])
    (repo / "notes.md").write_text("edited by the person while the loop runs\n")  # must survive
    loop = run_loop(repo, f"patches:{patches}")
    rows = experiments(repo)
    assert [e.kind for e in rows] == ["baseline"] + ["experiment"] * 9
    assert [e.status for e in rows] == ["keep", "keep", "discard", "invalid", "invalid", "invalid", "invalid",
                                        "crash", "invalid", "keep"]
    assert rows[0].metric == pytest.approx(9.5) and rows[1].metric == pytest.approx(4.5)
    assert rows[-1].metric == pytest.approx(2.0)
    assert "does not compile" in (rows[3].reason or "")
    assert "outside the editable set" in (rows[4].reason or "") or "frozen" in (rows[4].reason or "")
    assert "outside the editable set" in (rows[5].reason or "")
    assert "already tried" in (rows[6].reason or "")
    assert "ZeroDivisionError" in (rows[7].reason or "")
    assert loop.stop_reason == "the agent has nothing more to propose"
    # git: the branch is the champion, every experiment with a change has its ref
    champion = git(repo, "rev-parse", "refs/heads/autoresearch/t1")
    assert champion == rows[-1].commit_sha
    for e in rows:
        if e.commit_sha:
            assert git(repo, "rev-parse", f"refs/autoresearch/experiments/{e.id}") == e.commit_sha
    assert "RATE = 0.25" in git(repo, "show", f"{champion}:bench.py")
    # the person's checkout and other branches are untouched
    assert git(repo, "rev-parse", "--abbrev-ref", "HEAD") == "main"
    assert (repo / "notes.md").read_text() == "edited by the person while the loop runs\n"
    assert "WIDTH = 10" in (repo / "bench.py").read_text()
    # the worktree is clean at the champion
    worktree = repo / ".autoresearch" / "worktrees" / "t1"
    assert git(worktree, "rev-parse", "HEAD") == champion and git(worktree, "status", "--porcelain") == ""
    # results.tsv: the original's columns, one line per finished experiment
    tsv = (repo / "results.tsv").read_text().splitlines()
    assert tsv[0] == "commit\tval_bpb\tmemory_gb\tstatus\tdescription"
    assert len(tsv) == 1 + len(rows)
    assert tsv[2].split("\t")[3] == "keep" and tsv[2].split("\t")[4] == "WIDTH 10 -> 15"


def test_max_experiments_counts_the_whole_tag_and_resumes(tmp_path: Path) -> None:
    repo = make_target(tmp_path)
    run_loop(repo, "hparam", max_experiments=2)
    assert len(experiments(repo)) == 3  # baseline + 2
    run_loop(repo, "hparam", max_experiments=4)
    rows = experiments(repo)
    assert len(rows) == 5 and [e.kind for e in rows].count("baseline") == 1
    assert all(e.status in ("keep", "discard", "crash", "invalid") for e in rows)
    champion = min((e for e in rows if e.status == "keep"), key=lambda e: e.id * 0 + (e.metric or 0))
    assert git(repo, "rev-parse", "refs/heads/autoresearch/t1") == [e for e in rows if e.status == "keep"][-1].commit_sha
    assert champion.metric is not None


def test_hparam_improves_the_target(tmp_path: Path) -> None:
    repo = make_target(tmp_path)
    run_loop(repo, "hparam", max_experiments=12)
    rows = experiments(repo)
    kept = [e for e in rows if e.status == "keep"]
    assert kept[-1].metric is not None and rows[0].metric is not None
    assert kept[-1].metric < rows[0].metric  # a real improvement over the baseline 9.5
    for e in rows[1:]:
        assert e.description and "->" in e.description


def test_timeout_is_classified_and_the_loop_goes_on(tmp_path: Path) -> None:
    repo = make_target(tmp_path)
    toml = repo / "autoresearch.toml"
    toml.write_text(toml.read_text().replace("startup_allowance = 60", "startup_allowance = 1")
                    .replace("eval_allowance = 120", "eval_allowance = 1").replace("budget = 5", "budget = 1"))
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "short limits")
    slow = BENCH.replace("PAUSE = 0.0 ", "PAUSE = 60.0")
    better = BENCH.replace("WIDTH = 10 ", "WIDTH = 16 ")
    patches = write_patches(tmp_path / "patches", [diff("bench.py", BENCH, slow, "sleep forever"),
                                                   diff("bench.py", BENCH, better, "WIDTH 10 -> 16")])
    run_loop(repo, f"patches:{patches}")
    rows = experiments(repo)
    assert [e.status for e in rows] == ["keep", "timeout", "keep"]
    assert rows[1].run_seconds is not None and rows[1].run_seconds < 10


def test_baseline_failure_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    repo = make_target(tmp_path, bench="raise SystemExit('broken target')\n")
    monkeypatch.chdir(repo)
    assert main(["run", "--plain", "--max-experiments", "1", "--tag", "t1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: the baseline run failed") and "log:" in err
    assert [e.status for e in experiments(repo)] == ["crash"]


def test_status_and_report_after_a_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    import json

    repo = make_target(tmp_path)
    monkeypatch.chdir(repo)
    assert main(["run", "--plain", "--max-experiments", "3", "--tag", "t1"]) == 0
    capsys.readouterr()
    assert main(["status", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["tag"] == "t1" and len(data["experiments"]) == 4
    first = data["experiments"][0]
    assert first["status"] == "keep" and first["metric"] == pytest.approx(9.5) and first["commit"]
    # recorded for every run; whether one is `disturbed` depends on what else the machine did (these
    # runs last ~20 ms: one sample at 0 CPU seconds, or 0.01 s under load), so that is set below
    assert all(e["cpu_seconds"] is not None for e in data["experiments"])
    from autoresearch.ledger import Ledger

    with Ledger(repo / ".autoresearch" / "ledger.db") as ledger:  # as if another job took the machine for #3
        for e in ledger.experiments("t1"):
            ledger.update(e.id, outcome="ok", run_seconds=10.0, cpu_seconds=4.0 if e.id == 3 else 19.0)
    assert main(["status", "--json"]) == 0
    assert [e["disturbed"] is not None for e in json.loads(capsys.readouterr().out)["experiments"]] == \
        [False, False, True, False]
    assert main(["status"]) == 0
    out = capsys.readouterr().out
    assert "baseline" in out and "disturbed: it kept 0.4 cores busy where this run's experiments typically keep 1.9" in out
    assert main(["report"]) == 0
    png = repo / "progress.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    report = (repo / "report.md").read_text()
    assert "| 1 |" in report and "baseline score: 9.500000" in report


def test_target_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    assert main(["init", "--target", str(plain), "--run", "x", "--editable", "a.py"]) == 1
    assert "not the top of a git repository" in capsys.readouterr().err
    assert main(["init", "--target", str(plain)]) == 1
    assert "--run" in capsys.readouterr().err
    repo = make_target(tmp_path)
    assert main(["init", "--target", str(repo), "--run", "x", "--editable", "a.py"]) == 1
    assert "already a lab" in capsys.readouterr().err
