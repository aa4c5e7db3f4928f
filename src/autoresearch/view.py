"""What the person watching sees: a live terminal view, or plain lines when output is not a terminal."""

from __future__ import annotations

import time
from collections import deque
from typing import Protocol

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from .display import clean
from .ledger import Experiment
from .report import Standing, champion as champion_of

STATUS_STYLE = {"keep": "bold green", "discard": "dim", "crash": "red", "timeout": "red", "invalid": "yellow",
                "killed": "magenta", "running": "cyan"}


class View(Protocol):
    """`start` gets the tag's rows so far and `finished` each row as it is recorded (repeats too), so a
    view knows every run behind the champion's mean (report.champion); `finished`'s `champion` is the
    loop's champion mean of the moment, without its number of runs."""

    def start(self, lab: str, tag: str, agent: str, history: list[Experiment], budget: float) -> None: ...
    def proposing(self) -> None: ...
    def started(self, e: Experiment, limit: float) -> None: ...
    def tick(self, elapsed: float) -> None: ...
    def finished(self, e: Experiment, champion: float | None) -> None: ...
    def message(self, text: str) -> None: ...
    def stop(self, reason: str) -> None: ...


def fmt_metric(value: float | None) -> str:
    return "—" if value is None else f"{value:.6f}"


def fmt_champion(best: Standing | None) -> str:
    """The champion as the judge compares against it: `1.719012 (mean of 4 runs)`, or `—`."""
    return "—" if best is None else best.describe()


def fmt_delta(e: Experiment) -> str:
    if e.metric is None or e.champion_metric is None or e.kind == "baseline":
        return ""
    return f"{e.metric - e.champion_metric:+.6f}"


def result_line(e: Experiment) -> str:
    """One line per finished experiment, as the plain view and the logs show it."""
    seconds = f"{e.run_seconds:.0f}s" if e.run_seconds is not None else "-"
    extra = f"  ({clean(e.reason, limit=500)})" if e.reason and e.status not in ("keep", "discard") else ""
    return (f"#{e.id:<4} {e.status:<8} {fmt_metric(e.metric):>10} {fmt_delta(e):>10} {seconds:>6}  "
            f"{clean(e.description)}{extra}")


class PlainView:
    """A line per event: for logs, CI and terminals without live display. Every line is printed as
    plain text (no rich markup), cleaned of what a run or an agent could use to rewrite the terminal."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(highlight=False, soft_wrap=True)

    def say(self, line: str) -> None:
        self.console.print(Text(clean(line)))

    def start(self, lab: str, tag: str, agent: str, history: list[Experiment], budget: float) -> None:
        self.say(f"lab {lab}  run {tag}  agent {agent}  budget {budget:g}s  "
                 f"champion {fmt_champion(champion_of(history))}")

    def proposing(self) -> None:
        pass

    def started(self, e: Experiment, limit: float) -> None:
        self.say(f"#{e.id:<4} running  {e.description}")

    def tick(self, elapsed: float) -> None:
        pass

    def finished(self, e: Experiment, champion: float | None) -> None:
        self.say(result_line(e))

    def message(self, text: str) -> None:
        self.say(text)

    def stop(self, reason: str) -> None:
        self.say(f"stopped: {reason}")


class LiveView(PlainView):
    """A live panel: the current experiment with a progress bar over its time limit, the last
    results, and the champion."""

    def __init__(self, console: Console | None = None, rows: int = 8) -> None:
        super().__init__(console)
        self.recent: deque[Experiment] = deque(maxlen=rows)
        self.header = ""
        self.rows: dict[int, Experiment] = {}  # every row of the tag seen, for the champion's mean
        self.champion: Standing | None = None
        self.current = "waiting for the agent"
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                                 TextColumn("/ {task.total:.0f}s"), console=self.console)
        self.task = self.progress.add_task("", total=1, visible=False)
        self.live = Live(self._render(), console=self.console, refresh_per_second=4, transient=False)
        self._last = 0.0

    def _render(self) -> Group:
        table = Table(box=None, pad_edge=False, show_header=True, header_style="bold")
        for name, justify in (("#", "right"), ("status", "left"), ("metric", "right"), ("delta", "right"),
                              ("time", "right"), ("description", "left")):
            table.add_column(name, justify=justify)  # type: ignore[arg-type]
        for e in self.recent:
            seconds = f"{e.run_seconds:.0f}s" if e.run_seconds is not None else ""
            table.add_row(str(e.id), Text(e.status, style=STATUS_STYLE.get(e.status, "")), fmt_metric(e.metric),
                          fmt_delta(e), seconds, Text(clean(e.description, limit=70)))
        head = Text(f"{self.header}   champion {fmt_champion(self.champion)}", style="bold")
        return Group(head, Text(clean(self.current)), self.progress, table)

    def _refresh(self) -> None:
        self.live.update(self._render())

    def start(self, lab: str, tag: str, agent: str, history: list[Experiment], budget: float) -> None:
        self.header = f"lab {lab} · run {tag} · agent {agent} · budget {budget:g}s"
        self.rows = {e.id: e for e in history}
        self.champion = champion_of(history)
        self.live.start()
        self._refresh()

    def proposing(self) -> None:
        self.current = "the agent is proposing the next change…"
        self.progress.update(self.task, visible=False)
        self._refresh()

    def started(self, e: Experiment, limit: float) -> None:
        self.current = f"#{e.id} {e.description}"
        self.progress.reset(self.task, total=limit, description="running", visible=True)
        self._refresh()

    def tick(self, elapsed: float) -> None:
        now = time.monotonic()
        if now - self._last >= 0.25:
            self._last = now
            self.progress.update(self.task, completed=elapsed)
            self._refresh()

    def finished(self, e: Experiment, champion: float | None) -> None:
        self.recent.append(e)
        self.rows[e.id] = e  # a repeat of the champion, or a new one, changes its mean
        self.champion = champion_of([self.rows[i] for i in sorted(self.rows)])
        self.progress.update(self.task, visible=False)
        self.current = f"#{e.id} {e.status}: {e.description}"
        self._refresh()

    def message(self, text: str) -> None:
        self.live.console.print(Text(clean(text)))

    def stop(self, reason: str) -> None:
        self.current = f"stopped: {reason}"
        self._refresh()
        self.live.stop()
