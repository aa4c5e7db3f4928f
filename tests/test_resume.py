"""kill -9 of the orchestrator at random moments, then the same command again: nothing lost,
nothing duplicated, no orphan process, git and results.tsv consistent with the ledger."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from autoresearch.agents import make_agent
from autoresearch.lab import find_lab
from autoresearch.ledger import Ledger
from autoresearch.loop import EXHAUSTED, MAX_ATTEMPTS, Loop, RunOptions, ledger_path
from autoresearch.view import PlainView
from conftest import REPO
from test_loop import BENCH, experiments, git, make_target, run_loop

SLOW_BENCH = BENCH.replace('time.sleep(PAUSE)', '''import os
with open(os.path.join(os.environ["PID_DIR"], f"{os.getpid()}.pid"), "w") as f:
    f.write("x")
time.sleep(PAUSE)''').replace("PAUSE = 0.0 ", "PAUSE = 1.5 ")


def start(repo: Path, pid_dir: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PID_DIR": str(pid_dir), "PYTHONPATH": str(REPO / "src")}
    return subprocess.Popen([sys.executable, "-m", "autoresearch", "run", "--plain", "--max-experiments", "4",
                             "--tag", "k"], cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [7, 11])
def test_kill_9_at_random_moments_then_resume(tmp_path: Path, seed: int) -> None:
    repo = make_target(tmp_path, SLOW_BENCH)
    toml = repo / "autoresearch.toml"  # a run gets only the variables it is allowed
    toml.write_text(toml.read_text().replace("budget = 5", 'budget = 5\npass_env = ["PID_DIR"]'))
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "pass PID_DIR")
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    rng = random.Random(seed)
    for attempt in range(4):
        proc = start(repo, pid_dir)
        time.sleep(rng.uniform(0.5, 3.0))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)  # the orchestrator only; its run, if any, is orphaned
        proc.wait()
    # an orphaned training process may be alive now; the next run must end it
    final = start(repo, pid_dir)
    _, err = final.communicate(timeout=240)
    assert final.returncode == 0, err
    with Ledger(repo / ".autoresearch" / "ledger.db") as ledger:
        rows = ledger.experiments("k")
    # four kills may all land in one experiment (a slow machine): after three it is not run again
    done = [e for e in rows if not (e.status == "killed" and e.reason == EXHAUSTED)]
    assert [e.kind for e in done].count("baseline") == 1
    assert [e.kind for e in rows].count("experiment") == 4
    assert all(e.status in ("keep", "discard") for e in done), [(e.id, e.status, e.reason) for e in rows]
    assert len({e.commit_sha for e in rows if e.kind == "experiment"}) == 4  # nothing duplicated
    for e in rows:
        assert git(repo, "rev-parse", f"refs/autoresearch/experiments/{e.id}") == e.commit_sha
    kept = [e for e in rows if e.status == "keep"]
    assert git(repo, "rev-parse", "refs/heads/autoresearch/k") == kept[-1].commit_sha
    tsv = (repo / "results.tsv").read_text().splitlines()
    assert len(tsv) == 1 + len(rows)
    # no training process outlives its orchestrator
    for pid_file in pid_dir.iterdir():
        pid = int(pid_file.stem)
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_a_baseline_interrupted_too_often_is_measured_anew(tmp_path: Path) -> None:
    """An orchestrator killed during the baseline three times (the row says attempt 3, still running):
    the next start neither runs that row a fourth time nor stops on it; it stays in the ledger as
    killed, and a new baseline is measured, then the night goes on."""
    repo = make_target(tmp_path)
    lab = find_lab(repo)
    with Ledger(ledger_path(lab)) as ledger:
        loop = Loop(lab, make_agent("hparam", repo), RunOptions(tag="t1"), ledger, PlainView())
        loop.run_id = ledger.start_run("t1", "hparam", {})  # a run that was killed
        first = loop.add_baseline()
        ledger.update(first, started_at=time.time() - 5, attempt=MAX_ATTEMPTS)
    run_loop(repo, "hparam", max_experiments=2)
    rows = experiments(repo)
    assert [(e.kind, e.status) for e in rows][:2] == [("baseline", "killed"), ("baseline", "keep")]
    assert rows[0].id == first and rows[0].reason == EXHAUSTED
    assert [e.kind for e in rows].count("experiment") == 2
    assert all(e.status in ("keep", "discard") for e in rows[1:])
