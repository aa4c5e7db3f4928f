"""The ratchet: baseline, then propose -> check -> commit -> run -> judge -> advance or not -> record.

The ledger is the source of truth; git refs and results.tsv are derived from it and repaired from
it when a run resumes. Every step is written down before the next one starts, so `kill -9` at any
moment loses nothing: running the same command again resumes.

Git layout: the branch `autoresearch/<tag>` points at the champion; every experiment's commit is
kept under `refs/autoresearch/experiments/<id>`; experiments run in a worktree of their own under
`.autoresearch/worktrees/<tag>`, so the person's checkout is never used and never wiped.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType
from typing import Any

from . import compile_cache
from . import runner as runner_mod
from .agents.base import Agent, Proposal, ResearchContext
from .checks import check_change, frozen_hashes, lines_changed, matches, net_lines, patch_hash
from .errors import AgentUnavailable, AutoresearchError, GitError
from .gitrepo import Git
from .gpus import RunDevice, preflight, run_device
from .judge import baseline_runs, block_of, counted_runs, mean, next_step
from .lab import Lab
from .ledger import Experiment, Ledger
from .measurement import (TrustedEval, champion_startup, drop_scratch, hidden_paths, is_trusted, read_metric,
                          readable_paths, test_split_bpb, write_trusted_toml)
from .proposals import Prefetch, apply_proposal, commit_message, log_tail, merge_onto
from .recovery import TagLock, clear_stale_git_locks, group_is_from
from .sandbox import notice as sandbox_notice
from .view import View

EXPERIMENT_REF = "refs/autoresearch/experiments/{id}"
OUTCOME_LABEL = {"nan": "NaN or exploding loss", "oom": "out of memory"}
FIXABLE = ("crash", "oom", "nan")  # outcomes an agent may repair; a timeout is not a bug to patch
CRASH_STATUS = {"invalid": "invalid", "crash": "crash", "nan": "crash", "oom": "crash", "timeout": "timeout", "killed": "killed"}


class LoopError(AutoresearchError):
    """The loop cannot go on: the baseline fails, the branch was moved by hand, ..."""


@dataclass(frozen=True)
class RunOptions:
    tag: str
    budget: float | None = None  # overrides the lab's budget
    max_experiments: int | None = None  # total experiments of this tag (a re-run finishes the plan)
    hours: float | None = None  # wall-clock limit of this invocation
    max_cost: float | None = None  # USD spent on the agent for this tag


def ledger_path(lab: Lab) -> Path:
    return lab.state_dir / "ledger.db"


def default_tag(lab: Lab) -> str:
    """The tag of the latest run in this lab (so re-running resumes it), else today's date (nov23)."""
    path = ledger_path(lab)
    if path.exists():
        with Ledger(path) as ledger:
            runs = ledger.runs()
            if runs:
                return str(runs[-1]["tag"])
    return time.strftime("%b%d").lower()


