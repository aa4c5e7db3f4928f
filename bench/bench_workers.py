"""The scheduler's scaling: N workers on a lab whose run only sleeps (not a test: prints figures).

    python bench/bench_workers.py [--budget 20] [--minutes M] [--workers 1 2 4 8 16] [--judge noise] [--ray]
    python bench/bench_workers.py --quick          # budget 2 s, N = 1 2 4 8 16, ~40 s each: a dry run

The lab is a generic target (lab.init_target, as tests/test_loop.py's make_target): a git repository
whose bench.py sleeps for the budget, then prints `---` and `score: <gauss(10, 0.1)>`, the draw seeded
by the file's constants and the run's start time: every change the agent makes is a no-op, each run
of one commit differs as real runs do. `sandbox = "none"` keeps the start-up cheap; the judge is the
default noise-aware one (`--judge strict` for the original's rule). The agent is `hparam` (Optuna TPE
over the file's four constants). Each N gets a fresh lab and runs for --minutes of wall time
(RunOptions.hours); the experiments running when the time is up are finished, judging included.

The judge's cores figures are left out (judge.cores returns None, as it does for a run under 2 s)
unless --cores-heuristic: CPU seconds over wall seconds say nothing about a run that sleeps. psutil
counts CPU time in 10 ms ticks, so such a run shows 0.00-0.03 s: its "cores" jump 2-3x from one run
to the next, which the paired judge reads as a machine that changed between every two runs (a
candidate then gets the cap of 12 runs: "the machine kept changing"; judge.cores leaves out only a
run measured at exactly 0.00 s). The figures then show the scheduler, not that heuristic; pass
--cores-heuristic to see the latter.

Sixteen workers on a small machine. local_slots gives every local worker cores of its own and
refuses more workers than cores (right for a CPU-bound run). The sleeping run needs no core, so the
bench calls local_slots as the loop does, with an explicit `cpus` tuple of N entries that repeats the
real cores (w0..w7 on core 0, w8..w15 on core 1 on 2 cores): each worker is still bound to a real
core (Slot.bind) and gets one thread (Slot.env), only the cores are shared. Nothing else changes:
the loop, the workers' threads, the runner, the ledger and git are the real ones, in this process.

Figures, for each N (the first N listed is the reference, normally 1):
- runs: every run the ledger recorded (baseline, proposals, the judge's repeats); proposals: the agent's;
- runs/hour over the whole wall time (start-up and the drain after the limit included);
- efficiency = runs/hour / (N x the reference's runs/hour per worker);
- overhead per run = (wall x N - sum of run_seconds) / runs: the time a worker was not running
  anything (claiming, proposing, committing, recording, judging, waiting);
- steady: the same between the moment the noise is known (baseline and its repeats measured) and the
  time limit, where every worker should be busy; utilization = time in runs / (N x that window).
  Before it a parallel run waits (the baseline alone, then its repeats); after it, it drains.
- where the workers' time outside the runs went: exclusive seconds per run, by call path (Loop and
  Pool methods, git, the ledger, and the waits for Loop.mutex and the proposing lock), how long each
  lock was held and by whom, and the orchestrator's own CPU time (one process: its threads share a GIL);
- at the end (--night): the reads made under those locks (ledger.experiments(), Loop.context(), the
  hparam agent's propose) timed on the last lab's ledger grown to a night's size, since every one of
  them reads the whole tag.
--keep DIR leaves each N's lab (its ledger.db, loop.log, the runs' logs) there for a look at the timeline.

--ray runs the same on a local Ray cluster (ray.cluster_utils.Cluster on this machine, nodes of at most
8 logical CPUs adding up to N: num_cpus is a logical count in Ray, so 2 nodes of 8 on this 2-core
machine are 16 one-CPU shares). plan_lanes makes RayCluster(address, lab), which gives a generic target
one worker per node with all its CPUs; the bench makes it RayCluster(address, lab, cpus_per_worker=1),
one worker per logical CPU. Skipped when src/autoresearch/ray_backend.py cannot be imported.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import resource
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))  # for the runs

from rich.console import Console  # noqa: E402

from autoresearch import execution, judge, runner, workers  # noqa: E402
from autoresearch.agents import make_agent  # noqa: E402
from autoresearch.gitrepo import Git  # noqa: E402
from autoresearch.judge import block_of  # noqa: E402
from autoresearch.lab import find_lab, init_target  # noqa: E402
from autoresearch.ledger import Experiment, Ledger  # noqa: E402
from autoresearch.loop import Loop, RunOptions, ledger_path  # noqa: E402
from autoresearch.view import PlainView  # noqa: E402

SLEEPER = '''"""A run that costs no CPU: it sleeps for the budget and prints a score from N(10, 0.1)."""
import os
import random
import time

# Hyperparameters
WIDTH = 10        # a knob that does nothing
RATE = 0.5        # another
DECAY = 0.9       # another
STEPS = 300       # another

# ---
random.seed(f"{WIDTH} {RATE} {DECAY} {STEPS} {time.time_ns()}")
time.sleep(float(os.environ["AUTORESEARCH_BUDGET"]))
print("---")
print(f"score: {random.gauss(10, 0.1):.6f}")
'''


def make_lab(root: Path, budget: float, mode: str) -> Path:
    repo = root / "target"
    repo.mkdir(parents=True)
    (repo / "bench.py").write_text(SLEEPER)
    ident = ["-c", "user.name=b", "-c", "user.email=b@b"]
    subprocess.run(["git", "init", "-q", "-b", "main"], cwd=repo, check=True)
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run(["git", *ident, "commit", "-qm", "init"], cwd=repo, check=True)
    init_target(repo, run="python bench.py", editable=["bench.py"], metric="score", direction="min", budget=budget)
    toml = repo / "autoresearch.toml"
    text = toml.read_text()
    assert 'mode = "noise"' in text and 'sandbox = "auto"' in text, "init_target's toml changed: update the bench"
    toml.write_text(text.replace('mode = "noise"', f'mode = "{mode}"').replace('sandbox = "auto"', 'sandbox = "none"'))
    subprocess.run(["git", *ident, "commit", "-qam", f"judge {mode}, sandbox none"], cwd=repo, check=True)
    return repo


# -- where the workers' time goes ------------------------------------------------------------------


class Probe:
    """Exclusive wall time per call path, per thread: a span's time minus the spans inside it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self.seconds: defaultdict[str, float] = defaultdict(float)
        self.calls: Counter[str] = Counter()
        self.held: defaultdict[str, float] = defaultdict(float)
        self.exited: dict[str, float] = {}  # worker -> time.time() its thread stopped claiming
        self._here = threading.local()

    def _stack(self) -> list[list[Any]]:
        if not hasattr(self._here, "stack"):
            self._here.stack = []
        stack: list[list[Any]] = self._here.stack
        return stack

    def current(self) -> str:
        stack = self._stack()
        return str(stack[-1][0]) if stack else "(no span)"

    def push(self, label: str) -> None:
        self._stack().append([label, time.perf_counter(), 0.0])

    def pop(self) -> None:
        stack = self._stack()
        label, t0, inner = stack.pop()
        took = time.perf_counter() - t0
        if stack:
            stack[-1][2] += took
        path = " > ".join([*(s[0] for s in stack[-1:]), label])  # the caller and the callee
        with self._lock:
            self.seconds[path] += took - inner
            self.calls[path] += 1

    @contextlib.contextmanager
    def span(self, label: str) -> Iterator[None]:
        self.push(label)
        try:
            yield
        finally:
            self.pop()

    def wrap(self, owner: Any, attr: str, label: str) -> Any:
        original = getattr(owner, attr)
        probe = self

        def timed(*args: Any, **kwargs: Any) -> Any:
            with probe.span(label):
                return original(*args, **kwargs)

        return mock.patch.object(owner, attr, timed)

    def hold(self, label: str, seconds: float) -> None:
        with self._lock:
            self.held[label] += seconds


