"""The `hparam` agent against random proposals from the same space (not a test: prints figures).

    python bench/bench_search.py [--budget 30] [--experiments 20] [--preset cpu]

Two labs on the offline corpus, same budget, same number of experiments: one driven by TPE, one by
the same agent with every trial a random start-up sample (TPE never engages). Reports how far the
champion's val_bpb moved from the baseline in each. The judge is set to "strict" here so both arms
keep exactly what the original's rule would (the search, not the judge, is what is compared).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
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


def arm(name: str, startup_trials: int, args: argparse.Namespace, root: Path) -> None:
    lab = init_lab(root / name, dataset="sotu", preset=args.preset, budget=args.budget)
    toml = lab.root / "autoresearch.toml"
    toml.write_text(toml.read_text().replace('mode = "noise"', 'mode = "strict"'))
    lab = find_lab(lab.root)
    assert lab.config.task is not None
    prepare_dataset(lab.config.task.dataset, lab.config.task.vocab_size)
    agent = make_agent("hparam", lab.root, {"startup_trials": startup_trials, "seed": args.seed})
    t0 = time.monotonic()
    with Ledger(ledger_path(lab)) as ledger:
        Loop(lab, agent, RunOptions(tag=name, max_experiments=args.experiments), ledger, PlainView()).run()
        rows = ledger.experiments(name)
    base = rows[0].metric
    kept = [e for e in rows if e.status == "keep"]
    best = kept[-1].metric
    crashed = sum(1 for e in rows if e.status in ("crash", "timeout"))
    assert base is not None and best is not None
    wall = time.monotonic() - t0
    ran = [e for e in rows if e.run_seconds]
    outside = wall - sum(e.run_seconds for e in ran)
    print(f"{name:>6}: baseline {base:.4f} -> champion {best:.4f} ({best - base:+.4f}, {100 * (best - base) / base:+.1f}%); "
          f"{len(kept) - 1} kept, {crashed} crashed of {len(rows) - 1}; {wall:.0f} s; "
          f"final change: {kept[-1].description}")
    print(f"{'':>6}  utilization {args.budget * len(ran) / wall:.1%} (budget x {len(ran)} runs / wall time); "
          f"loop overhead outside the runs {outside / max(1, len(ran)):.2f} s per run; inside a run, "
          f"{statistics.median(e.run_seconds - args.budget for e in ran):.1f} s (median) of start-up, export and evaluation")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=30)
    parser.add_argument("--experiments", type=int, default=20)
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        arm("tpe", 8, args, Path(tmp))
        arm("random", 10_000, args, Path(tmp))


if __name__ == "__main__":
    main()
