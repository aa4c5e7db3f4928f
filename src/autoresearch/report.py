"""Status rows, progress.png and report.md, all computed from the ledger."""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .display import clean, markdown_cell
from .judge import commit_of, counted_runs, mean, outliers
from .ledger import Experiment, runs_of

if TYPE_CHECKING:
    from matplotlib.figure import Figure


# A run that had less than this fraction of the CPU its tag's runs typically had shared the machine
# with another job. Identical runs on a quiet machine differ by a few percent; the runs of a bench
# that shared 2 cores with a niced test suite took ~1.4x as long.
DISTURBED_SHARE = 0.8

GREEN, GREY = "#2ca02c", "#b0b0b0"  # progress.png: kept and champion, discarded


@dataclass(frozen=True)
class Standing:
    """A kept experiment's figure, as the judge compares against it: the mean of the runs that count
    for its commit (its own, the baseline's repeats, confirmations, re-measurements; outliers left out)."""

    experiment: Experiment
    metric: float
    runs: int

    def describe(self) -> str:
        """`1.719012 (mean of 4 runs)`, or `1.686000 (1 run)`."""
        return f"{self.metric:.6f} ({'1 run' if self.runs == 1 else f'mean of {self.runs} runs'})"


def standing(e: Experiment, history: list[Experiment]) -> Standing | None:
    """e's figure over the runs recorded in `history` (the tag's rows, repeats included)."""
    runs = counted_runs(e, history)
    if runs:
        return Standing(e, mean(runs), len(runs))
    return None if e.metric is None else Standing(e, e.metric, 1)


def by_commit(history: list[Experiment]) -> dict[int, list[Experiment]]:
    """The tag's rows grouped by the experiment whose commit they ran (judge.commit_of): all that a
    kept experiment's figure and its outliers read, so that figuring every one is linear in the rows."""
    groups: dict[int, list[Experiment]] = {}
    for x in history:
        groups.setdefault(commit_of(x), []).append(x)
    return groups


def standings(kept: list[Experiment], history: list[Experiment]) -> dict[int, Standing]:
    """Each kept experiment's figure (see standing), by id: linear in the tag's rows, not kept x rows
    (5.8 s at 10,000 rows)."""
    groups = by_commit(history)
    return {e.id: figure for e in kept if (figure := standing(e, groups.get(e.id, [e]))) is not None}


def champion(history: list[Experiment]) -> Standing | None:
    """The champion: the latest kept experiment (as the loop has it), with the mean of its runs."""
    kept = [e for e in history if e.status == "keep"]
    return standing(kept[-1], history) if kept else None


def cores_used(e: Experiment) -> float | None:
    """The CPU seconds of a finished run over its wall seconds: how many cores it kept busy."""
    if e.cpu_seconds is None or not e.run_seconds or e.outcome != "ok":
        return None
    return e.cpu_seconds / e.run_seconds


def disturbed(experiments: list[Experiment]) -> dict[int, float]:
    """The runs that had much less CPU than the median of the tag's runs (with 4 or more measured),
    mapped to that median: another job took part of the machine, so a metric that depends on time,
    such as val_bpb after a fixed budget, may be off for them."""
    cores = {e.id: c for e in experiments if (c := cores_used(e)) is not None}
    if len(cores) < 4:
        return {}
    typical = statistics.median(cores.values())
    return {i: typical for i, c in cores.items() if c < DISTURBED_SHARE * typical}


@dataclass(frozen=True)
class AgentTally:
    """What one agent of a shared run did: its proposals (experiments, repairs included), how many
    were kept, their summed gain over the champion each was judged against (positive = better, in
    the metric's direction), and what its proposals cost (None: no cost recorded)."""

    agent: str
    proposals: int
    keeps: int
    gain: float
    cost: float | None

    def cost_text(self) -> str:
        """`$1.25`, `$0.0042` (cents and below keep their digits), `—` when no cost was recorded."""
        if self.cost is None:
            return "—"
        return f"${self.cost:.2f}" if self.cost >= 0.1 else f"${self.cost:.4f}"


def per_agent(history: list[Experiment], direction: str) -> list[AgentTally]:
    """One tally per agent that proposed an experiment, in order of its first one."""
    found: dict[str, list[Experiment]] = {}
    for e in history:
        if e.kind == "experiment":
            found.setdefault(e.agent, []).append(e)
    tallies = []
    for agent, mine in found.items():
        kept = [e for e in mine if e.status == "keep"]
        gain = sum((e.champion_metric - e.metric if direction == "min" else e.metric - e.champion_metric)
                   for e in kept if e.metric is not None and e.champion_metric is not None)
        costs = [e.cost_usd for e in mine if e.cost_usd is not None]
        tallies.append(AgentTally(agent, len(mine), len(kept), gain, sum(costs) if costs else None))
    return tallies


