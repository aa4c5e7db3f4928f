"""The judge: keep a candidate or not.

This is the simple ratchet of the original (keep when strictly better). It is a separate piece so a
noise-aware judge can replace it without touching the loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol


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
