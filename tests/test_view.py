"""The live terminal view renders every state without a real terminal."""

from __future__ import annotations

import io
import time

from rich.console import Console

from autoresearch.ledger import Experiment
from autoresearch.view import LiveView, PlainView, result_line


def experiment(i: int, status: str, metric: float | None, kind: str = "experiment",
               repeat_of: int | None = None) -> Experiment:
    return Experiment(id=i, run_id=1, tag="t", kind=kind, parent_commit="a" * 40, commit_sha="b" * 40, agent="hparam",
                      description=f"MATRIX_LR 0.04 -> 0.0{i}", rationale=None, patch=None, status=status, reason=None,
                      metric=metric, champion_metric=1.0, summary_json=None, memory_gb=None, propose_seconds=0.1,
                      run_seconds=30.0, evaluate_seconds=None, log_path=None, pid=None, pgid=None,
                      created_at=time.time(), started_at=None, finished_at=None, lines_changed=2, outcome="ok",
                      meta_json=None, repeat_of=repeat_of)


def test_live_view_shows_progress_results_and_champion() -> None:
    out = io.StringIO()
    view = LiveView(Console(file=out, force_terminal=True, width=120, color_system=None))
    view.start("mylab", "nov23", "hparam", [experiment(1, "keep", 1.0, kind="baseline")], 30)
    view.proposing()
    view.started(experiment(2, "running", None), 90)
    view.tick(45.0)
    view.finished(experiment(2, "keep", 0.98), 1.0)
    view.finished(experiment(3, "discard", 1.01), 0.98)
    view.message("a message")
    view.stop("reached --max-experiments 2")
    text = out.getvalue()
    for needle in ("lab mylab", "run nov23", "champion 0.980000", "MATRIX_LR 0.04 -> 0.02", "keep", "discard",
                   "-0.020000", "a message", "stopped: reached --max-experiments 2"):
        assert needle in text, needle


def test_plain_view_is_one_line_per_result() -> None:
    out = io.StringIO()
    view = PlainView(Console(file=out, width=200))
    view.finished(experiment(4, "discard", 1.5), 1.0)
    assert out.getvalue().strip() == result_line(experiment(4, "discard", 1.5)).strip()
    assert "+0.500000" in out.getvalue()


def test_live_view_champion_is_the_mean_of_its_runs() -> None:
    def head(view: LiveView) -> str:
        screen = Console(file=io.StringIO(), width=160, record=True)
        screen.print(view._render())
        return screen.export_text().splitlines()[0]

    view = LiveView(Console(file=io.StringIO(), force_terminal=True, width=160, color_system=None))
    history = [experiment(1, "keep", 1.686, kind="baseline"), experiment(2, "measured", 1.7301, "repeat", 1)]
    view.start("mylab", "nov23", "hparam", history, 30)
    assert head(view).endswith("champion 1.708050 (mean of 2 runs)")  # a resumed tag: its runs so far count
    for i, metric in ((3, 1.7283), (4, 1.731648)):
        view.finished(experiment(i, "measured", metric, "repeat", 1), None)
    assert head(view).endswith("champion 1.719012 (mean of 4 runs)")  # not its first run, 1.686
    view.started(experiment(5, "running", None), 90)
    view.finished(experiment(6, "measured", 1.69, "repeat", 5), 1.719012)  # a confirmation: not yet kept
    assert head(view).endswith("champion 1.719012 (mean of 4 runs)")
    view.finished(experiment(5, "keep", 1.704), 1.719012)
    assert head(view).endswith("champion 1.697000 (mean of 2 runs)")
    view.stop("done")


def test_plain_view_starts_with_the_champions_mean() -> None:
    out = io.StringIO()
    view = PlainView(Console(file=out, width=200))
    view.start("mylab", "nov23", "hparam", [experiment(1, "keep", 1.686, kind="baseline"),
                                             experiment(2, "measured", 1.7301, "repeat", 1)], 30)
    assert out.getvalue().strip() == "lab mylab  run nov23  agent hparam  budget 30s  champion 1.708050 (mean of 2 runs)"
    view.start("mylab", "nov24", "hparam", [], 30)
    assert out.getvalue().splitlines()[-1].endswith("champion —")
