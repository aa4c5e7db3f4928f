"""Results that carry over: `promote` replays a tag's chain of kept changes at another scale (constants
set with --set, another --budget) or on another lab, and `ablate` takes each kept change out of the
champion in turn; both measure the way the loop does.

A study is a few arms, each one commit: the reference (the baseline at the target scale; for an
ablation, the champion) and the code under test (the whole chain; with --each, every change alone;
for an ablation, the champion less one change). Each arm runs `repeats` times, in rounds (every arm
once per round, the reference first), through the loop's own run step: the same runner, sandbox,
trusted evaluator, ledger rows and refs/autoresearch/experiments/ refs, under a tag of the study's own
(`TAG-promote-3f2a1c`: derived from the command and the chain, so that the same command again
resumes a killed study, and finds every arm and run again by their meta).

An arm's figure is its improvement over the reference within each round (a paired difference: the
two ran back to back, so drift between rounds cancels), averaged, with a 95% Student t interval; the
verdict says whether the interval lies above zero ("carries over"), below ("hurts") or across
("within noise"). A change's marginal effect in an ablation is the champion's improvement over the
champion without it: an interval that does not lie above zero flags a change the champion does not
need (a candidate for simplification).
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import queue
import re
import statistics
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .agents.base import AgentBase, Proposal, ResearchContext
from .checks import lines_changed, matches
from .constants import Literal, find_constants, set_constants
from .display import clean, markdown_cell
from .errors import ConfigError, GitError
from .experiment import EXPERIMENT_REF, Experiment
from .gitrepo import Git
from .judge import floored, improvement, mean
from .lab import Lab
from .ledger import Ledger
from .view import View

if TYPE_CHECKING:  # the loop and the runner bring torch: imported when a study runs, not to read one
    from .config import LabConfig
    from .loop import Loop

KINDS = ("promote", "ablate")
# Student's t at 97.5 % for 1..30 degrees of freedom (a two-sided 95 % interval); beyond, the normal's
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


@dataclass(frozen=True)
class Setting:
    """One `--set [FILE:]NAME=VALUE`: a module-level constant of an editable file."""

    name: str
    value: Literal
    file: str | None = None

    def __str__(self) -> str:
        return f"{self.file + ':' if self.file else ''}{self.name}={self.value!r}"


def parse_setting(text: str) -> Setting:
    """`DEPTH=12`, `train.py:LR=0.02`, `WINDOW="SSSL"`: the value a Python literal (a bare word is a
    string)."""
    where, eq, raw = text.partition("=")
    file, _, name = where.strip().rpartition(":")
    name = name.strip()
    if not eq or not name.isidentifier() or not name.isupper():
        raise ConfigError(f"--set {text!r}: expected NAME=VALUE with an upper-case constant name",
                          "e.g. --set DEPTH=12 or --set train.py:LR=0.02")
    try:
        value = ast.literal_eval(raw.strip())
    except (ValueError, SyntaxError):
        value = raw.strip()
    if not isinstance(value, (int, float, str, bool, tuple)):
        raise ConfigError(f"--set {text!r}: the value must be a number, string, bool or tuple")
    return Setting(name, value, file.strip() or None)


@dataclass(frozen=True)
class StudyOptions:
    kind: str  # "promote" or "ablate"
    source_tag: str
    settings: tuple[Setting, ...] = ()
    budget: float | None = None  # seconds per run at the target (None: the target lab's)
    repeats: int | None = None  # runs of every arm (None: [judge] repeats)
    each: bool = False  # promote: every change alone as well as the whole chain
    target: Path | None = None  # promote onto another lab (its root); None: this one
    workers: int | None = None
    ray: str | None = None
    tag: str | None = None  # the study's tag (None: derived from the command and the chain)


@dataclass(frozen=True)
class Arm:
    """One commit a study measures: `picks` applied onto the base, `drops` taken out of it (3-way),
    then the settings written."""

    key: str  # "baseline", "chain", "each:12" (promote); "champion", "without:12" (ablate)
    kind: str  # "baseline": the reference; "experiment": measured against it
    description: str
    picks: tuple[Experiment, ...] = ()
    drops: tuple[Experiment, ...] = ()
    source: int | None = None  # the kept change the arm is about


@dataclass(frozen=True)
class Verdict:
    """An arm's result against the reference, from the rounds both completed."""

    key: str
    row: int  # the arm's ledger row
    description: str
    pairs: int
    reference: float | None  # mean of the reference's runs in those rounds
    metric: float | None  # mean of the arm's runs in those rounds
    gain: float | None  # mean improvement over the reference (positive: better), None without a pair
    low: float | None  # the 95 % interval of `gain` (None with fewer than 2 pairs)
    high: float | None
    verdict: str
    source: int | None = None
    notes: tuple[str, ...] = ()

    def interval(self) -> str:
        if self.gain is None:
            return "—"
        if self.low is None or self.high is None:
            return f"{self.gain:+.6f}"
        return f"{self.gain:+.6f} ± {(self.high - self.low) / 2:.6f}"


