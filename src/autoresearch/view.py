"""What the person watching sees: a live terminal view, or plain lines when output is not a terminal."""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Protocol

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.progress_bar import ProgressBar
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
    loop's champion mean of the moment, without its number of runs.

    A run with several workers calls `workers` once after `start`, with each worker's name and what it
    runs on; then `started`/`finished` name the worker in `e.worker`, and `tick`/`proposing` take it as
    `worker`. Without `workers` (one worker) every worker is None. The methods may be called from
    several threads at once."""

    def start(self, lab: str, tag: str, agent: str, history: list[Experiment], budget: float) -> None: ...
    def workers(self, slots: list[tuple[str, str]]) -> None: ...
    def proposing(self, worker: str | None = None) -> None: ...
    def started(self, e: Experiment, limit: float) -> None: ...
    def tick(self, elapsed: float, worker: str | None = None) -> None: ...
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


def worker_prefix(e: Experiment) -> str:
    """`[w1] ` before a line about a worker's experiment; nothing in a single-worker run."""
    return f"[{e.worker}] " if e.worker else ""


class PlainView:
    """A line per event: for logs, CI and terminals without live display. Every line is printed as
    plain text (no rich markup), cleaned of what a run or an agent could use to rewrite the terminal.
    Every public method holds one lock, so the threads of several workers can share a view."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(highlight=False, soft_wrap=True)
        self._lock = threading.RLock()

    def say(self, line: str) -> None:
        with self._lock:
            self.console.print(Text(clean(line)))

    def start(self, lab: str, tag: str, agent: str, history: list[Experiment], budget: float) -> None:
        self.say(f"lab {lab}  run {tag}  agent {agent}  budget {budget:g}s  "
                 f"champion {fmt_champion(champion_of(history))}")

    def workers(self, slots: list[tuple[str, str]]) -> None:
        self.say("workers: " + ", ".join(f"{name} ({device})" for name, device in slots))

    def proposing(self, worker: str | None = None) -> None:
        pass

    def started(self, e: Experiment, limit: float) -> None:
        self.say(f"{worker_prefix(e)}#{e.id:<4} running  {e.description}")

    def tick(self, elapsed: float, worker: str | None = None) -> None:
        pass

    def finished(self, e: Experiment, champion: float | None) -> None:
        self.say(worker_prefix(e) + result_line(e))

    def message(self, text: str) -> None:
        self.say(text)

    def stop(self, reason: str) -> None:
        self.say(f"stopped: {reason}")


@dataclass
class Slot:
    """What one worker is doing, as the live view shows it."""

    device: str
    doing: str = "idle"  # "idle", "waiting for the agent", or "#id description" while it runs
    experiment: int | None = None  # the running experiment's id
    limit: float = 0.0
    elapsed: float = 0.0


class LiveView(PlainView):
    """A live panel: the current experiment with a progress bar over its time limit (with several
    workers, a row per worker), the last results, and the champion.

    Every change and every repaint happens under the view's lock, so a repaint never shows half an
    update: rich's own refresh thread is off, and `_repaint` redraws four times a second instead. What
    rich is handed is rebuilt from the state under the lock and not changed afterwards (the
    single-worker progress bar excepted, which has its own lock)."""

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
        self.slots: dict[str, Slot] = {}  # by worker name, once `workers` announced them
        self.stopped: str | None = None
        self.live = Live(self._render(), console=self.console, auto_refresh=False, transient=False)
        self._last = 0.0
        self._done = threading.Event()
        self._painter: threading.Thread | None = None

    def _results(self) -> Table:
        table = Table(box=None, pad_edge=False, show_header=True, header_style="bold")
        columns = [("#", "right"), ("status", "left"), ("metric", "right"), ("delta", "right"),
                   ("time", "right"), ("description", "left")]
        if self.slots:
            columns.insert(1, ("worker", "left"))
        for name, justify in columns:
            table.add_column(name, justify=justify)  # type: ignore[arg-type]
        for e in self.recent:
            seconds = f"{e.run_seconds:.0f}s" if e.run_seconds is not None else ""
            cells: list[str | Text] = [str(e.id), Text(e.status, style=STATUS_STYLE.get(e.status, "")),
                                       fmt_metric(e.metric), fmt_delta(e), seconds,
                                       Text(clean(e.description, limit=70))]
            if self.slots:
                cells.insert(1, Text(clean(e.worker or "")))
            table.add_row(*cells)
        return table

    def _workers(self) -> Table:
        table = Table(box=None, pad_edge=False, show_header=False)
        for justify in ("left", "left", "left", "left", "right"):
            table.add_column(justify=justify, no_wrap=True)  # type: ignore[arg-type]
        for name, slot in self.slots.items():
            running = slot.experiment is not None
            bar = ProgressBar(total=max(slot.limit, 1e-9), completed=min(slot.elapsed, slot.limit), width=30)
            table.add_row(Text(clean(name), style="bold"), Text(clean(slot.device, limit=30), style="dim"),
                          Text(slot.doing, style="" if running else "dim"), bar if running else "",
                          f"{slot.elapsed:.0f}s / {slot.limit:.0f}s" if running else "")
        return table

    def _render(self) -> Group:
        head = Text(f"{self.header}   champion {fmt_champion(self.champion)}", style="bold")
        if not self.slots:
            return Group(head, Text(clean(self.current)), self.progress, self._results())
        parts: list[Text | Table] = [head, self._workers(), self._results()]
        if self.stopped is not None:
            parts.insert(1, Text(clean(f"stopped: {self.stopped}")))
        return Group(*parts)

    def _refresh(self) -> None:
        self.live.update(self._render())

    def _repaint(self) -> None:
        while not self._done.wait(0.25):
            with self._lock:
                if not self._done.is_set():
                    self._refresh()
                    self.live.refresh()

    def start(self, lab: str, tag: str, agent: str, history: list[Experiment], budget: float) -> None:
        with self._lock:
            self.header = f"lab {lab} · run {tag} · agent {agent} · budget {budget:g}s"
            self.rows = {e.id: e for e in history}
            self.champion = champion_of(history)
            self.live.start()
            self._refresh()
            if self._painter is None:
                self._painter = threading.Thread(target=self._repaint, name="autoresearch-view", daemon=True)
                self._painter.start()

    def workers(self, slots: list[tuple[str, str]]) -> None:
        with self._lock:
            self.slots = {name: Slot(device) for name, device in slots}
            self._refresh()

    def _slot(self, worker: str | None) -> Slot:
        """The row of `worker`; one is added for a worker `workers` did not announce."""
        return self.slots.setdefault(worker or "-", Slot(""))

    def proposing(self, worker: str | None = None) -> None:
        with self._lock:
            if self.slots:
                slot = self._slot(worker)
                slot.doing, slot.experiment = "waiting for the agent", None
            else:
                self.current = "the agent is proposing the next change…"
                self.progress.update(self.task, visible=False)
            self._refresh()

    def started(self, e: Experiment, limit: float) -> None:
        with self._lock:
            if self.slots:
                slot = self._slot(e.worker)
                slot.doing = clean(f"#{e.id} {e.description}", limit=60)
                slot.experiment, slot.limit, slot.elapsed = e.id, limit, 0.0
            else:
                self.current = f"#{e.id} {e.description}"
                self.progress.reset(self.task, total=limit, description="running", visible=True)
            self._refresh()

    def tick(self, elapsed: float, worker: str | None = None) -> None:
        with self._lock:
            slot = self.slots.get(worker or "-")
            if slot is not None and slot.experiment is not None:
                slot.elapsed = elapsed
            now = time.monotonic()
            if now - self._last >= 0.25:
                self._last = now
                if not self.slots:
                    self.progress.update(self.task, completed=elapsed)
                self._refresh()

    def finished(self, e: Experiment, champion: float | None) -> None:
        with self._lock:
            self.recent.append(e)
            self.rows[e.id] = e  # a repeat of the champion, or a new one, changes its mean
            self.champion = champion_of([self.rows[i] for i in sorted(self.rows)])
            if self.slots:
                slot = self.slots.get(e.worker or "-")
                if slot is not None and slot.experiment in (None, e.id):  # not a run it started since
                    slot.doing, slot.experiment = "idle", None
            else:
                self.progress.update(self.task, visible=False)
                self.current = f"#{e.id} {e.status}: {e.description}"
            self._refresh()

    def message(self, text: str) -> None:
        with self._lock:
            self.live.console.print(Text(clean(text)))

    def stop(self, reason: str) -> None:
        with self._lock:
            self.current = f"stopped: {reason}"
            self.stopped = reason
            self._done.set()
            self._refresh()
            self.live.stop()
            painter, self._painter = self._painter, None
        if painter is not None:
            painter.join()  # outside the lock: it may be waiting for it
