"""The live terminal view renders every state without a real terminal."""

from __future__ import annotations

import dataclasses
import io
import threading
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


def on(worker: str, e: Experiment) -> Experiment:
    return dataclasses.replace(e, worker=worker, node="local")


def screen(view: LiveView) -> str:
    out = Console(file=io.StringIO(), width=160, record=True)
    out.print(view._render())
    return "\n".join(line.rstrip() for line in out.export_text().splitlines())


def test_plain_view_prefixes_a_workers_lines() -> None:
    out = io.StringIO()
    view = PlainView(Console(file=out, width=200))
    view.workers([("w0", "GPU 0: NVIDIA H200"), ("w1", "cores 1")])
    view.started(on("w1", experiment(12, "running", None)), 90)
    view.tick(3.0, worker="w1")
    view.proposing(worker="w0")
    view.finished(on("w1", experiment(12, "discard", 1.5)), 1.0)
    view.started(experiment(13, "running", None), 90)  # no worker: as in a single-worker run
    lines = out.getvalue().splitlines()
    assert lines[0] == "workers: w0 (GPU 0: NVIDIA H200), w1 (cores 1)"
    assert lines[1] == "[w1] #12   running  MATRIX_LR 0.04 -> 0.012"
    assert lines[2] == "[w1] " + result_line(experiment(12, "discard", 1.5))
    assert lines[3] == "#13   running  MATRIX_LR 0.04 -> 0.013"


def test_live_view_shows_a_row_per_worker() -> None:
    out = io.StringIO()
    view = LiveView(Console(file=out, force_terminal=True, width=160, color_system=None))
    view.start("mylab", "nov23", "hparam", [experiment(1, "keep", 1.0, kind="baseline")], 30)
    view.workers([("w0", "GPU 0: NVIDIA H200"), ("w1", "GPU 1: NVIDIA H200"), ("w2", "GPU 1 on 10.0.0.2")])
    rows = {line.split()[0]: line for line in screen(view).splitlines()[1:4]}
    assert set(rows) == {"w0", "w1", "w2"} and all(line.endswith("idle") for line in rows.values())
    assert "waiting for the agent" not in screen(view) and "running" not in screen(view)

    view.started(on("w0", experiment(2, "running", None)), 90)
    evil = dataclasses.replace(experiment(3, "running", None), description="\x1b[2Jwider [bold]MLP[/]\n")
    view.started(on("w1", evil), 120)
    view.proposing(worker="w2")
    view.tick(45.0, worker="w0")
    view._last = 0.0
    view.tick(30.0, worker="w1")
    lines = screen(view).splitlines()
    assert "GPU 0: NVIDIA H200" in lines[1] and "#2 MATRIX_LR 0.04 -> 0.02" in lines[1] and "45s / 90s" in lines[1]
    assert "GPU 1: NVIDIA H200" in lines[2] and "#3 wider [bold]MLP[/]" in lines[2] and "30s / 120s" in lines[2]
    assert "GPU 1 on 10.0.0.2" in lines[3] and "waiting for the agent" in lines[3]
    assert "\x1b" not in screen(view)

    view.finished(on("w0", experiment(2, "keep", 0.98)), 1.0)
    lines = screen(view).splitlines()
    assert lines[1].startswith("w0") and lines[1].endswith("idle") and "#2" not in lines[1]
    assert "#3 wider" in lines[2]  # the others run on
    assert lines[0].endswith("champion 0.980000 (1 run)")
    assert lines[4].split() == ["#", "worker", "status", "metric", "delta", "time", "description"]
    assert lines[5].split()[:3] == ["2", "w0", "keep"]
    view.stop("done")
    assert "stopped: done" in out.getvalue()


def test_live_view_without_workers_has_no_worker_rows_or_column() -> None:
    view = LiveView(Console(file=io.StringIO(), force_terminal=True, width=160, color_system=None))
    view.start("mylab", "nov23", "hparam", [], 30)
    view.started(experiment(2, "running", None), 90)
    view.tick(10.0)
    view.finished(experiment(2, "keep", 0.98), None)
    lines = screen(view).splitlines()
    assert lines[1] == "#2 keep: MATRIX_LR 0.04 -> 0.02"
    assert lines[2].split() == ["#", "status", "metric", "delta", "time", "description"]
    view.stop("done")


def test_live_view_takes_calls_from_many_threads() -> None:
    out = io.StringIO()
    view = LiveView(Console(file=out, force_terminal=True, width=160, color_system=None), rows=1000)
    view.start("mylab", "nov23", "hparam", [experiment(1, "keep", 1.0, kind="baseline")], 30)
    names = [f"w{i}" for i in range(4)]
    view.workers([(name, f"GPU {i}") for i, name in enumerate(names)])
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for k in range(200):
                eid = 100 * (t + 1) + k // 50
                if k % 50 == 0:
                    view.proposing(worker=names[t])
                    view.started(on(names[t], experiment(eid, "running", None)), 90)
                view.tick(float(k % 50), worker=names[t])
                if k % 50 == 49:
                    view.finished(on(names[t], experiment(eid, "discard", 1.0 + eid / 1e4)), 1.0)
                if k % 20 == 0:
                    view.message(f"{names[t]} at {k}")
                    time.sleep(0.01)  # let the repaint thread in between
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    lines = screen(view).splitlines()
    assert [line.split()[0] for line in lines[1:5]] == names
    assert all(line.endswith("idle") for line in lines[1:5])
    assert len(view.recent) == 16 and sorted(e.id for e in view.recent) == sorted(
        100 * (t + 1) + r for t in range(4) for r in range(4))
    assert lines[0].endswith("champion 1.000000 (1 run)")  # every run was discarded
    view.stop("done")
    assert "w3 at 180" in out.getvalue() and "stopped: done" in out.getvalue()
