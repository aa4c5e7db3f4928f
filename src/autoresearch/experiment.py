"""One row of the ledger's experiments table, as agents, the judge and the reports see it.

A type of its own so that what reads experiments (agents above all) need not import the ledger,
which imports it (and re-exports both names).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

EXPERIMENT_REF = "refs/autoresearch/experiments/{id}"  # the git ref of every experiment's commit, kept forever


@dataclass(frozen=True)
class Experiment:
    """One row of the experiments table."""

    id: int
    run_id: int | None
    tag: str
    kind: str  # baseline, experiment or repeat
    parent_commit: str
    commit_sha: str | None
    agent: str
    description: str
    rationale: str | None
    patch: str | None
    status: str
    reason: str | None
    metric: float | None
    champion_metric: float | None
    summary_json: str | None
    memory_gb: float | None
    propose_seconds: float | None
    run_seconds: float | None
    evaluate_seconds: float | None
    log_path: str | None
    pid: int | None
    pgid: int | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    lines_changed: int | None
    outcome: str | None
    meta_json: str | None
    input_tokens: int | None = None
    output_tokens: int | None = None
    cost_usd: float | None = None
    repair_of: int | None = None
    wait_seconds: float | None = None
    repeat_of: int | None = None
    sigma: float | None = None
    test_metric: float | None = None
    printed_metric: float | None = None
    handoff_seconds: float | None = None
    sandbox: str | None = None
    cpu_seconds: float | None = None
    eval_seconds: float | None = None
    causal_seconds: float | None = None
    worker: str | None = None
    node: str | None = None
    attempt: int | None = None
    regime: str | None = None

    @property
    def meta(self) -> dict[str, Any]:
        """What the agent attached to its proposal (the hparam agent: the parameter values). A copy:
        the row is parsed once (the scheduler reads every row's meta on every claim)."""
        return dict(self._meta)

    @property
    def summary(self) -> dict[str, Any]:
        return dict(self._summary)

    @functools.cached_property
    def _meta(self) -> dict[str, Any]:
        return json.loads(self.meta_json) if self.meta_json else {}

    @functools.cached_property
    def _summary(self) -> dict[str, Any]:
        return json.loads(self.summary_json) if self.summary_json else {}

    @property
    def short_commit(self) -> str:
        return (self.commit_sha or self.parent_commit)[:7]


def runs_of(e: Experiment, history: list[Experiment]) -> list[Experiment]:
    """The successful runs of e's commit that count for it: e itself and its measured repeats."""
    own = [e] if e.metric is not None and e.outcome == "ok" else []
    return own + [x for x in history if x.repeat_of == e.id and x.status == "measured" and x.metric is not None]