class TimedLock:
    """A lock (RLock with `reentrant`) whose waits are probe spans and whose hold time is summed; with
    the three methods threading.Condition uses, so Loop.mutex can be one (Pool.cond is built on it)."""

    def __init__(self, probe: Probe, label: str, reentrant: bool) -> None:
        self.probe, self.label = probe, label
        self.inner: Any = threading.RLock() if reentrant else threading.Lock()
        self.here = threading.local()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        with self.probe.span(f"wait: {self.label}"):
            got = bool(self.inner.acquire(blocking, timeout))
        if got:
            depth = getattr(self.here, "depth", 0)
            if depth == 0:
                self.here.since, self.here.owner = time.perf_counter(), self.probe.current()
            self.here.depth = depth + 1
        return got

    def release(self) -> None:
        self.here.depth -= 1
        if self.here.depth == 0:
            self.probe.hold(f"{self.label} held in {self.here.owner}", time.perf_counter() - self.here.since)
        self.inner.release()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _is_owned(self) -> bool:
        return bool(self.inner._is_owned())

    def _release_save(self) -> Any:  # Condition.wait: give the lock up entirely, then wait to be notified
        depth, self.here.depth = self.here.depth, 0
        self.probe.hold(f"{self.label} held in {self.here.owner}", time.perf_counter() - self.here.since)
        state = self.inner._release_save()
        self.probe.push("idle: Pool.cond.wait (nothing to claim yet)")
        return state, depth

    def _acquire_restore(self, saved: Any) -> None:
        state, depth = saved
        self.probe.pop()
        with self.probe.span(f"wait: {self.label}"):
            self.inner._acquire_restore(state)
        self.here.depth, self.here.since, self.here.owner = depth, time.perf_counter(), self.probe.current()


