"""Many experiments at once: a pool of workers over the loop's own steps.

`autoresearch run --workers N` gives each worker one GPU or a disjoint set of cores (execution.Slot)
and a worktree of its own; `--ray` gives each worker a GPU (or the cores) of a Ray cluster's node,
where the same run step executes (ray_backend.py). This module is only the scheduler: every worker is
a thread that claims the next piece of work and does it with the loop's methods (Loop.lane tells
them which worker they serve), so recording, running, judging and recovery are the single loop's.

What the scheduler adds, all decided under `Loop.mutex`:
- claims in order: what a killed orchestrator left unfinished, the baseline, its repeats (in
  parallel; nothing is judged before the noise is known), a re-measurement of the noise when the tag
  ran under other resources before, the champion's periodic re-measurement, then new experiments
  (counted against --max-experiments before they are proposed, so the plan is never overshot);
- the champion can change while a candidate runs: Loop._judge then keeps nothing on a stale parent,
  and a candidate that beat its old parent is merged onto the new champion and run there first;
- Ctrl-C once lets running experiments finish; twice ends them (recorded as killed). A worker whose
  Ray node died hands its experiment back (run again under the same id, the attempt recorded) and
  stops; the others go on.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .agents.base import Agent, Proposal, ResearchContext
from .errors import ConfigError, NodeLost
from .execution import device_of, local_slots, visible_gpus
from .judge import block_of
from .ledger import Experiment
from .procgroup import group_alive, kill_group

if TYPE_CHECKING:
    from .loop import Lane, Loop


class Serialized:
    """One agent shared by several workers: its calls are made one at a time (an agent keeps state:
    Optuna's study, an LLM's conversation), from whichever worker needs a proposal."""

    def __init__(self, agent: Agent) -> None:
        self.inner = agent
        self._lock = threading.Lock()
        self.name, self.slow, self.can_rebase = agent.name, agent.slow, agent.can_rebase

    def propose(self, context: ResearchContext) -> Proposal | None:
        with self._lock:
            result: Proposal | None = self.inner.propose(context)
            return result

    def repair(self, context: ResearchContext, failed: Experiment, log_tail: str, attempt: int,
               max_attempts: int) -> Proposal | None:
        with self._lock:
            return self.inner.repair(context, failed, log_tail, attempt, max_attempts)

    def rebase(self, proposal: Proposal, files: dict[str, str]) -> Proposal | None:
        with self._lock:
            return self.inner.rebase(proposal, files)


def plan_lanes(loop: Loop) -> None:
    """Give `loop` its workers for --workers / --ray. One local worker leaves the plain loop as it is."""
    from .loop import Lane

    options = loop.options
    if options.ray is not None:
        from .ray_backend import RayCluster, fingerprints

        cluster = loop.cluster = RayCluster(options.ray, loop.lab)
        slots = cluster.slots()
        if not slots:
            raise ConfigError("the Ray cluster has no node to run on", "start a node with `ray start --address ...`")
        cluster.check_nodes(fingerprints(loop.config))  # same data, tokenizer and code everywhere, or refused
    else:
        device = loop.lanes[0].device.type
        slots = local_slots(options.workers or 0, device, visible_gpus() if device == "cuda" else None)
        if len(slots) == 1:
            return
    lanes = [Lane(slot, loop.lab.worktree(loop.tag, slot.name), device_of(loop.lab, slot)) for slot in slots]
    regimes = {regime_of(loop, lane) for lane in lanes}
    if len(regimes) > 1:
        raise ConfigError(f"the workers would run under different resources ({', '.join(sorted(regimes))}): their "
                          "metrics would not be comparable", "give every worker the same kind of device")
    loop.lanes, loop.parallel, loop.regime = lanes, True, regimes.pop()
    loop.agent = Serialized(loop.agent)


def regime_of(loop: Loop, lane: Lane) -> str:
    """A worker's resources as the judge compares them. A Ray worker on CPUs is not bound to cores (Ray
    counts them): its share is the number of CPUs Ray gives each of its runs."""
    if loop.cluster is not None and lane.slot.gpu is None:
        return f"cpu x{loop.cluster.cores(lane.slot):g}"
    return lane.slot.regime(lane.device.type)


@dataclass
class Work:
    """A piece of work a worker claimed: `eid` is the experiment it is about (known once recorded)."""

    what: str
    do: Callable[[Work], None]
    eid: int | None = None


class Pool:
    """The workers of one run and what they have claimed."""

    def __init__(self, loop: Loop) -> None:
        self.loop = loop
        self.cond = threading.Condition(loop.mutex)
        self.errors: list[BaseException] = []
        self.alive = 0
        self.resume = self._left_unfinished()
        self.proposing = threading.Lock()  # a quick agent proposes and records one experiment at a time

    # -- what is left to do -----------------------------------------------------------------

    def _left_unfinished(self) -> list[int]:
        """A killed orchestrator's unfinished rows, each once: a candidate's judging resumes its own
        repeats (judge.next_step's `resume`), so those are not separate work."""
        rows = self.loop.ledger.unfinished(self.loop.tag)
        ids = {e.id for e in rows}
        owned = {e.id for e in rows if e.kind == "repeat" and (block_of(e) in ids - {e.id} or e.meta.get("for") in ids)}
        return [e.id for e in rows if e.id not in owned]

    def _running(self, test: Callable[[Experiment], bool]) -> bool:
        return any(e.status in ("pending", "running") and test(e) for e in self.loop.ledger.experiments(self.loop.tag))

    def claim(self) -> Work | None:
        """The next piece of work for a free worker; None when it should stop. Waits while the noise
        is being measured (nothing may be judged before it is known)."""
        loop = self.loop
        with self.cond:
            while True:
                if loop.stop_reason or loop.abandon.is_set() or self.errors:
                    return None
                if self.resume:
                    eid = self.resume.pop(0)
                    loop.view.message(f"resuming experiment {eid} ({loop.ledger.get(eid).description})")
                    return Work("resume", self._resume, eid)
                base = loop._baseline()
                if base is None:
                    if self._running(lambda e: e.kind == "baseline"):
                        self.cond.wait(1.0)
                        continue
                    return Work("baseline", self._baseline, loop.add_baseline())
                history = loop.judged()
                block = [e for e in history if e.kind == "repeat" and block_of(e) == base.id]
                running = sum(1 for e in block if e.status in ("pending", "running"))
                if loop.procedure.baseline_short(base, history, running):
                    return Work("repeat", self._execute, loop.add_repeat(base, block=base.id))
                if running:
                    self.cond.wait(1.0)
                    continue
                if loop.regime_short():
                    champ = loop._champion_row()
                    assert champ is not None
                    if not any(e.kind == "repeat" and block_of(e) == loop._regime_block() for e in history):
                        loop.view.message(f"this tag ran under other resources before: measuring the noise again "
                                          f"under {loop.regime}")
                    return Work("repeat", self._execute, loop.add_repeat(champ, block=loop._regime_block()))
                if self._running(lambda e: e.kind == "repeat" and block_of(e) == loop._regime_block()):
                    self.cond.wait(1.0)
                    continue
                champ = loop._champion_row()
                if (champ is not None and loop.procedure.remeasure_due(champ, history)
                        and not self._running(lambda e: e.repeat_of == champ.id and block_of(e) == e.id)):
                    loop.view.message(f"re-measuring the champion #{champ.id}")
                    return Work("repeat", self._execute, loop.add_repeat(champ, block=None))
                reason = loop._limit_reached(loop._started)
                if reason:
                    loop.stop_reason = reason
                    return None
                loop.reserved += 1  # counted against --max-experiments from now
                return Work("experiment", self._experiment)

    # -- doing it -------------------------------------------------------------------------------

    def _resume(self, work: Work) -> None:
        assert work.eid is not None
        self.loop._check_baseline(self.loop._execute(work.eid))

    def _baseline(self, work: Work) -> None:
        assert work.eid is not None
        self.loop._check_baseline(self.loop._execute(work.eid))

    def _execute(self, work: Work) -> None:
        assert work.eid is not None
        self.loop._execute(work.eid)

    def _experiment(self, work: Work) -> None:
        loop = self.loop
        e, reserved = None, True
        try:
            # A quick agent (hparam) sees every experiment in flight, each recorded before the next is
            # proposed; a slow one's proposals are prepared ahead per worker (Loop._start_prefetch).
            with self.proposing if not loop.agent.slow else _NO_LOCK:
                context = loop.context()
                got = loop._next_proposal(context)
                with self.cond:  # the row appears and the reservation goes in one step: never counted twice
                    if got is not None:
                        proposal, took, waited = got
                        e = loop._record(proposal, context, took, waited)
                        work.eid = e.id
                    loop.reserved -= 1
                    reserved = False
        finally:
            if reserved:
                with self.cond:
                    loop.reserved -= 1
        if e is not None and e.status == "running":
            loop._repair(loop._execute(e.id))

    def worker(self, lane: Lane) -> None:
        """One worker's thread: claim, do, until there is nothing left or the run stops."""
        from .loop import Abandoned

        loop = self.loop
        loop._here.lane = lane
        try:
            while (work := self.claim()) is not None:
                try:
                    work.do(work)
                except NodeLost as exc:
                    self._lost(lane, work, exc)
                    return
                finally:
                    with self.cond:  # whoever waits for the noise or a re-measurement looks again
                        self.cond.notify_all()
        except Abandoned:
            pass
        except BaseException as exc:  # noqa: BLE001  (handed to the main thread, which re-raises it)
            with self.cond:
                self.errors.append(exc)
                self.cond.notify_all()
        finally:
            with self.cond:
                self.alive -= 1
                self.cond.notify_all()

    def _lost(self, lane: Lane, work: Work, exc: BaseException) -> None:
        """A worker's Ray node died: its experiment goes back to the others (same id, next attempt)."""
        with self.cond:
            if work.eid is not None:
                self.resume.append(work.eid)
            self.loop.view.message(f"worker {lane.slot.name} lost its node ({exc}); "
                                   + (f"experiment {work.eid} runs again on another worker" if work.eid else ""))
            self.cond.notify_all()

    # -- the main thread ------------------------------------------------------------------------

    def run(self) -> None:
        loop = self.loop
        threads = [threading.Thread(target=self.worker, args=(lane,), name=f"autoresearch-{lane.slot.name}",
                                    daemon=True) for lane in loop.lanes]
        self.alive = len(threads)
        for t in threads:
            t.start()
        # Waits on the workers' own count, not Thread.join: a KeyboardInterrupt inside join() can mark
        # a thread that still runs as stopped (CPython bpo-45274), and its experiment would be left
        # `running` in the ledger.
        try:
            while self.alive > 0:
                time.sleep(0.2)
        except KeyboardInterrupt:  # the second Ctrl-C: end every running experiment
            self.abandon()
            while self.alive > 0:
                with contextlib.suppress(KeyboardInterrupt):  # a third changes nothing: they are ending
                    time.sleep(0.2)
            loop.stop_reason = "stopped by Ctrl-C"
        if self.errors:
            raise self.errors[0]
        with self.cond:
            left = self.resume
        if left and not loop.stop_reason:
            loop.stop_reason = f"every worker's node was lost ({len(left)} experiment(s) left to run again)"
        if not loop.stop_reason:
            loop.stop_reason = "every worker stopped"

    def abandon(self) -> None:
        loop = self.loop
        loop.abandon.set()
        loop.view.message("Ctrl-C again: ending the running experiments")
        for e in loop.ledger.unfinished(loop.tag):
            if e.pgid and loop.cluster is None and group_alive(e.pgid):
                kill_group(e.pgid)


_NO_LOCK = contextlib.nullcontext()


def run_lanes(loop: Loop) -> None:
    """Run `loop`'s experiments on all its workers until a limit, the agent running out, or Ctrl-C."""
    loop.view.workers([(lane.slot.name, lane.slot.describe(lane.device.type)) for lane in loop.lanes])
    Pool(loop).run()

