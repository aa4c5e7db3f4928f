"""Where an experiment's number comes from, and what a run may see while it produces it.

For any target the metric is read from the run's summary lines (or its JSON file). For the
built-in task it comes from the trusted evaluator instead: the run hands its model over, a separate
process scores it, and the run's own printed figure only has to agree. The validation and test
shards and the loop's state are hidden from the run; the data cache and the interpreter stay readable.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from . import runner as runner_mod
from .config import LabConfig
from .errors import AutoresearchError
from .lab import Lab

if TYPE_CHECKING:
    from .evaluator import EvaluatorProcess


def read_metric(config: LabConfig, worktree: Path, result: runner_mod.RunResult) -> float | None:
    """The run's own figure: a summary line, or a key of the JSON file it wrote; None if absent or not finite."""
    name = config.metric.name
    if config.metric.json_file:
        try:
            data = json.loads((worktree / config.metric.json_file).read_text(encoding="utf-8"))
            value = data[name]
        except (OSError, ValueError, KeyError, TypeError):
            return None
    else:
        value = result.summary.get(name)
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def is_trusted(config: LabConfig) -> bool:
    """The built-in task's metric comes from the trusted evaluator, not from the run's output."""
    return config.task is not None and config.trusted_eval


def hidden_paths(lab: Lab) -> tuple[Path, ...]:
    """What a run must not read: the loop's state (ledger, logs, other experiments) and, for the
    built-in task, the validation and test shards (the trusted evaluator reads those)."""
    hidden = [lab.state_dir]
    task = lab.config.task
    if task is not None and is_trusted(lab.config):
        from .data import load_prepared

        try:
            prepared = load_prepared(task.dataset, task.vocab_size)
            hidden += [*prepared.files("val"), *prepared.files("test")]
        except AutoresearchError:
            pass  # not prepared: the run stops with its own message
    return tuple(hidden)


def readable_paths() -> tuple[Path, ...]:
    """What a run needs to read even where the sandbox's fresh /tmp would hide it: the data cache and
    the PYTHONPATH entries (the sandbox itself keeps the interpreter and this package readable)."""
    from . import settings

    paths = [settings.cache_dir()]
    paths += [Path(p).resolve() for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return tuple(paths)


def write_trusted_toml(folder: Path, toml: bytes) -> Path:
    """Put the baseline commit's autoresearch.toml where the run cannot reach it: the evaluator
    reads the task (dataset, sequence length, evaluation tokens) from there, never from the worktree."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "autoresearch.toml").write_bytes(toml)
    return folder


class TrustedEval:
    """The trusted half of one run: an evaluator process started with the run, which prepares the
    validation split while the run trains; when the run hands its model over, it scores it and the
    run gets its answer. Afterwards, say what (if anything) disqualifies the run.

    Use it as a context manager around the run: leaving ends an evaluator the run never needed.
    """

    def __init__(self, folder: Path, trusted_lab: Path, budget: float, startup_allowance: float,
                 eval_allowance: float, device: str = "cpu", device_env: Mapping[str, str] | None = None) -> None:
        self.folder, self.lab = folder, trusted_lab
        self.device, self.device_env = device, dict(device_env or {})  # the run's: it scores where it trained
        self.budget, self.startup_allowance, self.eval_allowance = budget, startup_allowance, eval_allowance
        self.bpb: float | None = None
        self.rejection: str | None = None
        self.seconds: float | None = None  # the evaluator's: loading, checks and scoring
        self.causal_seconds: float | None = None
        self._process: EvaluatorProcess | None = None

    def __enter__(self) -> TrustedEval:
        from .evaluator import EvaluatorProcess

        self._process = EvaluatorProcess(self.lab, "val", self.device, self.device_env)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._process is not None:
            self._process.close()

    def env(self) -> dict[str, str]:
        """What tells prepare.py in the run where to hand its model over."""
        return {"AUTORESEARCH_HANDOFF": str(self.folder), "AUTORESEARCH_HANDOFF_TIMEOUT": f"{self.eval_allowance:g}"}

    def evaluate(self, folder: Path) -> None:
        """Called by the runner (in its thread) when the model has been handed over."""
        from .evaluator import Rejection

        assert self._process is not None, "TrustedEval is entered (with ...) before the run starts"
        result = self._process.score(folder / "model.pt2", timeout=self.eval_allowance)
        if isinstance(result, Rejection):
            self.rejection = f"{result.kind}: {result.error}"
            runner_mod.write_handoff_result(folder, {"error": f"the evaluator rejected the model ({self.rejection})"})
            return
        self.bpb, self.seconds, self.causal_seconds = result.bpb, result.seconds, result.causal_seconds
        runner_mod.write_handoff_result(folder, {"val_bpb": result.bpb})

    def problem(self, result: runner_mod.RunResult, printed: float | None) -> str | None:
        """Why the run's result cannot stand, or None."""
        if self.rejection:
            return f"the evaluator rejected the model: {self.rejection}"
        if result.handoff_seconds is None or self.bpb is None:
            return "the run never handed its model to the evaluator (train.py must call prepare.evaluate_bpb)"
        if result.handoff_seconds > self.budget + self.startup_allowance:
            return (f"trained past the budget: the model was handed over after {result.handoff_seconds:.1f} s "
                    f"(budget {self.budget:g} s + start-up allowance {self.startup_allowance:g} s)")
        if printed is not None and abs(printed - self.bpb) > 1e-4 * max(1.0, abs(self.bpb)):
            return f"the run printed val_bpb {printed:.6f} but the trusted evaluation is {self.bpb:.6f}"
        return None


def test_split_bpb(scratch: Path, trusted_lab: Path, timeout: float, device: str = "cpu",
                   device_env: Mapping[str, str] | None = None) -> tuple[float | None, str | None]:
    """Score a champion's handed-over model on the held-out test split, on the device it trained on:
    (bpb, None) or (None, why not). Never used for any decision: it makes overfitting the
    validation split by selection visible."""
    model = scratch / "handoff" / "model.pt2"
    if not model.is_file():
        return None, "its model was not kept"
    from .evaluator import EvaluatorFailed, Rejection, run_evaluator

    try:
        result = run_evaluator(model, trusted_lab, "test", timeout=timeout, device=device, extra_env=device_env)
    except EvaluatorFailed as exc:
        return None, str(exc)
    if isinstance(result, Rejection):
        return None, result.error
    return result.bpb, None


def drop_scratch(scratch: Path) -> None:
    """A discarded run's model is not needed again (a champion's is kept for the test split)."""
    shutil.rmtree(scratch, ignore_errors=True)
