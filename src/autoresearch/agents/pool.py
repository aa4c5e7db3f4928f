"""A research community: several agents share one run, each proposing in proportion to its weight.

The draw is deterministic: the next proposal comes from the member with the fewest proposals per
unit of weight (ties by order), counted from the history (experiments whose `agent` is the member's
name) plus the ones the pool handed out that the history does not show yet. Weights 2:1 give 20 and
10 of 30 proposals, exactly. A member that has nothing more to propose leaves the draw; the pool is
exhausted when every member is. Every member sees the whole history, and who proposed each row.

Each proposal carries its member's name (`Proposal.agent`); names are made unique (`hparam`,
`hparam#2`). Repairs go to the member that proposed the failed change. The pool does not rebase:
the loop asks `member(proposal.agent)` for the one that can.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import replace

from ..errors import AgentUnavailable
from ..experiment import Experiment
from .base import Agent, AgentBase, AgentError, Proposal, ResearchContext


class AgentPool(AgentBase):
    """Agents with weights, behind the one Agent interface."""

    can_rebase = False  # the loop rebases with `member(proposal.agent)` when that one can, else by a merge

    def __init__(self, members: Sequence[tuple[Agent, float]]) -> None:
        if not members:
            raise AgentError("an agent pool needs at least one agent")
        names: list[str] = []
        for agent, weight in members:
            if not weight > 0:  # NaN too
                raise AgentError(f"agent {agent.name!r} has weight {weight!r}", "give every agent a weight above 0")
            name, n = agent.name, 1
            while name in names:
                n += 1
                name = f"{agent.name}#{n}"
            names.append(name)
        self.names = tuple(names)  # the members' names as the pool (and the ledger) knows them
        self.agents = tuple(agent for agent, _ in members)
        self.weights = tuple(float(weight) for _, weight in members)
        self.name = "+".join(self.names)
        self.slow = any(agent.slow for agent in self.agents)
        self.exhausted: set[str] = set()
        self._handed = dict.fromkeys(self.names, 0)  # proposals this pool returned (or is asking for), per member
        self._seen: dict[str, int] | None = None  # the history's count per member when the pool began
        self._lock = threading.RLock()  # the draw: workers (and a repair beside a prepared proposal) ask at once
        self._busy = {name: threading.Lock() for name in self.names}  # one call into a member at a time

    def member(self, name: str | None) -> Agent | None:
        """The member the pool calls `name` (a Proposal's or an experiment's `agent`), else None."""
        return dict(zip(self.names, self.agents)).get(name) if name is not None else None

    def counts(self, history: Sequence[Experiment]) -> dict[str, int]:
        """Proposals so far per member: the history's experiments by it, or more when the pool has
        handed out some the history does not show yet."""
        shown = dict.fromkeys(self.names, 0)
        for e in history:
            if e.kind == "experiment" and e.agent in shown:
                shown[e.agent] += 1
        with self._lock:
            if self._seen is None:
                self._seen = dict(shown)
            return {n: max(shown[n], self._seen[n] + self._handed[n]) for n in self.names}

    def order(self, history: Sequence[Experiment]) -> list[str]:
        """The members still in the draw, the next to propose first."""
        counts = self.counts(history)
        ranked = sorted(range(len(self.names)), key=lambda i: (counts[self.names[i]] / self.weights[i], i))
        return [self.names[i] for i in ranked if self.names[i] not in self.exhausted]

    def propose(self, context: ResearchContext) -> Proposal | None:
        """The next member's proposal; a member with nothing left drops out and the next one is
        asked. A member whose service is down is passed over this once (it stays first in line);
        when every member's is, the first one's error is raised, for the loop to pause."""
        passed: set[str] = set()
        unavailable: AgentUnavailable | None = None
        while True:
            with self._lock:  # the turn is taken before the member is asked: a second worker asks the next
                name = next((n for n in self.order(context.history) if n not in passed), None)
                if name is None:
                    break
                self._handed[name] += 1
            try:
                with self._busy[name]:
                    proposal = self._agent(name).propose(context)
            except AgentUnavailable as exc:
                self._give_back(name)
                passed.add(name)
                unavailable = unavailable or exc
                continue
            except BaseException:
                self._give_back(name)
                raise
            if proposal is None:
                self._give_back(name, exhausted=True)
                continue
            return replace(proposal, agent=name)
        if unavailable is not None:
            raise unavailable
        return None

    def repair(self, context: ResearchContext, failed: Experiment, log_tail: str, attempt: int,
               max_attempts: int) -> Proposal | None:
        """The fix of a crashed change, by the member that proposed it (None when it cannot repair)."""
        agent = self.member(failed.agent)
        if agent is None:
            return None
        with self._busy[failed.agent]:
            proposal = agent.repair(context, failed, log_tail, attempt, max_attempts)
        if proposal is None:
            return None
        with self._lock:
            self._handed[failed.agent] += 1  # a repair is an experiment of its member too
        return replace(proposal, agent=failed.agent)

    def _agent(self, name: str) -> Agent:
        return self.agents[self.names.index(name)]

    def _give_back(self, name: str, exhausted: bool = False) -> None:
        """A turn that produced no proposal; `exhausted`: the member has nothing more to propose."""
        with self._lock:
            self._handed[name] -= 1
            if exhausted:
                self.exhausted.add(name)
