"""`autoresearch run --ray` end to end: the loop's workers on a local Ray cluster of two one-core nodes
on 127.0.0.1 (tests/test_ray.py's LocalCluster), the toy target of test_loop whose runs sleep, so no
core is burnt. One experiment per node at once; then a node removed while it runs one: that
experiment runs again on the other node under the same id, nothing is lost, nothing is left running."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from test_loop import BENCH, git, make_target
from test_ray import LocalCluster

from autoresearch.agents import make_agent
from autoresearch.lab import find_lab
from autoresearch.ledger import Experiment, Ledger
from autoresearch.loop import Loop, RunOptions, ledger_path, planned
from autoresearch.view import PlainView

pytestmark = pytest.mark.slow

SLEEPY = BENCH.replace("PAUSE = 0.0", "PAUSE = 0.0\nBASE = 3.0").replace("time.sleep(PAUSE)", "time.sleep(BASE + PAUSE)")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    local = LocalCluster(tmp_path_factory.mktemp("nodes"))
    yield local
    local.shutdown()


def sleepy_target(tmp_path: Path, seconds: float) -> Path:
    repo = make_target(tmp_path, bench=SLEEPY.replace("BASE = 3.0", f"BASE = {seconds}"), judge="strict")
    toml = repo / "autoresearch.toml"
    toml.write_text(toml.read_text().replace("budget = 5", "budget = 60"))  # the limit, not the run's length
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "budget 60")
    return repo


def run_on(repo: Path, address: str, **options: object) -> tuple[Loop, list[Experiment]]:
    lab = find_lab(repo)
    with Ledger(ledger_path(lab)) as ledger:
        loop = Loop(lab, make_agent("hparam", repo), RunOptions(tag="t1", ray=address, **options),  # type: ignore[arg-type]
                    ledger, PlainView())
        loop.run()
        return loop, ledger.experiments("t1")


def check_chain(rows: list[Experiment]) -> None:
    keeps = [e for e in rows if e.status == "keep"]
    for before, after in zip(keeps, keeps[1:]):
        assert after.parent_commit == before.commit_sha, (before.id, after.id)
    assert len({e.parent_commit for e in keeps[1:]}) == len(keeps) - 1  # never two keeps on one champion


def bench_processes(repo: Path) -> list[psutil.Process]:
    """Runs of this lab still alive anywhere on the machine (every node's worktree holds bench.py)."""
    found = []
    for p in psutil.process_iter(["cmdline", "cwd"]):
        try:
            if "bench.py" in " ".join(p.info["cmdline"] or []) and p.info["cwd"] and "ray" in p.info["cwd"]:
                found.append(p)
        except psutil.Error:
            continue
    return found


def test_one_experiment_per_node_at_once(cluster: LocalCluster, tmp_path: Path) -> None:
    repo = sleepy_target(tmp_path, 3.0)
    loop, rows = run_on(repo, cluster.cluster.address, max_experiments=4)
    assert loop.stop_reason == "reached --max-experiments 4"
    assert planned(rows) == 4 and all(e.status in ("keep", "discard", "measured") for e in rows)
    assert len({e.node for e in rows}) == 2 and {e.worker for e in rows} == {"w0", "w1"}
    assert {e.regime for e in rows} == {"cpu x1"}
    assert all((Path(e.log_path or "")).is_file() for e in rows)  # every node's log came back to the head
    # two runs overlapped in time: one per node at once
    spans = sorted((e.started_at or 0, e.finished_at or 0) for e in rows if e.kind == "experiment")
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:]))
    check_chain(rows)
    branch = git(repo, "rev-parse", "refs/heads/autoresearch/t1")
    assert branch == [e for e in rows if e.status == "keep"][-1].commit_sha


def test_a_node_removed_mid_run_runs_its_experiment_again(cluster: LocalCluster, tmp_path: Path) -> None:
    repo = sleepy_target(tmp_path, 6.0)
    lab = find_lab(repo)
    second = cluster.add_node("third")  # the node this test removes (the module's two stay)
    result: dict[str, object] = {}

    def body() -> None:
        try:
            result["loop"], result["rows"] = run_on(repo, cluster.cluster.address, max_experiments=5)
        except BaseException as exc:  # noqa: BLE001 - the test looks at it
            result["error"] = exc

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    victim = None
    deadline = time.monotonic() + 180
    with Ledger(ledger_path(lab)) as ledger:
        while victim is None and time.monotonic() < deadline and thread.is_alive():
            time.sleep(0.5)
            running = [e for e in ledger.experiments("t1") if e.status == "running" and e.node and e.outcome is None
                       and e.kind == "experiment"]
            nodes = {e.node for e in running}
            if len(nodes) >= 2:  # every node busy: remove the one this test added, with its run
                third = next((e for e in running if second.node_id[:6] in (e.node or "")), None)
                victim = third
    assert victim is not None, f"no run reached the added node: {result}"
    cluster.cluster.remove_node(second)
    thread.join(300)
    assert not thread.is_alive() and "error" not in result, result
    rows = result["rows"]
    assert isinstance(rows, list)
    again = next(e for e in rows if e.id == victim.id)
    assert again.attempt == 2 and again.status in ("keep", "discard"), again  # same id, run again elsewhere
    assert again.node != victim.node
    assert planned(rows) == 5 and not [e for e in rows if e.status in ("pending", "running")]
    assert len({e.id for e in rows}) == len(rows)
    check_chain(rows)
    deadline = time.monotonic() + 20
    while bench_processes(repo) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert bench_processes(repo) == []


def test_promote_on_the_cluster(cluster: LocalCluster, tmp_path: Path) -> None:
    """`promote --ray`: a study's rounds run on the cluster's nodes, one run per node at once."""
    from test_loop import diff, run_loop, write_patches

    from autoresearch.carry import Study, StudyOptions

    repo = sleepy_target(tmp_path, 1.0)
    program = (repo / "bench.py").read_text()
    wide = program.replace("WIDTH = 10 ", "WIDTH = 15 ")
    changes = [diff("bench.py", program, wide, "width 15"),
               diff("bench.py", wide, wide.replace("RATE = 0.5 ", "RATE = 0.3 "), "rate 0.3")]
    run_loop(repo, f"patches:{write_patches(tmp_path / 'patches', changes)}")
    study = Study(find_lab(repo), StudyOptions("promote", "t1", repeats=2, ray=cluster.cluster.address), PlainView())
    reason, result = study.run()
    assert reason == "study finished"
    assert [(v.description, v.verdict, v.gain) for v in result] == [
        ("the kept chain (2 changes) at the same scale", "carries over", pytest.approx(7.0))]
    with Ledger(ledger_path(find_lab(repo))) as ledger:
        rows = ledger.experiments(study.tag)
    assert len(rows) == 4 and all(e.status in ("keep", "measured") for e in rows)
    assert len({e.node for e in rows}) == 2 and {e.regime for e in rows} == {"cpu x1"}
    assert all(Path(e.log_path or "").is_file() for e in rows)
