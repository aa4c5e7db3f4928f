"""HTTP downloads: streamed to `<name>.tmp`, checked, then renamed into place.

Transient failures (connection errors, timeouts, HTTP 5xx and 429, a short body, a file that fails
its check) are retried with exponential backoff. A 404 or another client error is not: the file is
not there, and asking again will not change that. The retry constants are read at call time, so
tests can shrink them with monkeypatch.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import requests

from ..errors import DatasetUnreachable

ATTEMPTS = 5  # tries per file before giving up
BASE_DELAY = 2.0  # seconds before the first retry; doubles after every failure
MAX_DELAY = 60.0  # longest wait between two tries
TIMEOUT = 60.0  # seconds to connect, and at most between two received blocks
CHUNK_BYTES = 1 << 20
PROGRESS_BYTES = 128 << 20  # log progress of a large file every this many bytes

Log = Callable[[str], None]
Check = Callable[[Path], None]  # raises ValueError when a downloaded file is not what was asked for


@dataclass(frozen=True)
class Job:
    """One file to fetch."""

    url: str
    dest: Path


class _Retry(Exception):
    """A failure worth another try."""


class _Cancelled(Exception):
    """Another download of the same batch failed; stop quietly."""


def _quiet(_message: str) -> None:
    pass


def download(
    url: str,
    dest: Path,
    *,
    hint: str,
    check: Check | None = None,
    attempts: int | None = None,
    base_delay: float | None = None,
    timeout: float | None = None,
    stop: threading.Event | None = None,
    log: Log | None = None,
) -> str:
    """Fetch `url` into `dest` atomically and return the sha256 of its bytes.

    `hint` is what the user can do when the file stays unreachable (e.g. which variable names a
    mirror). A leftover `dest.tmp` from an interrupted run is overwritten.
    """
    attempts = ATTEMPTS if attempts is None else max(1, attempts)
    base_delay = BASE_DELAY if base_delay is None else base_delay
    timeout = TIMEOUT if timeout is None else timeout
    say = log or _quiet
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    problem = ""
    for attempt in range(attempts):
        if stop is not None and stop.is_set():
            raise _Cancelled()
        try:
            sha = _fetch(url, tmp, timeout, stop, say)
            if check is not None:
                check(tmp)
        except (_Retry, requests.RequestException, ValueError, OSError) as exc:
            problem = str(exc) or type(exc).__name__
            tmp.unlink(missing_ok=True)
            if attempt + 1 < attempts:
                delay = min(MAX_DELAY, base_delay * 2**attempt)
                say(f"{dest.name}: {problem}; retrying in {delay:.1f}s")
                if stop is not None:
                    stop.wait(delay)
                else:
                    time.sleep(delay)
            continue
        except DatasetUnreachable as exc:
            tmp.unlink(missing_ok=True)
            raise DatasetUnreachable(exc.message, hint) from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, dest)
        return sha
    raise DatasetUnreachable(f"could not download {url} after {attempts} attempts: {problem}", hint)


def _fetch(url: str, tmp: Path, timeout: float, stop: threading.Event | None, say: Log) -> str:
    """One try: stream the body into `tmp`, hashing as it arrives."""
    with requests.get(url, stream=True, timeout=timeout) as response:
        status = response.status_code
        if status == 404:
            base, _, name = url.rpartition("/")
            raise DatasetUnreachable(f"{name} does not exist at {base} (HTTP 404)", None)
        if 400 <= status < 500 and status not in (408, 429):
            raise DatasetUnreachable(f"{url} was refused with HTTP {status}", None)
        response.raise_for_status()
        expected = response.headers.get("Content-Length")
        compressed = "Content-Encoding" in response.headers
        digest = hashlib.sha256()
        received = 0
        with open(tmp, "wb") as handle:
            for block in response.iter_content(CHUNK_BYTES):
                if stop is not None and stop.is_set():
                    raise _Cancelled()
                handle.write(block)
                digest.update(block)
                received += len(block)
                if received // PROGRESS_BYTES > (received - len(block)) // PROGRESS_BYTES:
                    total = f" of {int(expected) >> 20}" if expected and not compressed else ""
                    say(f"{tmp.name[:-4]}: {received >> 20}{total} MiB")
    if expected is not None and not compressed and int(expected) != received:
        raise _Retry(f"connection closed after {received} of {expected} bytes")
    return digest.hexdigest()


def download_all(
    jobs: list[Job],
    *,
    hint: str,
    check: Check | None = None,
    workers: int = 8,
    attempts: int | None = None,
    base_delay: float | None = None,
    log: Log | None = None,
) -> dict[Path, str]:
    """Fetch every job in parallel; returns dest -> sha256. The first failure cancels the rest."""
    say = log or _quiet
    stop = threading.Event()
    shas: dict[Path, str] = {}
    if not jobs:
        return shas
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(jobs)))) as pool:
        futures = {
            pool.submit(download, job.url, job.dest, hint=hint, check=check, attempts=attempts,
                        base_delay=base_delay, stop=stop, log=log): job
            for job in jobs
        }
        try:
            for future in as_completed(futures):
                job = futures[future]
                shas[job.dest] = future.result()
                say(f"downloaded {job.dest.name} ({len(shas)}/{len(jobs)})")
        except BaseException:
            stop.set()
            for future in futures:
                future.cancel()
            raise
    return shas
