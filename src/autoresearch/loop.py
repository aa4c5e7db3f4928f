"""The ratchet: baseline, then propose -> check -> commit -> run -> judge -> advance or not -> record.

The ledger is the source of truth; git refs and results.tsv are derived from it and repaired from
it when a run resumes. Every step is written down before the next one starts, so `kill -9` at any
moment loses nothing: running the same command again resumes.

Git layout: the branch `autoresearch/<tag>` points at the champion; every experiment's commit is
kept under `refs/autoresearch/experiments/<id>`; experiments run in a worktree of their own under
`.autoresearch/worktrees/<tag>`, so the person's checkout is never used and never wiped.
"""

from __future__ import annotations

import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType
from typing import Any

from . import compile_cache
from .agents.base import Agent, Proposal, ResearchContext
from .checks import (
    check_change,
    frozen_hashes,
    lines_changed,
    matches,
    net_lines,
    patch_hash,
)
from .errors import AgentUnavailable, AutoresearchError, GitError
from .execution import Job, Slot, device_of, run_job
from .experiment import EXPERIMENT_REF
from .gitrepo import Git
from .gpus import RunDevice, preflight
from .judge import Procedure, block_of, counted_runs, mean
from .lab import Lab
from .ledger import Experiment, Ledger
from .measurement import (
    champion_startup,
    drop_scratch,
    is_trusted,
    test_split_bpb,
    write_trusted_toml,
)
from .procgroup import group_alive, kill_group
from .proposals import Prefetch, apply_proposal, commit_message, log_tail, merge_onto
from .recovery import TagLock, clear_stale_git_locks, group_is_from
from .sandbox import notice as sandbox_notice
from .view import View

OUTCOME_LABEL = {"nan": "NaN or exploding loss", "oom": "out of memory"}
FIXABLE = ("crash", "oom", "nan")  # outcomes an agent may repair; a timeout is not a bug to patch
MAX_ATTEMPTS = 3  # runs of one experiment that a lost node or a killed orchestrator may interrupt
EXHAUSTED = (f"interrupted {MAX_ATTEMPTS} times (its node lost or the orchestrator killed): "
             "not run again")  # the reason such an experiment is given
CRASH_STATUS = {"invalid": "invalid", "crash": "crash", "nan": "crash", "oom": "crash", "timeout": "timeout", "killed": "killed"}


class LoopError(AutoresearchError):
    """The loop cannot go on: the baseline fails, the branch was moved by hand, ..."""


class Abandoned(Exception):
    """A second Ctrl-C ended the experiment a worker was running (recorded as killed)."""


@dataclass
class Lane:
    """One worker of a run: its share of the machine, its worktree (and that worktree's Git, found by
    _recover), and the proposal being prepared for it."""

    slot: Slot
    worktree: Path
    device: RunDevice
    wt: Git | None = None
    prefetch: Prefetch | None = None


def planned(history: list[Experiment]) -> int:
    """Experiments that count against --max-experiments: the agent's proposals (a change re-run on a
    new champion after it beat its old parent is the same idea, not a new one)."""
    return sum(1 for e in history if e.kind == "experiment" and "confirms" not in e.meta)


@dataclass(frozen=True)
class RunOptions:
    tag: str
    budget: float | None = None  # overrides the lab's budget
    max_experiments: int | None = None  # total experiments of this tag (a re-run finishes the plan)
    hours: float | None = None  # wall-clock limit of this invocation
    max_cost: float | None = None  # USD spent on the agent for this tag
    workers: int | None = None  # experiments at once on this machine (None: 1; 0: one per GPU, else 1 on a CPU)
    ray: str | None = None  # a Ray cluster's address ("auto": the one `ray start` made): one experiment per GPU


def ledger_path(lab: Lab) -> Path:
    return lab.ledger_path


STUDY_AGENTS = ("promote", "ablate")  # the agent names of carry.py's studies, which are not research runs


def latest_tag(runs: list[Any]) -> str | None:
    """The tag of the latest research run (a `promote` or `ablate` study after it is not one)."""
    research = [r for r in runs if r["agent"] not in STUDY_AGENTS]
    return str(research[-1]["tag"]) if research else None


def default_tag(lab: Lab) -> str:
    """The tag of the latest run in this lab (so re-running resumes it), else today's date (nov23)."""
    path = ledger_path(lab)
    if path.exists():
        with Ledger(path) as ledger:
            tag = latest_tag(ledger.runs())
            if tag is not None:
                return tag
    return time.strftime("%b%d").lower()