class Loop:
    """One `autoresearch run`: owns the ledger's writes for its tag."""

    def __init__(self, lab: Lab, agent: Agent, options: RunOptions, ledger: Ledger, view: View) -> None:
        self.lab, self.agent, self.options, self.ledger, self.view = lab, agent, options, ledger, view
        self.config = lab.config
        self.git = Git(lab.root)
        self.tag = options.tag
        self.branch = f"refs/heads/autoresearch/{self.tag}"
        self.worktree = lab.state_dir / "worktrees" / self.tag
        self._wt: Git | None = None  # the worktree's Git, found from the lab's side by _recover
        self.logs = lab.state_dir / "logs"
        self.budget = options.budget or self.config.budget
        self.run_id = 0
        self.stop_reason = ""
        self._stop_requested = False
        self._prefetch: Prefetch | None = None
        self._pause = 0.0
        self._started = time.monotonic()
        self._lock = TagLock(lab.state_dir / f"run-{self.tag}.lock", self.tag)
        self.device: RunDevice = run_device(self.config)  # a cuda lab's runs get one GPU (gpus.py)

    # -- public -----------------------------------------------------------------------------

    def run(self) -> str:
        """Run until a limit, the agent runs out, or Ctrl-C. Returns why it stopped."""
        self._check_tag()
        gpu = preflight(self.device)  # CUDA must start outside the sandbox before anything runs
        self._lock.acquire()
        self.logs.mkdir(parents=True, exist_ok=True)
        self.run_id = self.ledger.start_run(self.tag, self.agent.name, self._snapshot())
        previous = signal.getsignal(signal.SIGINT)
        if _is_main_thread():
            signal.signal(signal.SIGINT, self._on_sigint)
        started = self._started = time.monotonic()
        try:
            self._recover()
            self.view.start(self.lab.root.name, self.tag, self.agent.name, self.ledger.experiments(self.tag),
                            self.budget)
            if notice := sandbox_notice(self.config.sandbox):  # once, when runs get less than bubblewrap
                self.view.message(notice)
            if gpu:
                self.view.message(f"GPU {self.device.gpu}: {gpu['name']}, {gpu['free_gb']:.0f} of "
                                  f"{gpu['total_gb']:.0f} GiB free")
            for e in self.ledger.unfinished(self.tag):  # first: what a killed orchestrator left running
                self.view.message(f"resuming experiment {e.id} ({e.description})")
                self._check_baseline(self._execute(e.id))
            if self._baseline() is None:
                self._run_baseline()
            self._measure_baseline()
            while not self.stop_reason:
                self.stop_reason = self._limit_reached(started)
                if self.stop_reason:
                    break
                self._one_experiment()
        except KeyboardInterrupt:
            self.stop_reason = "stopped by Ctrl-C"
        finally:
            if _is_main_thread():
                signal.signal(signal.SIGINT, previous)
            self.ledger.stop_run(self.run_id, self.stop_reason or "error")
            self._export()
            self.view.stop(self.stop_reason or "stopped by an error")
            self._lock.release()  # the tag is free for the next run
        return self.stop_reason

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
                "max_experiments": self.options.max_experiments, "hours": self.options.hours}

    def _recover(self) -> None:
        """Make git agree with the ledger after any interruption, and end orphaned runs."""
        clear_stale_git_locks(self.git, self.lab.root, self.tag)
        for e in self.ledger.unfinished(self.tag):
            if e.pgid and runner_mod.group_alive(e.pgid) and group_is_from(e.pgid, e.started_at):
                self.view.message(f"ending process group {e.pgid} left running by experiment {e.id}")
                runner_mod.kill_group(e.pgid)
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
        try:
            self._wt = self.git.worktree(self.worktree)
        except GitError:  # never made, or its registration is gone: make it anew
            shutil.rmtree(self.worktree, ignore_errors=True)
            self.worktree.parent.mkdir(parents=True, exist_ok=True)
            self.git.add_worktree(self.worktree, start)
            self._wt = self.git.worktree(self.worktree)
        found = self.wt.restore_gitfile()
        if found:
            self.view.message(f"restored the worktree's .git file ({found} was in its place)")
        self.wt.reset_to(start)

    @property
    def wt(self) -> Git:
        """Git in the experiments' worktree: explicit git dir, no hooks (see gitrepo)."""
        assert self._wt is not None, "the worktree is set up by _recover at the start of run()"
        return self._wt

    def _baseline(self) -> Experiment | None:
        rows = [e for e in self.ledger.experiments(self.tag) if e.kind == "baseline" and e.status == "keep"]
        return rows[0] if rows else None

    def _frozen(self) -> dict[str, str]:
        first = next(e for e in self.ledger.experiments(self.tag) if e.kind == "baseline")
        return frozen_hashes(self.git, first.commit_sha or first.parent_commit, self.config.frozen)

    # -- the steps --------------------------------------------------------------------------

    def _run_baseline(self) -> None:
        start = self.git.resolve(self.branch) or self.git.head()
        eid = self.ledger.add(run_id=self.run_id, tag=self.tag, kind="baseline", parent_commit=start,
                              commit_sha=start, agent=self.agent.name, description="baseline", status="running",
                              lines_changed=0)
        self.git.update_ref(EXPERIMENT_REF.format(id=eid), start)
        self._check_baseline(self._execute(eid))
        self._measure_baseline()

    def _measure_baseline(self) -> None:
        """Run the baseline `repeats` times in all, so the noise is known before the first decision
        (runs the machine disturbed do not count: judge.baseline_runs)."""
        base = self._baseline()
        jc = self.config.judge
        if base is None or jc.mode != "noise":
            return
        while baseline_runs(base, history := self.ledger.experiments(self.tag), jc) < jc.repeats:
            attempts = [e for e in history if e.repeat_of == base.id and block_of(e) == base.id]
            if len(attempts) >= 2 * jc.repeats:  # repeats keep crashing or being disturbed: go on without them
                break
            self._repeat(base, block=base.id)

    def _repeat(self, of: Experiment, block: int | None, beside: Experiment | None = None) -> Experiment:
        """Run an experiment's commit again; the new row is linked to it and decides nothing itself.
        `block`: the measurement it belongs to (judge.block_of; None: one of its own), `beside`: the
        candidate being judged, when this is a run of the champion made for it."""
        note, meta = "", {"block": block}
        if beside is not None:
            note, meta = f" beside #{beside.id}", {"block": block, "for": beside.id}
        eid = self.ledger.add(run_id=self.run_id, tag=self.tag, kind="repeat", repeat_of=of.id,
                              parent_commit=of.parent_commit, commit_sha=of.commit_sha, agent=of.agent,
                              description=f"repeat of #{of.id}{note}: {of.description}", status="running",
                              lines_changed=0, meta=meta)
        assert of.commit_sha is not None
        self.git.update_ref(EXPERIMENT_REF.format(id=eid), of.commit_sha)
        return self._execute(eid)

    def _check_baseline(self, e: Experiment) -> None:
        if e.kind == "baseline" and e.status != "keep":
            self.stop_reason = "baseline failed"
            raise LoopError(f"the baseline run failed ({e.reason}); nothing can be compared against it",
                            f"fix the code under study and run again; log: {e.log_path}")

    def _limit_reached(self, started: float) -> str:
        if self._stop_requested:
            return "stopped by Ctrl-C after finishing the experiment"
        done = sum(1 for e in self.ledger.experiments(self.tag) if e.kind == "experiment")
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
        every = self.config.judge.remeasure_every
        champ = self._champion_row()
        if not every or self.config.judge.mode != "noise" or champ is None:
            return
        history = self.ledger.experiments(self.tag)
        last = max([champ.id] + [x.id for x in history if x.repeat_of == champ.id])
        since = sum(1 for x in history if x.kind == "experiment" and x.id > last)
        if since >= every:
            self.view.message(f"re-measuring the champion #{champ.id} after {since} experiments")
            self._repeat(champ, block=None)

    # -- getting a proposal: prepared ahead, paused when the agent's service is down -----------

    def _next_proposal(self, context: ResearchContext) -> tuple[Proposal, float, float] | None:
        """(proposal, seconds the agent took, seconds the loop waited), or None to go round again."""
        self.view.proposing()
        prepared, self._prefetch = self._prefetch, None
        t0 = time.monotonic()
        if prepared is not None:
            prepared.thread.join()
            waited = time.monotonic() - t0
            if prepared.error is not None:
                return self._agent_failed(prepared.error)
            took = prepared.seconds
            proposal = prepared.proposal
            if proposal is not None and prepared.context.champion_commit != context.champion_commit:
                proposal = self._rebase(proposal, prepared.context.champion_commit, context.champion_commit)
                if proposal is None:  # no longer applies to the new champion: ask afresh
                    return self._next_proposal(context)
        else:
            try:
                proposal = self.agent.propose(context)
            except AutoresearchError as exc:
                return self._agent_failed(exc)
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
        if not getattr(self.agent, "slow", False) or self._prefetch is not None or self._stop_requested:
            return
        done = sum(1 for e in self.ledger.experiments(self.tag) if e.kind == "experiment")
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
        own = getattr(self.agent, "rebase", None)
        if own is not None:
            files = {p: (self.git.show(new, p) or b"").decode("utf-8", errors="replace")
                     for p in self.git.ls_files(new) if matches(p, self.config.editable)}
            moved = own(proposal, files)
            return None if moved is None else replace(moved, meta={**moved.meta, **meta})
        moved = merge_onto(self.wt, self.worktree, proposal, old, new)
        return None if moved is None else replace(moved, meta=meta)

    # -- repairs ------------------------------------------------------------------------------

    def _repair(self, failed: Experiment) -> None:
        """Give an agent that can repair a few attempts at fixing its own crashed change. Each
        attempt is an experiment of its own, linked to the idea it repairs."""
        repair = getattr(self.agent, "repair", None)
        idea = failed
        for attempt in range(1, self.config.repair_attempts + 1):
            if repair is None or failed.status != "crash" or failed.outcome not in FIXABLE or not failed.commit_sha:
                return
            if self._limit_reached(self._started):
                return
            files = {p: (self.git.show(failed.commit_sha, p) or b"").decode("utf-8", errors="replace")
                     for p in self.git.ls_files(failed.commit_sha) if matches(p, self.config.editable)}
            context = replace(self.context(), files=files, last_failure=failed)
            self.view.message(f"asking the agent to repair #{failed.id} (attempt {attempt}/{self.config.repair_attempts})")
            t0 = time.monotonic()
            try:
                proposal = repair(context, failed, log_tail(failed.log_path), attempt, self.config.repair_attempts)
            except AutoresearchError as exc:
                self._agent_failed(exc)
                return
            if proposal is None:
                return
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
            agent=self.agent.name, description=proposal.description, rationale=proposal.rationale,
            patch=patch, lines_changed=lines_changed(patch), meta=meta, repair_of=repair_of,
            propose_seconds=propose_seconds, wait_seconds=wait_seconds, status="invalid" if reason else "running",
            reason=reason, champion_metric=context.champion_metric, finished_at=time.time() if reason else None,
            input_tokens=meta.get("input_tokens"), output_tokens=meta.get("output_tokens"), cost_usd=meta.get("cost_usd"),
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
            self.ledger.update(eid, status="running", started_at=time.time(), log_path=str(log))
            e = self.ledger.get(eid)
            limit = self.budget + self.config.startup_allowance + self.config.eval_allowance
            self.view.started(e, limit)
            self._start_prefetch(e)
            scratch = self._scratch(e)
            c = self.config
            startup = champion_startup(self.ledger, self.tag)  # bounds the hand-off time (measurement.py)
            trusted = TrustedEval(scratch, self.trusted_lab(), self.budget, c.startup_allowance, c.eval_allowance,
                                  self.device.type, self.device.env, startup) if is_trusted(c) else None
            _, cache_env = compile_cache.for_run(self.lab.state_dir, self.tag, (e.commit_sha, e.parent_commit), scratch)
            extra_env = {"AUTORESEARCH_BUDGET": f"{self.budget:g}", **self.device.env, **cache_env,
                         **(trusted.env() if trusted else {})}
            if os.environ.get("PYTHONPATH"):  # the run starts in the worktree: relative entries would break
                extra_env["PYTHONPATH"] = os.pathsep.join(
                    str(Path(p).resolve()) for p in os.environ["PYTHONPATH"].split(os.pathsep) if p)
            spec = runner_mod.RunSpec(
                handoff_dir=trusted.folder if trusted else None, on_handoff=trusted.evaluate if trusted else None,
                handoff_copy=trusted.model if trusted else None,
                sandbox=c.sandbox, writable=(scratch,), hidden=hidden_paths(self.lab),
                readable=(*readable_paths(self.lab), self.worktree / ".git"),  # bound read-only over the writable worktree
                device_nodes=self.device.nodes(),
                command=self.config.run, cwd=self.worktree, log_path=log, budget=self.budget,
                startup_allowance=self.config.startup_allowance, eval_allowance=self.config.eval_allowance,
                env=dict(os.environ), extra_env=extra_env,
                secret_patterns=self.config.secret_env, pass_env=self.config.pass_env,
                log_cap_bytes=int(self.config.log_cap_mb * 2**20),
                memory_limit_bytes=int(self.config.memory_limit_gb * 2**30) if self.config.memory_limit_gb else None,
                on_start=lambda pid, pgid: self.ledger.update(eid, pid=pid, pgid=pgid),
                on_tick=self.view.tick, python=sys.executable,
            )
            try:
                with trusted or contextlib.nullcontext():  # the evaluator prepares while the run trains
                    result = runner_mod.run_experiment(spec)
            except KeyboardInterrupt:
                self.ledger.update(eid, status="killed", outcome="killed", reason="abandoned: stopped by Ctrl-C",
                                   finished_at=time.time())
                self.view.finished(self.ledger.get(eid), self.champion()[1])
                raise
            metric = read_metric(self.config, self.worktree, result)
            memory = result.summary.get("peak_vram_mb")
            outcome, reason, printed = result.outcome, result.error, None
            if trusted is not None:
                printed, metric = metric, trusted.bpb
                if trusted.rejection or result.handoff_error or outcome == "ok":  # these make the run exit 1 too
                    problem = trusted.problem(result, printed)
                    if problem:
                        outcome, reason = "invalid", problem
            tampered = self.wt.restore_gitfile()  # before any git command reads the worktree again
            if tampered:
                outcome, reason = "invalid", (f"the run replaced the worktree's .git file with {tampered}: git must "
                                              "never read what a run wrote (restored)")
            self.ledger.update(
                eid, outcome=outcome, sandbox=result.sandbox, run_seconds=result.wall_seconds, summary=result.summary,
                cpu_seconds=result.cpu_seconds, eval_seconds=trusted.seconds if trusted else None,
                causal_seconds=trusted.causal_seconds if trusted else None,
                metric=metric, printed_metric=printed, handoff_seconds=result.handoff_seconds,
                memory_gb=(memory / 1024 if isinstance(memory, float) else result.peak_rss_mb / 1024), reason=reason,
            )
            e = self.ledger.get(eid)
        return e

    def trusted_lab(self) -> Path:
        """The task the evaluator scores against: the baseline commit's autoresearch.toml, copied
        out of the run's reach."""
        first = next(e for e in self.ledger.experiments(self.tag) if e.kind == "baseline")
        text = self.git.show(first.commit_sha or first.parent_commit, "autoresearch.toml")
        if text is None:
            raise LoopError("the baseline commit has no autoresearch.toml")
        return write_trusted_toml(self.lab.state_dir / "trusted" / self.tag, text)

    def _judge(self, e: Experiment) -> Experiment:
        """Keep or discard: the runs judge.next_step asks for (the champion beside the candidate, a
        confirmation), each a ledger row, then its decision."""
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
            while True:
                step = next_step(e, champ, self.ledger.experiments(self.tag), self.config.judge,
                                 self.config.metric.direction, simpler)
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

    def _scratch(self, e: Experiment) -> Path:
        return self.lab.state_dir / "scratch" / f"{e.id:05d}"

    def _measure_test(self, e: Experiment) -> Experiment:
        """A new champion's score on the held-out test split (recorded, never used to decide)."""
        if not is_trusted(self.config):
            return e
        bpb, why_not = test_split_bpb(self._scratch(e), self.trusted_lab(), self.config.eval_allowance,
                                      self.device.type, self.device.env)
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
        self.ledger.export_tsv(self.lab.root / "results.tsv", self.tag)

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        if self._stop_requested:
            raise KeyboardInterrupt
        self._stop_requested = True
        self.view.message("Ctrl-C: finishing the current experiment, then stopping (Ctrl-C again abandons it)")


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