def instrument(probe: Probe, stack: contextlib.ExitStack, real_cores: tuple[int, ...], cores_heuristic: bool) -> None:
    """Patch the spans in (restored when `stack` closes), local_slots' cores and judge.cores (see the docstring)."""
    if not cores_heuristic:
        stack.enter_context(mock.patch.object(judge, "cores", lambda e: None))
    for owner, attr in [(Loop, "context"), (Loop, "_next_proposal"), (Loop, "_record"), (Loop, "_judge"),
                        (Loop, "_superseded"), (Loop, "_finish_repeat"), (Loop, "_run"), (Loop, "_run_job"),
                        (Loop, "_export"), (Loop, "_repair"), (Loop, "_recover"), (workers.Pool, "claim"),
                        (workers.Pool, "_experiment")]:
        stack.enter_context(probe.wrap(owner, attr, f"{owner.__name__}.{attr}"))
    stack.enter_context(probe.wrap(runner._Tree, "sample", "runner._Tree.sample"))  # inside the run, on the GIL
    for attr in ("run", "run_raw"):
        stack.enter_context(probe.wrap(Git, attr, "git"))
    for attr in ("add", "update", "get", "experiments", "unfinished", "export_tsv"):
        stack.enter_context(probe.wrap(Ledger, attr, f"ledger.{attr}"))
    init, worker = workers.Pool.__init__, workers.Pool.worker

    def pool_init(pool: workers.Pool, loop: Loop) -> None:
        init(pool, loop)
        pool.proposing = TimedLock(probe, "Pool.proposing", reentrant=False)  # type: ignore[assignment]

    def pool_worker(pool: workers.Pool, lane: Any) -> None:
        try:
            with probe.span("Pool.worker"):
                worker(pool, lane)
        finally:
            probe.exited[lane.slot.name] = time.time()

    def slots(n: int, device: str, gpus: list[str] | None = None, cpus: tuple[int, ...] | None = None) -> list:
        shared = tuple(real_cores[i % len(real_cores)] for i in range(max(n, 1)))
        return execution.local_slots(n, device, gpus, cpus if cpus is not None else shared)

    stack.enter_context(mock.patch.object(workers.Pool, "__init__", pool_init))
    stack.enter_context(mock.patch.object(workers.Pool, "worker", pool_worker))
    stack.enter_context(mock.patch.object(workers, "local_slots", slots))


class CountingView(PlainView):
    """PlainView into a log file, counting the judge's reruns asked for by the cores heuristic."""

    def __init__(self, log: Path) -> None:
        self.file = log.open("w")
        super().__init__(Console(file=self.file, highlight=False, soft_wrap=True, width=200))
        self.cores_reruns = 0

    def message(self, text: str) -> None:
        if " cores " in text:
            self.cores_reruns += 1
        super().message(text)