class Replayer(AgentBase):
    """The agent a study's rows record: it proposes nothing (the arms are made from kept commits)."""

    slow = False
    can_rebase = False

    def __init__(self, name: str) -> None:
        self.name = name

    def propose(self, context: ResearchContext) -> Proposal | None:
        return None


def kept_chain(history: list[Experiment]) -> list[Experiment]:
    """The tag's kept changes in order (each one commit on the previous champion): its history from the
    baseline, which `promote` replays and `ablate` takes apart."""
    return [e for e in history if e.kind == "experiment" and e.status == "keep" and e.commit_sha]


def t975(df: int) -> float:
    return T975[df - 1] if df <= len(T975) else 1.96


def judge_arm(pairs: list[tuple[float, float]], direction: str, kind: str,
              sigma_floor: float = 0.0) -> tuple[float | None, float | None, float | None, str]:
    """(mean gain, interval low, high, verdict) of (reference, arm) metrics paired by round. For an
    ablation the gain is the change's effect: the champion's improvement over the champion without it.
    The spread of the differences is taken as at least `sigma_floor` times the reference's level, as
    the judge does ([judge] sigma_floor): runs with fixed seeds can agree to the digit, and a spread
    of zero would call any gain real."""
    if not pairs:
        return None, None, None, "not measured (no round with both runs)"
    gains = [improvement(arm, ref, direction) if kind == "promote" else improvement(ref, arm, direction)
             for ref, arm in pairs]
    gain = mean(gains)
    if len(gains) < 2:
        return gain, None, None, "too few runs for an interval (1 pair)"
    spread = floored(statistics.stdev(gains), mean([ref for ref, _ in pairs]), sigma_floor) or 0.0
    half = t975(len(gains) - 1) * spread / math.sqrt(len(gains))
    low, high = gain - half, gain + half
    if kind == "promote":
        verdict = "carries over" if low > 0 else "hurts" if high < 0 else "within noise"
    else:
        verdict = ("needed: removing it hurts" if low > 0 else "removing it helps: a candidate for removal"
                   if high < 0 else "not needed within noise: a candidate for simplification")
    return gain, low, high, verdict


