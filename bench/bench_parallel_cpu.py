"""One worker on every core against several workers splitting them (not a test: prints figures).

    python bench/bench_parallel_cpu.py [--minutes 30] [--preset cpu] [--workers 2]

Two labs on the offline corpus, the same preset, budget and agent (hparam, same seed), each given
the same wall-clock time: one runs `autoresearch run` with one worker on the whole machine, the other
with `--workers N`, each worker on 1/N of the cores. Reports experiments completed, the champion's
val_bpb (the mean of its counted runs, as the judge sees it), its test-split bpb, and the runs'
tokens per second. The judge is the default (noise), so the figures include what the noise costs:
baseline repeats and runs of the champion beside candidates. The arms run one after the other, never
at once: each would otherwise take the other's cores.

Numbers from one arm are not comparable with the other's val_bpb run for run: a worker on one core
trains on about half the tokens in the same budget, so its champion starts higher; what the bench
answers is which use of the machine ends the night lower.
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
from autoresearch.judge import counted_runs  # noqa: E402
from autoresearch.lab import find_lab, init_lab  # noqa: E402
from autoresearch.ledger import Ledger  # noqa: E402
from autoresearch.loop import Loop, RunOptions, ledger_path  # noqa: E402
from autoresearch.view import PlainView  # noqa: E402


def arm(name: str, workers: int | None, args: argparse.Namespace, root: Path) -> dict[str, object]:
    lab = init_lab(root / name, dataset="sotu", preset=args.preset, budget=args.budget)
    lab = find_lab(lab.root)
    assert lab.config.task is not None
    prepare_dataset(lab.config.task.dataset, lab.config.task.vocab_size)
    agent = make_agent("hparam", lab.root, {"seed": args.seed})
    t0 = time.monotonic()
    with Ledger(ledger_path(lab)) as ledger:
        loop = Loop(lab, agent, RunOptions(tag=name, hours=args.minutes / 60, workers=workers), ledger, PlainView())
        stop = loop.run()
        history = ledger.experiments(name)
    wall = time.monotonic() - t0
    kept = [e for e in history if e.status == "keep"]
    champ = kept[-1]
    runs = counted_runs(champ, history)
    toks = [float(e.summary["total_tokens_M"]) * 1e6 / float(e.summary["training_seconds"]) for e in history
            if e.outcome == "ok" and isinstance(e.summary.get("total_tokens_M"), (int, float))
            and isinstance(e.summary.get("training_seconds"), (int, float)) and e.summary["training_seconds"]]
    return {
        "arm": name, "stop": stop, "wall_min": wall / 60,
        "experiments": sum(1 for e in history if e.kind == "experiment"),
        "runs": sum(1 for e in history if e.outcome is not None),
        "keeps": sum(1 for e in kept if e.kind == "experiment"),
        "baseline": next(e.metric for e in history if e.kind == "baseline"),
        "champion": statistics.mean(runs) if runs else champ.metric, "champion_runs": len(runs),
        "test": champ.test_metric, "tok_s": statistics.median(toks) if toks else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0, help="wall-clock time of each arm")
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--budget", type=float, default=None, help="training seconds per run (default: the preset's)")
    parser.add_argument("--workers", type=int, default=2, help="workers of the second arm")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-parallel-") as tmp:
        rows = [arm("one", None, args, Path(tmp)), arm(f"split{args.workers}", args.workers, args, Path(tmp))]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"\n{cores} cores, preset {args.preset}, {args.minutes:g} min per arm, hparam seed {args.seed}, noise judge")
    print(f"{'arm':<8} {'experiments':>11} {'runs':>5} {'keeps':>5} {'baseline':>9} {'champion':>9} {'(runs)':>6} "
          f"{'test':>8} {'tok/s':>7} {'wall min':>8}  stop")
    for r in rows:
        test = f"{r['test']:.4f}" if isinstance(r["test"], float) else "—"
        tok = f"{r['tok_s']:.0f}" if isinstance(r["tok_s"], float) else "—"
        print(f"{r['arm']:<8} {r['experiments']:>11} {r['runs']:>5} {r['keeps']:>5} {r['baseline']:>9.4f} "
              f"{r['champion']:>9.4f} {r['champion_runs']:>6} {test:>8} {tok:>7} {r['wall_min']:>8.1f}  {r['stop']}")


if __name__ == "__main__":
    main()
