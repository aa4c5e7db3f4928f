"""Loop overhead and training-time utilization (not a test: prints figures).

    python bench/bench_loop.py overhead [--experiments 20] [--budget 2]
    python bench/bench_loop.py lab --budgets 30 60 300 [--experiments 2]

overhead: a target lab whose run just sleeps for the budget, driven by the hparam agent. Everything
outside the run (propose + check + commit + record) is overhead: (loop wall time - sum of run
times) / experiments.
lab: the built-in task (sotu, cpu preset) at each budget; utilization = sum of budgets / wall time of
the whole loop, the rest being start-up, evaluation and the loop's own overhead.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))  # for the runs

from autoresearch.agents import make_agent  # noqa: E402
from autoresearch.lab import find_lab, init_lab, init_target  # noqa: E402
from autoresearch.ledger import Ledger  # noqa: E402
from autoresearch.loop import Loop, RunOptions, ledger_path  # noqa: E402
from autoresearch.view import PlainView  # noqa: E402

SLEEPER = '''import time
# Hyperparameters
WIDTH = 10        # a knob
RATE = 0.5        # another
BUDGET = {budget}
time.sleep(BUDGET)
print("---")
print(f"score: {{abs(WIDTH - 17) + abs(RATE - 0.25):.4f}}")
'''


def run(lab_root: Path, agent: str, options: RunOptions) -> tuple[float, list]:
    lab = find_lab(lab_root)
    with Ledger(ledger_path(lab)) as ledger:
        loop = Loop(lab, make_agent(agent, lab.root, lab.config.agent_options), options, ledger, PlainView())
        t0 = time.monotonic()
        loop.run()
        wall = time.monotonic() - t0
        return wall, ledger.experiments(options.tag)


def overhead(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "target"
        repo.mkdir()
        (repo / "bench.py").write_text(SLEEPER.format(budget=args.budget))
        subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
        subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
        subprocess.run(["git", "-c", "user.name=b", "-c", "user.email=b@b", "commit", "-qm", "init"], cwd=repo, check=True)
        init_target(repo, run="python bench.py", editable=["bench.py"], metric="score", budget=args.budget)
        wall, rows = run(repo, "hparam", RunOptions(tag="bench", max_experiments=args.experiments))
    runs = sum(e.run_seconds or 0 for e in rows)
    propose = [e.propose_seconds or 0 for e in rows if e.kind == "experiment"]
    n = len(rows)
    print(f"experiments: {n} (baseline included), run command sleeps {args.budget:g} s")
    print(f"time in runs (process start to exit): {runs:.1f} s of {wall:.1f} s loop wall time")
    print(f"overhead per experiment outside the run: {(wall - runs) / n:.3f} s "
          f"(of which propose: mean {sum(propose) / len(propose):.3f} s, max {max(propose):.3f} s)")
    print(f"process start-up inside each run (python + imports): {(runs - n * args.budget) / n:.3f} s")
    for budget in (30, 60, 300):
        per = (wall - runs) / n + (runs - n * args.budget) / n
        print(f"  projected utilization at {budget:>3} s budget (no training start-up/eval): "
              f"{budget / (budget + per):.1%}")


def lab_utilization(args: argparse.Namespace) -> None:
    for budget in args.budgets:
        with tempfile.TemporaryDirectory() as tmp:
            lab = init_lab(Path(tmp) / "lab", dataset="sotu", preset=args.preset, budget=budget)
            from autoresearch.data import prepare_dataset

            assert lab.config.task is not None
            prepare_dataset(lab.config.task.dataset, lab.config.task.vocab_size)
            wall, rows = run(lab.root, "hparam", RunOptions(tag="bench", max_experiments=args.experiments))
        measured = [e for e in rows if e.run_seconds]
        runs = sum(e.run_seconds or 0 for e in measured)
        startup = [float(e.summary.get("total_seconds", 0)) - float(e.summary.get("training_seconds", 0))
                   for e in measured if e.summary]
        handed = [e for e in measured if e.handoff_seconds]
        after = statistics.median(e.run_seconds - e.handoff_seconds for e in handed) if handed else float("nan")
        before = statistics.median(e.handoff_seconds - budget for e in handed) if handed else float("nan")
        print(f"budget {budget:>4} s: {len(rows)} experiments in {wall:.0f} s; utilization {budget * len(rows) / wall:.1%}; "
              f"per run: {runs / len(measured):.1f} s wall, start-up+eval (train.py's own view) "
              f"{sum(startup) / max(1, len(startup)):.1f} s; loop overhead {(wall - runs) / len(rows):.2f} s")
        print(f"{'':>14} medians: model handed over {before:.1f} s after the budget (start-up and export), "
              f"scored and exited {after:.1f} s after that (trusted evaluation)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("overhead")
    p.add_argument("--experiments", type=int, default=20)
    p.add_argument("--budget", type=float, default=2)
    p = sub.add_parser("lab")
    p.add_argument("--budgets", type=float, nargs="+", default=[30, 60, 300])
    p.add_argument("--experiments", type=int, default=2)
    p.add_argument("--preset", default="cpu")
    args = parser.parse_args()
    overhead(args) if args.mode == "overhead" else lab_utilization(args)


if __name__ == "__main__":
    main()