def verdicts(history: list[Experiment], direction: str, sigma_floor: float = 0.0) -> list[Verdict]:
    """Every arm's verdict from a study tag's rows (as the report shows them, mid-study as well)."""
    arms = [e for e in history if e.kind != "repeat" and "arm" in e.meta]
    if not arms:
        return []
    kind = str(arms[0].meta.get("study", "promote"))
    runs: dict[int, dict[int, float]] = {}  # arm row -> round -> metric
    for e in history:
        owner = e.repeat_of if e.kind == "repeat" else e.id
        if owner is not None and e.metric is not None and e.outcome == "ok" and "round" in e.meta:
            runs.setdefault(owner, {})[int(e.meta["round"])] = e.metric
    reference = next((a for a in arms if a.kind == "baseline"), None)
    ref_runs = runs.get(reference.id, {}) if reference else {}
    out = []
    for a in arms:
        if a is reference:
            continue
        notes = tuple(str(n) for n in a.meta.get("notes", []))
        if a.status == "invalid":
            out.append(Verdict(str(a.meta["arm"]), a.id, a.description, 0, None, None, None, None, None,
                               f"not measured: {a.reason}", a.meta.get("source"), notes))
            continue
        mine = runs.get(a.id, {})
        rounds = sorted(set(mine) & set(ref_runs))
        pairs = [(ref_runs[r], mine[r]) for r in rounds]
        gain, low, high, verdict = judge_arm(pairs, direction, kind, sigma_floor)
        out.append(Verdict(str(a.meta["arm"]), a.id, a.description, len(pairs),
                           mean([p[0] for p in pairs]) if pairs else None, mean([p[1] for p in pairs]) if pairs else None,
                           gain, low, high, verdict, a.meta.get("source"), notes))
    if kind == "ablate":
        out.sort(key=lambda v: (v.gain is None, -(v.gain or 0.0)))
    return out


def studies_of(ledger: Ledger, source_tag: str) -> list[tuple[str, str, list[Experiment]]]:
    """(study tag, kind, rows) of every promote or ablate study of `source_tag` in this ledger, or of
    that study itself when `source_tag` is one; oldest first."""
    found = []
    for tag in ledger.tags():
        rows = ledger.experiments(tag)
        first = next((e for e in rows if e.kind == "baseline"), None)
        if (first is not None and first.meta.get("study") in KINDS
                and source_tag in (tag, first.meta.get("source_tag"))):
            found.append((tag, str(first.meta["study"]), rows))
    return sorted(found, key=lambda f: f[2][0].id)  # in the order they were made


def sigma_floor(config: LabConfig) -> float:
    """The σ floor a lab's judge applies (none with a strict judge), which its studies apply too."""
    return config.judge.sigma_floor if config.judge.mode == "noise" else 0.0


def lab_studies(ledger: Ledger, tag: str, config: LabConfig) -> list[tuple[str, str, list[Verdict]]]:
    """(study tag, kind, verdicts) of every study of `tag` in this ledger, as report and dashboard show them."""
    return [(t, kind, verdicts(rows, config.metric.direction, sigma_floor(config)))
            for t, kind, rows in studies_of(ledger, tag)]


# -- making the arms ------------------------------------------------------------------------------


@dataclass
class Built:
    commit: str | None
    problem: str | None = None  # why the arm could not be made (nothing to run)
    notes: list[str] = field(default_factory=list)  # changes left out of it, constants the chain had set


def _diff(git: Git, old: str, new: str) -> str:
    return git.run_raw("diff", "--binary", old, new)


def constant_change(git: Git, e: Experiment) -> dict[str, dict[str, tuple[Literal, Literal]]] | None:
    """The change `e` made as {file: {constant: (old value, new value)}} when it changed nothing but
    module-level constants (as the hparam agent does), else None."""
    assert e.commit_sha is not None
    files = git.run("diff", "--name-only", e.parent_commit, e.commit_sha).splitlines()
    out: dict[str, dict[str, tuple[Literal, Literal]]] = {}
    for path in files:
        old, new = git.show(e.parent_commit, path), git.show(e.commit_sha, path)
        if old is None or new is None or not path.endswith(".py"):
            return None
        try:
            before, after = (find_constants(b.decode("utf-8")) for b in (old, new))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            return None
        if set(before) != set(after):
            return None
        changed = {n: (before[n].value, after[n].value) for n in before if before[n].value != after[n].value}
        try:
            same = set_constants(old.decode("utf-8"), {n: v for n, (_, v) in changed.items()}) == new.decode("utf-8")
        except ConfigError:
            return None
        if not changed or not same:
            return None
        out[path] = changed
    return out or None


