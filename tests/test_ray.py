"""Experiments on a Ray cluster (ray_backend.py), on a local cluster: two nodes of one core each on
127.0.0.1, each with a data cache of its own, running a generic target whose run sleeps and prints
its score (so no core is burnt). The runs are confined as on the head (bubblewrap where it works)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import ray
from conftest import prepared_tiny_lab

from autoresearch import ray_backend, sandbox
from autoresearch.errors import NodeLost, NodeRefused, RayMissing, RayUnreachable
from autoresearch.execution import Job
from autoresearch.gitrepo import Git
from autoresearch.lab import find_lab, init_target
from autoresearch.procgroup import is_live

BENCH = '''import os, subprocess, sys, time
SECONDS = {seconds}
print("threads:", os.environ.get("OMP_NUM_THREADS"), os.environ.get("RAYON_NUM_THREADS"))
# a straggler in a session of its own: whatever ends the run must end it too
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)
time.sleep(SECONDS)
print("---")
print("score: {score}")
'''


# --- without a cluster ------------------------------------------------------------------------

def test_without_ray_the_error_says_how_to_install(monkeypatch: pytest.MonkeyPatch, target: dict[str, Any]) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(RayMissing) as err:
        ray_backend.RayCluster("auto", target["lab"])
    assert "pip install 'autoresearch[ray]'" in str(err.value) and "\n" not in str(err.value)


def test_an_unreachable_cluster_is_one_clear_error(monkeypatch: pytest.MonkeyPatch, target: dict[str, Any]) -> None:
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as if this process had not connected yet
    started = time.monotonic()
    with pytest.raises(RayUnreachable) as err:
        ray_backend.RayCluster("127.0.0.1:1", target["lab"])
    assert time.monotonic() - started < 10
    assert "127.0.0.1:1" in str(err.value) and "ray start --head" in str(err.value) and "--ray HOST:PORT" in str(err.value)


def test_plan_slots_one_per_gpu_else_by_cores() -> None:
    nodes = [
        {"NodeID": "bb" * 28, "NodeManagerAddress": "10.0.0.2", "Alive": True, "Resources": {"CPU": 16.0, "GPU": 2.0}},
        {"NodeID": "aa" * 28, "NodeManagerAddress": "10.0.0.10", "Alive": True, "Resources": {"CPU": 8.0}},
        {"NodeID": "cc" * 28, "NodeManagerAddress": "10.0.0.3", "Alive": False, "Resources": {"CPU": 8.0, "GPU": 8.0}},
    ]
    slots = ray_backend.plan_slots(nodes, "auto")
    assert [(s.name, s.node, s.gpu, s.cpus) for s, _ in slots] == [
        ("w0", "10.0.0.2", "0", None), ("w1", "10.0.0.2", "1", None), ("w2", "10.0.0.10", None, None)]
    assert [(p.num_gpus, p.num_cpus, p.threads) for _, p in slots] == [(1, 8, 8), (1, 8, 8), (0, 8, 8)]
    assert [s.node for s, _ in ray_backend.plan_slots(nodes, "gpu")] == ["10.0.0.2", "10.0.0.2"]  # a cuda lab
    by_cores = ray_backend.plan_slots(nodes, "cpu", cpus_per_worker=3)  # a cpu lab: GPUs unused
    assert [(s.node, p.num_cpus) for s, p in by_cores] == [("10.0.0.2", 3)] * 5 + [("10.0.0.10", 3)] * 2
    twins = [dict(nodes[1], NodeID=f"{c}" * 56, NodeManagerAddress="127.0.0.1") for c in "ef"]
    assert [s.node for s, _ in ray_backend.plan_slots(twins, "auto")] == ["127.0.0.1-eeeeee", "127.0.0.1-ffffff"]


def test_fingerprint_differences_name_what_differs() -> None:
    head = {"val split": "a" * 64, "tokenizer": "b" * 64, "torch": "2.13.0"}
    assert ray_backend.fingerprint_differences(head, dict(head)) == []
    assert ray_backend.fingerprint_differences(head, {"val split": "c" * 64, "tokenizer": "b" * 64}) == [
        "val split: head aaaaaaaa, node cccccccc", "torch: head 2.13.0, node missing"]


@pytest.mark.parametrize("mode", ["auto", "none", "unshare"])
def test_a_runs_sandbox_dies_with_the_process_that_started_it(mode: str, tmp_path: Path) -> None:
    """What ends a run whose Ray worker (or orchestrator) is killed: bwrap's --die-with-parent, the
    reaper's PR_SET_PDEATHSIG, or for unshare (root without bubblewrap) the shim that starts it with one."""
    if mode == "auto" and sandbox.bwrap_executable() is None and sandbox.unshare_executable() is not None:
        mode = "unshare"
    if mode == "unshare" and sandbox.unshare_executable() is None:
        pytest.skip("unshare cannot build the fallback here (needs Linux and root)")
    without_bwrap = "sandbox.bwrap_executable = lambda: None" if mode == "unshare" else ""
    mode = "auto" if mode == "unshare" else mode
    parent_code = f'''
import json, sys
from pathlib import Path
from autoresearch import runner, sandbox
{without_bwrap}
folder = Path(sys.argv[1])
code = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'], start_new_session=True); time.sleep(300)"
runner.run_experiment(runner.RunSpec(command=[sys.executable, "-c", code], cwd=folder, log_path=folder / "run.log",
                                     budget=300, sandbox={mode!r}, writable=(folder / "scratch",),
                                     on_start=lambda pid, pgid: print(json.dumps(pid), flush=True)))
'''
    parent = subprocess.Popen([sys.executable, "-c", parent_code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    pid = json.loads(parent.stdout.readline())
    tree = _tree_after(pid, 2)
    parent.kill()
    parent.wait()
    assert _gone(tree, 15) == []


# --- a local cluster -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A generic target lab with three commits: fast (3 s, score 1.5), slow (300 s), fast again (1.25).
    Its runs are sandboxed with bubblewrap where it works, else with the reaper alone ("none")."""
    repo = tmp_path_factory.mktemp("target")
    git = Git(repo)
    git.init()
    (repo / "bench.py").write_text(BENCH.format(seconds=3, score=1.5))
    git.commit_all("bench")
    lab = init_target(repo, run="python bench.py", editable=["bench.py"], metric="score", budget=30)
    if sandbox.bwrap_executable() is None:  # unshare (root) outlives a dead worker: the reaper alone does not
        toml = repo / "autoresearch.toml"
        toml.write_text(toml.read_text().replace('sandbox = "auto"', 'sandbox = "none"'))
        git.commit_all("sandbox none")
    commits = {"fast": git.head()}
    for name, seconds, score in (("slow", 300, 2.0), ("again", 3, 1.25)):
        (repo / "bench.py").write_text(BENCH.format(seconds=seconds, score=score))
        commits[name] = git.commit_all(name)
    return {"lab": find_lab(lab.root), "commits": commits}


class LocalCluster:
    """ray.cluster_utils.Cluster on 127.0.0.1, each node started with a cache of its own."""

    def __init__(self, root: Path) -> None:
        from ray.cluster_utils import Cluster

        self.root, self.caches = root, {}
        self.patch = pytest.MonkeyPatch()
        # Ray takes the machine's address for 127.0.0.1 unless it believes it is alone (as on macOS)
        self.patch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        self.patch.setattr(ray._private.ray_constants, "ENABLE_RAY_CLUSTER", False)
        self.cluster = self._started(lambda: Cluster(initialize_head=True, head_node_args={
            "num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False}), "head")
        self.add_node("second")

    def _started(self, start: Any, name: str) -> Any:
        cache = self.root / name
        with pytest.MonkeyPatch.context() as env:  # what the node's raylet, and so its workers, inherit
            for variable in [v for v in os.environ if v.startswith("AUTORESEARCH_")]:
                env.delenv(variable)
            env.setenv("AUTORESEARCH_CACHE", str(cache))
            env.setenv("AUTORESEARCH_DEVICE", "cpu")
            env.setenv("RAY_kill_child_processes_on_worker_exit", "0")  # our own mechanisms, not Ray's, end runs
            started = start()
        node = started.head_node if name == "head" else started
        self.caches[node.node_id] = cache
        return started

    def add_node(self, name: str) -> Any:
        return self._started(lambda: self.cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1"), name)

    def shutdown(self) -> None:
        self.cluster.shutdown()
        self.patch.undo()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    local = LocalCluster(tmp_path_factory.mktemp("nodes"))
    yield local
    local.shutdown()


@pytest.fixture(scope="module")
def backend(cluster: LocalCluster, target: dict[str, Any]) -> Iterator[ray_backend.RayCluster]:
    with ray_backend.RayCluster(cluster.cluster.address, target["lab"]) as connected:
        yield connected


def node_dir(cluster: LocalCluster, backend: ray_backend.RayCluster, slot: Any) -> Path:
    return cluster.caches[backend._place(slot).node_id] / "ray" / backend.id


def _tree_after(pid: int, seconds: float) -> list[psutil.Process]:
    """The process and its descendants once the run had `seconds` to start its own."""
    time.sleep(seconds)
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def _gone(processes: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Those still alive after `timeout` seconds (zombies count as gone)."""
    deadline = time.monotonic() + timeout
    while (alive := [p for p in processes if is_live(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    for p in alive:  # never leave them behind
        p.kill()
    return alive


class Started:
    """on_start for run(): the node, pid and process group it reports, and when."""

    def __init__(self) -> None:
        self.event, self.at = threading.Event(), 0.0
        self.node, self.pid, self.pgid = "", 0, 0

    def __call__(self, node: str, pid: int, pgid: int) -> None:
        self.node, self.pid, self.pgid, self.at = node, pid, pgid, time.monotonic()
        self.event.set()

    def wait(self, thread: threading.Thread, timeout: float = 120) -> bool:
        """True once the run started; False when run() ended first or the time is up."""
        deadline = time.monotonic() + timeout
        while not self.event.wait(0.2) and thread.is_alive() and time.monotonic() < deadline:
            pass
        return self.event.is_set()


def in_thread(call: Any) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def body() -> None:
        try:
            out["fields"] = call()
        except BaseException as exc:  # noqa: BLE001 - the test looks at it
            out["error"] = exc
        out["ended"] = time.monotonic()

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread, out


@pytest.mark.slow
def test_slots_are_one_worker_per_node(backend: ray_backend.RayCluster) -> None:
    slots = backend.slots()
    assert [s.name for s in slots] == ["w0", "w1"]
    assert len({s.node for s in slots}) == 2 and all(s.node.startswith("127.0.0.1-") for s in slots)
    assert all(s.gpu is None and s.cpus is None for s in slots) and [backend.cores(s) for s in slots] == [1, 1]
    assert backend.slots() == slots  # a stable order


@pytest.mark.slow
def test_nodes_with_our_code_pass_and_a_generic_target_has_no_data(backend: ray_backend.RayCluster,
                                                                     target: dict[str, Any]) -> None:
    assert backend.check_nodes(None) == {}
    head = ray_backend.fingerprints(target["lab"].config)
    assert list(head) == ["autoresearch"]
    assert set(backend.check_nodes(head)) == {s.node for s in backend.slots()}
    with pytest.raises(NodeRefused) as err:
        backend.check_nodes({"autoresearch": "0" * 64})
    assert "refused" in str(err.value) and "autoresearch: head 00000000" in str(err.value)
    assert any(s.node in str(err.value) for s in backend.slots())


@pytest.mark.slow
def test_one_job_per_node_at_once(backend: ray_backend.RayCluster, cluster: LocalCluster,
                                  target: dict[str, Any], tmp_path: Path) -> None:
    slots, commit = backend.slots(), target["commits"]["fast"]
    started = {slot.name: Started() for slot in slots}
    runs = {slot.name: in_thread(lambda slot=slot, i=i: backend.run(
        slot, Job(1 + i, "t1", commit, None, 30.0), tmp_path / f"{1 + i:05d}.log", on_start=started[slot.name]))
        for i, slot in enumerate(slots)}
    for thread, _ in runs.values():
        thread.join(180)
    for i, slot in enumerate(slots):
        out = runs[slot.name][1]
        assert "error" not in out, out.get("error")
        fields = out["fields"]
        assert fields["outcome"] == "ok", fields
        assert fields["metric"] == 1.5 and fields["node"] == slot.node and started[slot.name].node == slot.node
        text = (tmp_path / f"{1 + i:05d}.log").read_text()
        assert "score: 1.5" in text and "threads: 1 1" in text  # every pool sized to the slot's one core
        assert list((node_dir(cluster, backend, slot) / "running").glob("*")) == []  # the marker went with the run
    first, second = slots  # both ran at once
    times = {name: (started[name].at, out["ended"]) for name, (_, out) in runs.items()}
    assert times[first.name][0] < times[second.name][1] and times[second.name][0] < times[first.name][1], times


@pytest.mark.slow
def test_a_child_commit_travels_thin_and_a_wiped_node_gets_everything(backend: ray_backend.RayCluster,
                                                                       cluster: LocalCluster, target: dict[str, Any],
                                                                       tmp_path: Path) -> None:
    slot, commits = backend.slots()[0], target["commits"]
    place = backend._place(slot)
    assert backend.run(slot, Job(4, "t1", commits["fast"], None, 30.0), tmp_path / "4.log")["outcome"] == "ok"
    assert backend._bundle(place.node_id, commits["fast"], False) is None  # it ran there: nothing to send
    thin = backend._bundle(place.node_id, commits["again"], False)
    assert thin is not None and len(thin) < len(backend._bundle(place.node_id, commits["again"], True) or b"")
    shutil.rmtree(node_dir(cluster, backend, slot) / "repo.git")  # the node lost its copy (worktrees' admin too)
    fields = backend.run(slot, Job(5, "t1", commits["again"], commits["slow"], 30.0), tmp_path / "5.log")
    assert fields["outcome"] == "ok" and fields["metric"] == 1.25, fields


@pytest.mark.slow
def test_cancel_ends_the_run_and_everything_it_started(backend: ray_backend.RayCluster, cluster: LocalCluster,
                                                       target: dict[str, Any], tmp_path: Path) -> None:
    slot, cancel, started = backend.slots()[1], threading.Event(), Started()
    thread, out = in_thread(lambda: backend.run(slot, Job(6, "t1", target["commits"]["slow"], None, 30.0),
                                                tmp_path / "6.log", on_start=started, cancel=cancel))
    assert started.wait(thread), out
    tree = _tree_after(started.pid, 2)
    cancel.set()
    thread.join(60)
    assert out.get("fields") == {"outcome": "killed", "reason": "abandoned: stopped by Ctrl-C", "node": slot.node}, out
    assert _gone(tree, 10) == []
    assert list((node_dir(cluster, backend, slot) / "running").glob("*")) == []


@pytest.mark.slow
def test_a_failing_on_start_ends_the_run_it_reports(backend: ray_backend.RayCluster, target: dict[str, Any],
                                                    tmp_path: Path) -> None:
    seen: list[int] = []

    def on_start(node: str, pid: int, pgid: int) -> None:
        seen.extend(p.pid for p in _tree_after(pid, 2))
        raise RuntimeError("the ledger is locked")

    with pytest.raises(RuntimeError, match="the ledger is locked"):
        backend.run(backend.slots()[1], Job(9, "t1", target["commits"]["slow"], None, 30.0), tmp_path / "9.log",
                    on_start=on_start)
    assert seen and _gone([psutil.Process(pid) for pid in seen if psutil.pid_exists(pid)], 10) == []


@pytest.mark.slow
def test_a_killed_worker_is_a_lost_node_and_leaves_nothing_running(backend: ray_backend.RayCluster,
                                                                    target: dict[str, Any], tmp_path: Path) -> None:
    slot, started = backend.slots()[0], Started()
    thread, out = in_thread(lambda: backend.run(slot, Job(7, "t1", target["commits"]["slow"], None, 30.0),
                                                tmp_path / "7.log", on_start=started))
    assert started.wait(thread), out
    tree = _tree_after(started.pid, 2)
    os.kill(psutil.Process(started.pid).ppid(), signal.SIGKILL)  # the Ray worker running the task
    thread.join(60)
    assert isinstance(out.get("error"), NodeLost), out
    assert slot.node in str(out["error"]) and "killed" in str(out["error"])
    assert _gone(tree, 15) == []


@pytest.mark.slow
def test_cleanup_ends_orphans_and_leaves_live_runs_alone(backend: ray_backend.RayCluster, cluster: LocalCluster) -> None:
    running = node_dir(cluster, backend, backend.slots()[0]) / "running"
    running.mkdir(parents=True, exist_ok=True)
    here = {"host": ray_backend.socket.gethostname(), "boot": psutil.boot_time()}
    gone_worker = subprocess.Popen(["true"])
    gone_worker.wait()
    groups = {}
    for name, worker in (("orphan", gone_worker.pid), ("live", os.getpid())):
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)
        groups[name] = proc
        (running / f"0009{len(groups)}-{name}.json").write_text(json.dumps({
            "eid": 90 + len(groups), "tag": "t1", "pid": proc.pid, "pgid": proc.pid,
            "started_at": psutil.Process(proc.pid).create_time(), "worker": worker,
            "worker_started": psutil.Process(worker).create_time() if worker == os.getpid() else 0, **here}))
    try:
        assert backend.cleanup() == 1
        assert groups["orphan"].wait(10) is not None and groups["live"].poll() is None
        assert [p.name for p in running.glob("*")] == ["00092-live.json"]
        assert backend.cleanup(tag="t1") == 1  # the caller holds t1's lock: every run of t1 is left over
        assert groups["live"].wait(10) is not None and list(running.glob("*")) == []
    finally:
        for proc in groups.values():
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_a_node_whose_data_differs_is_refused(backend: ray_backend.RayCluster, tmp_path: Path) -> None:
    lab = find_lab(prepared_tiny_lab(tmp_path, Path(os.environ["AUTORESEARCH_CACHE"])))
    head = ray_backend.fingerprints(lab.config)
    assert {"val split", "test split", "train split", "tokenizer", "dataset"} <= set(head)
    tiny = ray_backend.RayCluster(backend.address, lab)  # this process is connected already: reused
    try:
        assert set(tiny.check_nodes(head)) == {s.node for s in tiny.slots()}  # each node prepared the same data
        with pytest.raises(NodeRefused) as err:
            tiny.check_nodes(dict(head, **{"val split": "f" * 64}))
        message = str(err.value)
        assert "val split: head ffffffff, node " in message and any(s.node in message for s in tiny.slots())
    finally:
        tiny.close()
    assert ray.is_initialized()


@pytest.mark.slow
def test_a_node_removed_mid_run_is_lost(backend: ray_backend.RayCluster, cluster: LocalCluster,
                                        target: dict[str, Any], tmp_path: Path) -> None:
    node = cluster.add_node("third")
    slot = next(s for s in backend.slots() if backend._place(s).node_id == node.node_id)
    started = Started()
    thread, out = in_thread(lambda: backend.run(slot, Job(8, "t1", target["commits"]["slow"], None, 30.0),
                                                tmp_path / "8.log", on_start=started))
    assert started.wait(thread), out
    tree = _tree_after(started.pid, 2)
    cluster.cluster.remove_node(node, allow_graceful=False)
    thread.join(90)
    assert isinstance(out.get("error"), NodeLost) and slot.node in str(out["error"]), out
    assert _gone(tree, 15) == []
