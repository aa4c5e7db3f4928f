"""The judge: keep a candidate, discard it, or run it again first.

Two rules. `strict` is the original's ratchet: keep when strictly better. `noise` (the default)
keeps a gain only when it exceeds k times the run-to-run noise, measured on repeated runs of the
same commit, and (with `paired`, the default) only on runs of the candidate made beside fresh runs of
the champion, so that a machine that got faster or slower since the champion was measured cannot pass
for progress. `next_step` says which run to make next and then decides, from the ledger's rows alone;
the loop makes the runs and writes them down, so the procedure resumes after kill -9 and can be
replaced without touching the loop.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Protocol

from .ledger import Experiment, runs_of


@dataclass(frozen=True)
class Decision:
    keep: bool
    reason: str  # one line for the ledger and the terminal


class Judge(Protocol):
    def decide(self, candidate: float, champion: float, direction: str) -> Decision: ...


def improvement(candidate: float, champion: float, direction: str) -> float:
    """How much better the candidate is (positive = better), in the metric's units."""
    return champion - candidate if direction == "min" else candidate - champion


class StrictJudge:
    """Keep when the metric is finite and strictly better than the champion's."""

    def decide(self, candidate: float, champion: float, direction: str) -> Decision:
        if not math.isfinite(candidate):
            return Decision(False, f"metric is {candidate}")
        gain = improvement(candidate, champion, direction)
        if gain > 0:
            return Decision(True, f"better by {gain:.6g}")
        return Decision(False, "not better" if gain < 0 else "equal to the champion")


@dataclass(frozen=True)
class JudgeConfig:
    """[judge] in autoresearch.toml."""

    mode: str = "noise"  # "noise": keep only gains beyond run-to-run noise; "strict": keep anything lower
    k: float = 2.0  # a gain must exceed k standard errors of the difference
    repeats: int = 4  # runs of the baseline, to measure the noise before the first decision (see NOTES.md)
    confirmations: int = 2  # extra runs a borderline candidate may get (gain between 1 and k standard errors);
    # paired: the candidate runs beside the champion at most 1 + max(1, confirmations) times
    remeasure_every: int = 10  # experiments between re-runs of the champion (lucky winners)
    paired: bool = True  # before a keep, run the champion again beside the candidate and judge the pairs
    sigma_floor: float = 0.002  # σ is at least this fraction of the champion's metric (0: no floor)


@dataclass(frozen=True)
class Verdict:
    action: str  # "keep", "discard" or "confirm" (run the candidate again, then decide)
    reason: str


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


OUTLIER_MIN_RUNS = 4  # fewer runs of one commit are never trimmed
OUTLIER_CUTOFF = 20.0  # scaled median absolute deviations from the median


def outliers(runs: list[float]) -> set[int]:
    """Indices of the runs of one commit that the machine disturbed.

    Another job or a stalled host can slow one run many times over: on 2 cores a 30 s baseline run
    once trained 4 steps instead of ~105 (val_bpb 2.40 against 1.56-1.57 for its three repeats), and
    kept in the statistics it set sigma to 0.34, so that nothing could be kept all night. A run more than
    OUTLIER_CUTOFF scaled MADs from the median is left out of the mean and the noise; the ledger keeps it.
    The cutoff is far out because the MAD of 4-6 Gaussian runs is itself unsteady: at 20, fewer than
    1 % of groups of plain noise lose a run (a simulation of 400,000 groups). Only groups of at least
    OUTLIER_MIN_RUNS are trimmed (the baseline, a re-measured champion), and the loop never trims the
    runs of a candidate it is judging: dropping its own worst run could only help it.
    """
    if len(runs) < OUTLIER_MIN_RUNS:
        return set()
    middle = statistics.median(runs)
    scale = 1.4826 * statistics.median(abs(x - middle) for x in runs)
    if scale == 0:
        return set()
    far = {i for i, x in enumerate(runs) if abs(x - middle) > OUTLIER_CUTOFF * scale}
    return far if len(runs) - len(far) >= OUTLIER_MIN_RUNS - 1 else set()


