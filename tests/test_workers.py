"""Several experiments at once: the workers' slots, the scheduler, the rule that a change is kept only
after the exact code it becomes has beaten the champion it replaces, kill -9 and Ctrl-C of a parallel
run, a tag resumed under other resources, and an agent pool shared by the workers.

Real git, SQLite and subprocesses on the toy target of test_loop; the out-of-order tests replace
only the run step (Loop._run_job), so that which run finishes first is decided by the test.
"""

from __future__ import annotations

import io
import itertools
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from rich.console import Console

from autoresearch.agents import make_agent
from autoresearch.cli import main
from autoresearch.errors import ConfigError
from autoresearch.execution import THREAD_VARIABLES, Job, Slot, local_slots
from autoresearch.experiment import Experiment
from autoresearch.lab import find_lab
from autoresearch.ledger import MIGRATIONS, Ledger, LedgerError
from autoresearch.loop import Loop, RunOptions, ledger_path, planned
from autoresearch.view import PlainView
from conftest import REPO
from test_loop import BENCH, diff, experiments, git, make_target, write_patches

CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
TWO_CORES = hasattr(os, "sched_getaffinity") and CORES >= 2
SHARE = CORES // 2  # each of two workers' cores (1 on the 2-core machines CI runs on)
REGIME = f"cpu x{SHARE}"
needs_two_cores = pytest.mark.skipif(not TWO_CORES, reason="two workers need two cores of their own")


def sleeping(seconds: float, bench: str = BENCH) -> str:
    """BENCH whose runs take `seconds` (a literal, so the hparam agent cannot tune it away)."""
    return bench.replace("time.sleep(PAUSE)", f"time.sleep({seconds})")


def run_loop(repo: Path, agent: str, tag: str = "t1", console: Console | None = None, **options: Any) -> str:
    """Run the loop in this process; its stop reason."""
    lab = find_lab(repo)
    with Ledger(ledger_path(lab)) as ledger:
        loop = Loop(lab, make_agent(agent, repo), RunOptions(tag=tag, **options), ledger, PlainView(console))
        return loop.run()


def runs_table(repo: Path) -> list[Any]:
    with Ledger(repo / ".autoresearch" / "ledger.db") as ledger:
        return ledger.runs()


def check_plan(repo: Path, rows: list[Experiment], plan: int) -> None:
    """The run made exactly `plan` experiments (its agent's proposals; a confirmation on a new
    champion is not one), and says so."""
    ideas = [e for e in rows if e.kind == "experiment" and "confirms" not in e.meta]
    assert planned(rows) == len(ideas)
    reason = runs_table(repo)[-1]["stop_reason"]
    assert reason == f"reached --max-experiments {plan}"
    assert len(ideas) == plan, [(e.id, e.kind, e.status, e.attempt, e.reason) for e in rows]


def check_git_and_tsv(repo: Path, rows: list[Experiment], tag: str = "t1") -> None:
    """The derived state agrees with the ledger: keeps chain, the branch is the last keep, every
    commit has its ref, results.tsv lists every experiment (repeats are measurements, left out)."""
    kept = [e for e in rows if e.status == "keep"]
    assert kept[0].kind == "baseline"
    for before, after in itertools.pairwise(kept):
        assert after.parent_commit == before.commit_sha, (before.id, after.id)
    parents = [e.parent_commit for e in kept if e.kind != "baseline"]
    assert len(parents) == len(set(parents)), "two keeps against the same champion"
    assert git(repo, "rev-parse", f"refs/heads/autoresearch/{tag}") == kept[-1].commit_sha
    for e in rows:
        if e.commit_sha:
            assert git(repo, "rev-parse", f"refs/autoresearch/experiments/{e.id}") == e.commit_sha, e.id
    tsv = (repo / "results.tsv").read_text().splitlines()
    assert len(tsv) == 1 + sum(1 for e in rows if e.kind != "repeat")
    assert {line.split("\t")[0] for line in tsv[1:]} == {e.short_commit for e in rows if e.kind != "repeat"}


# -- 1. the workers' slots ----------------------------------------------------------------------


