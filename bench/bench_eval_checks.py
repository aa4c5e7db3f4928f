"""What the evaluator's checks cost per evaluation (not a test: prints figures).

    python bench/bench_eval_checks.py [--preset cpu] [--repeats 5] [--before REV]

A lab on sotu at the preset; its real train.py trains for `--budget` seconds and hands its model over
through prepare.hand_off (this script plays the orchestrator's side: it copies model.pt2 and answers).
The evaluator in the working tree then scores that model `--repeats` times in this process
(Scorer.score: loading, checks and scoring; the split is prepared once, as EvaluatorProcess does while
a run trains). Reported per evaluation: total seconds, the checks' seconds (EvalResult.causal_seconds,
what the ledger records: the causality check, and with it the batch-invariance check where the
evaluator has one) and their share of the total, medians over the repeats; the CPU seconds of the
whole evaluation; and the rows the graph was run on (a forward hook counts them), of which the
split's own are the scoring and the rest the checks' (exact, whatever the machine's load).

`--before REV` also loads src/autoresearch/evaluator.py as it was at git revision REV and scores the
same model with it, alternating with the working tree's, so that both see the same machine load; the
ratios after/before are printed. The machine is shared and noisy: read the medians and ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))  # for the run

from autoresearch import evaluator as current
from autoresearch.data import prepare_dataset
from autoresearch.lab import init_lab


def evaluator_at(rev: str) -> types.ModuleType:
    """autoresearch/evaluator.py as it was at `rev`, imported beside the current one."""
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:src/autoresearch/evaluator.py"],
                            capture_output=True, text=True, check=True).stdout
    name = f"autoresearch._evaluator_{rev.replace('~', '_').replace('^', '_')}"
    module = types.ModuleType(name)
    module.__package__ = "autoresearch"  # its relative imports resolve against the installed package
    sys.modules[name] = module  # dataclasses look their module up here
    exec(compile(source, f"{rev}:src/autoresearch/evaluator.py", "exec"), module.__dict__)  # noqa: S102
    return module


def handed_off_model(lab: Path, budget: float, target: Path) -> None:
    """Run the lab's train.py for `budget` seconds and keep the model it hands over."""
    handoff = lab.parent / "handoff"
    handoff.mkdir()
    env = {**os.environ, "AUTORESEARCH_HANDOFF": str(handoff), "AUTORESEARCH_BUDGET": f"{budget:g}"}
    proc = subprocess.Popen([sys.executable, "train.py"], cwd=lab, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    while not (handoff / "ready").exists():
        if proc.poll() is not None:
            raise SystemExit(f"train.py ended before its hand-off: {proc.communicate()[1][-2000:]}")
        time.sleep(0.05)
    shutil.copyfile(handoff / "model.pt2", target)
    (handoff / "result.json").write_text(json.dumps({"val_bpb": 0.0}))
    proc.communicate(timeout=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--budget", type=float, default=2, help="training seconds of the handed-over model")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--before", default=None, help="also time evaluator.py at this git revision")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    versions: dict[str, types.ModuleType] = {"after": current}
    if args.before:
        versions = {"before": evaluator_at(args.before), **versions}
    with tempfile.TemporaryDirectory() as tmp:
        lab = init_lab(Path(tmp) / "lab", dataset="sotu", preset=args.preset, budget=args.budget)
        assert lab.config.task is not None
        prepare_dataset(lab.config.task.dataset, lab.config.task.vocab_size)
        model = Path(tmp) / "model.pt2"
        handed_off_model(lab.root, args.budget, model)
        task = lab.config.task
        scorers = {name: module.Scorer(lab.root, "val", "cpu") for name, module in versions.items()}
        forwarded: list[int] = []
        for module in versions.values():
            module.load_program = counting(module.load_program, forwarded)
        rows = len(scorers["after"].rows)
        per_pass = current.rows_per_pass(task.max_seq_len, scorers["after"].enc.n_vocab)
        print(f"preset {args.preset}: T={task.max_seq_len}, vocab {task.vocab_size}, {rows} validation rows, "
              f"{per_pass} rows per pass; torch threads {torch.get_num_threads()}; load average "
              f"{os.getloadavg()[0]:.1f} at the start")
        results: dict[str, list[Run]] = {name: [] for name in versions}
        for repeat in range(args.repeats):
            for name, scorer in scorers.items():
                forwarded.clear()
                cpu = time.process_time()
                result = scorer.score(model)
                run = Run(result.seconds, result.causal_seconds, time.process_time() - cpu, sum(forwarded),
                          len(forwarded), result.bpb)
                results[name].append(run)
                print(f"  repeat {repeat + 1} {name:6s}: evaluation {run.seconds:6.3f} s, checks {run.checks:6.3f} s "
                      f"({run.checks / run.seconds:5.1%}), cpu {run.cpu:6.2f} s, {run.rows} rows in {run.passes} "
                      f"passes, bpb {run.bpb:.6f}; load {os.getloadavg()[0]:.1f}", flush=True)
    for name, runs in results.items():
        print(f"{name:6s} median of {len(runs)}: evaluation {median(runs, 'seconds'):.3f} s, checks "
              f"{median(runs, 'checks'):.3f} s = {statistics.median(r.checks / r.seconds for r in runs):.1%} of it; "
              f"cpu {median(runs, 'cpu'):.2f} s; rows {runs[0].rows} ({runs[0].rows - rows} for the checks, "
              f"{(runs[0].rows - rows) / rows:.0%} of the scoring's {rows}) in {runs[0].passes} passes; bpb {runs[0].bpb:.6f}")
    if "before" in results:
        before, after = results["before"], results["after"]

        def paired(field: str) -> float:
            return statistics.median(getattr(a, field) / getattr(b, field) for a, b in zip(after, before))

        print(f"after / before, medians of the paired ratios: evaluation {paired('seconds'):.2f}x, checks "
              f"{paired('checks'):.2f}x, cpu {paired('cpu'):.2f}x; check rows "
              f"{(after[0].rows - rows) / (before[0].rows - rows):.2f}x; bpb equal: {after[0].bpb == before[0].bpb}")


@dataclass(frozen=True)
class Run:
    seconds: float  # the evaluation, as EvalResult.seconds
    checks: float  # EvalResult.causal_seconds
    cpu: float  # process CPU seconds of the evaluation
    rows: int  # rows the graph ran on
    passes: int  # forward passes
    bpb: float


def median(runs: list[Run], field: str) -> float:
    return statistics.median(getattr(r, field) for r in runs)


def counting(load_program, forwarded: list[int]):
    """load_program whose module adds each forward pass's batch size to `forwarded`."""
    def load(path, device):
        module = load_program(path, device)
        module.register_forward_pre_hook(lambda _module, args: forwarded.append(int(args[0].shape[0])))
        return module
    return load


if __name__ == "__main__":
    main()