def without_outliers(runs: list[float]) -> list[float]:
    """The runs of one commit, those the machine disturbed left out (see outliers)."""
    far = outliers(runs)
    return [x for i, x in enumerate(runs) if i not in far]


def counted_runs(e: Experiment, history: list[Experiment], trim: bool = True) -> list[float]:
    """The metrics that count for e's commit: e's own run and its measured repeats (the baseline's
    repeats, confirmations, re-measurements of a champion, its runs beside a candidate); with `trim`,
    the runs the machine disturbed left out (far fewer cores than another run of its commit made in the
    same measurement, see Runs.disturbed; far off the others, see outliers). A champion's figure is the
    mean of these, as status and report show it."""
    rows = runs_of(e, history)
    if trim:
        runs = Runs(history)
        rows = [x for x in rows if not runs.disturbed(x)]
    values = [x.metric for x in rows if x.metric is not None]
    return without_outliers(values) if trim else values


def commit_runs(e: Experiment, history: list[Experiment]) -> list[float]:
    """Issue 5's runs of a commit: all of them, far outliers left out (the unpaired rule's figure)."""
    return without_outliers([x.metric for x in runs_of(e, history) if x.metric is not None])


def pooled_sigma(groups: list[list[float]]) -> float | None:
    """Run-to-run standard deviation, pooled over every group of repeated runs of one commit
    (each group's own mean removed, so real differences between commits do not count as noise)."""
    squares, dof = 0.0, 0
    for runs in groups:
        if len(runs) >= 2:
            m = mean(runs)
            squares += sum((x - m) ** 2 for x in runs)
            dof += len(runs) - 1
    return math.sqrt(squares / dof) if dof else None


def verdict(candidate: list[float], champion: list[float], sigma: float | None, direction: str, k: float,
            confirmations_left: int, simpler: bool) -> Verdict:
    """Keep, discard, or run again. The gain of the means must exceed k times the larger of sigma
    and the standard error of the difference, sigma * sqrt(1/n + 1/m); a gain between one standard
    error and that bar earns a confirmation run. With no noise estimate yet (a single run), this is
    the strict rule."""
    gain = improvement(mean(candidate), mean(champion), direction)
    if sigma is None:
        return Verdict("keep", f"better by {gain:.6g} (no noise estimate yet)") if gain > 0 else \
            Verdict("discard", "not better")
    se = sigma * math.sqrt(1 / len(candidate) + 1 / len(champion))
    # Never below k·σ: confirmation runs sharpen the estimate of the mean, but a gain smaller than the
    # noise of one run is not worth a commit (and a looser bar after each confirmation would let
    # borderline no-ops through by repeated chances).
    bar = k * max(se, sigma)
    runs = f"{len(candidate)} run{'s' if len(candidate) > 1 else ''}"
    if gain > bar:
        return Verdict("keep", f"better by {gain:.6g} > {bar:.3g} (σ {sigma:.3g}, {runs})")
    if gain > se and confirmations_left > 0:
        return Verdict("confirm", f"gain {gain:.6g} is between 1 and {k:g} standard errors: confirming")
    if simpler and gain > -se:
        return Verdict("keep", f"as good within noise ({gain:+.6g}, σ {sigma:.3g}) and simpler")
    if gain > 0:
        return Verdict("discard", f"gain {gain:.6g} is within the noise (needs > {bar:.3g}, {runs})")
    return Verdict("discard", "not better" if gain < -se else f"no gain beyond noise ({gain:+.6g})")


