"""Experiments on a Ray cluster: one Ray task per GPU of every node (or per share of a CPU node's
cores), each running our own runner, sandbox and trusted evaluator there (execution.run_job).

    cluster = RayCluster("auto", lab)              # or "HOST:PORT"; `ray start --head` made the cluster
    cluster.cleanup(tag)                           # what a killed head left running (hold the tag's lock)
    cluster.check_nodes(fingerprints(lab.config))  # every node prepares the data; it must be the head's
    for slot in cluster.slots(): ...               # one worker thread each, calling
    fields = cluster.run(slot, job, log, on_start, cancel)

Nodes are trusted, the code under study is not: on the node it is confined exactly as on the head.
The head stays the only writer of the ledger and of git. What travels:

- the commit, as a git bundle made from a scratch repository that borrows the lab's objects
  (`alternates`), so the lab's own refs are never touched. A node keeps one bare repository per lab
  under `<cache>/ray/<lab id>/` (its own AUTORESEARCH_CACHE, as `ray start` saw it) and fetches
  bundles into it; the head remembers which commits each node has, so a bundle carries only what is
  new (a node that lost them gets the whole history once). Each slot has its worktree there, made
  with `git worktree add --detach` and reused;
- back: run_job's fields, the run's log (already capped by the runner) and the model copy the trusted
  evaluator scored (up to MODEL_LIMIT; a larger one stays behind and `model_note` says so). The head
  writes the log where it was asked to and the model to `lab.state_dir/models/<id>.pt2`, as a local
  run would have; the node deletes its copies.

Shares. A GPU slot asks Ray for one GPU (and the node's CPUs divided by its GPUs); which physical GPU
it gets is Ray's choice (CUDA_VISIBLE_DEVICES in the task), so `Slot.gpu` on the head is the slot's
index on its node, not a promise of that device. A CPU slot asks for `cpus_per_worker` cores. Ray
counts cores, it does not bind them, so a node-side run is not pinned to cores (`Slot.cpus` is None
on both sides): instead every thread pool of the run and its evaluator is sized to the task's share
(execution.THREAD_VARIABLES, the same variables a local core-bound worker gets), and Ray never
schedules more shares on a node than it has cores. `RayCluster.cores(slot)` is that share, for
telling regimes apart: runs on slots of different shares are not comparable.

Orphans. A run leads its own process group (the runner starts it in a new session) and its sandbox
wrapper dies with the worker that started it (bwrap --die-with-parent; the reaper's
PR_SET_PDEATHSIG). `unshare` does not, so besides that every run leaves a marker on its node,
`<cache>/ray/<lab id>/running/<id>-<attempt>.json` (its pid, process group and start time, and the
Ray worker running it), removed when the run ends; `cleanup()` ends every group whose worker is gone.

Not carried to nodes (yet): torch.compile's champion cache (compile_cache.py). A node's runs start
from an empty one, so a CUDA run there compiles from cold, inside its budget.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import queue
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from . import settings
from .config import LabConfig
from .errors import (
    AutoresearchError,
    ConfigError,
    GitError,
    NodeLost,
    NodeRefused,
    RayMissing,
    RayUnreachable,
)
from .execution import THREAD_VARIABLES, Job, Slot, run_job
from .gitrepo import Git
from .lab import Lab
from .measurement import model_copy
from .procgroup import group_alive, kill_group
from .recovery import group_is_from

NAMESPACE = "autoresearch"
MODEL_LIMIT = 2 * 2**30  # the largest model copy that comes back from a node
CANCEL_GRACE = 10.0  # seconds a cancelled task has to end its run (the runner's SIGTERM grace is 3 s)
CLEANUP_TIMEOUT = 30.0
_POLL = 0.25  # seconds between looks at a running task and the cancel event
_NEGATIVE_REVS = 64  # commits a node is known to have that a bundle may leave out
_INSTALL_HINT = "pip install 'autoresearch[ray]'"

OnStart = Callable[[str, int, int], None]  # (node, pid, pgid): the node's numbers, never the head's


class _MissingCommits(AutoresearchError):
    """The node lacks the commits a bundle builds on (its cache was removed): send the whole history."""


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise RayMissing("--ray needs Ray, which is not installed", _INSTALL_HINT) from None
    return ray


# --- what the head plans ------------------------------------------------------------------------

@dataclass(frozen=True)
class Placement:
    """Where a slot's tasks run and what each asks Ray for."""

    node_id: str
    node: str  # the label: IP, or IP-<short node id> when nodes share an IP
    num_gpus: int
    num_cpus: float
    threads: int | None  # the size of every thread pool of a run (None: left alone)


