"""Threads for the training dataloader: an ordered parallel map and a bounded background producer.

Threads, not processes: runs execute inside a bubblewrap sandbox where multiprocessing's /dev/shm
semaphores may be missing, and the expensive step (tiktoken's BPE) releases the GIL while it
encodes (pyo3's `py.detach` around the encode in tiktoken's src/py.rs), so threads can scale there:
encoding paragraphs on 2 threads ran 1.8x faster than on 1 on an idle 2-core box. The rest of
tokenizing (splitting, converting ids, cutting pieces) and the packing hold the GIL, about 45 %
of the work at T=2048, which bounds what more threads can add.

Every thread here is a daemon, so a loader that is never closed cannot keep the interpreter alive,
and is also stopped and joined from an atexit hook: a daemon thread still running when the
interpreter finalizes is killed as it next takes the GIL, and if that happens inside torch's or
pyarrow's C++ the process aborts ("terminate called without an active exception", exit 134; seen
with a loader dropped right after its first batch).

Order is never left to the scheduler: `ordered_map` yields results in the order of its inputs and
`background` in the order its iterator produced them, so what comes out does not depend on how
many threads there are or how they were scheduled.
"""

from __future__ import annotations

import atexit
import itertools
import os
import queue
import threading
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

MAX_PRODUCERS = 8  # tokenizing threads at most: the packing thread and the GIL limit what more would add
JOIN_TIMEOUT = 10.0  # seconds to wait for a stopped thread to finish the item at hand


def default_producers() -> int:
    """Tokenizing threads for this host: one per core this process may run on but one (the training
    loop's), at least 1 and at most MAX_PRODUCERS. On 2 cores that is 1: with the training loop
    and the packing thread running too, a second tokenizing thread measured no faster there."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores - 1, MAX_PRODUCERS))


class _Failed:
    """An exception raised in a thread, carried to the thread that consumes its results."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


_DONE = object()  # the producer's iterator is exhausted


class _Slot(Generic[R]):
    """Where one item's result (or the exception computing it raised) is left for the consumer."""

    def __init__(self) -> None:
        self._ready = threading.Event()
        self._value: R | _Failed | None = None

    def put(self, value: R | _Failed) -> None:
        self._value = value
        self._ready.set()

    def get(self) -> R:
        self._ready.wait()
        value = self._value
        if isinstance(value, _Failed):
            raise value.error  # its __traceback__ still holds the worker's frames
        return value  # type: ignore[return-value]


class _Stopped(RuntimeError):
    """What a consumer still waiting on an item sees once its ordered_map was stopped."""


def _work(fn: Callable[[T], R], inbox: queue.SimpleQueue[tuple[T, _Slot[R]] | None], stopped: threading.Event) -> None:
    while True:
        job = inbox.get()
        if job is None:  # the end
            return
        item, slot = job
        if stopped.is_set():  # drain what is queued without computing it
            slot.put(_Failed(_Stopped("ordered_map was stopped")))
            continue
        try:
            slot.put(fn(item))
        except BaseException as exc:  # noqa: BLE001 - every failure is the consumer's to see
            slot.put(_Failed(exc))


def _join(threads: Iterable[threading.Thread]) -> None:
    for thread in threads:
        if thread is not threading.current_thread():
            thread.join(JOIN_TIMEOUT)


def ordered_map(
    fn: Callable[[T], R], items: Iterable[T], workers: int, ahead: int | None = None
) -> Generator[R, None, None]:
    """`map(fn, items)` computed on `workers` daemon threads, results in input order.

    At most `ahead` items (default 2 per worker) are in flight, so memory stays bounded however
    far the consumer lags. An exception raised by `fn` is re-raised here, at the item that raised
    it. Closing the iterator (or dropping it), or the interpreter exiting, stops and joins the
    workers. `workers` <= 1 is plain `map`.
    """
    if workers <= 1:
        yield from map(fn, items)
        return
    ahead = ahead or 2 * workers
    items = iter(items)
    inbox: queue.SimpleQueue[tuple[T, _Slot[R]] | None] = queue.SimpleQueue()
    stopped = threading.Event()
    threads = [threading.Thread(target=_work, args=(fn, inbox, stopped), daemon=True, name=f"ordered_map-{i}")
               for i in range(workers)]

    def stop() -> None:
        if not stopped.is_set():
            stopped.set()
            for _ in threads:
                inbox.put(None)
        _join(threads)

    for thread in threads:
        thread.start()
    atexit.register(stop)
    pending: deque[_Slot[R]] = deque()

    def send(item: T) -> None:
        slot: _Slot[R] = _Slot()
        inbox.put((item, slot))
        pending.append(slot)

    try:
        for item in itertools.islice(items, ahead):
            send(item)
        while pending:
            value = pending.popleft().get()
            for item in itertools.islice(items, 1):
                send(item)
            yield value
    finally:
        atexit.unregister(stop)
        stop()


def _produce(items: Iterator[T], out: queue.Queue[object], stopped: threading.Event) -> None:
    end: object = _DONE
    try:
        for item in items:
            if stopped.is_set():
                return
            out.put(item)  # blocks while the queue is full: the producer is at most `depth` ahead
    except BaseException as exc:  # noqa: BLE001 - the consumer re-raises it at next()
        end = _Failed(exc)
    finally:
        close = getattr(items, "close", None)
        if close is not None:
            close()  # a generator: closing it lets go of what it holds (an ordered_map stops once dropped)
    if not stopped.is_set():
        out.put(end)


def background(items: Iterator[T], depth: int, name: str = "loader") -> Generator[T, None, None]:
    """Yield what `items` yields, computed ahead on a daemon thread, at most `depth` items ahead.

    An exception in the producer is re-raised at the consumer's next(), with the producer's
    traceback. Closing this generator, dropping the last reference to it, or the interpreter
    exiting stops the producer: it finishes the item at hand, closes `items` and ends, and is
    joined. The thread holds no reference to this generator, so garbage collection can reach it.
    """
    out: queue.Queue[object] = queue.Queue(maxsize=depth)
    stopped = threading.Event()
    thread = threading.Thread(target=_produce, args=(items, out, stopped), daemon=True, name=name)

    def stop() -> None:
        stopped.set()
        while True:  # unblock a producer waiting on the full queue; it sees `stopped` next
            try:
                out.get_nowait()
            except queue.Empty:
                break
        _join([thread])

    thread.start()
    atexit.register(stop)
    try:
        while True:
            item = out.get()
            if item is _DONE:
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item  # type: ignore[misc]
    finally:
        atexit.unregister(stop)
        stop()
