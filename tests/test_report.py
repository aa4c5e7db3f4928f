"""What status, report.md and the plot say about the champion: the mean of the runs its judge counts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from autoresearch.cli import main
from autoresearch.judge import counted_runs, mean
from autoresearch.lab import find_lab
from autoresearch.ledger import Experiment, Ledger
from autoresearch.loop import ledger_path
from autoresearch.report import champion, champion_line, noise_band, plotted, progress_figure, write_report
from test_loop import make_target

if TYPE_CHECKING:
    from matplotlib.figure import Figure

BASELINE = (1.686000, 1.730100, 1.728300, 1.731648)  # mean 1.719012: its first run is not its figure
CANDIDATE = (1.704000, 1.690000)  # kept after one confirmation
REMEASURED = 1.712000  # the champion run again later: mean of 3 runs, 1.702000


def record(path: Path, tag: str = "t") -> list[Experiment]:
    """A tag as the noise judge leaves it: a baseline with 3 repeats, a discard judged against their
    mean, a candidate kept after a confirmation, an experiment judged against it, a re-measurement."""
    with Ledger(path) as ledger:
        run = ledger.start_run(tag, "hparam", {})

        def add(kind: str, status: str, metric: float, commit: str, **fields: object) -> int:
            return ledger.add(run_id=run, tag=tag, kind=kind, parent_commit="a" * 40, commit_sha=commit * 40,
                              agent="hparam", description=fields.pop("description", kind), status=status,
                              outcome="ok", metric=metric, **fields)

        base = add("baseline", "keep", BASELINE[0], "a")
        for metric in BASELINE[1:]:
            add("repeat", "measured", metric, "a", repeat_of=base)
        add("experiment", "discard", 1.75, "b", champion_metric=mean(list(BASELINE)), description="worse")
        kept = add("experiment", "keep", CANDIDATE[0], "c", champion_metric=mean(list(BASELINE)),
                   description="better")
        add("repeat", "measured", CANDIDATE[1], "c", repeat_of=kept)
        add("experiment", "discard", 1.72, "d", champion_metric=mean(list(CANDIDATE)), description="no gain")
        add("repeat", "measured", REMEASURED, "c", repeat_of=kept)
        return ledger.experiments(tag)


def test_champion_is_the_mean_of_the_runs_the_judge_counts(tmp_path: Path) -> None:
    history = record(tmp_path / "l.db")
    best = champion(history)
    assert best is not None and best.experiment.description == "better"
    assert best.metric == pytest.approx(1.702) and best.runs == 3
    assert best.describe() == "1.702000 (mean of 3 runs)"
    assert counted_runs(best.experiment, history) == [1.704, 1.69, 1.712]
    first = champion(history[:1])  # the baseline before its repeats
    assert first is not None and first.describe() == "1.686000 (1 run)"
    assert champion([]) is None


def test_champion_leaves_out_the_run_the_judge_leaves_out(tmp_path: Path) -> None:
    with Ledger(tmp_path / "l.db") as ledger:
        run = ledger.start_run("t", "hparam", {})
        base = ledger.add(run_id=run, tag="t", kind="baseline", parent_commit="abc", agent="hparam",
                          description="baseline", status="keep", outcome="ok", metric=2.3977)  # a disturbed run
        for metric in (1.5590, 1.5737, 1.5683):
            ledger.add(run_id=run, tag="t", kind="repeat", repeat_of=base, parent_commit="abc", agent="hparam",
                       description="repeat", status="measured", outcome="ok", metric=metric)
        best = champion(ledger.experiments("t"))
    assert best is not None and best.describe() == "1.567000 (mean of 3 runs)"


def test_status_shows_the_champions_mean_and_its_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    repo = make_target(tmp_path)
    record(ledger_path(find_lab(repo)))
    monkeypatch.chdir(repo)
    assert main(["status", "--tag", "t", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["champion"] == {"id": 6, "commit": "c" * 7, "metric_name": "score",
                                "metric": pytest.approx(1.702), "runs": 3}
    rows = {r["id"]: r for r in data["experiments"]}
    assert rows[1]["mean"] == pytest.approx(1.719012) and rows[1]["runs"] == 4 and rows[1]["metric"] == 1.686
    assert rows[5]["mean"] is None and rows[5]["delta"] == pytest.approx(1.75 - 1.719012)
    assert main(["status", "--tag", "t"]) == 0
    out = capsys.readouterr().out
    assert "champion score 1.702000 (mean of 3 runs) at ccccccc (#6)" in out
    assert "baseline (mean of 4 runs: 1.719012)" in out


def test_report_shows_the_champions_mean_and_its_runs(tmp_path: Path) -> None:
    history = record(tmp_path / "l.db")
    _, md = write_report(history, tmp_path / "out", "val_bpb", "min", "t")
    report = md.read_text()
    assert "- baseline val_bpb: 1.719012 (mean of 4 runs)\n" in report
    assert "- champion val_bpb: 1.702000 (mean of 3 runs), -0.017012 against the baseline, at `ccccccc` (#6)" in report
    assert "| 1 | aaaaaaa | 1.686000 |" in report and "baseline (mean of 4 runs: 1.719012) |" in report
    assert "better (mean of 3 runs: 1.702000) |" in report
    assert "| 2 |" not in report  # repeats are not rows of the table


def test_the_plots_champion_line_is_the_mean_each_judge_used(tmp_path: Path) -> None:
    history = record(tmp_path / "l.db")
    done = [e for e in history if e.kind != "repeat"]  # as write_report plots them: baseline, 3 experiments
    line = champion_line(done, final=1.702)
    assert [i for i, _ in line] == [0, 1, 2, 3]
    assert [y for _, y in line] == pytest.approx([1.719012, 1.719012, 1.697, 1.702])  # not 1.686, 1.686, 1.704
    assert champion_line(done[:1], final=None) == [(0, 1.686)]  # nothing judged yet: its one run


def judged(path: Path) -> list[Experiment]:
    """A tag whose judge recorded its noise: a baseline (no σ yet), a discard judged with σ 0.01, a keep
    with σ 0.02, a crash and a discard that recorded none (the last σ still holds), a repeat of the keep."""
    with Ledger(path) as ledger:
        run = ledger.start_run("t", "hparam", {})

        def add(kind: str, status: str, metric: float | None, champion: float | None, **fields: object) -> int:
            return ledger.add(run_id=run, tag="t", kind=kind, parent_commit="a" * 40, commit_sha="b" * 40,
                              agent="hparam", description=f"{kind} {status}", status=status,
                              outcome="ok" if metric is not None else "crash", metric=metric,
                              champion_metric=champion, **fields)

        add("baseline", "keep", 2.0, None)
        add("experiment", "discard", 2.05, 2.0, sigma=0.01)
        kept = add("experiment", "keep", 1.9, 2.0, sigma=0.02)
        add("repeat", "measured", 1.92, None, repeat_of=kept)
        add("experiment", "crash", None, 1.91)
        add("experiment", "discard", 1.95, 1.91)
        return ledger.experiments("t")


def test_noise_band_is_k_sigma_around_the_champion_line(tmp_path: Path) -> None:
    done = plotted(judged(tmp_path / "l.db"))
    assert [e.kind for e in done] == ["baseline", "experiment", "experiment", "experiment", "experiment"]
    line = champion_line(done, final=1.91)
    assert line == [(0, 2.0), (1, 2.0), (2, 1.91), (3, 1.91), (4, 1.91)]
    band = noise_band(done, line, k=2.0)
    assert [i for i, _, _ in band] == [1, 2, 3, 4]  # the baseline was judged with no σ: no band there
    assert [(low, high) for _, low, high in band] == [
        pytest.approx((1.98, 2.02)), pytest.approx((1.87, 1.95)), pytest.approx((1.87, 1.95)),
        pytest.approx((1.87, 1.95))]
    assert noise_band(done, line, k=3.0)[0] == pytest.approx((1, 1.97, 2.03))
    assert noise_band(done, [], k=2.0) == []


def legend_labels(fig: Figure) -> list[str]:
    legend = fig.axes[0].get_legend()
    return [t.get_text() for t in legend.get_texts()] if legend else []


def test_no_noise_band_without_sigma(tmp_path: Path) -> None:
    history = community(tmp_path / "l.db")  # as a strict judge leaves it: no σ recorded
    done = plotted(history)
    assert noise_band(done, champion_line(done, final=1.75), k=2.0) == []
    fig = progress_figure(history, "val_bpb", "min", "t", k=2.0)
    assert not any("noise" in label for label in legend_labels(fig))
    assert not [c for c in fig.axes[0].collections if "noise" in c.get_label()]
    with_band = progress_figure(judged(tmp_path / "m.db"), "val_bpb", "min", "t", k=2.0)
    assert "noise band (±2·σ the judge uses)" in legend_labels(with_band)
    assert not any("noise" in label for label in legend_labels(progress_figure(judged(tmp_path / "m.db"),
                                                                                "val_bpb", "min", "t")))


def test_progress_ticks_are_whole_experiments(tmp_path: Path) -> None:
    for history in (record(tmp_path / "l.db"), judged(tmp_path / "m.db"), record(tmp_path / "n.db")[:1]):
        fig = progress_figure(history, "val_bpb", "min", "t", k=2.0)
        fig.draw_without_rendering()
        ax = fig.axes[0]
        labels = [t.get_text() for t in ax.get_xticklabels()]
        assert labels and all(label.replace("\u2212", "-").lstrip("-").isdigit() for label in labels), labels
        assert all(float(x).is_integer() for x in ax.get_xticks())


def test_the_kept_marker_sits_at_the_mean_of_its_runs(tmp_path: Path) -> None:
    fig = progress_figure(record(tmp_path / "l.db"), "val_bpb", "min", "t", k=2.0)
    ax = fig.axes[0]
    points = {c.get_label(): c.get_offsets().tolist() for c in ax.collections if c.get_label()}
    assert points["kept: mean of its runs"] == [[0, pytest.approx(1.719012)], [2, pytest.approx(1.702)]]
    assert points["kept: its own run"] == [[0, pytest.approx(1.686)], [2, pytest.approx(1.704)]]  # hollow
    assert points["discarded"] == [[1, 1.75], [3, 1.72]]
    assert [t.get_text() for t in ax.texts] == ["better"]  # the description, at the mean
    assert ax.texts[0].xy == (2, pytest.approx(1.702))
    step = next(line for line in ax.get_lines() if line.get_label() == "champion (mean of its runs)")
    assert list(step.get_ydata()) == pytest.approx([1.719012, 1.719012, 1.697, 1.702, 1.702])  # drawn to 3.5
    single = progress_figure(community(tmp_path / "m.db"), "val_bpb", "min", "t")  # one run each: no hollow ones
    assert "kept: its own run" not in legend_labels(single) and "kept: mean of its runs" in legend_labels(single)


def test_progress_png_for_crashes_and_for_a_single_baseline(tmp_path: Path) -> None:
    png, _ = write_report(community(tmp_path / "l.db"), tmp_path / "crashes", "val_bpb", "min", "t", k=2.0)
    assert png.read_bytes().startswith(b"\x89PNG")
    png, _ = write_report(record(tmp_path / "m.db")[:1], tmp_path / "baseline", "val_bpb", "min", "t", k=2.0)
    assert png.read_bytes().startswith(b"\x89PNG")
    with Ledger(tmp_path / "n.db") as ledger:  # the baseline crashed: nothing measured, nothing kept
        run = ledger.start_run("t", "hparam", {})
        ledger.add(run_id=run, tag="t", kind="baseline", parent_commit="a" * 40, agent="hparam",
                   description="baseline", status="crash", outcome="crash")
        crashed = ledger.experiments("t")
    png, _ = write_report(crashed, tmp_path / "crashed", "val_bpb", "min", "t", k=2.0)
    assert png.read_bytes().startswith(b"\x89PNG")


# ---------------------------------------------------------------------------
# What a run or an agent wrote, shown safely
# ---------------------------------------------------------------------------

HOSTILE = ("\x1b[2J\x1b[Hall clear \x1b]0;owned\x07\x1b]8;;https://evil.example\x1b\\click\x1b]8;;\x1b\\ "
           "[/] [bold red]fake[/bold red] | col \u202eevil\u202c\r\x08\x9b31m")


def test_clean_removes_escapes_controls_and_reordering() -> None:
    from autoresearch.display import clean, markdown_cell

    out = clean(HOSTILE)
    assert "\x1b" not in out and "\x07" not in out and "\r" not in out and "\x9b" not in out
    assert "\u202e" not in out and "owned" not in out and "https://evil" not in out
    assert out.startswith("all clear click [/] [bold red]fake[/bold red] | col evil")
    assert markdown_cell("a | b") == "a \\| b"
    assert clean("x" * 10, limit=5) == "xxxx…" and clean("two\nlines", one_line=False) == "two\nlines"


def test_hostile_descriptions_and_reasons_are_shown_as_plain_text(tmp_path: Path) -> None:
    import io

    from rich.console import Console

    from autoresearch.view import LiveView, PlainView

    with Ledger(tmp_path / "l.db") as ledger:
        run = ledger.start_run("t", "hparam", {})
        eid = ledger.add(run_id=run, tag="t", kind="experiment", parent_commit="a" * 40, commit_sha="b" * 40,
                         agent="llm", description=HOSTILE, status="crash", outcome="crash", reason=HOSTILE)
        e = ledger.get(eid)
    out = io.StringIO()
    view = PlainView(Console(file=out, force_terminal=True, width=300))
    view.started(e, 10)
    view.finished(e, None)
    view.message(HOSTILE)
    text = out.getvalue()
    assert "\x1b[2J" not in text and "\x1b]" not in text and "[bold red]fake[/bold red]" in text  # markup shown as text
    live = LiveView(Console(file=io.StringIO(), force_terminal=True, width=300))
    live.start("lab", "t", "a", [e], 10)
    live.finished(e, None)  # a hostile "[/]" raised MarkupError here before
    live.stop("done")


# ---------------------------------------------------------------------------
# Several agents, several workers
# ---------------------------------------------------------------------------


def community(path: Path, tag: str = "t") -> list[Experiment]:
    """A run shared by hparam and an LLM, on two workers: a baseline, then 5 experiments."""
    with Ledger(path) as ledger:
        run = ledger.start_run(tag, "hparam+openai:gpt-x", {})

        def add(agent: str, status: str, metric: float | None, champion: float | None, **fields: object) -> None:
            ledger.add(run_id=run, tag=tag, kind=fields.pop("kind", "experiment"), parent_commit="a" * 40,
                       commit_sha="b" * 40, agent=agent, description=f"{agent} {status}", status=status,
                       outcome="ok" if metric is not None else "crash", metric=metric, champion_metric=champion,
                       **fields)

        add("hparam+openai:gpt-x", "keep", 2.0, None, kind="baseline", worker="w0", node="local")
        add("hparam", "keep", 1.9, 2.0, worker="w0", node="local")
        add("openai:gpt-x", "discard", 1.95, 1.9, worker="w1", node="10.0.0.2", cost_usd=0.25)
        add("openai:gpt-x", "keep", 1.8, 1.9, worker="w1", node="10.0.0.2", cost_usd=0.5)
        add("hparam", "crash", None, 1.8, worker="w0", node="local")
        add("openai:gpt-x", "keep", 1.75, 1.8, worker="w0", node=None, cost_usd=0.25)
        return ledger.experiments(tag)


def test_per_agent_tallies_proposals_keeps_gain_and_cost(tmp_path: Path) -> None:
    from autoresearch.report import AgentTally, per_agent

    history = community(tmp_path / "l.db")
    hparam, llm = per_agent(history, "min")  # the baseline is no agent's proposal
    assert hparam == AgentTally("hparam", proposals=2, keeps=1, gain=pytest.approx(0.1), cost=None)
    assert llm == AgentTally("openai:gpt-x", proposals=3, keeps=2, gain=pytest.approx(0.15), cost=pytest.approx(1.0))
    assert hparam.cost_text() == "—" and llm.cost_text() == "$1.00"
    higher = {t.agent: t.gain for t in per_agent(history, "max")}  # higher is better: these were losses
    assert higher == {"hparam": pytest.approx(-0.1), "openai:gpt-x": pytest.approx(-0.15)}
    assert per_agent([], "min") == []


def test_status_shows_where_each_ran_and_each_agents_share(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    repo = make_target(tmp_path)
    community(ledger_path(find_lab(repo)))
    monkeypatch.chdir(repo)
    assert main(["status", "--tag", "t"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if " id " in line and "description" in line)
    assert "where" in header and "agent" in header
    assert "w0@local" in out and "w1@10.0.0.2" in out and "│ w0 " in out  # a node unknown: the worker alone
    assert "per agent" in out and "proposals" in out and "$1.00" in out and "—" in out
    assert "+0.150000" in out and "+0.100000" in out
    assert main(["status", "--tag", "t", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [r["where"] for r in data["experiments"]] == ["w0@local", "w0@local", "w1@10.0.0.2", "w1@10.0.0.2",
                                                         "w0@local", "w0"]
    assert [(a["agent"], a["proposals"], a["keeps"]) for a in data["agents"]] == [("hparam", 2, 1), ("openai:gpt-x", 3, 2)]


def test_status_without_workers_or_a_second_agent_looks_as_before(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    repo = make_target(tmp_path)
    record(ledger_path(find_lab(repo)))
    monkeypatch.chdir(repo)
    assert main(["status", "--tag", "t"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if " id " in line and "description" in line)
    assert "where" not in header and "agent" not in header and "per agent" not in out


def test_report_breaks_a_shared_run_down_per_agent(tmp_path: Path) -> None:
    history = community(tmp_path / "l.db")
    _, md = write_report(history, tmp_path / "out", "val_bpb", "min", "t")
    report = md.read_text()
    assert "## Agents" in report and "| agent | proposals | keeps | gain | cost |" in report
    assert "| hparam | 2 | 1 | +0.100000 | — |" in report
    assert "| openai:gpt-x | 3 | 2 | +0.150000 | $1.00 |" in report
    assert "(by openai:gpt-x)" in report  # a kept change says whose it was
    _, alone = write_report(record(tmp_path / "m.db"), tmp_path / "alone", "val_bpb", "min", "t")
    assert "## Agents" not in alone.read_text() and "(by " not in alone.read_text()


def test_cost_text_keeps_small_costs_readable() -> None:
    from autoresearch.report import AgentTally

    assert AgentTally("a", 1, 0, 0.0, 0.0042).cost_text() == "$0.0042"
    assert AgentTally("a", 1, 0, 0.0, 12.345).cost_text() == "$12.35"
