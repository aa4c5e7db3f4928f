"""Fixtures for the data tests: a real HTTP server on 127.0.0.1 and small generated corpora."""

from __future__ import annotations

import io
import random
import threading
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from autoresearch.data import download

WORDS = """
    the a of and to in is was it for on with as his that he by at from her they this had not but story
    little girl boy dog cat tree house river sun moon happy sad played found wanted looked said big
    small red blue green day night friend mother father garden ball bird fish water
"""


def make_texts(count: int, seed: int) -> list[str]:
    """`count` short English-like documents, the same for the same seed."""
    rng = random.Random(seed)
    vocabulary = WORDS.split()
    texts = []
    for _ in range(count):
        sentences = []
        for _ in range(rng.randint(2, 5)):
            words = [rng.choice(vocabulary) for _ in range(rng.randint(4, 12))]
            sentences.append(" ".join(words).capitalize() + rng.choice([".", "!", "?"]))
        texts.append(" ".join(sentences))
    return texts


def parquet_bytes(texts: list[str], row_group_size: int = 64) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.table({"text": pa.array(texts, pa.string())}), buffer, row_group_size=row_group_size)
    return buffer.getvalue()


class FileServer:
    """Serves `files` (name -> bytes) over HTTP; counts requests; can fail the first N of a file."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: Counter[str] = Counter()
        self.fail_first: dict[str, int] = {}  # name -> how many requests answer 500 first
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                name = self.path.rsplit("/", 1)[-1]
                with server.lock:
                    server.requests[name] += 1
                    failing = server.requests[name] <= server.fail_first.get(name, 0)
                    body = server.files.get(name)
                if failing or body is None:
                    self.send_error(500 if failing else 404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/data"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def total_requests(self) -> int:
        with self.lock:
            return sum(self.requests.values())

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


CLIMBMIX_SHARDS = {0: 11, 1: 12, 6541: 13, 6542: 14}  # shard number -> seed of its texts


@pytest.fixture()
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Retries without the real backoff, so failure tests take milliseconds."""
    monkeypatch.setattr(download, "BASE_DELAY", 0.01)
    monkeypatch.setattr(download, "TIMEOUT", 5.0)


@pytest.fixture()
def file_server(fast_retries: None) -> Iterator[FileServer]:
    server = FileServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture()
def climbmix_server(file_server: FileServer, monkeypatch: pytest.MonkeyPatch) -> FileServer:
    """Small climbmix-like shards (0, 1, 6541, 6542), with AUTORESEARCH_CLIMBMIX_URL pointing at them."""
    for number, seed in CLIMBMIX_SHARDS.items():
        file_server.files[f"shard_{number:05d}.parquet"] = parquet_bytes(make_texts(60, seed))
    monkeypatch.setenv("AUTORESEARCH_CLIMBMIX_URL", file_server.url)
    return file_server


@pytest.fixture()
def tinystories_server(file_server: FileServer, monkeypatch: pytest.MonkeyPatch) -> FileServer:
    """A 400-row stand-in for tinystories_gpt4_clean.parquet."""
    texts = [f"Story {i}. " + text for i, text in enumerate(make_texts(400, 7))]
    file_server.files["tinystories_gpt4_clean.parquet"] = parquet_bytes(texts, row_group_size=100)
    monkeypatch.setenv("AUTORESEARCH_TINYSTORIES_URL", file_server.url)
    return file_server


def read_texts(path: Path) -> list[str]:
    return [str(t) for t in pq.read_table(path).column("text").to_pylist()]