# -- one N -------------------------------------------------------------------------------------------


@dataclass
class Result:
    n: int
    backend: str
    wall: float
    runs: int
    proposals: int
    run_seconds: float
    startup: float  # loop start -> first run started
    noise_at: float  # loop start -> the noise known
    steady_busy: float  # worker-seconds in runs between noise_at and the limit
    steady_runs: float  # runs in that window (fractions at its edges)
    steady_window: float
    drain: float  # the limit -> the loop's end
    drain_idle: float  # worker-seconds not in a run after the limit
    kept: int
    cores_reruns: int
    profile: dict[str, float] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    held: dict[str, float] = field(default_factory=dict)
    exited_idle: float = 0.0  # worker-seconds between a worker's thread stopping and the loop's end
    cpu_self: float = 0.0  # CPU seconds of this process (the orchestrator's threads) during the loop
    cpu_children: float = 0.0  # of its children: git, the runs (and the Ray cluster's processes, started before)
    real_cores: int = 0

    @property
    def per_hour(self) -> float:
        return self.runs / self.wall * 3600

    @property
    def overhead(self) -> float:
        return (self.wall * self.n - self.run_seconds) / max(1, self.runs)

    @property
    def steady_util(self) -> float:
        return self.steady_busy / (self.n * self.steady_window) if self.steady_window > 0 else float("nan")

    @property
    def steady_overhead(self) -> float:
        return (self.n * self.steady_window - self.steady_busy) / self.steady_runs if self.steady_runs else float("nan")


def interval(e: Experiment) -> tuple[float, float]:
    assert e.started_at is not None and e.run_seconds is not None
    return e.started_at, e.started_at + e.run_seconds


def run_one(n: int, args: argparse.Namespace, root: Path, probe: Probe, ray: str | None = None) -> Result:
    repo = make_lab(root, args.budget, args.judge)
    lab = find_lab(repo)
    view = CountingView(root / "loop.log")
    options = RunOptions(tag="bench", hours=args.minutes / 60, workers=n, ray=ray)
    probe.reset()  # fresh figures for this N
    with Ledger(ledger_path(lab)) as ledger:
        agent = make_agent("hparam", lab.root, lab.config.agent_options, editable=lab.config.editable, tag="bench")
        loop = Loop(lab, agent, options, ledger, view)
        loop.mutex = TimedLock(probe, "Loop.mutex", reentrant=True)  # type: ignore[assignment]
        before = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.time()
        loop.run()
        end = time.time()
        after_self = resource.getrusage(resource.RUSAGE_SELF)
        after_children = resource.getrusage(resource.RUSAGE_CHILDREN)
        rows = ledger.experiments("bench")
    view.file.close()
    workers_n = len(loop.lanes)
    ran = [e for e in rows if e.run_seconds is not None and e.started_at is not None]
    base = next(e for e in rows if e.kind == "baseline")
    noise_rows = [base, *(e for e in ran if e.kind == "repeat" and block_of(e) == base.id)]
    noise_at = max(interval(e)[1] for e in noise_rows if e.run_seconds is not None)
    limit = t0 + args.minutes * 60
    busy = fraction = after = 0.0
    for e in ran:
        a, b = interval(e)
        inside = max(0.0, min(b, limit) - max(a, noise_at))
        busy += inside
        fraction += inside / e.run_seconds if e.run_seconds else 0.0
        after += max(0.0, b - max(a, limit))
    drain = max(0.0, end - limit)
    exited = sum(max(0.0, end - at) for at in probe.exited.values())
    return Result(
        n=workers_n, backend="ray" if ray else "local", wall=end - t0, runs=len(ran),
        proposals=sum(1 for e in rows if e.kind == "experiment" and e.run_seconds is not None),
        run_seconds=sum(e.run_seconds or 0.0 for e in ran),
        startup=min(interval(e)[0] for e in ran) - t0, noise_at=noise_at - t0,
        steady_busy=busy, steady_runs=fraction, steady_window=max(0.0, limit - noise_at),
        drain=drain, drain_idle=workers_n * drain - after,
        kept=sum(1 for e in rows if e.kind == "experiment" and e.status == "keep"), cores_reruns=view.cores_reruns,
        profile=dict(probe.seconds), calls=dict(probe.calls), held=dict(probe.held), exited_idle=exited,
        cpu_self=after_self.ru_utime + after_self.ru_stime - before[0].ru_utime - before[0].ru_stime,
        cpu_children=after_children.ru_utime + after_children.ru_stime - before[1].ru_utime - before[1].ru_stime,
        real_cores=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1,
    )