def delta_of(e: Experiment) -> float | None:
    """e's metric minus the champion's it was judged against (negative = lower); None for the
    baseline or an unmeasured run."""
    if e.metric is None or e.champion_metric is None or e.kind == "baseline":
        return None
    return e.metric - e.champion_metric


def where_ran(e: Experiment) -> str | None:
    """`w1@local`, `w0@10.0.0.2`: the worker and the node that ran e (None when not recorded)."""
    if not e.worker:
        return None
    return f"{e.worker}@{e.node}" if e.node else e.worker


def status_rows(experiments: list[Experiment]) -> list[dict[str, Any]]:
    """One dict per experiment; `delta` is against the champion of its time (negative = lower);
    `left_out` marks a run the judge does not count for a champion, far off its other runs;
    `disturbed` is the typical cores of the tag's runs when this one had much fewer (else None);
    `mean` and `runs`, for a kept experiment, the mean of the runs that count for its commit and their
    number (its `metric` is its own run only); `where`, the worker and node that ran it (see `where_ran`)."""
    shared = disturbed(experiments)
    groups = by_commit(experiments)
    left_out: set[int] = set()
    for e in experiments:
        if e.kind != "repeat" and e.status == "keep":  # a candidate's own runs are never trimmed
            group = runs_of(e, groups[e.id])
            left_out |= {group[i].id for i in outliers([x.metric for x in group if x.metric is not None])}
    figures = standings([e for e in experiments if e.status == "keep"], experiments)
    rows = []
    for e in experiments:
        delta = delta_of(e)
        figure = figures.get(e.id)
        rows.append({
            "id": e.id, "kind": e.kind, "commit": e.short_commit if e.commit_sha else "", "metric": e.metric,
            "delta": delta, "status": e.status, "reason": e.reason, "seconds": e.run_seconds,
            "description": e.description, "rationale": e.rationale, "lines_changed": e.lines_changed,
            "memory_gb": e.memory_gb, "agent": e.agent, "parent_commit": e.parent_commit[:7],
            "summary": e.summary, "test_metric": e.test_metric, "printed_metric": e.printed_metric,
            "sigma": e.sigma, "repeat_of": e.repeat_of, "sandbox": e.sandbox, "handoff_seconds": e.handoff_seconds,
            "cost_usd": e.cost_usd, "left_out": e.id in left_out, "cpu_seconds": e.cpu_seconds,
            "cores": cores_used(e), "disturbed": shared.get(e.id),
            "mean": figure.metric if figure else None, "runs": figure.runs if figure else None,
            "worker": e.worker, "node": e.node, "where": where_ran(e),
        })
    return rows


def runs_note(row: dict[str, Any]) -> str:
    """` (mean of 4 runs: 1.719012)` for a status row of a kept experiment with repeats, else ``."""
    return f" (mean of {row['runs']} runs: {row['mean']:.6f})" if row["runs"] and row["runs"] > 1 else ""


def champion_line(experiments: list[Experiment], final: float | None) -> list[tuple[int, float]]:
    """(experiment number, champion metric in force after it), from the first kept experiment on: the
    mean of the champion's runs that the next experiment was judged against (its `champion_metric`),
    and after the last, `final` (the current champion's mean; without it, the last kept run). A kept
    run's own metric is one run; this line is what the judge compared against."""
    kept = [e.metric for e in experiments if e.status == "keep" and e.metric is not None]
    if not kept:
        return []
    first = next(i for i, e in enumerate(experiments) if e.status == "keep" and e.metric is not None)
    points, level = [], kept[-1] if final is None else final
    for i in range(len(experiments) - 1, first - 1, -1):
        points.append((i, level))
        e = experiments[i]
        if e.champion_metric is not None and e.kind != "baseline":
            level = e.champion_metric
    return points[::-1]


