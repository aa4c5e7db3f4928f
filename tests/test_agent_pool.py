"""A research community: agents share one run in proportion to their weights, deterministically."""

from __future__ import annotations

import dataclasses
import threading
from collections import Counter
from typing import Any

import pytest

from autoresearch.agents import AgentPool
from autoresearch.agents.base import AgentBase, AgentError, Proposal, ResearchContext
from autoresearch.errors import AgentUnavailable
from autoresearch.experiment import Experiment


class Fake(AgentBase):
    """Proposes `left` numbered changes, then nothing; repairs when `repairs`; records its calls."""

    def __init__(self, name: str, left: int = 1_000, repairs: bool = True, slow: bool = False) -> None:
        self.name, self.left, self.slow, self.repairs = name, left, slow, repairs
        self.calls = 0
        self.repaired: list[int] = []

    def propose(self, context: ResearchContext) -> Proposal | None:
        self.calls += 1
        if self.left <= 0:
            return None
        self.left -= 1
        return Proposal(description=f"{self.name} idea {self.calls}", meta={"by": self.name})

    def repair(self, context: ResearchContext, failed: Experiment, log_tail: str, attempt: int,
               max_attempts: int) -> Proposal | None:
        if not self.repairs:
            return None  # as AgentBase does
        self.repaired.append(failed.id)
        return Proposal(description=f"fix #{failed.id} ({log_tail}, {attempt}/{max_attempts})")


class Down(Fake):
    """A member whose service is down until `up` is set."""

    up = False

    def propose(self, context: ResearchContext) -> Proposal | None:
        if not self.up:
            raise AgentUnavailable(f"{self.name} is down")
        return super().propose(context)


def experiment(id: int, agent: str, **fields: Any) -> Experiment:
    values: dict[str, Any] = {f.name: None for f in dataclasses.fields(Experiment)}
    values.update(id=id, run_id=1, tag="t", kind="experiment", parent_commit="a" * 40, agent=agent,
                  description="x", status="discard", created_at=0.0)
    values.update(fields)
    return Experiment(**values)


def context(history: list[Experiment] | None = None) -> ResearchContext:
    return ResearchContext(program="", files={}, history=list(history or []), champion_commit="c" * 40,
                           champion_metric=1.0, metric_name="score", direction="min", budget=1.0)


@pytest.mark.parametrize("recorded", [False, True])
def test_weights_two_to_one_give_twenty_and_ten_of_thirty(recorded: bool) -> None:
    """Whether the loop records each proposal before asking again or not (prepared ahead)."""
    pool = AgentPool([(Fake("a"), 2.0), (Fake("b"), 1.0)])
    history: list[Experiment] = [experiment(1, pool.name, kind="baseline", status="keep")]
    drawn = []
    for _ in range(30):
        proposal = pool.propose(context(history))
        assert proposal is not None and proposal.agent is not None
        assert proposal.description.startswith(proposal.agent)  # the member's own proposal, named
        drawn.append(proposal.agent)
        if recorded:
            history.append(experiment(len(history) + 1, proposal.agent))
    assert Counter(drawn) == {"a": 20, "b": 10}
    assert drawn[:6] == ["a", "b", "a", "a", "b", "a"]  # the fewest per weight first, ties by order


def test_the_draw_counts_the_history_on_resume() -> None:
    history = [experiment(i, "a") for i in range(1, 7)]  # a run before this one: 6 by a, none by b
    pool = AgentPool([(Fake("a"), 1.0), (Fake("b"), 1.0)])
    drawn = [p.agent for p in (pool.propose(context(history)) for _ in range(8)) if p is not None]
    assert drawn == ["b"] * 6 + ["a", "b"]
    assert pool.counts(history) == {"a": 7, "b": 7}


def test_an_exhausted_member_drops_out_then_the_pool_is_done() -> None:
    a, b = Fake("a", left=5), Fake("b", left=2)
    pool = AgentPool([(a, 1.0), (b, 1.0)])
    drawn = []
    while (proposal := pool.propose(context())) is not None:
        drawn.append(proposal.agent)
    assert Counter(drawn) == {"a": 5, "b": 2}
    assert drawn[:4] == ["a", "b", "a", "b"] and drawn[4:] == ["a", "a", "a"]
    assert pool.exhausted == {"a", "b"}
    calls = (a.calls, b.calls)
    assert pool.propose(context()) is None
    assert (a.calls, b.calls) == calls  # a member that said "nothing more" is not asked again