class Loop:
    """One `autoresearch run`: owns the ledger's writes for its tag."""

    def __init__(self, lab: Lab, agent: Agent, options: RunOptions, ledger: Ledger, view: View) -> None:
        self.lab, self.agent, self.options, self.ledger, self.view = lab, agent, options, ledger, view
        self.config = lab.config
        self.git = Git(lab.root)
        self.tag = options.tag
        self.branch = f"refs/heads/autoresearch/{self.tag}"
        self.logs = lab.logs
        self.results: Path | None = lab.root / "results.tsv"  # the tag's rows in the original's format (None: not written)
        self.budget = options.budget or self.config.budget
        self.run_id = 0
        self.stop_reason = ""
        self._stop_requested = False
        self._pause = 0.0
        self._started = time.monotonic()
        self._lock = TagLock(lab.lock(self.tag), self.tag)
        self.reserved = 0  # experiments being proposed by workers, not yet in the ledger
        self.procedure = Procedure(self.config.judge, self.config.metric.direction)
        # The workers: one (the whole machine, or the first GPU: gpus.run_device) unless --workers or
        # --ray ask for more (workers.py). Each has its slot, worktree and prepared proposal; the worker
        # whose thread runs a method is `self.lane`, so every step below serves them all.
        self.lanes = [Lane(Slot(), lab.worktree(self.tag), device_of(lab, Slot()))]
        self._here = threading.local()
        self.mutex = threading.RLock()  # claims of work and decisions, when several workers run
        self.parallel = False
        self.cluster: Any = None  # a ray_backend.RayCluster when the runs go to a Ray cluster
        self.abandon = threading.Event()  # a second Ctrl-C: every running experiment is ended
        self.single_regime = self.regime = self.lanes[0].slot.regime(self.lanes[0].device.type)

    @property
    def lane(self) -> Lane:
        """The worker this thread serves (the first one outside the workers' threads)."""
        return getattr(self._here, "lane", None) or self.lanes[0]

    @property
    def worktree(self) -> Path:
        return self.lane.worktree

    @property
    def slot(self) -> Slot:
        return self.lane.slot

    @property
    def device(self) -> RunDevice:
        return self.lane.device

    @property
    def _prefetch(self) -> Prefetch | None:
        return self.lane.prefetch

    @_prefetch.setter
    def _prefetch(self, value: Prefetch | None) -> None:
        self.lane.prefetch = value

    # -- public -----------------------------------------------------------------------------

    def run(self) -> str:
        """Run until a limit, the agent runs out, or Ctrl-C. Returns why it stopped."""
        return self.session(self._night)

    def session(self, body: Callable[[], None]) -> str:
        """Everything around the work of one invocation (`body`): the workers planned, the GPU
        checked, the tag locked, the run recorded, git and the ledger made to agree (_recover); then,
        whatever happens, the run's end recorded, results.tsv written and the tag freed. Ctrl-C once
        asks `body` to stop after the current experiment (self._stop_requested). Returns why it stopped."""
        self._check_tag()
        if self.options.ray is not None or (self.options.workers is not None and self.options.workers != 1):
            from .workers import plan_lanes

            plan_lanes(self)  # raises with a clear line before anything is locked or recorded
        # CUDA must start outside the sandbox before anything runs (a Ray node checks its own)
        gpu = {} if self.cluster is not None else preflight(self.device)
        for lane in self.lanes[1:] if self.cluster is None else ():
            preflight(lane.device)
        self._lock.acquire()
        self.logs.mkdir(parents=True, exist_ok=True)
        self.run_id = self.ledger.start_run(self.tag, self.agent.name, self._snapshot())
        previous = signal.getsignal(signal.SIGINT)
        if _is_main_thread():
            signal.signal(signal.SIGINT, self._on_sigint)
        self._started = time.monotonic()
        try:
            self._recover()
            self.view.start(self.lab.root.name, self.tag, self.agent.name, self.ledger.experiments(self.tag),
                            self.budget)
            if notice := sandbox_notice(self.config.sandbox):  # once, when runs get less than bubblewrap
                self.view.message(notice)
            if gpu:
                self.view.message(f"GPU {self.device.gpu}: {gpu['name']}, {gpu['free_gb']:.0f} of "
                                  f"{gpu['total_gb']:.0f} GiB free")
            body()
        except KeyboardInterrupt:
            self.stop_reason = "stopped by Ctrl-C"
        finally:
            if _is_main_thread():
                signal.signal(signal.SIGINT, previous)
            self.ledger.stop_run(self.run_id, self.stop_reason or "error")
            self._export()
            self.view.stop(self.stop_reason or "stopped by an error")
            self._lock.release()  # the tag is free for the next run
            if self.cluster is not None:
                self.cluster.close()
        return self.stop_reason

    def _night(self) -> None:
        """The research itself: the baseline and its repeats, then experiments until a limit."""
        if self.parallel:
            from .workers import run_lanes

            run_lanes(self)  # the same steps, on every worker at once
            return
        for e in self.ledger.unfinished(self.tag):  # first: what a killed orchestrator left running
            self.view.message(f"resuming experiment {e.id} ({e.description})")
            self._check_baseline(self._execute(e.id))
        if self._baseline() is None:
            self._run_baseline()
        self._measure_baseline()
        self._measure_regime()
        while not self.stop_reason:
            self.stop_reason = self._limit_reached(self._started)
            if self.stop_reason:
                break
            self._one_experiment()

    def champion(self) -> tuple[str | None, float | None]:
        """(commit, metric) of the latest kept experiment of this tag; the metric is the mean of all
        its runs (repeats included)."""
        row = self._champion_row()
        if row is None:
            return None, None
        runs = self._runs_of(row)
        return row.commit_sha, (mean(runs) if runs else row.metric)

    def _champion_row(self) -> Experiment | None:
        kept = [e for e in self.ledger.experiments(self.tag) if e.status == "keep"]
        return kept[-1] if kept else None

    def _runs_of(self, e: Experiment, history: list[Experiment] | None = None, trim: bool = True) -> list[float]:
        """The metric of `e` and of every successful repeat of it; with `trim`, runs the machine
        disturbed left out (never for a candidate being judged: dropping its worst run could only help it)."""
        return counted_runs(e, history if history is not None else self.ledger.experiments(self.tag), trim)

    # -- setup and recovery -----------------------------------------------------------------

    def _check_tag(self) -> None:
        if not self.tag or any(c in self.tag for c in " ~^:?*[\\") or self.tag.startswith("-"):
            raise LoopError(f"invalid tag {self.tag!r}", "use letters, digits, dots, dashes and underscores")
        if self.git.resolve("HEAD") is None:
            raise LoopError(f"{self.lab.root} has no commit yet", "commit the lab's files first")

    def _snapshot(self) -> dict[str, Any]:
        c = self.config
        return {"run": c.run, "budget": self.budget, "editable": c.editable, "frozen": c.frozen,
                "metric": c.metric.__dict__, "task": c.task.__dict__ if c.task else None,
                "startup_allowance": c.startup_allowance, "eval_allowance": c.eval_allowance,
                "max_experiments": self.options.max_experiments, "hours": self.options.hours,
                "workers": [{"name": ln.slot.name, "node": ln.slot.node, "runs_on": ln.slot.describe(ln.device.type)}
                            for ln in self.lanes], "regime": self.regime}

    def _recover(self) -> None:
        """Make git agree with the ledger after any interruption, and end orphaned runs."""
        clear_stale_git_locks(self.git, self.lab.root, self.tag)
        for e in self.ledger.unfinished(self.tag):
            if e.pgid and group_alive(e.pgid) and group_is_from(e.pgid, e.started_at):
                self.view.message(f"ending process group {e.pgid} left running by experiment {e.id}")
                kill_group(e.pgid)
            if e.commit_sha is None:  # recorded but never committed: it never ran
                self.ledger.update(e.id, status="killed", reason="interrupted before it ran", finished_at=time.time())
        for e in self.ledger.experiments(self.tag):
            ref = EXPERIMENT_REF.format(id=e.id)
            if e.commit_sha and self.git.resolve(ref) is None and self.git.resolve(e.commit_sha):
                self.git.update_ref(ref, e.commit_sha)
        commit, _ = self.champion()
        start = commit or self.git.resolve(self.branch) or self.git.head()
        if self.git.resolve(self.branch) != start:
            self.git.update_ref(self.branch, start)
        for lane in self.lanes:
            try:
                lane.wt = self.git.worktree(lane.worktree)
            except GitError:  # never made, or its registration is gone: make it anew
                shutil.rmtree(lane.worktree, ignore_errors=True)
                lane.worktree.parent.mkdir(parents=True, exist_ok=True)
                self.git.add_worktree(lane.worktree, start)
                lane.wt = self.git.worktree(lane.worktree)
            found = lane.wt.restore_gitfile()
            if found:
                self.view.message(f"restored the worktree's .git file ({found} was in its place)")
            lane.wt.reset_to(start)
        if self.cluster is not None and (ended := self.cluster.cleanup(self.tag)):
            self.view.message(f"ended {ended} run{'s' if ended > 1 else ''} an earlier head left on the cluster")

    @property
    def wt(self) -> Git:
        """Git in this worker's worktree: explicit git dir, no hooks (see gitrepo)."""
        wt = self.lane.wt
        assert wt is not None, "the worktrees are set up by _recover at the start of run()"
        return wt

    def _baseline(self) -> Experiment | None:
        rows = [e for e in self.ledger.experiments(self.tag) if e.kind == "baseline" and e.status == "keep"]
        return rows[0] if rows else None

    def _frozen(self) -> dict[str, str]:
        first = next(e for e in self.ledger.experiments(self.tag) if e.kind == "baseline")
        return frozen_hashes(self.git, first.commit_sha or first.parent_commit, self.config.frozen)

    # -- the steps --------------------------------------------------------------------------

    def _run_baseline(self) -> None:
        self._check_baseline(self._execute(self.add_baseline()))

    def add_baseline(self) -> int:
        start = self.git.resolve(self.branch) or self.git.head()
        eid = self.ledger.add(run_id=self.run_id, tag=self.tag, kind="baseline", parent_commit=start,
                              commit_sha=start, agent=self.agent.name, description="baseline", status="running",
                              lines_changed=0, regime=self.regime)
        self.git.update_ref(EXPERIMENT_REF.format(id=eid), start)
        return eid

    def _measure_baseline(self) -> None:
        """Run the baseline `repeats` times in all, so the noise is known before the first decision
        (runs the machine disturbed do not count: judge.baseline_runs)."""
        base = self._baseline()
        while base is not None and self.procedure.baseline_short(base, self.judged()):
            self._repeat(base, block=base.id)

    def judged(self) -> list[Experiment]:
        """The tag's rows the judge may compare: those of this run's regime (rows from before regimes
        were recorded were a single worker's)."""
        return [e for e in self.ledger.experiments(self.tag) if self.regime_of(e) == self.regime]

    def regime_of(self, e: Experiment) -> str:
        return e.regime or self.single_regime

    def regime_short(self) -> bool:
        """The tag ran under other resources before (another number of workers or cores): the noise
        and the champion's level are measured again under these, `repeats` runs of the champion,
        before anything is judged."""
        history = self.ledger.experiments(self.tag)
        champ = self._champion_row()
        if champ is None or not self.procedure.noise or all(self.regime_of(e) == self.regime for e in history):
            return False
        here = [e for e in history if self.regime_of(e) == self.regime]
        runs = [e for e in here if e.kind == "repeat" and e.repeat_of == champ.id and e.status == "measured"]
        runs += [champ] if self.regime_of(champ) == self.regime else []
        busy = [e for e in here if e.kind == "repeat" and e.repeat_of == champ.id and e.status in ("pending", "running")]
        attempts = [e for e in here if e.kind == "repeat" and block_of(e) == self._regime_block()]
        return len(attempts) < 2 * self.config.judge.repeats and len(runs) + len(busy) < self.config.judge.repeats

    def _regime_block(self) -> int:
        return -self.run_id  # the re-measurement of this invocation, a block of its own (judge.block_of)

    def _measure_regime(self) -> None:
        if not self.regime_short():
            return
        self.view.message(f"this tag ran under other resources before: measuring the noise again under "
                          f"{self.regime} ({self.config.judge.repeats} runs of the champion)")
        while self.regime_short():
            champ = self._champion_row()
            assert champ is not None
            self._repeat(champ, block=self._regime_block())

    def _repeat(self, of: Experiment, block: int | None, beside: Experiment | None = None) -> Experiment:
        """Run an experiment's commit again; the new row is linked to it and decides nothing itself.
        `block`: the measurement it belongs to (judge.block_of; None: one of its own), `beside`: the
        candidate being judged, when this is a run of the champion made for it."""
        return self._execute(self.add_repeat(of, block, beside))

    def add_repeat(self, of: Experiment, block: int | None, beside: Experiment | None = None) -> int:
        """The row (and ref) of a repeat, `running` from birth: a worker claims it by writing it."""
        note, meta = "", {"block": block}
        if beside is not None:
            note, meta = f" beside #{beside.id}", {"block": block, "for": beside.id}
        eid = self.ledger.add(run_id=self.run_id, tag=self.tag, kind="repeat", repeat_of=of.id,
                              parent_commit=of.parent_commit, commit_sha=of.commit_sha, agent=of.agent,
                              description=f"repeat of #{of.id}{note}: {of.description}", status="running",
                              lines_changed=0, meta=meta, regime=self.regime)
        assert of.commit_sha is not None
        self.git.update_ref(EXPERIMENT_REF.format(id=eid), of.commit_sha)
        return eid

    def _check_baseline(self, e: Experiment) -> None:
        """Stop when the baseline failed. One that the orchestrator's deaths interrupted too often is
        not the code's fault: it stays in the ledger as killed and a new baseline is measured."""
        if e.kind == "baseline" and e.status == "killed" and e.reason == EXHAUSTED:
            self.view.message(f"the baseline #{e.id} was {EXHAUSTED}; measuring a new baseline")
            return
        if e.kind == "baseline" and e.status != "keep":
            self.stop_reason = "baseline failed"
            raise LoopError(f"the baseline run failed ({e.reason}); nothing can be compared against it",
                            f"fix the code under study and run again; log: {e.log_path}")

    def _limit_reached(self, started: float) -> str:
        if self._stop_requested:
            return "stopped by Ctrl-C after finishing the experiment"
        done = planned(self.ledger.experiments(self.tag)) + self.reserved
        if self.options.max_experiments is not None and done >= self.options.max_experiments:
            return f"reached --max-experiments {self.options.max_experiments}"
        if self.options.hours is not None and time.monotonic() - started >= self.options.hours * 3600:
            return f"reached --hours {self.options.hours:g}"
        if self.options.max_cost is not None:
            spent = sum(e.cost_usd or 0.0 for e in self.ledger.experiments(self.tag))
            if spent >= self.options.max_cost:
                return f"reached --max-cost ${self.options.max_cost:g} (spent ${spent:.2f})"
        return ""

    def context(self, start: str | None = None) -> ResearchContext:
        """What the agent sees. `start` stands in for the champion while the baseline still runs."""
        commit, metric = self.champion()
        commit = commit or start
        assert commit is not None
        files = {p: (self.git.show(commit, p) or b"").decode("utf-8", errors="replace")
                 for p in self.git.ls_files(commit) if matches(p, self.config.editable)}
        program = self.lab.root / "program.md"
        history = self.ledger.experiments(self.tag)
        failures = [e for e in history if e.status in ("crash", "timeout")]
        return ResearchContext(
            program=program.read_text(encoding="utf-8") if program.is_file() else "",
            files=files, history=history, champion_commit=commit, champion_metric=metric,
            metric_name=self.config.metric.name, direction=self.config.metric.direction, budget=self.budget,
            last_failure=failures[-1] if failures and failures[-1] is history[-1] else None,
        )

    def _one_experiment(self) -> None:
        self._remeasure_champion()
        context = self.context()
        got = self._next_proposal(context)
        if got is None:
            return
        proposal, propose_seconds, wait_seconds = got
        e = self._record(proposal, context, propose_seconds, wait_seconds)
        if e.status == "running":
            self._repair(self._execute(e.id))

    def _remeasure_champion(self) -> None:
        """Every `remeasure_every` experiments, run the champion again: a lucky winner regresses to
        its mean, and the screen (judge._screen) compares new candidates with its level as it is now."""
        champ = self._champion_row()
        if champ is not None and self.procedure.remeasure_due(champ, self.judged()):
            self.view.message(f"re-measuring the champion #{champ.id} after {self.config.judge.remeasure_every} "
                              "experiments")
            self._repeat(champ, block=None)

    # -- getting a proposal: prepared ahead, paused when the agent's service is down -----------

    def _next_proposal(self, context: ResearchContext) -> tuple[Proposal, float, float] | None:
        """(proposal, seconds the agent took, seconds the loop waited), or None to go round again."""
        self.view.proposing(self.slot.name if self.parallel else None)
        prepared, self._prefetch = self._prefetch, None
        t0 = time.monotonic()
        if prepared is not None:
            prepared.thread.join()
            waited = time.monotonic() - t0
            if prepared.error is not None:
                self._agent_failed(prepared.error)
                return None
            took = prepared.seconds
            proposal = prepared.proposal
            # a proposal that failed (no valid edit) has nothing to move: it is recorded as invalid
            if proposal is not None and proposal.error is None \
                    and prepared.context.champion_commit != context.champion_commit:
                proposal = self._rebase(proposal, prepared.context.champion_commit, context.champion_commit)
                if proposal is None:  # no longer applies to the new champion: ask afresh
                    return self._next_proposal(context)
        else:
            try:
                proposal = self.agent.propose(context)
            except AutoresearchError as exc:
                self._agent_failed(exc)
                return None
            took = waited = time.monotonic() - t0
        if proposal is None:
            self.stop_reason = "the agent has nothing more to propose"
            return None
        self._pause = 0.0
        return proposal, took, waited

    def _agent_failed(self, exc: BaseException) -> None:
        """A service that is down pauses the loop (longer each time); anything else stops it."""
        if isinstance(exc, AgentUnavailable):
            self._pause = min(max(self._pause * 2, self.config.pause_seconds), self.config.max_pause_seconds)
            self.view.message(f"the agent is unavailable: {exc}; pausing {self._pause:.0f} s, then trying again")
            deadline = time.monotonic() + self._pause
            while time.monotonic() < deadline and not self._stop_requested:
                time.sleep(min(1.0, deadline - time.monotonic()))
            return None
        if isinstance(exc, AutoresearchError):
            self.stop_reason = f"the agent failed: {exc}"
            return None
        raise exc

    def _start_prefetch(self, running: Experiment) -> None:
        """Ask a slow agent for the next proposal while the current experiment runs (the baseline
        included: it runs the code the first proposal starts from)."""
        if not self.agent.slow or self._prefetch is not None or self._stop_requested:
            return
        done = planned(self.ledger.experiments(self.tag)) + self.reserved
        if self.options.max_experiments is not None and done >= self.options.max_experiments:
            return  # this is the last experiment: a proposal now would be wasted
        if self.champion()[0] is None and running.kind != "baseline":
            return
        self._prefetch = Prefetch(self.agent, self.context(start=running.commit_sha))

    def _rebase(self, proposal: Proposal, old: str, new: str) -> Proposal | None:
        """A proposal prepared against the previous champion, moved onto the new one: by the agent
        itself when it can (an LLM re-applies its SEARCH/REPLACE blocks), else by a three-way merge
        of its diff. None when it no longer fits."""
        meta = {**proposal.meta, "rebased_from": old}
        if self.agent.can_rebase:
            files = {p: (self.git.show(new, p) or b"").decode("utf-8", errors="replace")
                     for p in self.git.ls_files(new) if matches(p, self.config.editable)}
            moved = self.agent.rebase(proposal, files)
            return None if moved is None else replace(moved, meta={**moved.meta, **meta})
        moved = merge_onto(self.wt, self.worktree, proposal, old, new)
        return None if moved is None else replace(moved, meta=meta)

    # -- repairs ------------------------------------------------------------------------------

    def _repair(self, failed: Experiment) -> None:
        """Give an agent that can repair a few attempts at fixing its own crashed change. Each
        attempt is an experiment of its own, linked to the idea it repairs."""
        idea = failed
        for attempt in range(1, self.config.repair_attempts + 1):
            if failed.status != "crash" or failed.outcome not in FIXABLE or not failed.commit_sha:
                return
            if self._limit_reached(self._started):
                return
            files = {p: (self.git.show(failed.commit_sha, p) or b"").decode("utf-8", errors="replace")
                     for p in self.git.ls_files(failed.commit_sha) if matches(p, self.config.editable)}
            context = replace(self.context(), files=files, last_failure=failed)
            t0 = time.monotonic()
            try:
                proposal = self.agent.repair(context, failed, log_tail(failed.log_path), attempt,
                                             self.config.repair_attempts)
            except AutoresearchError as exc:
                self._agent_failed(exc)
                return
            if proposal is None:  # this agent does not repair, or gives up
                return
            self.view.message(f"the agent repaired #{failed.id} (attempt {attempt}/{self.config.repair_attempts})")
            took = time.monotonic() - t0
            e = self._record(proposal, self.context(), took, took, repair_of=idea.id)
            if e.status != "running":
                return
            failed = self._execute(e.id)

    # -- recording a proposal -------------------------------------------------------------------

    def _record(self, proposal: Proposal, context: ResearchContext, propose_seconds: float, wait_seconds: float,
                repair_of: int | None = None) -> Experiment:
        """Apply, check and commit a proposal; write its ledger row (running, or invalid with the reason)."""
        champion = context.champion_commit
        self.wt.reset_to(champion)
        reason = proposal.error or apply_proposal(self.wt, self.worktree, proposal)
        if reason:
            self.wt.reset_to(champion)  # nothing half-applied (or conflict-marked) gets committed
        patch = self.wt.diff_head()
        changed = self.wt.run("diff", "--cached", "--name-only", "HEAD").splitlines()
        if reason is None:
            tried = {patch_hash(e.patch) for e in context.history if e.parent_commit == champion and e.patch}
            reason = check_change(self.worktree, changed, self.config.editable, self._frozen(), tried, patch)
        commit = self.wt.commit_staged(commit_message(proposal)) if patch.strip() else None
        meta = proposal.meta
        eid = self.ledger.add(
            run_id=self.run_id, tag=self.tag, kind="experiment", parent_commit=champion, commit_sha=commit,
            agent=proposal.agent or self.agent.name, description=proposal.description, rationale=proposal.rationale,
            patch=patch, lines_changed=lines_changed(patch), meta=meta, repair_of=repair_of,
            propose_seconds=propose_seconds, wait_seconds=wait_seconds, status="invalid" if reason else "running",
            reason=reason, champion_metric=context.champion_metric, finished_at=time.time() if reason else None,
            input_tokens=meta.get("input_tokens"), output_tokens=meta.get("output_tokens"), cost_usd=meta.get("cost_usd"),
            regime=self.regime,  # from birth: a row not yet run must not read as another regime's (judged())
        )
        if commit:
            self.git.update_ref(EXPERIMENT_REF.format(id=eid), commit)
        e = self.ledger.get(eid)
        if reason:
            self.view.finished(e, context.champion_metric)
            self._export()
        return e

    def _execute(self, eid: int) -> Experiment:
        """Run experiment `eid` (already committed) and judge it. Resumable: a row that already has
        its outcome is only judged; one without is run (again)."""
        e = self._run(eid)
        return self._finish_repeat(e) if e.kind == "repeat" else self._judge(e)

    def _finish_repeat(self, e: Experiment) -> Experiment:
        status, reason = "measured", None
        if e.outcome != "ok" or e.metric is None:
            status, reason = self._failure(e)
        self.ledger.update(e.id, status=status, reason=reason, finished_at=time.time())
        e = self.ledger.get(e.id)
        drop_scratch(self._scratch(e))
        self.view.finished(e, self.champion()[1])
        return e

    def _failure(self, e: Experiment) -> tuple[str, str | None]:
        """Status and reason of a run that produced no usable metric."""
        if e.outcome != "ok":
            reason = e.reason
            label = OUTCOME_LABEL.get(e.outcome or "")
            if label and not (reason or "").startswith(label):
                reason = f"{label}: {reason}" if reason else label
            return CRASH_STATUS.get(e.outcome or "crash", "crash"), reason
        return "crash", f"the run printed no {self.config.metric.name}"

    def _run(self, eid: int) -> Experiment:
        """Run `eid` unless its outcome is already recorded; returns the row with outcome and metric."""
        e = self.ledger.get(eid)
        if e.outcome is None:
            assert e.commit_sha is not None
            self.wt.reset_to(e.commit_sha)
            log = self.logs / f"{eid:05d}.log"
            if log.exists():  # an interrupted attempt: keep its log beside the new one
                log.rename(log.with_name(f"{log.name}.interrupted-{int(time.time())}"))
            where = {"worker": self.slot.name, "node": self.slot.node} if self.parallel else {}
            attempt = (e.attempt or 1) + 1 if e.started_at is not None else 1  # run again after a kill or lost node
            if attempt > MAX_ATTEMPTS:
                self.ledger.update(eid, status="killed", outcome="killed", finished_at=time.time(),
                                   reason=EXHAUSTED)
                return self.ledger.get(eid)
            self.ledger.update(eid, status="running", started_at=time.time(), log_path=str(log), regime=self.regime,
                               attempt=attempt, **where)
            e = self.ledger.get(eid)
            limit = self.budget + self.config.startup_allowance + self.config.eval_allowance
            self.view.started(e, limit)
            self._start_prefetch(e)
            assert e.commit_sha is not None
            job = Job(eid, self.tag, e.commit_sha, e.parent_commit, self.budget, self.trusted_toml(),
                      champion_startup(self.ledger, self.tag))  # the start-up bounds the hand-off time
            try:
                fields = self._run_job(job, log)
            except KeyboardInterrupt:
                self.ledger.update(eid, status="killed", outcome="killed", reason="abandoned: stopped by Ctrl-C",
                                   finished_at=time.time())
                self.view.finished(self.ledger.get(eid), self.champion()[1])
                raise
            if self.abandon.is_set():  # a second Ctrl-C ended it from the main thread
                self.ledger.update(eid, status="killed", outcome="killed", reason="abandoned: stopped by Ctrl-C",
                                   finished_at=time.time())
                self.view.finished(self.ledger.get(eid), self.champion()[1])
                raise Abandoned
            self.ledger.update(eid, **fields)
            e = self.ledger.get(eid)
        return e

    def _run_job(self, job: Job, log: Path) -> dict[str, Any]:
        """The run itself: here (execution.run_job) or on the worker's Ray node (ray_backend)."""
        eid = job.eid

        def started(pid: int, pgid: int) -> None:
            self.ledger.update(eid, pid=pid, pgid=pgid)

        if self.cluster is not None:  # the pid and group are the node's: its markers end them (ray_backend)
            return dict(self.cluster.run(self.slot, job, log, cancel=self.abandon))
        name = self.slot.name if self.parallel else None
        tick = (lambda t: self.view.tick(t, name)) if name else self.view.tick
        return run_job(self.lab, self.wt, self.worktree, self.slot, job, log, on_start=started, on_tick=tick)

    def trusted_toml(self) -> bytes | None:
        """The task the evaluator scores against: the baseline commit's autoresearch.toml (copied out
        of the run's reach by execution.run_job); None when the metric is not the evaluator's."""
        if not is_trusted(self.config):
            return None
        first = next(e for e in self.ledger.experiments(self.tag) if e.kind == "baseline")
        text = self.git.show(first.commit_sha or first.parent_commit, "autoresearch.toml")
        if text is None:
            raise LoopError("the baseline commit has no autoresearch.toml")
        return text

    def trusted_lab(self) -> Path:
        """Where the evaluator reads the task from: the baseline commit's autoresearch.toml."""
        text = self.trusted_toml()
        if text is None:
            raise LoopError("this lab's metric does not come from the trusted evaluator")
        return write_trusted_toml(self.lab.trusted(self.tag), text)

    def _judge(self, e: Experiment) -> Experiment:
        """Keep or discard: the runs judge.next_step asks for (the champion beside the candidate, a
        confirmation), each a ledger row, then its decision. With several workers, the champion may
        change while a candidate runs: a change is kept only after the exact code it becomes has beaten
        the champion it replaces (_superseded), and decisions are made one at a time (self.mutex), so
        two results can never both be kept against the same champion."""
        champ = self._champion_row()
        commit, champion_metric = self.champion()
        sigma = None
        if e.outcome != "ok" or e.metric is None:
            status, reason = self._failure(e)
        elif e.kind == "baseline":
            status, reason = "keep", "baseline"
        else:
            assert champ is not None and champion_metric is not None
            simpler = net_lines(e.patch or "") < 0
            if champ.commit_sha != e.parent_commit:  # another worker's result was kept while this one ran
                return self._superseded(e, simpler, None)
            while True:
                step = self.procedure.step(e, champ, self.judged(), simpler)
                if step.action == "resume":  # killed during this judging: finish that run in place
                    assert step.of is not None
                    self._execute(step.of.id)
                elif step.action == "run":
                    assert step.of is not None
                    self.view.message(f"#{e.id}: {step.reason}")
                    self._repeat(step.of, block=None if step.alone else e.id, beside=e if step.of.id != e.id else None)
                else:
                    break
            status, reason, sigma = step.action, step.reason, step.sigma
            champion_metric = champion_metric if step.reference is None else step.reference
        with self.mutex:  # decide against the champion as it is now, one decision at a time
            now = self._champion_row()
            if status == "keep" and e.kind != "baseline" and (now is None or now.commit_sha != e.parent_commit):
                return self._superseded(e, net_lines(e.patch or "") < 0, reason)
            self.ledger.update(e.id, status=status, reason=reason, champion_metric=champion_metric, sigma=sigma,
                               finished_at=time.time())
            e = self.ledger.get(e.id)
            if status == "keep" and e.kind != "baseline":
                self._advance(commit, e.commit_sha)
        if status == "keep":
            assert e.commit_sha is not None
            compile_cache.adopt(self.lab.state_dir, self.tag, e.commit_sha, self._scratch(e))  # the champion's now
            e = self._measure_test(e)
        else:
            drop_scratch(self._scratch(e))
        self.view.finished(e, champion_metric)
        self._export()
        return e

    def _superseded(self, e: Experiment, simpler: bool, won: str | None) -> Experiment:
        """`e` ran on a parent that is no longer the champion. If it beat that parent (`won`: the
        judge's reason, when its whole judging said keep; else the screen a fresh candidate gets), its
        diff is merged onto the champion and the result runs there as a new experiment that confirms
        it (linked by meta `confirms`), judged like any other; `e` itself is discarded either way."""
        with self.mutex:
            champ = self._champion_row()
            assert champ is not None and champ.commit_sha is not None
            parent = next((x for x in reversed(self.ledger.experiments(self.tag))
                           if x.status == "keep" and x.commit_sha == e.parent_commit), None)
            if won is None and parent is not None:
                ok, why = self.procedure.promising(e, parent, self.judged(), simpler)
            else:
                ok, why = won is not None, won or "its parent is gone"
            moved = None
            if ok:
                proposal = Proposal(description=e.description, patch=e.patch or "", rationale=e.rationale or "",
                                    meta={**e.meta, "confirms": e.id, "rebased_from": e.parent_commit}, agent=e.agent)
                moved = merge_onto(self.wt, self.worktree, proposal, e.parent_commit, champ.commit_sha)
            moved_note = f"#{champ.id} became the champion while it ran"
            if not ok:
                reason = f"{moved_note}; against its parent: {why}, not worth a run on #{champ.id}"
            elif moved is None:
                reason = f"beat its parent ({why}), but {moved_note} and the change does not merge onto it (or it has it)"
            else:
                reason = f"beat its parent ({why}); {moved_note}: confirming on it"
            self.ledger.update(e.id, status="discard", reason=reason, finished_at=time.time())
            drop_scratch(self._scratch(e))
            self.view.finished(self.ledger.get(e.id), self.champion()[1])
            if moved is None:
                self._export()
                return self.ledger.get(e.id)
            self.view.message(f"#{e.id} beat its parent; running it again on the champion #{champ.id}")
            new = self._record(moved, self.context(), 0.0, 0.0)
            self.ledger.update(e.id, reason=f"{reason} as #{new.id}")
        self._export()
        return self._execute(new.id) if new.status == "running" else new

    def _scratch(self, e: Experiment) -> Path:
        return self.lab.scratch(e.id)

    def _measure_test(self, e: Experiment) -> Experiment:
        """A new champion's score on the held-out test split (recorded, never used to decide)."""
        if not is_trusted(self.config):
            return e
        device = self.device if self.cluster is None else device_of(self.lab, Slot())  # Ray: the head's own
        bpb, why_not = test_split_bpb(self._scratch(e), self.trusted_lab(), self.config.eval_allowance,
                                      device.type, device.env)
        if bpb is None:
            self.view.message(f"test split not measured for #{e.id}: {why_not}")
            return e
        self.ledger.update(e.id, test_metric=bpb)
        return self.ledger.get(e.id)

    def _advance(self, old: str | None, new: str | None) -> None:
        assert new is not None
        current = self.git.resolve(self.branch)
        if current is not None and old is not None and current != old:
            raise LoopError(f"branch autoresearch/{self.tag} was moved outside autoresearch",
                            "reset it to the champion or start a new --tag")
        self.git.update_ref(self.branch, new, current)
        if self.git.current_branch() == self.branch and old:
            # The person has the run's branch checked out: bring its files along, but only where they
            # have not edited them (read-tree refuses to overwrite local changes).
            self.git.run("read-tree", "-m", "-u", old, new, check=False)

    def _export(self) -> None:
        if self.results is None:
            return
        with self.mutex:  # workers finishing together write it one at a time, the latest last
            self.ledger.export_tsv(self.results, self.tag)

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        if self._stop_requested:
            raise KeyboardInterrupt
        self._stop_requested = True
        self.view.message("Ctrl-C: finishing the current experiment, then stopping (Ctrl-C again abandons it)")


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