def test_two_cpu_workers_get_a_core_each() -> None:
    slots = local_slots(2, "cpu", cpus=(0, 1))
    assert slots == [Slot("w0", cpus=(0,)), Slot("w1", cpus=(1,))]
    assert {s.regime("cpu") for s in slots} == {"cpu x1"}
    assert [s.node for s in slots] == ["local", "local"] and all(s.gpu is None for s in slots)


def test_cores_split_evenly_and_the_remainder_is_unused() -> None:
    slots = local_slots(3, "cpu", cpus=tuple(range(8)))
    assert [s.cpus for s in slots] == [(0, 1), (2, 3), (4, 5)]  # 6 and 7 unused: every share the same
    assert [s.name for s in slots] == ["w0", "w1", "w2"]
    assert {s.regime("cpu") for s in slots} == {"cpu x2"}
    # the cores are taken in order whatever order they come in
    assert [s.cpus for s in local_slots(2, "cpu", cpus=(7, 3, 5, 1))] == [(1, 3), (5, 7)]


def test_one_worker_or_auto_on_a_cpu_is_the_whole_machine() -> None:
    for workers in (0, 1):
        assert local_slots(workers, "cpu", cpus=(0, 1, 2, 3)) == [Slot("w0")]
    assert Slot().regime("cpu") == "cpu" and Slot().env() == {}


def test_more_workers_than_cores_is_a_config_error_with_a_fix() -> None:
    with pytest.raises(ConfigError) as info:
        local_slots(3, "cpu", cpus=(0, 1))
    assert "more workers than this machine has cores (2)" in info.value.message
    assert info.value.hint is not None and "--workers 2 or fewer" in info.value.hint


def test_cuda_gives_one_worker_per_visible_gpu() -> None:
    slots = local_slots(0, "cuda", gpus=["2", "5"])
    assert slots == [Slot("w0", gpu="2"), Slot("w1", gpu="5")]
    assert [s.regime("cuda") for s in slots] == ["cuda", "cuda"] and [s.env() for s in slots] == [{}, {}]
    assert local_slots(1, "cuda", gpus=["2", "5"]) == [Slot("w0", gpu="2")]
    assert local_slots(0, "cuda", gpus=None) == [Slot("w0", gpu="0")]  # none listed: one, as before
    with pytest.raises(ConfigError) as info:
        local_slots(3, "cuda", gpus=["0", "1"])
    assert "more GPUs than this machine shows (2)" in info.value.message
    assert info.value.hint is not None and "--workers 2 or fewer" in info.value.hint


def test_slot_thread_counts_and_description() -> None:
    slot = Slot("w1", cpus=(4, 5, 6))
    assert slot.env() == {name: "3" for name in THREAD_VARIABLES}
    assert "OMP_NUM_THREADS" in slot.env() and "MKL_NUM_THREADS" in slot.env()
    assert Slot(cpus=(0, 1, 2, 3, 8)).describe() == "cores 0-3,8"
    assert Slot(cpus=(5,)).describe() == "core 5"
    assert Slot(cpus=(1, 3, 4, 5)).describe() == "cores 1,3-5"
    assert Slot(gpu="1").describe("cuda") == "GPU 1"
    assert Slot(gpu="0", node="10.0.0.2").describe("cuda") == "GPU 0 on 10.0.0.2"
    assert Slot().describe() == "cpu" and Slot().describe("mps") == "mps"
    assert Slot(node="10.0.0.2").describe("cpu") == "cpu on 10.0.0.2"