def plan_slots(nodes: Iterable[Mapping[str, Any]], kind: str,
               cpus_per_worker: int | None = None) -> list[tuple[Slot, Placement]]:
    """The workers of a cluster from `ray.nodes()`, named w0, w1, ... in a stable order (by IP, then
    node id). `kind`: "gpu" one per GPU of each GPU node (a cuda lab: CPU-only nodes give none);
    "cpu" workers of `cpus_per_worker` cores on every node (default: all of a node's, one worker);
    "auto" (a generic target) one per GPU where a node has GPUs, else by cores."""
    alive = [n for n in nodes if n.get("Alive")]
    shared = Counter(n["NodeManagerAddress"] for n in alive)
    planned: list[tuple[Slot, Placement]] = []
    for n in sorted(alive, key=_node_order):
        ip, node_id = n["NodeManagerAddress"], n["NodeID"]
        label = ip if shared[ip] == 1 else f"{ip}-{node_id[:6]}"
        resources = n.get("Resources") or {}
        gpus, cpus = int(resources.get("GPU", 0)), float(resources.get("CPU", 0))
        if kind != "cpu" and gpus:
            share = int(cpus // gpus)
            for index in range(gpus):
                planned.append((Slot(f"w{len(planned)}", label, str(index)),
                                Placement(node_id, label, 1, share, share or None)))
        elif kind != "gpu":
            per = cpus_per_worker or int(cpus)
            for _ in range(int(cpus) // per if per > 0 else 0):
                planned.append((Slot(f"w{len(planned)}", label), Placement(node_id, label, 0, per, per)))
    return planned


def _node_order(node: Mapping[str, Any]) -> tuple[Any, ...]:
    ip = node["NodeManagerAddress"]
    try:
        address = ipaddress.ip_address(ip)
        return (address.version, int(address), node["NodeID"])
    except ValueError:
        return (99, 0, ip, node["NodeID"])


def _kind(config: LabConfig) -> str:
    if config.task is None:
        return "auto"
    from .devices import lab_device
    from .presets import get_preset

    return "gpu" if lab_device(get_preset(config.task.preset).device) == "cuda" else "cpu"


def lab_id(lab: Lab) -> str:
    """The name of a lab on the nodes: its folder name and a hash of where it lives on the head."""
    where = f"{socket.gethostname()}:{lab.root.resolve()}"
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", lab.root.name).strip(".-") or "lab"
    return f"{name[:40]}-{hashlib.sha256(where.encode()).hexdigest()[:12]}"


# --- what must be the same on every node -----------------------------------------------------------

def code_digest() -> str:
    """sha256 over this package's sources (the runner, sandbox, evaluator and template)."""
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts
                       and p.suffix in (".py", ".md", ".toml", "") and not p.name.startswith(".")):
        digest.update(f"{path.relative_to(root).as_posix()}\0".encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def fingerprints(config: LabConfig) -> dict[str, str]:
    """What a node must share with the head for its runs to count beside the head's: this package's
    sources and, for a lab with a [task], the prepared data as its manifest records it (the
    dataset, each split's fingerprint, the tokenizer's hashes, the number of training shards) and
    torch's version. DataNotPrepared when the head itself has not prepared it."""
    found = {"autoresearch": code_digest()}
    if config.task is not None:
        from .data import load_prepared

        found.update(_data_fingerprints(load_prepared(config.task.dataset, config.task.vocab_size)))
    return found


def _data_fingerprints(data: Any) -> dict[str, str]:
    from importlib import metadata

    tokenizer = data.manifest["tokenizers"][str(data.vocab_size)]
    found = {"dataset": str(data.manifest.get("dataset")), "train shards": str(len(data.files("train"))),
             "tokenizer": tokenizer["sha256"], "token bytes": tokenizer["token_bytes_sha256"]}
    found.update({f"{split} split": data.fingerprint(split) for split in ("train", "val", "test")})
    try:
        found["torch"] = metadata.version("torch")
    except metadata.PackageNotFoundError:
        found["torch"] = "not installed"
    return found


def fingerprint_differences(head: Mapping[str, str], node: Mapping[str, str]) -> list[str]:
    """What differs, one phrase per key of the head's: `val split: head 9815a362, node 12ab34cd`."""
    def short(value: str | None) -> str:
        if value is None:
            return "missing"
        return value[:8] if re.fullmatch(r"[0-9a-f]{64}", value) else value

    return [f"{key}: head {short(value)}, node {short(node.get(key))}"
            for key, value in head.items() if node.get(key) != value]


# --- the node's side ---------------------------------------------------------------------------

class _NodeLab:
    """A lab's home on a node: `<cache>/ray/<lab id>/` with `repo.git` (bare, fed by bundles), the
    lab's state directory `.autoresearch/` (worktrees, scratch, logs, models: hidden from runs as on
    the head) and `running/` (one marker per run in progress)."""

    def __init__(self, lab_name: str, config: LabConfig) -> None:
        self.dir = settings.cache_dir() / "ray" / lab_name
        self.repo = self.dir / "repo.git"
        self.running = self.dir / "running"
        self.lab = Lab(self.dir, config)
        self.git = Git(self.repo)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """One git operation at a time on the node's repository (slots share it)."""
        with _flock(self.dir / ".lock"):
            yield

    def receive(self, commit: str, bundle: bytes | None) -> None:
        """Make `commit` exist in the repository, from `bundle`. _MissingCommits when there is no
        bundle, or it builds on commits the repository lacks."""
        with self.locked():
            if not (self.repo / "HEAD").is_file():
                self.repo.mkdir(parents=True, exist_ok=True)
                self.git.run("init", "-q", "--bare")
            if self._has(commit):
                return
            if bundle is None:
                raise _MissingCommits(f"the node lacks commit {commit[:12]}")
            incoming = self.dir / "incoming" / f"{commit}-{uuid.uuid4().hex[:8]}.bundle"
            incoming.parent.mkdir(parents=True, exist_ok=True)
            incoming.write_bytes(bundle)
            try:
                check = subprocess.run(self.git.argv("bundle", "verify", str(incoming)), cwd=self.repo,
                                       capture_output=True, text=True, check=False)
                if check.returncode != 0:
                    if "prerequisite" in check.stderr:  # (`verify -q` would not say so)
                        raise _MissingCommits(f"the node lacks the commits the bundle of {commit[:12]} builds on")
                    raise GitError(f"the bundle of {commit[:12]} is unusable: {check.stderr.strip()[-300:]}")
                self.git.run("fetch", "-q", str(incoming), "+refs/ship/*:refs/ship/*")
            finally:
                incoming.unlink(missing_ok=True)

    def _has(self, commit: str) -> bool:
        return subprocess.run(self.git.argv("cat-file", "-e", f"{commit}^{{commit}}"), cwd=self.repo,
                              capture_output=True, check=False).returncode == 0

    def worktree(self, tag: str, worker: str, commit: str) -> tuple[Git, Path]:
        """The slot's worktree (made once, then reused) and its Git."""
        path = self.lab.worktree(tag, worker)
        with self.locked():
            try:
                return self.git.worktree(path), path
            except GitError:
                shutil.rmtree(path, ignore_errors=True)
                path.parent.mkdir(parents=True, exist_ok=True)
                self.git.add_worktree(path, commit)
                return self.git.worktree(path), path

    def forget(self, eid: int) -> None:
        """A run's files on the node, once they came back (or the run was abandoned)."""
        scratch = self.lab.scratch(eid)
        shutil.rmtree(scratch, ignore_errors=True)
        model_copy(scratch).unlink(missing_ok=True)
        (self.lab.logs / f"{eid:05d}.log").unlink(missing_ok=True)


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@dataclass(frozen=True)
class _NodeSlot(Slot):
    """The slot as run_job sees it on the node: no cores of its own (Ray does not bind them), but
    every thread pool sized to the task's share, as a core-bound local worker's would be."""

    threads: int | None = None

    def env(self) -> dict[str, str]:
        return {} if self.threads is None else {name: str(self.threads) for name in THREAD_VARIABLES}


def _identity() -> dict[str, Any]:
    return {"host": socket.gethostname(), "boot": psutil.boot_time()}


def _started(pid: int) -> float | None:
    """When process `pid` started (None: there is none)."""
    if pid <= 0:
        return None
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(data), encoding="utf-8")
    os.replace(partial, path)


def _run_on_node(lab_name: str, config: LabConfig, slot: Slot, threads: int | None, job: Job,
                 bundle: bytes | None) -> Iterator[dict[str, Any]]:
    """The Ray task (a streaming generator): yields {"started": (pid, pgid)} once the run is spawned,
    then {"fields": ..., "log": bytes, "model": bytes | None, "model_note": str | None}.

    run_job runs in a thread so that this generator can report the start; a cancel (Ray raises
    KeyboardInterrupt here) makes the run's next tick raise KeyboardInterrupt in that thread, and
    the runner then ends the run's whole tree as on a local Ctrl-C."""
    import ray

    node = _NodeLab(lab_name, config)
    node.receive(job.commit, bundle)
    gpus = ray.get_runtime_context().get_accelerator_ids().get("GPU") or []
    run_slot = _NodeSlot(slot.name, slot.node, gpus[0] if gpus and slot.gpu is not None else None, None, threads)
    wt, worktree = node.worktree(job.tag, slot.name, job.commit)
    log = node.lab.logs / f"{job.eid:05d}.log"
    marker = node.running / f"{job.eid:05d}-{uuid.uuid4().hex[:8]}.json"
    events: queue.Queue[tuple[str, Any]] = queue.Queue()
    abort = threading.Event()

    def check(*_: object) -> None:
        if abort.is_set():
            raise KeyboardInterrupt

    def on_start(pid: int, pgid: int) -> None:
        check()
        _write_json(marker, {"eid": job.eid, "tag": job.tag, "pid": pid, "pgid": pgid, "started_at": _started(pid),
                             "worker": os.getpid(), "worker_started": _started(os.getpid()), **_identity()})
        events.put(("started", (pid, pgid)))

    def work() -> None:
        try:
            events.put(("fields", run_job(node.lab, wt, worktree, run_slot, job, log, on_start, check)))
        except BaseException as exc:  # noqa: BLE001 - handed to the task's thread, which raises it
            events.put(("error", exc))

    thread = threading.Thread(target=work, name=f"autoresearch-{slot.name}", daemon=True)
    thread.start()
    try:
        while True:
            try:
                kind, value = events.get(timeout=_POLL)
            except queue.Empty:
                continue
            if kind == "started":
                yield {"started": value}
            elif kind == "error":
                raise value
            else:
                fields = value
                break
        copy = model_copy(node.lab.scratch(job.eid))
        model, note = None, None
        if copy.is_file():
            size = copy.stat().st_size
            if size <= MODEL_LIMIT:
                model = copy.read_bytes()
            else:
                note = (f"the model copy ({size / 2**30:.2f} GiB) is over the {MODEL_LIMIT / 2**30:g} GiB a node "
                        "sends back: it was not kept")
        yield {"fields": fields, "log": log.read_bytes() if log.is_file() else b"", "model": model, "model_note": note}
    finally:
        if thread.is_alive():  # cancelled, or the generator closed: end the run first
            abort.set()
            thread.join()
        marker.unlink(missing_ok=True)
        node.forget(job.eid)


def _check_node(config: LabConfig, head: Mapping[str, str]) -> dict[str, Any]:
    """The Ray task that makes a node ready: prepare the lab's data as `autoresearch prepare` does
    (for a cuda lab also FlashAttention-3 and the CUDA preflight, in processes of their own so this
    worker never holds the GPU), and return its fingerprints and a note."""
    found = {"autoresearch": code_digest()}
    notes: list[str] = []
    task = config.task
    if task is not None:
        from .data import prepare_dataset

        shards = head.get("train shards")
        num_shards = int(shards) if task.dataset.strip() == "climbmix" and shards and shards.isdigit() else None
        with _flock(settings.cache_dir() / "ray" / "prepare.lock"):  # nodes may share one cache
            data = prepare_dataset(task.dataset, task.vocab_size, num_shards=num_shards)
        found.update(_data_fingerprints(data))
        if _kind(config) == "gpu":
            notes += _ready_gpu(config)
    return {"fingerprints": found, "note": "; ".join(notes)}


def _ready_gpu(config: LabConfig) -> list[str]:
    import ray

    from .gpus import preflight, run_device

    gpus = ray.get_runtime_context().get_accelerator_ids().get("GPU") or []
    device = run_device(config, gpu=gpus[0] if gpus else None)
    probe = ("from autoresearch.attention_kernels import fetch_flash_attention as f; "
             "print(f(lambda line: None), flush=True)")
    proc = subprocess.run([sys.executable, "-c", probe], env={**os.environ, **device.env}, capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=1800, check=False)
    lines = proc.stdout.strip().splitlines()
    found = preflight(device)
    return [lines[-1] if lines else f"attention: sdpa (the fetch failed: {proc.stderr.strip()[-200:]})",
            f"GPU {found.get('name', '?')}"]


def _cleanup_node(lab_name: str, config: LabConfig, tag: str | None) -> int:
    """The Ray task that ends what runs of this lab left on this node: every process group a marker
    names whose Ray worker is gone (or whose tag is `tag`: the caller holds that tag's lock, so no
    live head runs it), when its process is still the one the marker saw start."""
    node = _NodeLab(lab_name, config)
    here, ended = _identity(), 0
    with _flock(node.dir / ".cleanup.lock"):
        for path in sorted(node.running.glob("*.json")):
            try:
                marker = json.loads(path.read_text(encoding="utf-8"))
                pid, pgid, started = int(marker["pid"]), int(marker["pgid"]), marker.get("started_at")
            except (OSError, ValueError, KeyError, TypeError):
                path.unlink(missing_ok=True)
                continue
            if marker.get("host") != here["host"]:
                continue  # another machine's run, in a cache both mount
            if abs(float(marker.get("boot") or 0) - here["boot"]) < 5:
                worker = _started(int(marker.get("worker") or 0))
                live = worker is not None and abs(worker - float(marker.get("worker_started") or 0)) < 1
                if live and marker.get("tag") != tag:
                    continue  # a run in progress
                same = _started(pid)
                if group_alive(pgid) and ((same is not None and started is not None and abs(same - started) < 1)
                                          or group_is_from(pgid, started)):
                    with contextlib.suppress(ValueError, psutil.Error):
                        kill_group(pgid)
                        ended += 1
            path.unlink(missing_ok=True)
            with contextlib.suppress(KeyError, TypeError, ValueError):
                node.forget(int(marker["eid"]))
    return ended


# --- the head's side ---------------------------------------------------------------------------

class RayCluster:
    """A Ray cluster as the lab's workers. Thread-safe: the scheduler calls `run` from one thread per
    slot. Connects on creation (and disconnects on `close` if it did)."""

    def __init__(self, address: str, lab: Lab, cpus_per_worker: int | None = None) -> None:
        ray = _ray()
        if cpus_per_worker is not None and cpus_per_worker < 1:
            raise ConfigError(f"cpus per worker must be at least 1, not {cpus_per_worker}")
        self.ray, self.lab, self.cpus_per_worker = ray, lab, cpus_per_worker
        self.address = address
        self.id = lab_id(lab)
        self.connected = False
        if not ray.is_initialized():
            _probe(ray, address)
            try:
                ray.init(address=address, namespace=NAMESPACE, log_to_driver=False, ignore_reinit_error=True)
            except (ConnectionError, TimeoutError, RuntimeError) as exc:
                raise _unreachable(address, str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__) from None
            self.connected = True
        self._tasks = {fn.__name__: ray.remote(fn) for fn in (_run_on_node, _check_node, _cleanup_node)}
        self._places: dict[Slot, Placement] = {}  # every slot handed out, kept when its node goes
        self._shipped: dict[str, list[str]] = {}  # node id -> commits it has, oldest first
        self._lock = threading.Lock()
        self._scratch: Path | None = None  # the repository bundles are made from

    # -- workers --------------------------------------------------------------------------------

    def slots(self) -> list[Slot]:
        """The cluster's workers now (alive nodes): see plan_slots. A slot handed out earlier keeps
        its node, even when a later call numbers the workers differently."""
        planned = plan_slots(self.ray.nodes(), _kind(self.lab.config), self.cpus_per_worker)
        with self._lock:
            self._places.update(planned)
        return [slot for slot, _ in planned]

    def cores(self, slot: Slot) -> float:
        """The CPU share (Ray's num_cpus) every run of `slot` gets."""
        return self._place(slot).num_cpus

    def _place(self, slot: Slot) -> Placement:
        with self._lock:
            place = self._places.get(slot)
        if place is None:
            self.slots()
            place = self._places.get(slot)
        if place is None:
            raise AutoresearchError(f"no worker {slot.name} ({slot.describe()}) on the Ray cluster",
                                    "use the slots that slots() returns")
        return place

    def _options(self, node_id: str, **resources: Any) -> dict[str, Any]:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        return dict(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False), max_retries=0,
                    retry_exceptions=False, **resources)

    def _alive(self) -> set[str]:
        """The ids of the nodes Ray counts as alive."""
        return {n["NodeID"] for n in self.ray.nodes() if n.get("Alive")}

    # -- the data -------------------------------------------------------------------------------

    def check_nodes(self, head_fingerprints: Mapping[str, str] | None) -> dict[str, str]:
        """Make every node with a worker ready and check it against the head: it prepares the lab's
        data (a lab with a [task]; once, at the start), and its fingerprints must equal
        `head_fingerprints` (from `fingerprints(lab.config)`), or NodeRefused names the node and what
        differs. None: nothing to check. Returns each node's note (for a cuda lab: attention kernel
        and GPU)."""
        if not head_fingerprints:
            return {}
        current = self.slots()
        nodes = {place.node_id: place for place in map(self._place, current)}
        pending = {}
        for node_id, place in nodes.items():
            gpu = {"num_gpus": 1} if place.num_gpus and _kind(self.lab.config) == "gpu" else {}
            task = self._tasks["_check_node"].options(**self._options(node_id, num_cpus=0, **gpu))
            pending[place.node] = task.remote(self.lab.config, dict(head_fingerprints))
        notes = {}
        for label, ref in pending.items():
            try:
                answer = self.ray.get(ref)
            except Exception as exc:  # sorted out by _failure
                cause = self._failure(exc, label)
                if isinstance(cause, NodeLost):
                    raise cause from exc
                raise NodeRefused(label, f"it could not be made ready: {cause}",
                                  getattr(cause, "hint", None)) from exc
            differences = fingerprint_differences(head_fingerprints, answer["fingerprints"])
            if differences:
                raise NodeRefused(label, "its runs would not be comparable with the head's: " + "; ".join(differences))
            notes[label] = answer["note"]
        return notes

    # -- one run ------------------------------------------------------------------------------

    def run(self, slot: Slot, job: Job, log: Path, on_start: OnStart | None = None,
            cancel: threading.Event | None = None) -> dict[str, Any]:
        """Run `job` on `slot`'s node and wait for it (call it from the slot's thread). Returns
        run_job's fields with `node` added (and `model_note` when the model copy did not come back);
        writes the run's log to `log` and the model copy to the head's `models/<id>.pt2`.

        `on_start(node, pid, pgid)` once the run is spawned: the node's numbers, so never end that
        group on the head (cleanup() ends what a node kept). `cancel` set: the run is ended (Ctrl-C
        reaches run_job, then the task is killed after CANCEL_GRACE) and the result is
        {"outcome": "killed", "reason": "abandoned: stopped by Ctrl-C"}. NodeLost when the node dies
        or the task's worker is killed; our own failure on the node is re-raised here."""
        place = self._place(slot)
        for whole in (False, True):
            bundle = self._bundle(place.node_id, job.commit, whole)
            try:
                return self._run(place, slot, job, log, bundle, on_start, cancel)
            except _MissingCommits:
                if whole:
                    raise
                with self._lock:
                    self._shipped.pop(place.node_id, None)
        raise AssertionError("unreachable")

    def _run(self, place: Placement, slot: Slot, job: Job, log: Path, bundle: bytes | None,
             on_start: OnStart | None, cancel: threading.Event | None) -> dict[str, Any]:
        task = self._tasks["_run_on_node"].options(num_returns="streaming", **self._options(
            place.node_id, num_cpus=place.num_cpus, num_gpus=place.num_gpus))
        stream = task.remote(self.id, self.lab.config, slot, place.threads, job, bundle)
        try:
            event = self._follow(stream, place, job, on_start, cancel)
        except BaseException:  # an error of ours, or of on_start: the run must not go on without us
            with contextlib.suppress(Exception):
                self._abandon(stream, place)
            raise
        if event is None:
            return {"outcome": "killed", "reason": "abandoned: stopped by Ctrl-C", "node": place.node}
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_bytes(event["log"])
        if event["model"] is not None:
            target = model_copy(self.lab.scratch(job.eid))
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(f".{target.name}.partial")
            partial.write_bytes(event["model"])
            os.replace(partial, target)
        fields = dict(event["fields"], node=place.node)
        if event["model_note"]:
            fields["model_note"] = event["model_note"]
        return fields

    def _follow(self, stream: Any, place: Placement, job: Job, on_start: OnStart | None,
                cancel: threading.Event | None) -> dict[str, Any] | None:
        """The task's events up to its result (None: cancelled, and the task ended)."""
        ray = self.ray
        while True:
            if cancel is not None and cancel.is_set():
                self._abandon(stream, place)
                return None
            try:
                ready, _ = ray.wait([stream], timeout=_POLL)
                if not ready:
                    continue
                event: dict[str, Any] = ray.get(next(stream))
            except StopIteration:
                raise AutoresearchError(f"the Ray task of experiment {job.eid} on {place.node} ended without a result") from None
            except Exception as exc:  # sorted out by _failure
                raise self._failure(exc, place.node, place.node_id) from exc
            if "started" not in event:
                return event
            with self._lock:  # the node has the commit now
                known = self._shipped.setdefault(place.node_id, [])
                if job.commit not in known:
                    known.append(job.commit)
            if on_start is not None:
                on_start(place.node, *event["started"])

    def _failure(self, exc: BaseException, node: str, node_id: str | None = None) -> BaseException:
        """What a failed task means here: NodeLost for a dead node or killed worker (after ending
        what the run may have left on a node that is still there), our own error for a failure of
        ours on the node."""
        errors = self.ray.exceptions
        lost = {  # why, and whether the node may still be there (and hold what the run left)
            "NodeDiedError": ("the node died", False), "TaskUnschedulableError": ("the node is gone", False),
            "LocalRayletDiedError": ("the head's Ray node died", False),
            "WorkerCrashedError": ("the worker running the run was killed", True),
            "OutOfMemoryError": ("Ray's memory monitor killed the worker (the node ran out of memory)", True),
            "OwnerDiedError": ("the run's result was lost", True), "ObjectLostError": ("the run's result was lost", True),
            "TaskCancelledError": ("the task was cancelled", True)}
        for name, (why, there) in lost.items():
            kind = getattr(errors, name, None)
            if kind is not None and isinstance(exc, kind):
                if there and node_id is not None:
                    self._cleanup_nodes([node_id])
                return NodeLost(node, why)
        if isinstance(exc, errors.RayTaskError):
            cause = getattr(exc, "cause", None)
            if isinstance(cause, AutoresearchError):
                return cause
            if cause is not None:
                return AutoresearchError(f"the Ray task on {node} failed: {type(cause).__name__}: {cause}")
        if isinstance(exc, AutoresearchError):
            return exc
        if isinstance(exc, errors.RayError):
            return NodeLost(node, f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}")
        return exc

    def _abandon(self, stream: Any, place: Placement) -> None:
        """End a running task: KeyboardInterrupt in it (run_job ends the run), then, after
        CANCEL_GRACE, its worker killed; then whatever a killed worker left on the node."""
        ray = self.ray
        ray.cancel(stream, force=False)
        done, _ = ray.wait([stream.completed()], timeout=CANCEL_GRACE)
        if not done:
            with contextlib.suppress(Exception):
                ray.cancel(stream, force=True)
            ray.wait([stream.completed()], timeout=CANCEL_GRACE)
            self._cleanup_nodes([place.node_id])

    # -- shipping commits ---------------------------------------------------------------------

    def _bundle(self, node_id: str, commit: str, whole: bool) -> bytes | None:
        """A bundle of `commit` for a node: None when the node has it; without the commits it is
        known to have unless `whole`."""
        with self._lock:
            known = [] if whole else list(self._shipped.get(node_id, []))
            if commit in known:
                return None
            scratch = self._scratch_repo()
            git = Git(scratch)
            ref = f"refs/ship/{commit}"
            git.run("update-ref", ref, commit)
            revs = "".join(f"{line}\n" for line in [ref, *(f"^{c}" for c in known[-_NEGATIVE_REVS:])]).encode()
            new = subprocess.run(git.argv("rev-list", "--max-count=1", "--stdin"), cwd=scratch, input=revs,
                                 capture_output=True, check=False)
            if new.returncode == 0 and not new.stdout.strip():
                return None  # an ancestor of a commit the node has
            proc = subprocess.run(git.argv("bundle", "create", "-q", "-", "--stdin"), cwd=scratch, input=revs,
                                  capture_output=True, check=False)
            if proc.returncode != 0:
                raise GitError(f"cannot bundle commit {commit[:12]}: {proc.stderr.decode(errors='replace').strip()[-300:]}")
            return proc.stdout

    def _scratch_repo(self) -> Path:
        """A bare repository that borrows the lab's objects, so bundles are made without writing a
        ref into the lab."""
        if self._scratch is None:
            lab_git = Git(self.lab.root)
            common = Path(lab_git.run("rev-parse", "--git-common-dir"))
            objects = (common if common.is_absolute() else self.lab.root / common).resolve() / "objects"
            scratch = Path(tempfile.mkdtemp(prefix="autoresearch-ray-"))
            Git(scratch).run("init", "-q", "--bare")
            (scratch / "objects" / "info" / "alternates").write_text(f"{objects}\n", encoding="utf-8")
            self._scratch = scratch
        return self._scratch

    # -- orphans ------------------------------------------------------------------------------

    def cleanup(self, tag: str | None = None) -> int:
        """End, on every alive node, the runs of this lab that nothing runs any more (their Ray worker
        was killed: a kill -9 of the head, a cancel that had to kill); with `tag`, every run of that
        tag too (call it holding the tag's lock, before the first run). Returns how many process
        groups were ended."""
        return self._cleanup_nodes(list(self._alive()), tag)

    def _cleanup_nodes(self, node_ids: list[str], tag: str | None = None) -> int:
        alive = self._alive()
        refs = [self._tasks["_cleanup_node"].options(**self._options(node_id, num_cpus=0)).remote(self.id, self.lab.config, tag)
                for node_id in node_ids if node_id in alive]
        ended = 0
        for ref in refs:
            try:
                ended += self.ray.get(ref, timeout=CLEANUP_TIMEOUT)
            except Exception:  # noqa: BLE001 - a node that went away meanwhile has nothing left to end
                continue
        return ended

    def close(self) -> None:
        """Disconnect (when this object connected) and remove the scratch repository."""
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None
        if self.connected:
            self.ray.shutdown()
            self.connected = False

    def __enter__(self) -> RayCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _unreachable(address: str, why: str) -> RayUnreachable:
    return RayUnreachable(f"cannot reach the Ray cluster at {address}: {why}",
                          "start one with `ray start --head`, or pass --ray HOST:PORT of a running cluster")


def _probe(ray: Any, address: str) -> None:
    """Fail at once, not after Ray's minutes of retries, when nothing listens at the address."""
    if address == "auto":
        try:
            from ray._private.services import canonicalize_bootstrap_address

            resolved = canonicalize_bootstrap_address(address)
        except Exception:  # noqa: BLE001 - Ray's own look-up then says what is wrong
            return
        if resolved is None:
            raise _unreachable(address, "no running cluster found on this machine")
        address = resolved
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    try:
        with socket.create_connection((host, int(port)), timeout=5):
            pass
    except ValueError:
        raise _unreachable(address, "not an address of the form HOST:PORT") from None
    except OSError as exc:
        raise _unreachable(address, exc.strerror or str(exc)) from None