def _merge_constants(wt: Git, change: dict[str, dict[str, tuple[Literal, Literal]]], undo: bool) -> str | None:
    """Apply (or, `undo`, revert) a constants-only change by value, three-way per constant: a constant
    the target holds at the change's starting value takes its new value; one it already holds at the
    new value stays; any other value is a conflict. Neighbouring lines never conflict, as they do for
    a textual merge. Returns the conflict, or None."""
    for path, values in change.items():
        target = wt.root / path
        try:
            text = target.read_text(encoding="utf-8")
            now = find_constants(text)
        except (OSError, SyntaxError, UnicodeDecodeError):
            return f"{path} is missing or not Python at the target"
        wanted: dict[str, Literal] = {}
        for name, (old, new) in values.items():
            start, end = (new, old) if undo else (old, new)
            if name not in now:
                return f"{path} has no constant {name} at the target"
            if now[name].value == end:
                continue
            if now[name].value != start:
                return f"{path}: {name} is {now[name].value!r} at the target, not {start!r}"
            wanted[name] = end
        if wanted:
            target.write_text(set_constants(text, wanted), encoding="utf-8")
    return None


def _merge(wt: Git, e: Experiment, undo: bool = False) -> str | None:
    """Bring `e`'s change into the worktree (`undo`: take it out): by constant values when that is all
    it changed, else a three-way merge of its diff. Returns the conflict, or None."""
    assert e.commit_sha is not None
    change = constant_change(wt, e)
    if change is not None:
        return _merge_constants(wt, change, undo)
    old, new = (e.commit_sha, e.parent_commit) if undo else (e.parent_commit, e.commit_sha)
    problem = wt.apply(_diff(wt, old, new), three_way=True)
    if problem is None:
        return None
    conflicted = [line[2:] for line in problem.splitlines() if line.startswith("U ")]
    return f"conflicts in {', '.join(conflicted)}" if conflicted else problem.splitlines()[-1]


def build_arm(wt: Git, base: str, arm: Arm, settings: tuple[Setting, ...], editable: Sequence[str]) -> Built:
    """Make `arm`'s commit in the worktree `wt`: from `base`, each pick's change merged in, each
    drop's taken out (see _merge), one commit each, then the settings written and committed."""
    wt.reset_to(base)
    head, notes, applied = base, [], 0
    for e in arm.picks:
        problem = _merge(wt, e)
        if problem is None:
            wt.diff_head()  # stages it
        else:
            wt.reset_to(head)
            why = f"#{e.id} ({e.description}) does not apply on the target: {problem}"
            if len(arm.picks) == 1:
                return Built(None, why)
            notes.append(f"{why}; left out of the chain")
            continue
        head = wt.commit_staged(f"{e.description}\n\n(autoresearch: #{e.id} of the kept chain)")
        applied += 1
    if arm.picks and not applied:
        return Built(None, "none of the kept changes applies on the target", notes)
    for e in arm.drops:
        problem = _merge(wt, e, undo=True)
        if problem is not None:
            wt.reset_to(head)
            return Built(None, f"#{e.id} cannot be taken out alone (later changes build on it): {problem}")
        wt.diff_head()
        head = wt.commit_staged(f"without #{e.id}: {e.description}\n\n(autoresearch ablate)")
    if settings:
        notes += _set_constants(wt, settings, editable, arm.picks)
        if wt.diff_head().strip():
            head = wt.commit_staged("autoresearch: " + ", ".join(str(s) for s in settings))
    return Built(head, None, notes)