def test_too_many_workers_is_one_line_before_anything_is_recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    repo = make_target(tmp_path)
    monkeypatch.chdir(repo)
    assert main(["run", "--plain", "--workers", str(CORES + 1), "--max-experiments", "1", "--tag", "t1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: --workers {CORES + 1} asks for more workers than this machine has cores ({CORES})")
    assert f"use --workers {CORES} or fewer" in err and len(err.strip().splitlines()) == 1
    assert experiments(repo) == [] and runs_table(repo) == []
    assert git(repo, "for-each-ref", "refs/autoresearch", "refs/heads/autoresearch") == ""


# -- 2. two local workers on the toy target -----------------------------------------------------


@needs_two_cores
@pytest.mark.parametrize("judge", ["strict", "noise"])
def test_two_workers_run_the_plan_on_the_toy_target(tmp_path: Path, judge: str) -> None:
    repo = make_target(tmp_path, sleeping(1.0), judge=judge)
    run_loop(repo, "hparam", max_experiments=6, workers=2)
    rows = experiments(repo)
    check_plan(repo, rows, 6)
    assert [e.kind for e in rows].count("baseline") == 1
    assert {e.worker for e in rows} == {"w0", "w1"}
    assert all(e.regime == REGIME and e.node == "local" for e in rows), [(e.id, e.regime, e.node) for e in rows]
    assert all(e.status not in ("pending", "running") for e in rows)
    # a row recorded but not yet run never reads as another regime's (a false re-measurement of the noise)
    assert not [e.id for e in rows if e.kind == "repeat" and (e.meta.get("block") or 0) < 0]
    if judge == "noise":  # the noise was measured (1 + 3 repeats) before anything was judged
        base = rows[0]
        repeats = [e for e in rows if e.kind == "repeat" and e.repeat_of == base.id and e.meta.get("block") == base.id]
        assert len(repeats) >= 3
        first_decision = min(e.finished_at or 0 for e in rows if e.kind == "experiment")
        assert all((e.finished_at or 0) <= first_decision for e in repeats[:3])
    check_git_and_tsv(repo, rows)
    # every worker's worktree is left clean
    lab = find_lab(repo)
    for name in ("w0", "w1"):
        wt = lab.worktree("t1", name)
        assert git(wt, "status", "--porcelain") == ""


# -- 3. every run is bound to its worker's cores ------------------------------------------------

CORES_BENCH = '''"""Reports the cores it may run on, and the thread count it was given."""
import os
import time

WIDTH = 10        # an integer knob
RATE = 0.5        # a float knob

time.sleep(0.5)
print("omp:", os.environ.get("OMP_NUM_THREADS"))
print("cores:", sorted(os.sched_getaffinity(0)))
print("---")
print(f"score: {len(os.sched_getaffinity(0))}")
'''


@needs_two_cores
@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="no CPU affinity on this platform")
def test_each_run_sees_its_share_of_cores_and_threads(tmp_path: Path) -> None:
    repo = make_target(tmp_path, CORES_BENCH)
    before = os.sched_getaffinity(0)
    run_loop(repo, "hparam", max_experiments=3, workers=2)
    assert os.sched_getaffinity(0) == before  # the workers bound their own threads, not the caller's
    rows = experiments(repo)
    assert len(rows) == 4 and {e.worker for e in rows} == {"w0", "w1"}
    seen: dict[str, set[str]] = {}
    for e in rows:
        assert e.metric == SHARE, (e.id, e.metric, e.reason)
        log = Path(e.log_path or "").read_text()
        assert f"omp: {SHARE}\n" in log, log
        cores = re.search(r"cores: \[([\d, ]+)\]", log)
        assert cores is not None and len(cores.group(1).split(",")) == SHARE, log
        seen.setdefault(e.worker or "", set()).add(cores.group(1))
    assert all(len(c) == 1 for c in seen.values()), seen  # a worker keeps its core
    w0, w1 = ({int(c) for c in next(iter(seen[w])).split(",")} for w in ("w0", "w1"))
    assert not w0 & w1, seen  # and the two never share one


# -- 4. results out of order: a fake run step -----------------------------------------------------

SCHEDULER_BENCH = '''"""The scheduler's target: the test's run step reads its constants instead of running it."""

WIDTH = 10        # an integer knob

# a spacer, so that a change of WIDTH and one of RATE
# merge cleanly onto each other

RATE = 0.5        # a float knob

# another spacer, between RATE and PAUSE
# (two lines, never adjacent hunks)

PAUSE = 0.0       # seconds the run takes
'''


def constants(text: str) -> dict[str, float]:
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^([A-Z]+) = ([-0-9.]+)", text, re.MULTILINE)}


def score(text: str) -> float:
    c = constants(text)
    return abs(c["WIDTH"] - 17) + abs(c["RATE"] - 0.25) * 10