# -- the judging procedure: which runs to make for a candidate, then the decision ------------------
#
# A pure function of the ledger's rows (`next_step`), so the loop only sequences: it makes the run
# asked for, writes it down, and asks again. Killed at any moment, the loop asks again on resume and
# gets the same answer from the same rows.
#
# Drift. The noise judge used to compare a fresh candidate with runs of the champion measured hours
# before. On a machine whose load changed in between (a shared laptop or server), a change that does
# nothing scored 0.6 better than a baseline measured while other jobs ran, and was kept. Now a
# candidate that looks better than the champion's latest runs (the screen) is measured beside the
# champion, interleaved: candidate, champion, candidate, champion (and one more of each when the gain
# is borderline), and the decision uses the paired differences d_i = c_i - mean(champion runs next to
# c_i), which a machine that got faster or slower between the baseline and now cannot move. The
# cores each run had (CPU seconds over wall seconds) tell the judge when the machine changed: a run
# with far fewer than the champion's is run again before it is screened, a candidate whose runs had a
# different share of the machine than the champion's latest gets the champion measured again first,
# and no pair spans a change of cores between two runs of one commit.

CORES_MIN_SECONDS = 2.0  # shorter runs: start-up and the runner's 0.25 s CPU sampling decide their cores
DISTURBED_SHARE = 0.8  # a run with under this fraction of the cores of its like had the machine shared
STATE_CHANGE = 1.25  # consecutive runs of one commit whose cores differ by more: the machine changed between


@dataclass(frozen=True)
class Step:
    """What the judging of a candidate needs next: `run` the commit of `of` once more (the candidate or
    the champion), `resume` the interrupted run `of`, or the decision (`keep` / `discard`)."""

    action: str  # "run", "resume", "keep" or "discard"
    reason: str
    of: Experiment | None = None
    alone: bool = False  # run: a measurement of the champion of its own, before the screen (not paired)
    sigma: float | None = None  # the noise the decision used (None: strict)
    reference: float | None = None  # the champion's level the decision compared against


def cores(e: Experiment) -> float | None:
    """CPU seconds of a run's process tree over its wall seconds (as report.cores_used), or None when
    the run was too short for the figure to mean anything."""
    if e.cpu_seconds is None or not e.run_seconds or e.run_seconds < CORES_MIN_SECONDS or e.outcome != "ok":
        return None
    if e.cpu_seconds <= 0:  # a run that sleeps (a target waiting on a device or a service): nothing measured
        return None
    return e.cpu_seconds / e.run_seconds


def commit_of(e: Experiment) -> int:
    """The experiment whose commit `e` ran: itself, or the one it repeats."""
    return e.repeat_of if e.kind == "repeat" and e.repeat_of is not None else e.id


def block_of(e: Experiment) -> int:
    """The measurement a run belongs to: the baseline's repeats, one candidate's judging (its own runs
    and the champion's runs beside it), or a lone re-measurement. Runs of one block were made back to
    back, so their spread is noise; the spread between blocks may be drift. Repeats recorded before
    blocks existed belong with every run of their commit, as they were then counted."""
    if e.kind != "repeat":
        return e.id
    if "block" in e.meta:
        block = e.meta["block"]
        return e.id if block is None else int(block)
    return commit_of(e)


def measured(e: Experiment) -> bool:
    """A run with a metric that counts: an experiment's own run, or a measured repeat."""
    if e.metric is None or e.outcome != "ok":
        return False
    return e.status == "measured" if e.kind == "repeat" else True