def _set_constants(wt: Git, settings: tuple[Setting, ...], editable: Sequence[str],
                   picks: tuple[Experiment, ...]) -> list[str]:
    """Write the settings into the worktree's files (each constant found in exactly one editable
    file, unless the setting names its file); notes for constants a picked change had set itself."""
    files = [p for p in wt.run("ls-files").splitlines() if matches(p, editable) and p.endswith(".py")]
    by_file: dict[str, dict[str, Literal]] = {}
    for s in settings:
        holders = [s.file] if s.file else [p for p in files if s.name in _constants(wt.root / p)]
        if s.file and (s.file not in files or s.name not in _constants(wt.root / s.file)):
            raise ConfigError(f"--set {s}: {s.file} is not an editable file with a constant {s.name}")
        if not holders:
            raise ConfigError(f"--set {s}: no editable file has a module-level constant {s.name}",
                              "name a constant written as NAME = literal at the top of an editable file")
        if len(holders) > 1:
            raise ConfigError(f"--set {s}: {s.name} is a constant of {', '.join(holders)}",
                              f"say which: --set {holders[0]}:{s.name}=...")
        by_file.setdefault(holders[0], {})[s.name] = s.value
    for path, values in by_file.items():
        target = wt.root / path
        target.write_text(set_constants(target.read_text(encoding="utf-8"), values), encoding="utf-8")
    notes = []
    names = {s.name for s in settings}
    for e in picks:
        touched = sorted(n for n in names if re.search(rf"^[+-]\s*{re.escape(n)}\s*[:=]", e.patch or "", re.MULTILINE))
        if touched:
            notes.append(f"#{e.id} changed {', '.join(touched)}, which --set fixes at the target: "
                         "that part of it is not carried")
    return notes


def _constants(path: Path) -> set[str]:
    try:
        return set(find_constants(path.read_text(encoding="utf-8")))
    except (OSError, SyntaxError, UnicodeDecodeError):
        return set()


# -- the study ------------------------------------------------------------------------------------