def fake_run_job(self: Loop, job: Job, log: Path) -> dict[str, Any]:
    """A run that takes the commit's PAUSE seconds and scores its WIDTH and RATE as BENCH would."""
    text = (self.git.show(job.commit, "bench.py") or b"").decode()
    pause = constants(text)["PAUSE"]
    time.sleep(pause)
    metric = score(text)
    log.write_text(f"---\nscore: {metric:.4f}\n")
    return {"outcome": "ok", "sandbox": "none", "run_seconds": pause, "summary": {"score": metric},
            "cpu_seconds": pause, "eval_seconds": None, "causal_seconds": None, "metric": metric,
            "printed_metric": None, "handoff_seconds": None, "memory_gb": 0.0, "reason": None}


def edit(text: str, **changes: str) -> str:
    for name, value in changes.items():
        text, n = re.subn(rf"^{name} = [-0-9.]+", f"{name} = {value}", text, flags=re.MULTILINE)
        assert n == 1, name
    return text


def run_out_of_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, slow: dict[str, str],
                     fast: dict[str, str]) -> list[Experiment]:
    """Patch 1 (`slow`, with PAUSE 2) and patch 2 (`fast`) both start on the baseline; 2 finishes first."""
    monkeypatch.setattr(Loop, "_run_job", fake_run_job)
    repo = make_target(tmp_path, SCHEDULER_BENCH)
    patches = write_patches(tmp_path / "patches", [
        diff("bench.py", SCHEDULER_BENCH, edit(SCHEDULER_BENCH, PAUSE="2.0", **slow), "slow"),
        diff("bench.py", SCHEDULER_BENCH, edit(SCHEDULER_BENCH, **fast), "fast"),
    ])
    reason = run_loop(repo, f"patches:{patches}", workers=2)
    assert reason == "the agent has nothing more to propose"
    rows = experiments(repo)
    base, first, second = rows[:3]
    assert (base.kind, first.description, second.description) == ("baseline", "slow", "fast")
    assert first.parent_commit == second.parent_commit == base.commit_sha  # both started on the baseline
    assert second.status == "keep" and (second.finished_at or 0) < (first.finished_at or 0)
    assert first.status == "discard"  # never kept directly: its parent was no longer the champion
    assert all(e.status not in ("pending", "running") for e in rows)
    check_git_and_tsv(repo, rows)
    return rows


@needs_two_cores
def test_a_late_winner_is_confirmed_on_the_new_champion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = run_out_of_order(tmp_path, monkeypatch, slow={"WIDTH": "16"}, fast={"RATE": "0.25"})
    base, first, second = rows[:3]
    assert (base.metric, first.metric, second.metric) == (9.5, 3.5, 7.0)
    confirms = [e for e in rows if e.meta.get("confirms") == first.id]
    assert len(confirms) == 1 and len(rows) == 4
    merged = confirms[0]
    assert merged.kind == "experiment" and merged.parent_commit == second.commit_sha
    assert merged.meta.get("rebased_from") == base.commit_sha and merged.agent == first.agent
    assert merged.metric == pytest.approx(1.0) and merged.status == "keep"  # 16, 0.25: both changes
    assert merged.champion_metric == pytest.approx(7.0)  # judged against the champion it replaces
    text = git(repo := tmp_path / "target", "show", f"{merged.commit_sha}:bench.py")
    assert constants(text) == {"WIDTH": 16.0, "RATE": 0.25, "PAUSE": 2.0}
    assert "beat its parent" in (first.reason or "") and f"as #{merged.id}" in (first.reason or "")
    assert planned(rows) == 2  # the confirmation is the same idea, not a new one
    assert git(repo, "rev-parse", "refs/heads/autoresearch/t1") == merged.commit_sha


@needs_two_cores
def test_a_late_winner_that_does_not_merge_is_discarded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = run_out_of_order(tmp_path, monkeypatch, slow={"WIDTH": "16"}, fast={"WIDTH": "12"})
    _, first, second = rows[:3]
    assert (first.metric, second.metric) == (3.5, 7.5)
    assert len(rows) == 3 and not any("confirms" in e.meta for e in rows)
    assert "beat its parent" in (first.reason or "") and "does not merge onto it" in (first.reason or "")
    assert git(tmp_path / "target", "rev-parse", "refs/heads/autoresearch/t1") == second.commit_sha