class Runs:
    """The tag's measured runs, by commit and block."""

    def __init__(self, history: list[Experiment]) -> None:
        self.history = history
        self.blocks: dict[tuple[int, int], list[Experiment]] = {}
        for e in history:
            if measured(e):
                self.blocks.setdefault((commit_of(e), block_of(e)), []).append(e)

    def disturbed(self, e: Experiment) -> bool:
        """e had under DISTURBED_SHARE of the cores that another run of its commit had in the same block.

        Compared within one commit, never across the tag: a configuration may keep fewer cores busy by
        itself (measured on 2 cores: tiny and cpu presets, 1 to 3 layers, 1.77-1.87 cores), and a
        champion's runs must not be dropped for what its code does."""
        c = cores(e)
        others = [x for x in (cores(r) for r in self.blocks.get((commit_of(e), block_of(e)), []) if r.id != e.id)
                  if x is not None]
        return c is not None and bool(others) and c < DISTURBED_SHARE * max(others)

    def undisturbed(self, commit: int, block: int) -> list[Experiment]:
        return [e for e in self.blocks.get((commit, block), []) if not self.disturbed(e)]

    def sigma(self) -> float | None:
        """Run-to-run noise pooled over blocks (each block's own mean removed, disturbed runs and far
        outliers left out): the spread of runs made back to back, not the drift between them."""
        return pooled_sigma([without_outliers([x.metric for x in self.undisturbed(*key) if x.metric is not None])
                             for key in self.blocks])

    def latest(self, champion: Experiment) -> list[Experiment]:
        """The champion's runs as the machine is now, as near as the ledger knows: its most recent block
        of undisturbed runs (beside the last candidate, a re-measurement, its own), and its earlier runs
        that had as many cores as those (within STATE_CHANGE), the machine then as it is now."""
        blocks = [b for b in (self.undisturbed(c, b) for c, b in self.blocks if c == champion.id) if b]
        if not blocks:
            return []
        last = max(blocks, key=lambda b: max(x.id for x in b))
        known = [c for c in (cores(x) for x in last) if c is not None]
        if not known:
            return last
        now = statistics.median(known)
        alike = [x for b in blocks for x in b
                 if (c := cores(x)) is not None and 1 / STATE_CHANGE <= c / now <= STATE_CHANGE]
        return sorted({x.id: x for x in [*last, *alike]}.values(), key=lambda x: x.id)


def commit_sigma(history: list[Experiment]) -> float | None:
    """Issue 5's noise estimate: pooled over all the runs of each commit, whenever they were made."""
    return pooled_sigma([commit_runs(e, history) for e in history if e.kind != "repeat"])


def floored(sigma: float | None, level: float, floor: float) -> float | None:
    """σ, never below `floor` times the champion's level: identical repeats are not evidence of zero
    noise (under a wall-clock budget, runs that reach the same step count give the same value with
    fixed seeds; the next run may reach one step more or less)."""
    if floor <= 0:
        return sigma
    return max(sigma or 0.0, floor * abs(level))


def baseline_runs(base: Experiment, history: list[Experiment], config: JudgeConfig) -> int:
    """How many of the baseline's runs count for the noise: with pairing, those the machine did not
    disturb; without, all of them but far outliers (issue 5)."""
    if not config.paired:
        return len(commit_runs(base, history))
    runs = Runs(history)
    return len(without_outliers([x.metric for x in runs.undisturbed(base.id, base.id) if x.metric is not None]))


def paired(window: list[tuple[str, float]], direction: str) -> tuple[float, float, int] | None:
    """(gain, ‖w‖, pairs) of a stretch of interleaved runs, ("C" candidate / "H" champion, metric) in
    time order: the gain is the mean over candidate runs of c - mean(champion runs next to it), signed
    so that positive is better; ‖w‖ the norm of the weights that mean puts on the runs, so its standard
    error is σ·‖w‖ (1.06 σ for C H C H). Candidate runs with no champion run beside them are left out."""
    pairs = [(i, [j for j in (i - 1, i + 1) if 0 <= j < len(window) and window[j][0] == "H"])
             for i, (role, _) in enumerate(window) if role == "C"]
    pairs = [(i, nb) for i, nb in pairs if nb]
    if not pairs:
        return None
    weights = [0.0] * len(window)
    for i, nb in pairs:
        weights[i] += 1 / len(pairs)
        for j in nb:
            weights[j] -= 1 / (len(pairs) * len(nb))
    diff = sum(w * x for w, (_, x) in zip(weights, window))
    return (-diff if direction == "min" else diff), math.sqrt(sum(w * w for w in weights)), len(pairs)