def describe(r: Result, top: int) -> None:
    """The details of one N: phases, and where the workers' time outside the runs went."""
    print(f"  {r.backend} N={r.n}: {r.runs} runs ({r.proposals} proposals, {r.kept} kept) in {r.wall:.0f} s; "
          f"first run after {r.startup:.1f} s, noise known at {r.noise_at:.0f} s, "
          f"steady window {r.steady_window:.0f} s at {r.steady_util:.1%} utilization; "
          f"drain {r.drain:.0f} s ({r.drain_idle:.0f} worker-s idle)"
          + (f"; {r.cores_reruns} judge steps asked for by the cores heuristic" if r.cores_reruns else ""))
    outside = r.wall * r.n - r.run_seconds
    skip = {"Loop._run_job", "runner._Tree.sample"}  # the runs themselves (with their set-up inside run_job)
    spent = sorted(((p, s) for p, s in r.profile.items() if p.split(" > ")[-1] not in skip), key=lambda x: -x[1])
    in_job = sum(s for p, s in r.profile.items() if p.split(" > ")[-1] in skip) - r.run_seconds
    sampling = sum(s for p, s in r.profile.items() if p.endswith("runner._Tree.sample"))
    accounted = sum(s for _, s in spent) + in_job + r.exited_idle
    print(f"    outside the runs: {outside:.0f} worker-s = {outside / max(1, r.runs):.2f} s per run; by call path "
          f"(exclusive, s per run; {accounted / max(1e-9, outside):.0%} of it accounted for):")
    print(f"      {in_job / max(1, r.runs):7.3f}  run_job around the run's process (worktree reset, spawn, reaping)")
    for path, seconds in spent[:top]:
        print(f"      {seconds / max(1, r.runs):7.3f}  {path}  ({r.calls[path]} calls)")
    if r.exited_idle:
        print(f"      {r.exited_idle / max(1, r.runs):7.3f}  idle: workers stopped, waiting for the "
              "others to finish")
    for lock in ("Loop.mutex", "Pool.proposing"):
        owners = sorted(((k.split(" held in ")[1], v) for k, v in r.held.items() if k.startswith(lock + " ")),
                        key=lambda x: -x[1])
        if owners:
            total = sum(v for _, v in owners)
            print(f"    {lock} held {total:.1f} s ({total / r.wall:.1%} of the wall time), in "
                  + ", ".join(f"{owner} {v:.1f} s" for owner, v in owners[:4]))
    claims = r.calls.get("Pool.worker > Pool.claim", 0)
    reads = r.calls.get("Pool.claim > ledger.experiments", 0)
    if claims:
        held = r.held.get("Loop.mutex held in Pool.claim", 0.0)
        read = r.profile.get("Pool.claim > ledger.experiments", 0.0)
        print(f"    Pool.claim: {claims} claims, {held / claims * 1000:.0f} ms of Loop.mutex each; "
              f"{reads / claims:.1f} ledger.experiments() per claim at {read / max(1, reads) * 1000:.1f} ms each "
              f"({r.runs} rows at the end)")
    print(f"    orchestrator process CPU {r.cpu_self:.1f} s ({r.cpu_self / r.wall:.0%} of one core), its children "
          f"(git, the runs) {r.cpu_children:.1f} s, {r.real_cores} real cores; the runners' process-tree sampling "
          f"(psutil, every 0.25 s per run) took {sampling:.1f} s of the workers' threads")