@needs_two_cores
def test_a_late_loser_is_discarded_without_a_confirmation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = run_out_of_order(tmp_path, monkeypatch, slow={"WIDTH": "1"}, fast={"RATE": "0.25"})
    _, first, second = rows[:3]
    assert (first.metric, second.metric) == (18.5, 7.0)
    assert len(rows) == 3 and not any("confirms" in e.meta for e in rows)
    assert f"#{second.id} became the champion while it ran" in (first.reason or "")
    assert "not worth a run" in (first.reason or ""), first.reason


# -- 5 and 6. kill -9 and Ctrl-C of a parallel run, in a subprocess ---------------------------------


def start_cli(repo: Path, *args: str) -> subprocess.Popen[str]:
    """`python -m autoresearch run ...` in the target, as a user starts it."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.Popen([sys.executable, "-m", "autoresearch", "run", "--plain", "--workers", "2",
                             "--agent", "hparam", "--tag", "t1", *args], cwd=repo, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for_two_running(repo: Path, proc: subprocess.Popen[str], timeout: float = 60) -> list[Experiment]:
    """Poll the ledger until two experiments run at once (each with its process group recorded).
    The first polls may open the ledger while the orchestrator is still making it, as `status` can."""
    path = repo / ".autoresearch" / "ledger.db"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[0]
        with Ledger(path) as ledger:
            running = [e for e in ledger.unfinished("t1") if e.status == "running" and e.pgid]
        if len(running) >= 2 and all(psutil.pid_exists(e.pgid or 0) for e in running):
            return running
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"never two running at once: {proc.communicate()[0]}")


def group_members(pgids: set[int]) -> list[int]:
    """Live (non-zombie) processes in the given process groups."""
    found = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) in pgids and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p.pid)
        except (OSError, psutil.Error):
            continue
    return found


def wait_gone(pgids: set[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := group_members(pgids)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


@pytest.fixture
def slow_target(tmp_path: Path) -> Path:
    """The toy target with runs of ~2 s and the strict judge."""
    return make_target(tmp_path, sleeping(2.0))


@needs_two_cores
@pytest.mark.slow
def test_kill_9_during_a_parallel_run_then_resume(slow_target: Path) -> None:
    repo = slow_target
    proc = start_cli(repo, "--max-experiments", "6")
    running = wait_for_two_running(repo, proc)
    os.kill(proc.pid, signal.SIGKILL)  # the orchestrator only: its two runs are orphaned
    proc.wait()
    interrupted = {e.id for e in running}
    pgids = {e.pgid for e in running if e.pgid}
    again = start_cli(repo, "--max-experiments", "6")
    out, _ = again.communicate(timeout=180)
    assert again.returncode == 0, out
    assert not wait_gone(pgids, 5), "a run of the killed orchestrator outlived the resume"
    rows = experiments(repo)
    ids = [e.id for e in rows]
    assert ids == list(range(1, len(rows) + 1))  # nothing lost
    check_plan(repo, rows, 6)
    assert [e.kind for e in rows].count("baseline") == 1
    commits = [e.commit_sha for e in rows if e.kind == "experiment"]
    assert len(commits) == len(set(commits))  # nothing duplicated
    assert all(e.status in ("keep", "discard", "crash", "invalid") for e in rows), \
        [(e.id, e.status, e.reason) for e in rows]
    for e in rows:
        if e.id in interrupted:  # run again in place, under the same id
            assert e.attempt == 2 and e.outcome == "ok" and e.metric is not None, (e.id, e.attempt, e.status)
            assert "resuming experiment" in out and f"resuming experiment {e.id} " in out
            assert list(Path(e.log_path or "").parent.glob(f"{e.id:05d}.log.interrupted-*"))
        elif e.started_at is not None:
            assert e.attempt == 1, (e.id, e.attempt)
    assert {e.worker for e in rows} == {"w0", "w1"}
    check_git_and_tsv(repo, rows)
    assert runs_table(repo)[0]["stop_reason"] is None  # the killed run never wrote its end


@needs_two_cores
def test_ctrl_c_once_lets_the_running_experiments_finish(slow_target: Path) -> None:
    repo = slow_target
    proc = start_cli(repo, "--max-experiments", "20")
    running = wait_for_two_running(repo, proc)
    os.kill(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "Ctrl-C: finishing the current experiment" in out
    rows = experiments(repo)
    assert planned(rows) < 20
    assert all(e.status not in ("pending", "running", "killed") for e in rows), [(e.id, e.status) for e in rows]
    for e in running:
        done = next(r for r in rows if r.id == e.id)
        assert done.status in ("keep", "discard") and done.outcome == "ok" and done.metric is not None
    assert "Ctrl-C" in (runs_table(repo)[-1]["stop_reason"] or "")
    assert not group_members({e.pgid for e in rows if e.pgid})
    check_git_and_tsv(repo, rows)


@needs_two_cores
def test_ctrl_c_twice_ends_the_running_experiments(slow_target: Path) -> None:
    repo = slow_target
    proc = start_cli(repo, "--max-experiments", "20")
    running = wait_for_two_running(repo, proc)
    os.kill(proc.pid, signal.SIGINT)
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert "Ctrl-C again: ending the running experiments" in out, out
    assert proc.returncode == 0, out
    rows = experiments(repo)
    ended = [next(r for r in rows if r.id == e.id) for e in running]
    # every worker recorded its experiment before the process ended
    assert all(e.status == "killed" and "abandoned" in (e.reason or "") for e in ended), \
        [(e.id, e.status, e.reason) for e in ended]
    assert not any(e.status in ("pending", "running") for e in rows), [(e.id, e.status) for e in rows]
    assert not wait_gone({e.pgid for e in rows if e.pgid}, 2)  # the runs themselves were ended, all of them
    assert "Ctrl-C" in (runs_table(repo)[-1]["stop_reason"] or "")


# -- 7. a tag resumed under other resources -------------------------------------------------------


@needs_two_cores
def test_a_regime_change_measures_the_noise_again(tmp_path: Path) -> None:
    from autoresearch.workers import plan_lanes

    repo = make_target(tmp_path, judge="noise")
    run_loop(repo, "hparam", max_experiments=2)  # one worker: the whole machine
    first = experiments(repo)
    assert {e.regime for e in first} == {"cpu"} and all(e.worker is None for e in first)
    out = io.StringIO()
    run_loop(repo, "hparam", max_experiments=4, workers=2, console=Console(file=out, width=300))
    text = out.getvalue()
    assert f"this tag ran under other resources before: measuring the noise again under {REGIME}" in text, text
    rows = experiments(repo)
    later = [e for e in rows if e.id > first[-1].id]
    assert all(e.regime == REGIME for e in later)
    champ = [e for e in first if e.status == "keep"][-1]
    block = -runs_table(repo)[-1]["id"]
    remeasured = [e for e in later if e.kind == "repeat" and e.repeat_of == champ.id and e.meta.get("block") == block]
    assert len([e for e in remeasured if e.status == "measured"]) >= 4, [(e.id, e.status) for e in remeasured]
    new = [e for e in later if e.kind == "experiment"]
    assert planned(rows) == 4 and len(new) >= 2
    assert min(e.created_at for e in new) >= max(e.finished_at or 0 for e in remeasured)  # noise first
    # what the judge may compare: one regime; rows from before regimes were recorded are one worker's
    lab = find_lab(repo)
    with Ledger(ledger_path(lab)) as ledger:
        ledger.update(first[1].id, regime=None)  # as a ledger from before m007 left it
        parallel = Loop(lab, make_agent("hparam", repo), RunOptions(tag="t1", workers=2), ledger, PlainView())
        plan_lanes(parallel)
        assert parallel.regime == REGIME and parallel.single_regime == "cpu"
        assert [e.id for e in parallel.judged()] == [e.id for e in later]
        assert parallel.regime_of(ledger.get(first[1].id)) == "cpu"
        single = Loop(lab, make_agent("hparam", repo), RunOptions(tag="t1"), ledger, PlainView())
        assert single.regime == "cpu"
        assert [e.id for e in single.judged()] == [e.id for e in first]  # the legacy row included


# -- 8. an agent pool shared by the workers ---------------------------------------------------------


@needs_two_cores
def test_a_pool_of_agents_on_two_workers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    repo = make_target(tmp_path, sleeping(0.5))
    monkeypatch.chdir(repo)
    assert main(["run", "--plain", "--workers", "2", "--agent", "hparam", "--agent", "hparam",
                 "--max-experiments", "6", "--tag", "t1"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^workers: w0 \(cores? [\d,-]+\), w1 \(cores? [\d,-]+\)$", out, re.MULTILINE), out
    rows = experiments(repo)
    ideas = [e for e in rows if e.kind == "experiment" and "confirms" not in e.meta]
    check_plan(repo, rows, 6)
    counts = [sum(1 for e in ideas if e.agent == name) for name in ("hparam", "hparam#2")]
    assert counts == [3, 3], counts  # in turn
    assert all(e.agent in ("hparam", "hparam#2") for e in rows[1:])
    assert {e.worker for e in rows} == {"w0", "w1"}
    assert rows[0].agent == "hparam+hparam#2"
    check_git_and_tsv(repo, rows)


# -- the ledger opened by a second process while the first is making it -----------------------------


def test_a_second_opener_while_the_ledger_is_being_made(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`status` (or a test polling the ledger) opens it while `run` is making it: the other process
    applies every migration after this one has read which are applied and before its first write."""
    path = tmp_path / "ledger.db"
    real = Ledger.transaction
    calls: list[bool] = []
    interleaved: list[bool] = []

    def transaction(self: Ledger):  # type: ignore[no-untyped-def]
        calls.append(True)
        if len(calls) == 2:  # the first read the applied migrations (none); this one would apply m001
            interleaved.append(True)
            monkeypatch.setattr(Ledger, "transaction", real)
            Ledger(path).close()
        return real(self)

    monkeypatch.setattr(Ledger, "transaction", transaction)
    try:
        Ledger(path).close()
    except LedgerError as exc:
        pytest.fail(str(exc))
    assert interleaved
    with Ledger(path) as ledger:
        assert ledger.schema_version == len(MIGRATIONS)