def last_change(episode: list[tuple[str, Experiment]]) -> tuple[int, str]:
    """Where the runs of one judging made since the machine last changed start, and a note saying where
    it changed ("" when it did not). A change: two consecutive runs of one commit whose cores differ by
    more than STATE_CHANGE either way (another job started or stopped between them). It happened
    somewhere between the two, so the stretch starts at the later one."""
    start, note, last = 0, "", dict[str, tuple[float, Experiment]]()
    for i, (role, e) in enumerate(episode):
        c = cores(e)
        if c is None:
            continue
        if role in last and not 1 / STATE_CHANGE <= c / last[role][0] <= STATE_CHANGE:
            before, seen = last[role]
            start, note = i, f"the machine changed between #{seen.id} and #{e.id} ({before:.2f} -> {c:.2f} cores), "
        last[role] = (c, e)
    return start, note


def since_last_change(episode: list[tuple[str, Experiment]]) -> list[tuple[str, Experiment]]:
    """The runs of one judging made since the machine last changed (see last_change)."""
    return episode[last_change(episode)[0]:]


def next_step(candidate: Experiment, champion: Experiment, history: list[Experiment], config: JudgeConfig,
              direction: str, simpler: bool) -> Step:
    """The next step of judging `candidate` against `champion`, from the tag's rows (`history`)."""
    later = [e for e in history
             if e.kind == "repeat" and e.id > candidate.id and e.repeat_of in (candidate.id, champion.id)]
    own = [e for e in later if block_of(e) == candidate.id]  # its runs and the champion's beside them
    before = [e for e in later if e not in own and e.meta.get("for") == candidate.id]  # the champion's, alone
    unfinished = [e for e in own + before if e.status in ("pending", "running")]
    if unfinished:
        return Step("resume", f"finishing run #{unfinished[0].id}, interrupted", of=unfinished[0])
    if config.mode != "noise" or not config.paired:
        return _unpaired(candidate, champion, history, config, direction, simpler, own)
    return _paired(candidate, champion, history, config, direction, simpler, own, bool(before))


def _unpaired(candidate: Experiment, champion: Experiment, history: list[Experiment], config: JudgeConfig,
              direction: str, simpler: bool, own: list[Experiment]) -> Step:
    """Issue 5's rule: the candidate's runs against all of the champion's recorded runs, σ pooled per
    commit; a borderline gain earns confirmation runs of the candidate. In strict mode, the original's."""
    noise = config.mode == "noise"
    reference = commit_runs(champion, history)
    raw = commit_sigma(history) if noise else None
    sigma = floored(raw, mean(reference), config.sigma_floor) if noise else None
    runs = counted_runs(candidate, history, trim=False)
    left = config.confirmations - (len(runs) - 1) if len(own) < 2 * config.confirmations else 0
    v = verdict(runs, reference, sigma, direction, config.k, left, simpler)
    if noise and v.action == "keep" and config.sigma_floor > 0 and len(runs) == 1 and not raw and left > 0:
        v = Verdict("confirm", f"gain on 1 run while no noise has been seen yet (σ {raw}): confirming")
    if v.action == "confirm":
        return Step("run", v.reason, of=candidate, sigma=sigma)
    return Step(v.action, v.reason, sigma=sigma, reference=mean(reference))


