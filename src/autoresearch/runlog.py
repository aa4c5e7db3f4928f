"""A run's log: the child's output copied from a pipe to a file in a thread, capped in size.

A run that prints 100 MB must fill neither memory nor disk: the first half of the cap goes to disk
as it comes, the last half stays in memory until the end, and a marker says how much was dropped
between them. The pipe is always drained, even when the disk is full, so the child never blocks.
"""

from __future__ import annotations

import os
import selectors
import threading
import time
from collections import deque
from pathlib import Path

_CHUNK = 1 << 20  # one read from the pipe; also the most the in-memory tail overshoots its cap


class CappedLog:
    """Copies the child's output from a pipe to a file in a thread, keeping at most `cap` bytes: the
    first half goes to disk as it comes, the last half stays in memory until close(), a marker between."""

    def __init__(self, path: Path, cap: int) -> None:
        self.file = open(path, "w+b")  # closed in close()
        self.tail_cap = max(cap, 2) // 2
        self.head_cap = max(cap, 2) - self.tail_cap
        self.on_disk = self.total = self.tail_len = 0
        self.tail: deque[bytes] = deque()
        self.truncated = self.head_newline = self.broken = False
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def start(self, fd: int) -> None:
        self.thread = threading.Thread(target=self._pump, args=(fd,), name="runner-log", daemon=True)
        self.thread.start()

    def _pump(self, fd: int) -> None:
        drain_until = None
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            while drain_until is None or time.monotonic() < drain_until:
                if selector.select(0.1):
                    data = os.read(fd, _CHUNK)
                    if not data:
                        return
                    self.write(data)
                elif self.stop.is_set():
                    return
                if self.stop.is_set() and drain_until is None:
                    drain_until = time.monotonic() + 2.0  # a writer we could not end keeps writing

    def write(self, data: bytes) -> None:
        self.total += len(data)
        try:
            if self.broken:
                return
            if not self.truncated and self.on_disk + len(data) <= self.head_cap + self.tail_cap:
                self.file.write(data)
                self.file.flush()
                self.on_disk += len(data)
                return
            if not self.truncated:  # first overflow: the head stays on disk, what follows it moves to memory
                self.truncated = True
                fill = max(0, self.head_cap - self.on_disk)
                self.file.write(data[:fill])
                data = data[fill:]
                self.file.seek(self.head_cap - 1)
                self.head_newline = self.file.read(1) == b"\n"
                moved = self.file.read()
                self.file.truncate(self.head_cap)
                self.tail.append(moved)
                self.tail_len += len(moved)
            self.tail.append(data)
            self.tail_len += len(data)
            while self.tail_len - len(self.tail[0]) >= self.tail_cap:
                self.tail_len -= len(self.tail.popleft())
        except OSError:
            self.broken = True  # e.g. disk full: keep draining the pipe so the child never blocks

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join()
        try:
            if self.truncated and not self.broken:
                tail = b"".join(self.tail)[-self.tail_cap:]
                marker = f"[... {self.total - self.head_cap - len(tail)} bytes omitted ...]\n".encode()
                self.file.seek(self.head_cap)
                self.file.write((b"" if self.head_newline else b"\n") + marker + tail)
                self.file.truncate()
        finally:
            self.file.close()