def table(results: list[Result]) -> None:
    ref = results[0]
    ref_rate, ref_util = ref.per_hour / ref.n, ref.steady_util
    print(f"\n{'backend':<7} {'N':>3} {'runs':>5} {'props':>5} {'runs/h':>7} {'eff %':>6} {'ovh s/run':>9} "
          f"{'steady util %':>13} {'steady eff %':>12} {'steady ovh s/run':>16}")
    for r in results:
        eff = r.per_hour / (r.n * ref_rate)
        print(f"{r.backend:<7} {r.n:>3} {r.runs:>5} {r.proposals:>5} {r.per_hour:>7.0f} {eff:>6.1%} {r.overhead:>9.2f} "
              f"{r.steady_util:>13.1%} {r.steady_util / ref_util:>12.1%} {r.steady_overhead:>16.2f}")
    print(f"(efficiency against {ref.backend} N={ref.n}: {ref_rate:.0f} runs/h per worker, {ref_util:.1%} steady "
          "utilization)")


# -- a night's ledger ------------------------------------------------------------------------------


def night_scaling(repo: Path, sizes: list[int], calls_per_claim: float) -> None:
    """What the reads under Loop.mutex and the proposing lock cost once the ledger holds a night's rows:
    the last lab's ledger copied and its rows repeated to each size (16 workers x 20 s runs x 8 h is
    ~23,000 runs), then ledger.experiments(), Loop.context() and the hparam agent's propose timed."""
    lab = find_lab(repo)
    source = ledger_path(lab)
    print(f"\nthe same reads at a night's ledger size (rows of the last lab repeated; {calls_per_claim:.1f} "
          "ledger.experiments() per claim, measured above):")
    print(f"{'rows':>6} {'experiments() ms':>16} {'again ms':>8} {'claim reads ms':>14} {'context() ms':>12} "
          f"{'propose ms':>10}")
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "ledger.db"
        shutil.copy(source, copy)
        db = sqlite3.connect(copy)
        columns = [row[1] for row in db.execute("PRAGMA table_info(experiments)") if row[1] != "id"]
        names = ", ".join(columns)
        for size in sizes:
            while (count := db.execute("SELECT count(*) FROM experiments").fetchone()[0]) < size:
                db.execute(f"INSERT INTO experiments ({names}) SELECT {names} FROM experiments ORDER BY id "
                           f"LIMIT {size - count}")
                db.commit()
            with Ledger(copy) as ledger:
                t = time.perf_counter()
                rows = ledger.experiments("bench")
                read = time.perf_counter() - t
                t = time.perf_counter()
                ledger.experiments("bench")  # the same again, no write between (the ledger may cache it)
                again = time.perf_counter() - t
                agent = make_agent("hparam", lab.root, lab.config.agent_options, editable=lab.config.editable,
                                   tag="bench")
                loop = Loop(lab, agent, RunOptions(tag="bench"), ledger, PlainView(Console(file=io.StringIO())))
                t = time.perf_counter()
                context = loop.context()
                built = time.perf_counter() - t
                t = time.perf_counter()
                agent.propose(context)
                proposed = time.perf_counter() - t
            print(f"{len(rows):>6} {read * 1000:>16.1f} {again * 1000:>8.1f} {read * calls_per_claim * 1000:>14.0f} "
                  f"{built * 1000:>12.0f} {proposed * 1000:>10.0f}")
        db.close()
    print("(claim reads: experiments() per claim x the first read's time, the most a claim can spend reading; "
          "every write in between, at least two per run, makes the next read a first one)")