def noise_band(experiments: list[Experiment], line: list[tuple[int, float]], k: float) -> list[tuple[int, float, float]]:
    """(experiment number, low, high) around each point of `line` (champion_line's output for the same
    `experiments`) where a noise estimate is known: level ∓ k·σ, σ being the latest one the judge
    recorded at or before that experiment (`Experiment.sigma`). The judge keeps a gain only beyond
    k·max(se, σ), never less than k·σ, so a run inside the band could not have been kept on its gain.
    Empty when no σ was recorded (the strict judge, or no decision yet)."""
    sigma, known = None, {}
    for i, e in enumerate(experiments):
        sigma = e.sigma if e.sigma is not None else sigma
        if sigma is not None:
            known[i] = sigma
    return [(i, level - k * known[i], level + k * known[i]) for i, level in line if i in known]


def plotted(history: list[Experiment]) -> list[Experiment]:
    """The experiments progress.png shows as points: finished, repeats left out (they count for means)."""
    return [e for e in history if e.status not in ("pending", "running") and e.kind != "repeat"]


def progress_figure(history: list[Experiment], metric: str, direction: str, title: str,
                    k: float | None = None) -> Figure:
    """The chart of progress.png for a tag's rows (`history`, repeats included): each finished
    experiment at its own run, a kept one also at the mean of its runs (filled; its own run hollow,
    joined by a thin line, when they differ), the champion's mean as a step line, and with `k` the
    judge's noise band around it (see noise_band)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    experiments = plotted(history)
    best = champion(history)
    fig = Figure(figsize=(10, 5), dpi=120)
    ax = fig.subplots()
    measured = [(i, e, e.metric) for i, e in enumerate(experiments) if e.metric is not None]
    discarded = [(i, y) for i, e, y in measured if e.status != "keep"]
    if discarded:
        ax.scatter([i for i, _ in discarded], [y for _, y in discarded], s=18, color=GREY, label="discarded",
                   zorder=2)
    kept = [(i, e, y, figure.metric if (figure := standing(e, history)) else y)
            for i, e, y in measured if e.status == "keep"]  # (number, experiment, its own run, its mean)
    if kept:
        apart = [(i, y, at) for i, _, y, at in kept if at != y]
        if apart:
            ax.vlines([i for i, _, _ in apart], [y for _, y, _ in apart], [at for _, _, at in apart], color=GREEN,
                      linewidth=0.8, zorder=3)
            ax.scatter([i for i, _, _ in apart], [y for _, y, _ in apart], s=36, facecolors="none",
                       edgecolors=GREEN, linewidths=1.2, label="kept: its own run", zorder=4)
        ax.scatter([i for i, *_ in kept], [at for *_, at in kept], s=36, color=GREEN, label="kept: mean of its runs",
                   zorder=4)
        line = champion_line(experiments, best.metric if best else None)  # not empty: something was kept
        end = line[-1][0] + 0.5  # the level after the last experiment is drawn too, as a short step
        ax.step(*zip(*line, (end, line[-1][1])), where="post", color=GREEN, linewidth=1.5,
                label="champion (mean of its runs)", zorder=1)
        band = noise_band(experiments, line, k) if k is not None else []
        if band:
            xs, lows, highs = zip(*band, (end, *band[-1][1:]))
            ax.fill_between(xs, lows, highs, step="post", color=GREEN, alpha=0.12, linewidth=0,
                            label=f"noise band (±{k:g}·σ the judge uses)", zorder=0)
        for i, e, _, at in kept:
            if e.kind != "baseline":
                ax.annotate(clean(e.description, limit=40), (i, at), textcoords="offset points", xytext=(4, 6),
                            fontsize=7, color="#2c6e2c", rotation=20)
    tested = [(i, e.test_metric) for i, e in enumerate(experiments) if e.status == "keep" and e.test_metric is not None]
    if tested:
        ax.plot(*zip(*tested), marker="s", markersize=4, linestyle="--", color="#1f77b4", label="champion on test split",
                zorder=2, drawstyle="steps-post")
    failed = [i for i, e in enumerate(experiments) if e.metric is None]
    if failed and measured:
        low = min(y for _, _, y in measured)
        ax.scatter(failed, [low] * len(failed), marker="x", color="#d62728", s=20, label="crash/invalid", zorder=2)
    # Experiments are numbered: no tick at 2.5, and for a lone baseline one tick at 0 (the default
    # falls back to fractions when fewer than 2 whole numbers fit).
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.set_xlabel("experiment")
    ax.set_ylabel(f"{metric} ({'lower' if direction == 'min' else 'higher'} is better)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # nothing measured yet (a crashed baseline): no legend
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return fig


def plot_progress(history: list[Experiment], path: Path, metric: str, direction: str, title: str,
                  k: float | None = None) -> None:
    """Save progress_figure's chart of `history` (a tag's rows, repeats included) as a PNG at `path`."""
    progress_figure(history, metric, direction, title, k).savefig(path)


def write_report(experiments: list[Experiment], out: Path, metric: str, direction: str, tag: str,
                 k: float | None = None, sections: list[str] | tuple[str, ...] = ()) -> tuple[Path, Path]:
    """Write progress.png and report.md into `out` for a tag's rows (repeats included); returns their
    paths. `k`: the judge's k, for the noise band of the chart (None: no band); `sections`: markdown
    lines added at the end (the tag's promotions and ablations, carry.markdown)."""
    out.mkdir(parents=True, exist_ok=True)
    png, md = out / "progress.png", out / "report.md"
    done = plotted(experiments)
    repeats = [e for e in experiments if e.kind == "repeat"]
    kept = [e for e in done if e.status == "keep"]
    base, best = (standing(kept[0], experiments), champion(experiments)) if kept else (None, None)
    plot_progress(experiments, png, metric, direction, f"autoresearch run {tag}: {len(done)} experiments", k=k)
    counts: dict[str, int] = {}
    for e in done:
        counts[e.status] = counts.get(e.status, 0) + 1
    lines = [f"# autoresearch run `{tag}`", ""]
    if base is not None and best is not None:
        first, last = base.experiment, best.experiment
        lines += [f"- baseline {metric}: {base.describe()}",
                  f"- champion {metric}: {best.describe()}, {best.metric - base.metric:+.6f} against the baseline, "
                  f"at `{last.short_commit}` (#{last.id})"]
        if first.test_metric is not None and last.test_metric is not None:
            lines.append(f"- held-out test split (never used for decisions): baseline {first.test_metric:.6f}, "
                         f"champion {last.test_metric:.6f} ({last.test_metric - first.test_metric:+.6f})")
        sigmas = [e.sigma for e in done if e.sigma is not None]
        if sigmas:
            lines.append(f"- run-to-run noise σ: {sigmas[-1]:.6f}; {len(repeats)} repeat runs (baseline, "
                         "confirmations, champion re-measurements)")
    lines += ["- experiments: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())), "",
              "![progress](progress.png)", "", "| # | commit | metric | delta | test | status | seconds | description |",
              "|---:|---|---:|---:|---:|---|---:|---|"]
    ids = {e.id for e in done}
    for r in (r for r in status_rows(experiments) if r["id"] in ids):  # the repeats count for the means
        metric_s = "" if r["metric"] is None else f"{r['metric']:.6f}"
        delta_s = "" if r["delta"] is None else f"{r['delta']:+.6f}"
        secs = "" if r["seconds"] is None else f"{r['seconds']:.0f}"
        desc = markdown_cell(r["description"])  # an agent's words: no escapes, no extra columns
        if r["reason"] and r["status"] not in ("keep", "discard"):
            desc += f" ({markdown_cell(r['reason'], limit=500)})"
        desc += runs_note(r)
        test_s = "" if r["test_metric"] is None else f"{r['test_metric']:.6f}"
        lines.append(f"| {r['id']} | {r['commit']} | {metric_s} | {delta_s} | {test_s} | {r['status']} | {secs} | {desc} |")
    tallies = per_agent(experiments, direction)
    if len(tallies) > 1:
        lines += ["", "## Agents", "", f"gain: how much each agent's kept experiments improved {metric} on the champion "
                  "each was judged against, summed (positive is better)", "",
                  "| agent | proposals | keeps | gain | cost |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {markdown_cell(t.agent)} | {t.proposals} | {t.keeps} | {t.gain:+.6f} | {t.cost_text()} |"
                  for t in tallies]
    changes = [e for e in kept if e.kind != "baseline"]
    if changes:
        lines += ["", "## Kept changes", ""]
        for e in changes:
            by = f" (by {clean(e.agent)})" if len(tallies) > 1 else ""
            lines += [f"### #{e.id} {clean(e.description)}{by}", ""]
            if e.rationale:
                lines += [clean(e.rationale, one_line=False), ""]
            body = clean(e.patch, one_line=False).rstrip()
            fence = "`" * max(3, 1 + max((len(run) for run in re.findall(r"`+", body)), default=0))  # never closed early
            lines += [f"{fence}diff", body, fence, ""]
    lines += list(sections)
    md.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return png, md