def _paired(candidate: Experiment, champion: Experiment, history: list[Experiment], config: JudgeConfig,
            direction: str, simpler: bool, own: list[Experiment], remeasured: bool) -> Step:
    """Screen the candidate against the champion's latest runs; if it may be better, measure the
    champion beside it and decide on the paired differences (see the section comment)."""
    runs = Runs(history)
    latest = runs.latest(champion)
    level = mean([x.metric for x in latest if x.metric is not None]) if latest else champion.metric
    assert level is not None
    sigma = floored(runs.sigma(), level, config.sigma_floor) or 0.0
    k, rounds = config.k, 1 + max(1, config.confirmations)  # candidate runs paired at most
    cap = 2 * (2 * rounds - 1) + 2  # runs of one judging at most: a machine that keeps changing
    failed = [e for e in own if e.repeat_of == candidate.id and e.status in ("crash", "timeout", "invalid")]
    if failed:
        return Step("discard", f"a repeat of the candidate failed: {failed[0].reason or failed[0].status}",
                    sigma=sigma, reference=level)
    episode = [("C" if e.id == candidate.id or e.repeat_of == candidate.id else "H", e)
               for e in [candidate, *own] if measured(e)]
    start, changed = last_change(episode)
    window = episode[start:]
    full = len(own) + remeasured >= cap
    if not any(role == "H" for role, _ in episode):
        return _screen(candidate, champion, [e for _, e in window], latest, level, sigma, direction, simpler, full,
                       remeasured, retried=len(episode) > 1)
    series = [(role, e.metric) for role, e in window if e.metric is not None]
    unpaired = Step("discard", f"the machine kept changing: no pairs in {len(own)} runs", sigma=sigma, reference=level)
    if not series or series[-1][0] == "C":
        if full:
            return unpaired
        return Step("run", f"{changed}measuring the champion beside it", of=champion, sigma=sigma)
    beside = mean([x for role, x in series if role == "H"])
    got = paired(series, direction)
    if got is None:
        if full:
            return unpaired
        return Step("run", f"{changed}running the candidate beside the champion", of=candidate, sigma=sigma)
    gain, norm, n = got
    se = sigma * norm
    bar = k * max(se, sigma)
    where = f"σ {sigma:.3g}, {n} pair{'s' if n > 1 else ''} beside the champion"
    if n == 1 and not full:  # one candidate run paired: never a keep on it, but a loss ends it early
        if gain <= (-bar if simpler else 0.0):
            return Step("discard", f"no gain beside the champion ({gain:+.6g}, {where})", sigma=sigma, reference=beside)
        return Step("run", f"gain {gain:.6g} beside the champion on 1 pair: one more round", of=candidate, sigma=sigma)
    if gain > bar and n >= 2:
        return Step("keep", f"better by {gain:.6g} > {bar:.3g} ({where})", sigma=sigma, reference=beside)
    if gain > se and n < rounds and not full:
        return Step("run", f"gain {gain:.6g} is between 1 and {k:g} standard errors: confirming", of=candidate,
                    sigma=sigma)
    if simpler and gain > -se and n >= 2:
        return Step("keep", f"as good within noise ({gain:+.6g}, {where}) and simpler", sigma=sigma, reference=beside)
    if gain > 0:
        return Step("discard", f"gain {gain:.6g} is within the noise (needs > {bar:.3g}, {where})", sigma=sigma,
                    reference=beside)
    return Step("discard", "not better" if gain < -se else f"no gain beyond noise ({gain:+.6g}, {where})",
                sigma=sigma, reference=beside)


def _screen(candidate: Experiment, champion: Experiment, own: list[Experiment], latest: list[Experiment],
            level: float, sigma: float, direction: str, simpler: bool, full: bool, remeasured: bool,
            retried: bool) -> Step:
    """Before any paired run: is the candidate worth measuring beside the champion? Its runs against the
    champion's latest; one standard error of promise is enough (the decision is the pairs'). A run with
    far fewer cores than the champion's latest is run again first (once). If the candidate's runs and the
    champion's latest differ in cores (the machine changed since, or the change keeps fewer or more
    cores busy by itself), the champion is measured again first, once, so that the screen compares like
    with like: a machine that got faster must not pair every candidate, one that got slower must not
    discard every gain."""
    ran = [c for c in (cores(x) for x in own) if c is not None]
    usual = [c for c in (cores(x) for x in latest) if c is not None]
    if not retried and ran and usual and ran[0] < DISTURBED_SHARE * max(usual) and not full:
        return Step("run", f"its run had {ran[0]:.2f} cores against the champion's {max(usual):.2f}: the machine "
                    "was shared, running it again", of=candidate, sigma=sigma)
    if ran and usual and not remeasured and not full:
        now, then = statistics.median(ran), statistics.median(usual)
        if not 1 / STATE_CHANGE <= now / then <= STATE_CHANGE:
            return Step("run", f"{now:.2f} cores against {then:.2f} when the champion was last measured: "
                        "measuring it again first", of=champion, alone=True, sigma=sigma)
    values = [x.metric for x in own if x.metric is not None]
    gain = improvement(mean(values), level, direction)
    se = sigma * math.sqrt(1 / len(values) + 1 / max(1, len(latest)))
    if gain > se or (simpler and gain > -se):
        if full:
            return Step("discard", f"the champion could not be measured beside it ({gain:+.6g} against its latest "
                        "runs)", sigma=sigma, reference=level)
        return Step("run", f"gain {gain:+.6g} against the champion's latest runs: measuring the champion beside it",
                    of=champion, sigma=sigma)
    if gain > 0:
        return Step("discard", f"gain {gain:.6g} is within the noise (σ {sigma:.3g}, against the champion's latest "
                    f"{len(latest)} run{'s' if len(latest) != 1 else ''})", sigma=sigma, reference=level)
    return Step("discard", "not better" if gain < -se else f"no gain beyond noise ({gain:+.6g})", sigma=sigma,
                reference=level)