# -- two workers at once: results.tsv, the plan, Ctrl-C twice -----------------------------------------


def test_two_workers_exporting_results_tsv_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two exports of results.tsv at once: each writes a temporary file of its own (Ledger.export_tsv),
    and the loop's (Loop._export, from _judge, _superseded and _record) are made one at a time."""
    repo = make_target(tmp_path)
    run_loop(repo, "hparam", max_experiments=1)
    tsv = repo / "results.tsv"
    first_written, second_done = threading.Event(), threading.Event()
    hold = [0.0]  # how long w0 waits, its file written, for w1's export to end
    renamed: list[str] = []
    real_replace = os.replace

    def replace(src: Any, dst: Any, **kwargs: Any) -> None:  # Path.replace calls it too
        if Path(dst).name == "results.tsv":
            if threading.current_thread().name == "w0":  # about to rename its file: w1 exports now
                first_written.set()
                second_done.wait(hold[0])
            renamed.append(threading.current_thread().name)
        real_replace(src, dst, **kwargs)

    monkeypatch.setattr(os, "replace", replace)

    def at_once(export: Any, wait: float) -> list[BaseException]:
        """`export` in w0 and w1, w1's started once w0's file is written; the errors."""
        hold[0] = wait
        renamed.clear()
        first_written.clear()
        second_done.clear()
        errors: list[BaseException] = []

        def worker(second: bool) -> None:
            try:
                if second:
                    first_written.wait(5)
                export()
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)
            finally:
                if second:
                    second_done.set()

        threads = [threading.Thread(target=worker, args=(False,), name="w0"),
                   threading.Thread(target=worker, args=(True,), name="w1")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(15)
        assert not any(t.is_alive() for t in threads)
        return errors

    lab = find_lab(repo)
    with Ledger(ledger_path(lab)) as ledger:
        # the ledger's export itself, unserialised: w1 writes and renames its file while w0's waits
        errors = at_once(lambda: ledger.export_tsv(tsv, "t1"), wait=5.0)
        assert not errors, errors
        assert renamed == ["w1", "w0"]
        assert len(tsv.read_text().splitlines()) == 3
        # the loop's: w1 waits for w0's export to end (w0 holds its file 0.5 s, then gives up on w1)
        loop = Loop(lab, make_agent("hparam", repo), RunOptions(tag="t1", workers=2), ledger, PlainView())
        errors = at_once(loop._export, wait=0.5)
        assert not errors, errors
        assert renamed == ["w0", "w1"]
    assert len(tsv.read_text().splitlines()) == 3
    assert [p.name for p in repo.iterdir() if "results.tsv" in p.name] == ["results.tsv"]  # no temporary left


@needs_two_cores
def test_a_claim_while_another_worker_records_does_not_stop_early(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Loop, "_run_job", fake_run_job)
    real_record = Loop._record

    def slow_record(self: Loop, *args: Any, **kwargs: Any) -> Experiment:
        e = real_record(self, *args, **kwargs)
        time.sleep(1.0)  # recorded, and the other worker's run ends now: it must not count this one twice
        return e

    monkeypatch.setattr(Loop, "_record", slow_record)
    bench = edit(SCHEDULER_BENCH, PAUSE="0.2")
    repo = make_target(tmp_path, bench)
    patches = write_patches(tmp_path / "patches", [
        diff("bench.py", bench, edit(bench, WIDTH=str(width)), f"WIDTH {width}") for width in (11, 12, 13, 14)])
    reason = run_loop(repo, f"patches:{patches}", workers=2, max_experiments=3)
    rows = experiments(repo)
    assert planned(rows) == 3, (reason, [(e.id, e.description, e.status) for e in rows])
    assert reason == "reached --max-experiments 3"


@needs_two_cores
def test_ctrl_c_twice_waits_for_every_worker_to_record_its_experiment(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    def ctrl_c_twice() -> None:
        os.kill(os.getpid(), signal.SIGINT)  # the loop's own handler is installed: it runs
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGINT)

    def run_job(self: Loop, job: Job, log: Path) -> dict[str, Any]:
        if job.eid > 1:  # the one experiment; the other worker has stopped (nothing more to propose)
            time.sleep(0.5)
            threading.Thread(target=ctrl_c_twice, daemon=True).start()
            while not self.abandon.wait(0.05):
                pass
            time.sleep(1.0)  # a run takes a moment to end once it is told to
        return fake_run_job(self, job, log)

    if threading.current_thread() is not threading.main_thread():
        pytest.skip("the loop handles Ctrl-C only in the main thread")
    monkeypatch.setattr(Loop, "_run_job", run_job)
    repo = make_target(tmp_path, SCHEDULER_BENCH)
    patches = write_patches(tmp_path / "patches", [
        diff("bench.py", SCHEDULER_BENCH, edit(SCHEDULER_BENCH, WIDTH="12"), "WIDTH 12")])
    t0 = time.monotonic()
    reason = run_loop(repo, f"patches:{patches}", workers=2)
    rows = experiments(repo)
    took = time.monotonic() - t0
    pool = [t for t in threading.enumerate() if t.name.startswith("autoresearch-w")]
    for t in pool:  # each had ended its work when the run returned: only its last instructions left
        t.join(1)
    assert not any(t.is_alive() for t in pool), pool
    assert reason == "stopped by Ctrl-C"
    assert [(e.id, e.status) for e in rows] == [(1, "keep"), (2, "killed")], took
    assert "abandoned" in (rows[1].reason or "")


@needs_two_cores
def test_every_row_has_its_regime_from_birth(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A row recorded but not yet run must not read as the single worker's regime: a claim made in that
    window would see "other resources" and queue a false re-measurement of the noise."""
    born: list[object] = []
    add = Ledger.add

    def recording(self: Ledger, **fields: object) -> int:
        born.append(fields.get("regime"))
        return add(self, **fields)  # type: ignore[arg-type]

    monkeypatch.setattr(Ledger, "add", recording)
    repo = make_target(tmp_path, sleeping(0.5), judge="noise")
    run_loop(repo, "hparam", max_experiments=3, workers=2)
    assert born and set(born) == {REGIME}
