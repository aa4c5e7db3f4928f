"""The ratchet: baseline, then propose -> check -> commit -> run -> judge -> advance or not -> record.

The ledger is the source of truth; git refs and results.tsv are derived from it and repaired from
it when a run resumes. Every step is written down before the next one starts, so `kill -9` at any
moment loses nothing: running the same command again resumes.

Git layout: the branch `autoresearch/<tag>` points at the champion; every experiment's commit is
kept under `refs/autoresearch/experiments/<id>`; experiments run in a worktree of their own under
`.autoresearch/worktrees/<tag>`, so the person's checkout is never used and never wiped.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType
from typing import Any

from . import runner as runner_mod
from .agents.base import Agent, Proposal, ResearchContext
from .checks import check_change, frozen_hashes, lines_changed, matches, net_lines, patch_hash
from .errors import AgentUnavailable, AutoresearchError
from .gitrepo import Git
from .judge import mean, pooled_sigma, verdict
from .lab import Lab
from .ledger import Experiment, Ledger
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
        self.wt = Git(self.worktree)
        self.logs = lab.state_dir / "logs"
        self.budget = options.budget or self.config.budget
        self.run_id = 0
        self.stop_reason = ""
        self._stop_requested = False
        self._prefetch: _Prefetch | None = None
        self._pause = 0.0
        self._started = time.monotonic()

    # -- public -----------------------------------------------------------------------------

    def run(self) -> str:
        """Run until a limit, the agent runs out, or Ctrl-C. Returns why it stopped."""
        self._check_tag()
        self._lock()
        self.logs.mkdir(parents=True, exist_ok=True)
        self.run_id = self.ledger.start_run(self.tag, self.agent.name, self._snapshot())
        previous = signal.getsignal(signal.SIGINT)
        if _is_main_thread():
            signal.signal(signal.SIGINT, self._on_sigint)
        started = self._started = time.monotonic()
        try:
            self._recover()
            self.view.start(self.lab.root.name, self.tag, self.agent.name, self.champion()[1], self.budget)
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
            self._lock_file.close()  # releases the tag for the next run
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

    def _runs_of(self, e: Experiment, history: list[Experiment] | None = None) -> list[float]:
        """The metric of `e` and of every successful repeat of it."""
        history = history if history is not None else self.ledger.experiments(self.tag)
        own = [e.metric] if e.metric is not None and e.outcome == "ok" else []
        return own + [x.metric for x in history if x.repeat_of == e.id and x.status == "measured" and x.metric is not None]

    def _sigma(self) -> float | None:
        """Run-to-run noise, pooled over every experiment that has repeats (None in strict mode)."""
        if self.config.judge.mode != "noise":
            return None
        history = self.ledger.experiments(self.tag)
        return pooled_sigma([self._runs_of(e, history) for e in history if e.kind != "repeat"])

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

    def _lock(self) -> None:
        """One orchestrator per tag: a second `run` on the same tag is refused, not interleaved.
        The kernel drops the lock when its holder dies, even by kill -9."""
        import fcntl

        path = self.lab.state_dir / f"run-{self.tag}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(path, "a+")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.seek(0)
            holder = self._lock_file.read().strip() or "?"
            raise LoopError(f"another `autoresearch run` is using tag {self.tag} (pid {holder})",
                            "wait for it, stop it, or choose another --tag") from None
        self._lock_file.seek(0)
        self._lock_file.truncate()
        self._lock_file.write(str(os.getpid()))
        self._lock_file.flush()

    def _clear_stale_git_locks(self) -> None:
        """A kill -9 in the middle of a git command leaves its lock file behind. Only locks of the
        refs and worktree this loop owns are removed; the lock above guarantees nobody else uses them."""
        common = Path(self.git.run("rev-parse", "--git-common-dir"))
        common = common if common.is_absolute() else (self.lab.root / common)
        candidates = [common / "refs" / "heads" / "autoresearch" / f"{self.tag}.lock",
                      common / "worktrees" / self.tag / "index.lock", common / "worktrees" / self.tag / "HEAD.lock"]
        candidates += list((common / "refs" / "autoresearch" / "experiments").glob("*.lock"))
        for lock in candidates:
            lock.unlink(missing_ok=True)

    def _recover(self) -> None:
        """Make git agree with the ledger after any interruption, and end orphaned runs."""
        self._clear_stale_git_locks()
        for e in self.ledger.unfinished(self.tag):
            if e.pgid and runner_mod.group_alive(e.pgid) and _group_is_from(e.pgid, e.started_at):
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
        if not (self.worktree / ".git").exists():
            self.worktree.parent.mkdir(parents=True, exist_ok=True)
            self.git.add_worktree(self.worktree, start)
        self.wt.reset_to(start)

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
        """Run the baseline `repeats` times in all, so the noise is known before the first decision."""
        base = self._baseline()
        if base is None:
            return
        while len(self._runs_of(base)) < self.config.judge.repeats and self.config.judge.mode == "noise":
            attempts = [e for e in self.ledger.experiments(self.tag) if e.repeat_of == base.id]
            if len(attempts) >= 2 * self.config.judge.repeats:  # repeats keep crashing: go on without them
                break
            self._repeat(base)

    def _repeat(self, of: Experiment) -> Experiment:
        """Run an experiment's commit again; the new row is linked to it and decides nothing itself."""
        eid = self.ledger.add(run_id=self.run_id, tag=self.tag, kind="repeat", repeat_of=of.id,
                              parent_commit=of.parent_commit, commit_sha=of.commit_sha, agent=of.agent,
                              description=f"repeat of #{of.id}: {of.description}", status="running", lines_changed=0)
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
        its mean, and drift of the machine shows up in the noise estimate."""
        every = self.config.judge.remeasure_every
        champ = self._champion_row()
        if not every or self.config.judge.mode != "noise" or champ is None:
            return
        history = self.ledger.experiments(self.tag)
        last = max([champ.id] + [x.id for x in history if x.repeat_of == champ.id])
        since = sum(1 for x in history if x.kind == "experiment" and x.id > last)
        if since >= every:
            self.view.message(f"re-measuring the champion #{champ.id} after {since} experiments")
            self._repeat(champ)

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
        self._prefetch = _Prefetch(self.agent, self.context(start=running.commit_sha))

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
        self.wt.reset_to(old)
        if self._apply(proposal) is not None:
            return None
        patch = self.wt.diff_head()
        self.wt.reset_to(new)
        merged = bool(patch.strip()) and self.wt.apply(patch, three_way=True) is None
        changed = self.wt.changed_paths() if merged else []
        files = {p: (self.worktree / p).read_text(encoding="utf-8") for p in changed if (self.worktree / p).is_file()}
        deleted = [p for p in changed if not (self.worktree / p).exists()]
        self.wt.reset_to(new)
        if not merged or not files or deleted:
            return None
        return replace(proposal, files=files, patch=None, meta=meta)

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
                proposal = repair(context, failed, _log_tail(failed.log_path), attempt, self.config.repair_attempts)
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
        reason = proposal.error or self._apply(proposal)
        if reason:
            self.wt.reset_to(champion)  # nothing half-applied (or conflict-marked) gets committed
        patch = self.wt.diff_head()
        changed = self.wt.run("diff", "--cached", "--name-only", "HEAD").splitlines()
        if reason is None:
            tried = {patch_hash(e.patch) for e in context.history if e.parent_commit == champion and e.patch}
            reason = check_change(self.worktree, changed, self.config.editable, self._frozen(), tried, patch)
        commit = self.wt.commit_staged(_message(proposal)) if patch.strip() else None
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

    def _apply(self, proposal: Proposal) -> str | None:
        """Put the proposal into the worktree; the reason when it cannot be applied."""
        if proposal.patch is not None:
            error = self.wt.apply(proposal.patch)
            if error and self.wt.apply(proposal.patch, three_way=True) is None:
                return None  # written against an older champion, merged cleanly onto this one
            return f"patch does not apply: {error.splitlines()[0]}" if error else None
        root = self.worktree.resolve()
        for path, content in proposal.files.items():
            target = (root / path).resolve()
            if root not in target.parents:
                return f"path {path} is outside the lab"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(content, encoding="utf-8")
        return None

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
        self._drop_scratch(e)
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
            scratch = self.lab.state_dir / "scratch" / f"{eid:05d}"
            trusted = _TrustedEval(self, scratch / "handoff") if self._trusted() else None
            extra_env = {"AUTORESEARCH_BUDGET": f"{self.budget:g}"}
            if os.environ.get("PYTHONPATH"):  # the run starts in the worktree: relative entries would break
                extra_env["PYTHONPATH"] = os.pathsep.join(
                    str(Path(p).resolve()) for p in os.environ["PYTHONPATH"].split(os.pathsep) if p)
            if trusted is not None:
                extra_env.update(AUTORESEARCH_HANDOFF=str(trusted.folder),
                                 AUTORESEARCH_HANDOFF_TIMEOUT=f"{self.config.eval_allowance:g}")
            spec = runner_mod.RunSpec(
                handoff_dir=trusted.folder if trusted else None, on_handoff=trusted.evaluate if trusted else None,
                sandbox=self.config.sandbox, writable=(scratch,), hidden=self._hidden(),
                readable=self._readable(),
                command=self.config.run, cwd=self.worktree, log_path=log, budget=self.budget,
                startup_allowance=self.config.startup_allowance, eval_allowance=self.config.eval_allowance,
                env=dict(os.environ), extra_env=extra_env,
                secret_patterns=self.config.secret_env, log_cap_bytes=int(self.config.log_cap_mb * 2**20),
                memory_limit_bytes=int(self.config.memory_limit_gb * 2**30) if self.config.memory_limit_gb else None,
                on_start=lambda pid, pgid: self.ledger.update(eid, pid=pid, pgid=pgid),
                on_tick=self.view.tick, python=sys.executable,
            )
            try:
                result = runner_mod.run_experiment(spec)
            except KeyboardInterrupt:
                self.ledger.update(eid, status="killed", outcome="killed", reason="abandoned: stopped by Ctrl-C",
                                   finished_at=time.time())
                self.view.finished(self.ledger.get(eid), self.champion()[1])
                raise
            metric = self._metric(result)
            memory = result.summary.get("peak_vram_mb")
            outcome, reason, printed = result.outcome, result.error, None
            if trusted is not None:
                printed, metric = metric, trusted.bpb
                if trusted.rejection or outcome == "ok":  # a rejected model makes the run exit 1 too
                    problem = trusted.problem(result, printed, self.budget + self.config.startup_allowance)
                    if problem:
                        outcome, reason = "invalid", problem
            self.ledger.update(
                eid, outcome=outcome, sandbox=result.sandbox, run_seconds=result.wall_seconds, summary=result.summary,
                metric=metric, printed_metric=printed, handoff_seconds=result.handoff_seconds,
                memory_gb=(memory / 1024 if isinstance(memory, float) else result.peak_rss_mb / 1024), reason=reason,
            )
            e = self.ledger.get(eid)
        return e

    def _hidden(self) -> tuple[Path, ...]:
        """What a run must not read: the loop's state (ledger, logs, other experiments) and, for the
        built-in task, the validation and test shards (the trusted evaluator reads those)."""
        hidden = [self.lab.state_dir]
        task = self.config.task
        if task is not None and self._trusted():
            from .data import load_prepared

            try:
                prepared = load_prepared(task.dataset, task.vocab_size)
                hidden += [*prepared.files("val"), *prepared.files("test")]
            except AutoresearchError:
                pass  # not prepared: the run stops with its own message
        return tuple(hidden)

    def trusted_lab(self) -> Path:
        """A copy of the baseline commit's autoresearch.toml, outside the run's reach: the evaluator
        reads the task (dataset, sequence length, evaluation tokens) from it, never from the worktree."""
        folder = self.lab.state_dir / "trusted" / self.tag
        first = next(e for e in self.ledger.experiments(self.tag) if e.kind == "baseline")
        text = self.git.show(first.commit_sha or first.parent_commit, "autoresearch.toml")
        if text is None:
            raise LoopError("the baseline commit has no autoresearch.toml")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "autoresearch.toml").write_bytes(text)
        return folder

    def _trusted(self) -> bool:
        """The built-in task's metric comes from the trusted evaluator, not from the run's output."""
        return self.config.task is not None and self.config.trusted_eval

    def _readable(self) -> tuple[Path, ...]:
        """What a run needs to read even where the sandbox's fresh /tmp would hide it: the data cache,
        the interpreter's environment, and the source of the autoresearch package."""
        from . import settings

        paths = [settings.cache_dir(), Path(sys.prefix), Path(__file__).resolve().parent.parent]
        paths += [Path(p).resolve() for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        return tuple(paths)

    def _metric(self, result: runner_mod.RunResult) -> float | None:
        name = self.config.metric.name
        if self.config.metric.json_file:
            import json

            try:
                data = json.loads((self.worktree / self.config.metric.json_file).read_text(encoding="utf-8"))
                value = data[name]
            except (OSError, ValueError, KeyError, TypeError):
                return None
        else:
            value = result.summary.get(name)
        try:
            number = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return None
        return number if math.isfinite(number) else None

    def _judge(self, e: Experiment) -> Experiment:
        """Keep or discard. Borderline gains earn confirmation runs; the decision uses the means."""
        champ = self._champion_row()
        commit, champion_metric = self.champion()
        sigma = None
        if e.outcome != "ok" or e.metric is None:
            status, reason = self._failure(e)
        elif e.kind == "baseline":
            status, reason = "keep", "baseline"
        else:
            assert champ is not None and champion_metric is not None
            jc = self.config.judge
            simpler = net_lines(e.patch or "") < 0
            while True:
                sigma = self._sigma()
                runs = self._runs_of(e)
                v = verdict(runs, self._runs_of(champ), sigma, self.config.metric.direction, jc.k,
                            jc.confirmations - (len(runs) - 1), simpler)
                if v.action != "confirm":
                    break
                self.view.message(f"#{e.id}: {v.reason}")
                self._repeat(e)
            status, reason = v.action, v.reason
        self.ledger.update(e.id, status=status, reason=reason, champion_metric=champion_metric, sigma=sigma,
                           finished_at=time.time())
        e = self.ledger.get(e.id)
        if status == "keep" and e.kind != "baseline":
            self._advance(commit, e.commit_sha)
        if status == "keep":
            e = self._measure_test(e)
        else:
            self._drop_scratch(e)
        self.view.finished(e, champion_metric)
        self._export()
        return e

    def _scratch(self, e: Experiment) -> Path:
        return self.lab.state_dir / "scratch" / f"{e.id:05d}"

    def _drop_scratch(self, e: Experiment) -> None:
        """A discarded run's model is not needed again (a champion's is kept for the test split)."""
        import shutil

        shutil.rmtree(self._scratch(e), ignore_errors=True)

    def _measure_test(self, e: Experiment) -> Experiment:
        """Score a new champion on the held-out test split. Never used for any decision: it is there
        so that overfitting the validation split through many selections becomes visible."""
        model = self._scratch(e) / "handoff" / "model.pt2"
        if not self._trusted() or not model.is_file():
            return e
        from .evaluator import EvaluatorFailed, Rejection, run_evaluator

        try:
            result = run_evaluator(model, self.trusted_lab(), "test", timeout=self.config.eval_allowance)
        except EvaluatorFailed as exc:
            self.view.message(f"test split not measured for #{e.id}: {exc}")
            return e
        if isinstance(result, Rejection):
            self.view.message(f"test split not measured for #{e.id}: {result.error}")
            return e
        self.ledger.update(e.id, test_metric=result.bpb)
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


class _TrustedEval:
    """The trusted half of one run: when the run hands its model over, score it in a separate
    evaluator process and answer the run; afterwards, say what (if anything) disqualifies it."""

    def __init__(self, loop: Loop, folder: Path) -> None:
        self.loop, self.folder = loop, folder
        self.lab = loop.trusted_lab()  # here, in the loop's thread: evaluate() runs in the runner's
        self.bpb: float | None = None
        self.rejection: str | None = None

    def evaluate(self, folder: Path) -> None:
        from .evaluator import Rejection, run_evaluator

        result = run_evaluator(folder / "model.pt2", self.lab, "val",
                               timeout=self.loop.config.eval_allowance)
        if isinstance(result, Rejection):
            self.rejection = f"{result.kind}: {result.error}"
            runner_mod.write_handoff_result(folder, {"error": f"the evaluator rejected the model ({self.rejection})"})
            return
        self.bpb = result.bpb
        runner_mod.write_handoff_result(folder, {"val_bpb": result.bpb})

    def problem(self, result: runner_mod.RunResult, printed: float | None, limit: float) -> str | None:
        if self.rejection:
            return f"the evaluator rejected the model: {self.rejection}"
        if result.handoff_seconds is None or self.bpb is None:
            return "the run never handed its model to the evaluator (train.py must call prepare.evaluate_bpb)"
        if result.handoff_seconds > limit:
            return (f"trained past the budget: the model was handed over after {result.handoff_seconds:.1f} s "
                    f"(budget {self.loop.budget:g} s + start-up allowance {self.loop.config.startup_allowance:g} s)")
        if printed is not None and abs(printed - self.bpb) > 1e-4 * max(1.0, abs(self.bpb)):
            return f"the run printed val_bpb {printed:.6f} but the trusted evaluation is {self.bpb:.6f}"
        return None


class _Prefetch:
    """A proposal being prepared in a thread, against the champion of `context`."""

    def __init__(self, agent: Agent, context: ResearchContext) -> None:
        self.agent, self.context = agent, context
        self.proposal: Proposal | None = None
        self.error: BaseException | None = None
        self.seconds = 0.0
        self.thread = threading.Thread(target=self._work, name="autoresearch-prefetch", daemon=True)
        self.thread.start()

    def _work(self) -> None:
        t0 = time.monotonic()
        try:
            self.proposal = self.agent.propose(self.context)
        except BaseException as exc:  # handed to the loop's thread, which decides
            self.error = exc
        self.seconds = time.monotonic() - t0


def _log_tail(path: str | None, lines: int = 80) -> str:
    if not path:
        return ""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _message(proposal: Proposal) -> str:
    body = f"\n\n{proposal.rationale}" if proposal.rationale else ""
    return f"{proposal.description}{body}"


def _group_is_from(pgid: int, started_at: float | None) -> bool:
    """True when a process of group `pgid` started no earlier than the experiment did: after a reboot
    the number may belong to an unrelated group, which must not be killed."""
    import psutil

    if started_at is None:
        return False
    for proc in psutil.process_iter(["pid", "create_time"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["create_time"] >= started_at - 2:
                return True
        except (ProcessLookupError, psutil.Error):
            continue
    return False


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