# -- Ray -----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def ray_cluster(n: int) -> Iterator[str]:
    """A cluster of N logical CPUs on this machine, in nodes of at most 8 (num_cpus is a logical count in
    Ray). The nodes take Ray's own choice of address: with node_ip_address="127.0.0.1" the driver's
    ray.init (made by RayCluster, which detects this machine's other address) never connected."""
    from ray.cluster_utils import Cluster

    nodes = math.ceil(n / 8)
    sizes = [n // nodes + (1 if i < n % nodes else 0) for i in range(nodes)]
    node: dict[str, Any] = {"object_store_memory": 128 * 2**20}  # runs return a few kB each
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": sizes[0], "include_dashboard": False, **node})
    try:
        for size in sizes[1:]:
            cluster.add_node(num_cpus=size, **node)
        cluster.wait_for_nodes()
        yield cluster.address
    finally:
        cluster.shutdown()


def ray_missing() -> str:
    try:
        import ray  # noqa: F401
    except ImportError:
        return "Ray is not installed"
    try:
        from autoresearch import ray_backend  # noqa: F401
    except ImportError as exc:
        return f"autoresearch.ray_backend cannot be imported ({exc})"
    return ""


# -- main ------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=20, help="seconds each run sleeps (default 20)")
    parser.add_argument("--minutes", type=float, default=None,
                        help="wall time per N (default: 6 budgets, ~6 experiments per worker)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8, 16],
                        help="the numbers of workers; the first is the reference for efficiency")
    parser.add_argument("--judge", choices=["noise", "strict"], default="noise")
    parser.add_argument("--cores-heuristic", action="store_true",
                        help="leave the judge's cores figures in (see above: meaningless for a sleeping run)")
    parser.add_argument("--ray", action="store_true", help="also on a local Ray cluster")
    parser.add_argument("--no-local", action="store_true", help="only the Ray figures")
    parser.add_argument("--quick", action="store_true", help="budget 2 s, 40 s per N: a dry run")
    parser.add_argument("--keep", type=Path, default=None, help="keep each N's lab (ledger, logs) under this folder")
    parser.add_argument("--top", type=int, default=8, help="call paths shown per N")
    parser.add_argument("--night", type=int, nargs="*", default=[1000, 5000, 20000],
                        help="ledger sizes for the reads timed at the end (none: skip)")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]  # figures as each N ends
    if args.quick:
        args.budget, args.minutes = 2.0, args.minutes or 40 / 60
    args.minutes = args.minutes or 6 * args.budget / 60
    real = tuple(sorted(os.sched_getaffinity(0))) if hasattr(os, "sched_getaffinity") else \
        tuple(range(os.cpu_count() or 1))
    print(f"budget {args.budget:g} s, {args.minutes:g} min per N, judge {args.judge}"
          f"{'' if args.cores_heuristic else ' (cores figures left out)'}, agent hparam, "
          f"{len(real)} real cores; workers {args.workers}")
    probe = Probe()
    results: list[Result] = []
    last = Path()
    with contextlib.ExitStack() as patches, tempfile.TemporaryDirectory() as tmp:
        instrument(probe, patches, real, args.cores_heuristic)
        base = args.keep or Path(tmp)
        backends = ([] if args.no_local else ["local"]) + (["ray"] if args.ray else [])
        for backend in backends:
            if backend == "ray" and (why := ray_missing()):
                print(f"Ray: skipped ({why})")
                continue
            for n in args.workers:
                root = base / f"{backend}-{n}"
                try:
                    if backend == "ray":
                        from autoresearch import ray_backend

                        original = ray_backend.RayCluster

                        def one_cpu(address: str, lab: Any, original: Any = original) -> Any:
                            return original(address, lab, cpus_per_worker=1)

                        with ray_cluster(n) as address, mock.patch.object(ray_backend, "RayCluster", one_cpu):
                            r = run_one(n, args, root, probe, ray=address)
                    else:
                        r = run_one(n, args, root, probe)
                except Exception as exc:  # noqa: BLE001  (a bench: say which N failed, go on with the others)
                    where = traceback.extract_tb(exc.__traceback__)[-1]
                    print(f"  {backend} N={n}: failed: {type(exc).__name__}: {exc} at {Path(where.filename).name}:"
                          f"{where.lineno} (log: {root / 'loop.log'})")
                    continue
                if r.n != n:
                    print(f"  {backend} N={n}: the loop made {r.n} workers")
                describe(r, args.top)
                results.append(r)
                last = root / "target"
                sys.stdout.flush()
        if results:
            table(results)
            if args.night:
                claims = sum(r.calls.get("Pool.worker > Pool.claim", 0) for r in results)
                reads = sum(r.calls.get("Pool.claim > ledger.experiments", 0) for r in results)
                night_scaling(last, args.night, reads / claims if claims else 0.0)


if __name__ == "__main__":
    main()