class Study:
    """One `promote` or `ablate`: the arms planned from the source tag, made, run in rounds, judged."""

    def __init__(self, source: Lab, options: StudyOptions, view: View) -> None:
        if options.kind not in KINDS:
            raise ValueError(options.kind)
        self.source, self.options, self.view = source, options, view
        self.target = source if options.target is None else _lab_at(options.target)
        if options.kind == "ablate" and self.target is not source:
            raise ConfigError("ablate runs on the lab of the tag", "promote the chain to the other lab first")
        with Ledger(source.ledger_path) as ledger:
            self.history = ledger.experiments(options.source_tag)
        if not self.history:
            raise ConfigError(f"no experiments with tag {options.source_tag!r} in {source.root}",
                              "name a tag of this lab with --tag (see `autoresearch status --tag NAME`)")
        self.chain = kept_chain(self.history)
        if not self.chain:
            raise ConfigError(f"tag {options.source_tag!r} has no kept change to {options.kind}",
                              "run more experiments first: only kept changes are carried over")
        baseline = next((e for e in self.history if e.kind == "baseline" and e.status == "keep"), None)
        if baseline is None or baseline.commit_sha is None:
            raise ConfigError(f"tag {options.source_tag!r} has no baseline")
        self.baseline = baseline
        repeats = options.repeats if options.repeats is not None else self.target.config.judge.repeats
        if repeats < 2:
            raise ConfigError("--repeats must be at least 2: an interval needs two pairs of runs")
        self.repeats = repeats
        self.tag = options.tag or self._derived_tag()

    def _derived_tag(self) -> str:
        o = self.options
        key = json.dumps({"kind": o.kind, "source": str(self.source.root), "tag": o.source_tag,
                          "champion": self.chain[-1].commit_sha, "settings": sorted(str(s) for s in o.settings),
                          "budget": o.budget, "each": o.each,
                          "target": None if o.target is None else str(self.target.root)}, sort_keys=True)
        return f"{o.source_tag}-{o.kind}-{hashlib.sha1(key.encode()).hexdigest()[:6]}"

    def scale(self) -> str:
        parts = [str(s) for s in self.options.settings]
        if self.options.budget is not None:
            parts.append(f"budget {self.options.budget:g} s")
        if self.target is not self.source:
            parts.append(f"on {self.target.root.name}")
        return ", ".join(parts) or "the same scale"

    def arms(self) -> list[Arm]:
        chain, at = tuple(self.chain), self.scale()
        if self.options.kind == "ablate":
            champ = self.chain[-1]
            arms = [Arm("champion", "baseline", f"the champion #{champ.id} ({len(chain)} kept changes) at {at}")]
            return arms + [Arm(f"without:{e.id}", "experiment", f"without #{e.id}: {e.description}", drops=(e,),
                               source=e.id) for e in chain]
        arms = [Arm("baseline", "baseline", f"baseline at {at}"),
                Arm("chain", "experiment", f"the kept chain ({len(chain)} change{'s' if len(chain) > 1 else ''}) "
                                           f"at {at}", picks=chain)]
        if self.options.each:
            arms += [Arm(f"each:{e.id}", "experiment", f"#{e.id} alone at {at}: {e.description}", picks=(e,),
                         source=e.id) for e in chain]
        return arms

    def base(self, git: Git) -> str:
        """The commit every arm starts from: the source's baseline (promote here), the target lab's
        HEAD (promote elsewhere), or the champion (ablate)."""
        if self.options.kind == "ablate":
            commit = self.chain[-1].commit_sha
            assert commit is not None
            return commit
        if self.target is self.source:
            assert self.baseline.commit_sha is not None
            return self.baseline.commit_sha
        return git.head()

    def run(self) -> tuple[str, list[Verdict]]:
        """Make and run every arm (resuming what an earlier attempt left), then judge them. Returns
        (why it stopped, the verdicts)."""
        from .loop import Loop, RunOptions

        options = RunOptions(tag=self.tag, budget=self.options.budget, workers=self.options.workers,
                             ray=self.options.ray)
        with Ledger(self.target.ledger_path) as ledger:
            loop = Loop(self.target, Replayer(self.options.kind), options, ledger, self.view)
            loop.results = None  # results.tsv stays the lab's night; the study is in the ledger and the report
            reason = loop.session(lambda: self._work(loop))
            return reason, self.verdicts(ledger.experiments(self.tag))

    def verdicts(self, history: list[Experiment]) -> list[Verdict]:
        return verdicts(history, self.target.config.metric.direction, sigma_floor(self.target.config))

    # -- inside the session --------------------------------------------------------------------

    def _work(self, loop: Loop) -> None:
        from .loop import LoopError

        if self.target is not self.source:
            self._import(loop.git)
        rows = self._arms(loop)
        runnable = [e for e in rows if e.status != "invalid"]
        reference = next(e for e in rows if e.kind == "baseline")
        if reference.status == "invalid":
            raise LoopError(f"the reference of this study could not be made: {reference.reason}")
        order = [self._round_row(loop, arm, r) for r in range(self.repeats) for arm in runnable]
        todo = [e.id for e in map(loop.ledger.get, order) if e.outcome is None or e.status in ("pending", "running")]
        if len(todo) < len(order):
            self.view.message(f"resuming study {self.tag}: {len(order) - len(todo)} of {len(order)} runs done")
        self._run_all(loop, todo, reference.id)
        if not loop.stop_reason:
            self._decide(loop)
            loop.stop_reason = "study finished"

    def _import(self, git: Git) -> None:
        """Bring the chain's commits from the source lab's repository into the target's."""
        refs = [f"+{EXPERIMENT_REF.format(id=e.id)}:refs/autoresearch/imported/{self.source.root.name}/{e.id}"
                for e in self.chain]
        try:
            git.run("fetch", "-q", "--no-tags", str(self.source.root), *refs)
        except GitError as exc:
            raise ConfigError(f"could not bring the kept commits from {self.source.root}: {exc}") from None

    def _arms(self, loop: Loop) -> list[Experiment]:
        """Every arm's ledger row: found again (a resumed study) or made now (its commit built)."""
        existing = {str(e.meta.get("arm")): e for e in loop.ledger.experiments(self.tag)
                    if e.kind != "repeat" and "arm" in e.meta}
        base = self.base(loop.git)
        reference: str | None = None
        rows = []
        for arm in self.arms():
            row = existing.get(arm.key)
            if row is None:
                built = build_arm(loop.wt, base, arm, self.options.settings, self.target.config.editable)
                patch = "" if built.commit is None or reference is None else _diff(loop.git, reference, built.commit)
                meta: dict[str, Any] = {"study": self.options.kind, "arm": arm.key, "source_tag": self.options.source_tag,
                                        "source_lab": str(self.source.root), "settings": [str(s) for s in self.options.settings],
                                        "notes": built.notes, "round": 0, "block": None}
                if arm.source is not None:
                    meta["source"] = arm.source
                eid = loop.ledger.add(
                    run_id=loop.run_id, tag=self.tag, kind=arm.kind, parent_commit=reference or base,
                    commit_sha=built.commit, agent=self.options.kind, description=arm.description,
                    status="invalid" if built.problem else "pending", reason=built.problem, patch=patch,
                    lines_changed=lines_changed(patch), meta=meta, regime=loop.regime,
                    finished_at=time.time() if built.problem else None)
                if built.commit is not None:
                    loop.git.update_ref(EXPERIMENT_REF.format(id=eid), built.commit)
                for note in built.notes:
                    self.view.message(f"{arm.key}: {note}")
                if built.problem:
                    self.view.message(f"{arm.key}: {built.problem}")
                row = loop.ledger.get(eid)
            if arm.kind == "baseline":
                reference = row.commit_sha
            rows.append(row)
        return rows

    def _round_row(self, loop: Loop, arm: Experiment, r: int) -> int:
        """The row of `arm`'s run in round `r`: the arm's own row for the first, a repeat after."""
        if r == 0:
            return arm.id
        for e in loop.ledger.experiments(self.tag):
            if e.kind == "repeat" and e.repeat_of == arm.id and e.meta.get("round") == r:
                return e.id
        eid = loop.ledger.add(run_id=loop.run_id, tag=self.tag, kind="repeat", repeat_of=arm.id,
                              parent_commit=arm.parent_commit, commit_sha=arm.commit_sha, agent=arm.agent,
                              description=f"round {r + 1} of #{arm.id}: {arm.description}", status="pending",
                              lines_changed=0, meta={**{k: arm.meta[k] for k in ("study", "arm")}, "round": r,
                                                     "block": None}, regime=loop.regime)
        assert arm.commit_sha is not None
        loop.git.update_ref(EXPERIMENT_REF.format(id=eid), arm.commit_sha)
        return eid

    def _run_all(self, loop: Loop, todo: list[int], reference: int) -> None:
        """Run the rows in order, on every worker at once when there are several."""
        if not loop.parallel:
            for eid in todo:
                if loop._stop_requested:
                    loop.stop_reason = "stopped by Ctrl-C after finishing the run"
                    return
                self._run_one(loop, eid, reference)
            return
        work: queue.Queue[int] = queue.Queue()
        for eid in todo:
            work.put(eid)
        errors: list[BaseException] = []

        def worker(lane: Any) -> None:
            loop._here.lane = lane
            while not errors and not loop._stop_requested and not loop.abandon.is_set():
                try:
                    eid = work.get_nowait()
                except queue.Empty:
                    return
                try:
                    self._run_one(loop, eid, reference)
                except BaseException as exc:  # noqa: BLE001  (re-raised by the main thread)
                    errors.append(exc)

        threads = [threading.Thread(target=worker, args=(lane,), daemon=True) for lane in loop.lanes]
        for t in threads:
            t.start()
        try:
            while any(t.is_alive() for t in threads):
                time.sleep(0.2)
        except KeyboardInterrupt:
            loop.abandon.set()
            while any(t.is_alive() for t in threads):
                time.sleep(0.2)
            raise
        if errors:
            raise errors[0]
        if loop._stop_requested:
            loop.stop_reason = "stopped by Ctrl-C after finishing the runs"

    def _run_one(self, loop: Loop, eid: int, reference: int) -> None:
        from .loop import LoopError

        e = loop._finish_repeat(loop._run(eid))  # an arm's own run too: measured (or failed), judged later
        if eid == reference and e.status != "measured":
            raise LoopError(f"the study's reference run failed ({e.reason}); nothing can be compared against it",
                            f"see its log: {e.log_path}")
        loop._export()

    def _decide(self, loop: Loop) -> None:
        """Write each arm's verdict into its row: keep when it carries over (or, ablated, is needed)."""
        history = loop.ledger.experiments(self.tag)
        for v in self.verdicts(history):
            row = loop.ledger.get(v.row)
            if row.status == "invalid":
                continue
            good = v.verdict == "carries over" or v.verdict.startswith("needed")
            reason = f"{v.verdict}: {'gain' if self.options.kind == 'promote' else 'effect'} {v.interval()} " \
                     f"(95% interval, {v.pairs} pairs)"
            status, meta = "keep" if good else "discard", dict(row.meta)
            if row.status not in ("measured", "keep", "discard"):  # its first run failed: that stays said
                meta.setdefault("failure", row.reason)
                status, reason = row.status, f"{meta['failure']}; {reason}"
            loop.ledger.update(v.row, status=status, reason=reason,
                               meta={**meta, "verdict": v.verdict, "gain": v.gain, "low": v.low, "high": v.high,
                                     "pairs": v.pairs})
        ref = next(e for e in history if e.kind == "baseline")
        if ref.status == "measured":
            loop.ledger.update(ref.id, status="keep", reason=f"the reference of this {self.options.kind}")


