"""False keeps and noise (not a test: prints figures).

    python bench/bench_trust.py [--budget 30] [--noops 20] [--preset cpu]

A lab on the offline corpus; the baseline, then `--noops` experiments that each change only a comment
of train.py, all from the same champion. Counts how many the original's rule (keep when lower than
the champion) would keep on exactly these runs, and how many the noise-aware judge kept; reports
σ of val_bpb at the budget and the extra runs spent on confirmations and re-measurements.
"""

from __future__ import annotations

import argparse
import os
import difflib
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))  # for the runs

from autoresearch.agents import make_agent  # noqa: E402
from autoresearch.data import prepare_dataset  # noqa: E402
from autoresearch.lab import find_lab, init_lab  # noqa: E402
from autoresearch.ledger import Ledger  # noqa: E402
from autoresearch.loop import Loop, RunOptions, ledger_path  # noqa: E402
from autoresearch.view import PlainView  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=30)
    parser.add_argument("--noops", type=int, default=20)
    parser.add_argument("--preset", default="cpu")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        lab = init_lab(Path(tmp) / "lab", dataset="sotu", preset=args.preset, budget=args.budget)
        assert lab.config.task is not None
        prepare_dataset(lab.config.task.dataset, lab.config.task.vocab_size)
        train = (lab.root / "train.py").read_text()
        patches = Path(tmp) / "patches"
        patches.mkdir()
        lines = train.splitlines(True)
        spacing = max(8, len(lines) // (args.noops + 1))
        for i in range(args.noops):
            at = (i + 1) * spacing  # far apart, so a kept no-op does not conflict with the next ones
            changed = [*lines[:at], f"# no-op {i}\n", *lines[at:]]  # a comment: changes nothing that runs
            body = "".join(difflib.unified_diff(lines, changed, "a/train.py", "b/train.py"))
            (patches / f"{i:03d}.patch").write_text(f"no-op {i}: a comment\n\n{body}")
        lab = find_lab(lab.root)
        agent = make_agent(f"patches:{patches}", lab.root)
        with Ledger(ledger_path(lab)) as ledger:
            Loop(lab, agent, RunOptions(tag="noops"), ledger, PlainView()).run()
            rows = ledger.experiments("noops")
    runs = [e for e in rows if e.metric is not None]
    base = rows[0]
    base_runs = [base.metric] + [e.metric for e in rows if e.repeat_of == base.id and e.metric is not None]
    noops = [e for e in rows if e.kind == "experiment"]
    # the original's rule on the same first runs: keep when lower than the current champion
    champion, original_keeps = base.metric, 0
    for e in noops:
        if e.metric is not None and champion is not None and e.metric < champion:
            original_keeps, champion = original_keeps + 1, e.metric
    ours = sum(1 for e in noops if e.status == "keep")
    extra = sum(1 for e in rows if e.kind == "repeat")
    sigma = statistics.stdev([e.metric for e in runs])  # every run is of the same code: all of it is noise
    print(f"budget {args.budget:g} s, {len(noops)} no-op experiments")
    print(f"original rule keeps {original_keeps}/{len(noops)}; noise-aware judge keeps {ours}/{len(noops)}")
    print(f"σ(val_bpb) over all {len(runs)} runs of identical code: {sigma:.5f}; over the baseline's "
          f"{len(base_runs)} runs: {statistics.stdev(base_runs):.5f}")
    print(f"extra runs (baseline repeats, confirmations, re-measurements): {extra} of {len(rows)} runs "
          f"= {extra / len(rows):.0%} of compute")
    timed = [e for e in rows if e.run_seconds and e.handoff_seconds]
    if timed:
        handoff = sorted(e.handoff_seconds for e in timed)
        after = sorted(e.run_seconds - e.handoff_seconds for e in timed)
        wall = sum(e.run_seconds for e in timed)
        print(f"cost of trust over {len(timed)} runs (min/median/max): model handed over "
              f"{handoff[0]:.1f}/{statistics.median(handoff):.1f}/{handoff[-1]:.1f} s after spawn (budget "
              f"{args.budget:g} s: start-up and export are the rest); evaluator until exit "
              f"{after[0]:.1f}/{statistics.median(after):.1f}/{after[-1]:.1f} s; sandbox "
              f"{', '.join(sorted({str(e.sandbox) for e in timed}))}")
        print(f"training-time utilization of these runs: {args.budget * len(timed) / wall:.1%} "
              f"(budget / wall time from spawn to exit)")
    print(f"sandbox start-up: {sandbox_overhead() * 1e3:.0f} ms per run (bwrap around `true`, best of 20)")


def sandbox_overhead() -> float:
    """Seconds bubblewrap adds to starting a process (0 when it is not installed)."""
    import subprocess
    import time

    from autoresearch.sandbox import bwrap_argv, bwrap_executable

    bwrap = bwrap_executable()
    if bwrap is None:
        return 0.0

    def best(argv: list[str]) -> float:
        times = []
        for _ in range(20):
            t0 = time.perf_counter()
            subprocess.run(argv, check=True)
            times.append(time.perf_counter() - t0)
        return min(times)

    return max(0.0, best(bwrap_argv(bwrap, ["true"], Path.cwd())) - best(["true"]))


if __name__ == "__main__":
    main()