class Procedure:
    """The judging procedure of one tag over the pure rules above: which run the tag needs next and what
    a finished candidate's runs decide, from the ledger's rows alone. The loop (and each worker of a
    parallel run) makes the runs it asks for and writes them down; so it resumes after kill -9 and
    several workers can follow it at once."""

    def __init__(self, config: JudgeConfig, direction: str) -> None:
        self.config, self.direction = config, direction

    @property
    def noise(self) -> bool:
        return self.config.mode == "noise"

    def baseline_short(self, base: Experiment, history: list[Experiment], running: int = 0) -> bool:
        """Does the baseline need another repeat before the first decision? `running`: repeats of it
        under way (a parallel run starts several at once). Repeats that keep crashing or being
        disturbed stop being asked for after 2 x `repeats` attempts."""
        if not self.noise:
            return False
        attempts = [e for e in history if e.repeat_of == base.id and block_of(e) == base.id]
        if len(attempts) >= 2 * self.config.repeats:
            return False
        return baseline_runs(base, history, self.config) + running < self.config.repeats

    def remeasure_due(self, champion: Experiment | None, history: list[Experiment]) -> bool:
        """Every `remeasure_every` experiments the champion runs again: a lucky winner regresses to
        its mean, and the screen compares new candidates with its level as it is now."""
        every = self.config.remeasure_every
        if not every or not self.noise or champion is None:
            return False
        last = max([champion.id] + [x.id for x in history if x.repeat_of == champion.id])
        return sum(1 for x in history if x.kind == "experiment" and x.id > last) >= every

    def step(self, candidate: Experiment, champion: Experiment, history: list[Experiment], simpler: bool) -> Step:
        return next_step(candidate, champion, history, self.config, self.direction, simpler)

    def promising(self, candidate: Experiment, parent: Experiment, history: list[Experiment],
                  simpler: bool) -> tuple[bool, str]:
        """A candidate whose parent stopped being the champion while it ran: does it deserve a run on
        the new champion? The screen a fresh candidate gets (one standard error of promise against
        its parent's latest runs; any gain in strict mode), and a line saying why."""
        runs = Runs(history)
        latest = runs.latest(parent)
        values = [x.metric for x in latest if x.metric is not None] or ([parent.metric] if parent.metric else [])
        if candidate.metric is None or not values:
            return False, "its parent has no measurement to compare with"
        level = mean(values)
        gain = improvement(candidate.metric, level, self.direction)
        if not self.noise:
            return gain > 0, f"{gain:+.6g} against its parent #{parent.id}"
        sigma = floored(runs.sigma(), level, self.config.sigma_floor) or 0.0
        se = sigma * math.sqrt(1 + 1 / len(values))
        return (gain > se or (simpler and gain > -se)), f"{gain:+.6g} against its parent #{parent.id} (σ {sigma:.3g})"