def _lab_at(path: Path) -> Lab:
    from .lab import find_lab

    root = path.expanduser().resolve()
    if not (root / "autoresearch.toml").is_file():
        raise ConfigError(f"--lab {path}: no autoresearch.toml there", "give the root of another lab")
    return find_lab(root)


def markdown(studies: list[tuple[str, str, list[Verdict]]], metric: str) -> list[str]:
    """report.md's sections for a tag's studies: (study tag, kind, verdicts) each, promotions first."""
    lines: list[str] = []
    for kind, title in (("promote", "Promotions"), ("ablate", "Ablations")):
        mine = [(tag, result) for tag, k, result in studies if k == kind]
        if not mine:
            continue
        lines += ["", f"## {title}", ""]
        if kind == "promote":
            lines += [f"Each arm against the baseline at the target, paired by round: the gain in {metric} "
                      "(positive is better) with its 95% interval.", ""]
        else:
            lines += [f"Each kept change's effect: the champion's improvement in {metric} over the champion "
                      "without it (positive: the change helps), with its 95% interval, largest first.", ""]
        for tag, result in mine:
            head = "reference" if kind == "promote" else "champion"
            lines += [f"### `{tag}`", "", f"| # | arm | pairs | {head} | arm | {'gain' if kind == 'promote' else 'effect'} "
                      "| 95% interval | verdict |", "|---:|---|---:|---:|---:|---:|---|---|"]
            for v in result:
                low_high = "" if v.low is None or v.high is None else f"{v.low:+.6f} … {v.high:+.6f}"
                cells = [str(v.row), markdown_cell(v.description), str(v.pairs), _num(v.reference), _num(v.metric),
                         "" if v.gain is None else f"{v.gain:+.6f}", low_high, markdown_cell(v.verdict, limit=300)]
                lines.append("| " + " | ".join(cells) + " |")
            notes = [n for v in result for n in v.notes]
            if notes:
                lines += [""] + [f"- {markdown_cell(n, limit=300)}" for n in notes]
            lines.append("")
    return lines


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.6f}"


def summary_lines(study_tag: str, kind: str, result: list[Verdict], metric: str) -> list[str]:
    """The verdicts as printed at the end and in report.md."""
    what = "gain over the baseline" if kind == "promote" else "effect (champion vs without it)"
    lines = [f"{kind} {study_tag}: {what}, {metric}, positive is better, 95% interval over paired rounds"]
    for v in result:
        lines.append(f"  #{v.row} {clean(v.description)}: {v.interval()} ({v.pairs} pairs) -> {clean(v.verdict)}")
        lines += [f"      note: {clean(n)}" for n in v.notes]
    return lines