def test_repair_goes_to_the_member_that_proposed_the_change() -> None:
    a, b, c = Fake("a"), Fake("b"), Fake("c", repairs=False)
    pool = AgentPool([(a, 1.0), (b, 1.0), (c, 1.0)])
    fixed = pool.repair(context(), experiment(7, "b", status="crash"), "Traceback", 1, 2)
    assert fixed is not None and fixed.agent == "b" and fixed.description == "fix #7 (Traceback, 1/2)"
    assert a.repaired == [] and b.repaired == [7]
    assert pool.repair(context(), experiment(8, "c", status="crash"), "", 1, 2) is None  # c cannot repair
    assert pool.repair(context(), experiment(9, "someone else", status="crash"), "", 1, 2) is None
    assert pool.counts([]) == {"a": 0, "b": 1, "c": 0}  # the fix will be an experiment of b's


def test_duplicate_names_get_suffixes_and_proposals_carry_them() -> None:
    first, second, third = Fake("hparam"), Fake("hparam"), Fake("hparam")
    pool = AgentPool([(first, 1.0), (second, 1.0), (Fake("patches:p"), 1.0), (third, 1.0)])
    assert pool.names == ("hparam", "hparam#2", "patches:p", "hparam#3")
    assert pool.name == "hparam+hparam#2+patches:p+hparam#3"
    assert pool.member("hparam#2") is second and pool.member("hparam") is first and pool.member("nobody") is None
    assert [p.agent for p in (pool.propose(context()) for _ in range(4)) if p] == list(pool.names)
    assert second.calls == 1 and third.calls == 1 and first.name == "hparam"  # the members keep their names
    fixed = pool.repair(context(), experiment(3, "hparam#3", status="crash"), "", 1, 2)
    assert fixed is not None and fixed.agent == "hparam#3" and third.repaired == [3] and first.repaired == []


def test_the_proposal_is_the_members_with_its_name_set() -> None:
    pool = AgentPool([(Fake("solo"), 1.0)])
    proposal = pool.propose(context())
    assert proposal == Proposal(description="solo idea 1", meta={"by": "solo"}, agent="solo")
    assert pool.name == "solo" and pool.can_rebase is False


def test_slow_when_any_member_is() -> None:
    assert AgentPool([(Fake("a"), 1.0), (Fake("b", slow=True), 1.0)]).slow is True
    assert AgentPool([(Fake("a"), 1.0), (Fake("b"), 1.0)]).slow is False


@pytest.mark.parametrize("weight", [0.0, -1.0, float("nan")])
def test_weights_must_be_positive(weight: float) -> None:
    with pytest.raises(AgentError, match="above 0"):
        AgentPool([(Fake("a"), 1.0), (Fake("b"), weight)])
    with pytest.raises(AgentError, match="at least one"):
        AgentPool([])


def test_a_member_whose_service_is_down_is_passed_over() -> None:
    down = Down("llm")
    pool = AgentPool([(down, 1.0), (Fake("hparam"), 1.0)])
    assert [p.agent for p in (pool.propose(context()) for _ in range(3)) if p] == ["hparam"] * 3
    down.up = True
    # back: it catches up to its share (3 each, then the tie goes by order), then they alternate
    assert [p.agent for p in (pool.propose(context()) for _ in range(5)) if p] == ["llm"] * 4 + ["hparam"]
    alone = AgentPool([(Down("llm"), 1.0), (Down("other"), 1.0)])
    with pytest.raises(AgentUnavailable, match="llm is down"):  # every one down: the loop pauses
        alone.propose(context())
    assert alone.counts([]) == {"llm": 0, "other": 0}  # a turn without a proposal is not counted


def test_concurrent_callers_take_turns_by_weight() -> None:
    """Two workers asking at once: the turn is taken before the member is asked."""
    gate = threading.Event()

    class Slow(Fake):
        def propose(self, context: ResearchContext) -> Proposal | None:
            gate.wait(5)
            return super().propose(context)

    pool = AgentPool([(Slow("a"), 1.0), (Slow("b"), 1.0)])
    got: list[str | None] = []
    threads = [threading.Thread(target=lambda: got.append(getattr(pool.propose(context()), "agent", None)))
               for _ in range(2)]
    for t in threads:
        t.start()
    gate.set()
    for t in threads:
        t.join(5)
    assert sorted(got, key=str) == ["a", "b"]
