"""The agent seam: what an agent sees (ResearchContext) and what it returns (Proposal).

The loop is ours; an agent only proposes. Every backend — the built-in `hparam` search, replayed
`patches:`, LLMs, coding assistants — implements the same two methods.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from ..errors import AutoresearchError
from ..ledger import Experiment


class AgentError(AutoresearchError):
    """An agent could not produce a proposal (bad spec, missing directory, broken reply)."""


@dataclass(frozen=True)
class ResearchContext:
    """Everything an agent may look at when proposing the next experiment."""

    program: str  # the research brief, program.md
    files: dict[str, str]  # the champion's editable files: path -> content
    history: list[Experiment]  # every experiment of this tag so far, oldest first
    champion_commit: str
    champion_metric: float | None
    metric_name: str
    direction: str  # "min" or "max"
    budget: float  # training seconds per experiment
    last_failure: Experiment | None = None  # the latest crash, for agents that repair
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Proposal:
    """One change to try. Either `files` (new full contents) or `patch` (a unified diff)."""

    description: str  # one line: becomes the commit message and the results.tsv description
    files: dict[str, str] = field(default_factory=dict)  # path -> new content
    patch: str | None = None  # a unified diff against the champion, applied with `git apply`
    rationale: str = ""
    meta: dict[str, Any] = field(default_factory=dict)  # stored in the ledger; the agent may read it back
    error: str | None = None  # the agent could not produce a valid change: recorded as invalid, nothing runs


class Agent(Protocol):
    """Proposes experiments. `propose` returns None when it has nothing left to try.

    Optional, looked up with getattr by the loop:
    - `slow: bool` — proposing takes long (an LLM): the loop prepares the next proposal while the
      current experiment runs, so the device does not sit idle.
    - `repair(context, failed, log_tail, attempt) -> Proposal | None` — fix a crashed change; the
      context's files are then the failed experiment's, and the returned files replace them.
    """

    name: str

    def propose(self, context: ResearchContext) -> Proposal | None: ...
