"""The judge: keep a candidate, discard it, or run it again first.

Two rules. `strict` is the original's ratchet: keep when strictly better. `noise` (the default)
keeps a gain only when it exceeds k times the run-to-run noise, measured on repeated runs of the
same commit; a borderline gain earns confirmation runs. The loop gathers the runs; this module says
which recorded runs count for a commit and does the arithmetic, so it can be replaced without touching
the loop.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Protocol

from .ledger import Experiment, runs_of


@dataclass(frozen=True)
class Decision:
    keep: bool
    reason: str  # one line for the ledger and the terminal


class Judge(Protocol):
    def decide(self, candidate: float, champion: float, direction: str) -> Decision: ...


def improvement(candidate: float, champion: float, direction: str) -> float:
    """How much better the candidate is (positive = better), in the metric's units."""
    return champion - candidate if direction == "min" else candidate - champion


class StrictJudge:
    """Keep when the metric is finite and strictly better than the champion's."""

    def decide(self, candidate: float, champion: float, direction: str) -> Decision:
        if not math.isfinite(candidate):
            return Decision(False, f"metric is {candidate}")
        gain = improvement(candidate, champion, direction)
        if gain > 0:
            return Decision(True, f"better by {gain:.6g}")
        return Decision(False, "not better" if gain < 0 else "equal to the champion")


@dataclass(frozen=True)
class JudgeConfig:
    """[judge] in autoresearch.toml."""

    mode: str = "noise"  # "noise": keep only gains beyond run-to-run noise; "strict": keep anything lower
    k: float = 2.0  # a gain must exceed k standard errors of the difference
    repeats: int = 4  # runs of the baseline, to measure the noise before the first decision (see NOTES.md)
    confirmations: int = 2  # extra runs a borderline candidate may get (gain between 1 and k standard errors)
    remeasure_every: int = 10  # experiments between re-runs of the champion (drift, lucky winners)


@dataclass(frozen=True)
class Verdict:
    action: str  # "keep", "discard" or "confirm" (run the candidate again, then decide)
    reason: str


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


OUTLIER_MIN_RUNS = 4  # fewer runs of one commit are never trimmed
OUTLIER_CUTOFF = 20.0  # scaled median absolute deviations from the median


def outliers(runs: list[float]) -> set[int]:
    """Indices of the runs of one commit that the machine disturbed.

    Another job or a stalled host can slow one run many times over: on 2 cores a 30 s baseline run
    once trained 4 steps instead of ~105 (val_bpb 2.40 against 1.56-1.57 for its three repeats), and
    kept in the statistics it set sigma to 0.34, so that nothing could be kept all night. A run more than
    OUTLIER_CUTOFF scaled MADs from the median is left out of the mean and the noise; the ledger keeps it.
    The cutoff is far out because the MAD of 4-6 Gaussian runs is itself unsteady: at 20, fewer than
    1 % of groups of plain noise lose a run (a simulation of 400,000 groups). Only groups of at least
    OUTLIER_MIN_RUNS are trimmed (the baseline, a re-measured champion), and the loop never trims the
    runs of a candidate it is judging: dropping its own worst run could only help it.
    """
    if len(runs) < OUTLIER_MIN_RUNS:
        return set()
    middle = statistics.median(runs)
    scale = 1.4826 * statistics.median(abs(x - middle) for x in runs)
    if scale == 0:
        return set()
    far = {i for i, x in enumerate(runs) if abs(x - middle) > OUTLIER_CUTOFF * scale}
    return far if len(runs) - len(far) >= OUTLIER_MIN_RUNS - 1 else set()


def without_outliers(runs: list[float]) -> list[float]:
    """The runs of one commit, those the machine disturbed left out (see outliers)."""
    far = outliers(runs)
    return [x for i, x in enumerate(runs) if i not in far]


def counted_runs(e: Experiment, history: list[Experiment], trim: bool = True) -> list[float]:
    """The metrics that count for e's commit: e's own run and its measured repeats (the baseline's
    repeats, confirmations, re-measurements of a champion); with `trim`, the runs the machine disturbed
    left out (see outliers). A champion's figure is the mean of these, as status and report show it."""
    runs = [x.metric for x in runs_of(e, history) if x.metric is not None]
    return without_outliers(runs) if trim else runs


def pooled_sigma(groups: list[list[float]]) -> float | None:
    """Run-to-run standard deviation, pooled over every group of repeated runs of one commit
    (each group's own mean removed, so real differences between commits do not count as noise)."""
    squares, dof = 0.0, 0
    for runs in groups:
        if len(runs) >= 2:
            m = mean(runs)
            squares += sum((x - m) ** 2 for x in runs)
            dof += len(runs) - 1
    return math.sqrt(squares / dof) if dof else None


def verdict(candidate: list[float], champion: list[float], sigma: float | None, direction: str, k: float,
            confirmations_left: int, simpler: bool) -> Verdict:
    """Keep, discard, or run again. The gain of the means must exceed k times the larger of sigma
    and the standard error of the difference, sigma * sqrt(1/n + 1/m); a gain between one standard
    error and that bar earns a confirmation run. With no noise estimate yet (a single run), this is
    the strict rule."""
    gain = improvement(mean(candidate), mean(champion), direction)
    if sigma is None:
        return Verdict("keep", f"better by {gain:.6g} (no noise estimate yet)") if gain > 0 else \
            Verdict("discard", "not better")
    se = sigma * math.sqrt(1 / len(candidate) + 1 / len(champion))
    # Never below k·σ: confirmation runs sharpen the estimate of the mean, but a gain smaller than the
    # noise of one run is not worth a commit (and a looser bar after each confirmation would let
    # borderline no-ops through by repeated chances).
    bar = k * max(se, sigma)
    runs = f"{len(candidate)} run{'s' if len(candidate) > 1 else ''}"
    if gain > bar:
        return Verdict("keep", f"better by {gain:.6g} > {bar:.3g} (σ {sigma:.3g}, {runs})")
    if gain > se and confirmations_left > 0:
        return Verdict("confirm", f"gain {gain:.6g} is between 1 and {k:g} standard errors: confirming")
    if simpler and gain > -se:
        return Verdict("keep", f"as good within noise ({gain:+.6g}, σ {sigma:.3g}) and simpler")
    if gain > 0:
        return Verdict("discard", f"gain {gain:.6g} is within the noise (needs > {bar:.3g}, {runs})")
    return Verdict("discard", "not better" if gain < -se else f"no gain beyond noise ({gain:+.6g})")
