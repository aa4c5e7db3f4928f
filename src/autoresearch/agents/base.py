"""The agent seam: what an agent sees (ResearchContext), what it returns (Proposal), and what the
loop may ask of it (Agent).

The loop is ours; an agent only proposes. Every backend — the built-in `hparam` search, replayed
`patches:`, LLMs, coding assistants — subclasses AgentBase, which gives every member of the Agent
protocol a default, and overrides what it does differently.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..errors import AutoresearchError
from ..experiment import Experiment


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
    agent: str | None = None  # who proposed it, when several agents share a run (None: the run's agent)


class Agent(Protocol):
    """Proposes experiments. Every member the loop uses is declared here (AgentBase has the defaults).

    - `name`: what the ledger records as the experiment's agent (its spec: "hparam", "openai:MODEL").
    - `slow`: proposing takes long (an LLM): the loop prepares the next proposal while the current
      experiment runs, so the device does not sit idle.
    - `can_rebase`: `rebase` can move a proposal made against the previous champion onto a new one
      (an LLM re-applies its SEARCH/REPLACE blocks); False: the loop merges its diff with git.
    """

    name: str
    slow: bool
    can_rebase: bool

    def propose(self, context: ResearchContext) -> Proposal | None:
        """The next experiment, or None when there is nothing left to try."""
        ...

    def repair(self, context: ResearchContext, failed: Experiment, log_tail: str, attempt: int,
               max_attempts: int) -> Proposal | None:
        """Fix the crashed change `failed` (the end of its log: `log_tail`; this is try `attempt` of
        `max_attempts`). The context's files are then the failed experiment's, and the returned files
        replace them. None: this agent does not repair, or gives up."""
        ...

    def rebase(self, proposal: Proposal, files: dict[str, str]) -> Proposal | None:
        """`proposal`, made against the previous champion, moved onto the new champion's editable
        `files`; None when it no longer fits. Called only when `can_rebase` is True."""
        ...


class AgentBase(ABC):
    """The defaults of the Agent protocol: fast, no repairs, proposals moved by the loop's merge.
    A subclass sets `name` and implements `propose`, and overrides the rest when it does more."""

    name: str
    slow: bool = False
    can_rebase: bool = False

    @abstractmethod
    def propose(self, context: ResearchContext) -> Proposal | None: ...

    def repair(self, context: ResearchContext, failed: Experiment, log_tail: str, attempt: int,
               max_attempts: int) -> Proposal | None:
        return None

    def rebase(self, proposal: Proposal, files: dict[str, str]) -> Proposal | None:
        raise NotImplementedError(f"{type(self).__name__} cannot rebase a proposal (can_rebase is False): "
                                  "the loop merges its diff onto the new champion instead")
