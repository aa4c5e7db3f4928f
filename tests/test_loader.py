"""The training dataloader: batches made ahead on threads, the same whatever the number of threads.

make_dataloader is checked against the loader it replaced (a single pinned buffer, packing inline)
on a real sotu lab: same rows, same order, across an epoch boundary. Then what the threads must
never do: share a buffer between two batches, hang on an error, outlive the loader, or abort the
interpreter at exit.
"""

from __future__ import annotations

import gc
import itertools
import subprocess
import sys
import threading
import traceback
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from autoresearch.data.loader import background, ordered_map
from autoresearch.data.packing import (
    encode_each,
    pack_rows,
    pieces_of,
    shuffled_epochs,
    split_paragraphs,
)
from conftest import REPO, import_prepare, prepared_tiny_lab

B, T = 32, 1024  # 32k tokens a batch: the sotu training split (~100 batches) ends within the test


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, shared_cache: Path) -> Path:
    return prepared_tiny_lab(tmp_path_factory.mktemp("loader"), shared_cache)


@pytest.fixture(autouse=True)
def _shared_cache(monkeypatch: pytest.MonkeyPatch, shared_cache: Path) -> None:
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(shared_cache))


@pytest.fixture(scope="module")
def prepare(lab: Path) -> ModuleType:
    """The lab's frozen prepare.py, imported in this process under a name of its own."""
    return import_prepare(lab, "loader_test_prepare")


@pytest.fixture()
def tokenizer(prepare: ModuleType) -> object:
    return prepare.Tokenizer.from_directory()  # found through AUTORESEARCH_CACHE: set per test


def loader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "loader" or t.name.startswith("ordered_map-")]


# ---------------------------------------------------------------------------
# The loader it replaced, verbatim but for the names: the reference for "the same batches"
# ---------------------------------------------------------------------------


def old_document_pieces(docs: Iterable[tuple[str, int]], encode, bos: int, capacity: int,  # type: ignore[no-untyped-def]
                        batch_docs: int = 64) -> Iterator[tuple[np.ndarray, int]]:
    docs = iter(docs)
    while True:
        batch = list(itertools.islice(docs, batch_docs))
        if not batch:
            return
        split = [split_paragraphs(text) for text, _ in batch]
        flat = encode([p for paras in split for p in paras])
        i = 0
        for (_, epoch), paras in zip(batch, split):
            encoded = flat[i : i + len(paras)]
            i += len(paras)
            for piece in pieces_of(encoded, bos, capacity):
                yield piece, epoch


def old_make_dataloader(prepare: ModuleType, tokenizer, B: int, T: int, split: str):  # type: ignore[no-untyped-def]
    capacity = T + 1
    bos = tokenizer.get_bos_token_id()
    docs = shuffled_epochs(prepare._row_group_loaders(split), seed=prepare.TRAIN_SEED, shuffle=split == "train")
    pieces = old_document_pieces(docs, encode_each(tokenizer.enc.encode_ordinary), bos, capacity)
    rows = pack_rows(pieces, capacity, bos)
    staging = np.empty((B, T + 1), dtype=np.int64)
    host = torch.empty((2, B, T), dtype=torch.long)
    while True:
        for i in range(B):
            staging[i], epoch = next(rows)
        host[0].copy_(torch.from_numpy(staging[:, :-1]))
        host[1].copy_(torch.from_numpy(staging[:, 1:]))
        batch = host.clone()
        yield batch[0], batch[1], epoch


def take(loader: Iterator[tuple[torch.Tensor, torch.Tensor, int]], n: int) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    return list(itertools.islice(loader, n))


# ---------------------------------------------------------------------------
# make_dataloader on a real lab
# ---------------------------------------------------------------------------


def test_batches_are_the_old_loaders_whatever_the_producers(prepare: ModuleType, tokenizer: object) -> None:
    old = take(old_make_dataloader(prepare, tokenizer, B, T, "train"), 130)
    epochs = [epoch for _, _, epoch in old]
    assert epochs[0] == 1 and epochs[-1] >= 2, "the batches must cross an epoch boundary (a new shuffle)"
    for producers in (1, 2, 3):
        loader = prepare.make_dataloader(tokenizer, B, T, "train", device="cpu", producers=producers)
        new = take(loader, len(old))
        loader.close()
        for k, ((x0, y0, e0), (x1, y1, e1)) in enumerate(zip(old, new)):
            assert e1 == e0, f"producers={producers}: batch {k} epoch"
            assert torch.equal(x1, x0) and torch.equal(y1, y0), f"producers={producers}: batch {k} differs"


def test_validation_batches_are_the_old_loaders(prepare: ModuleType, tokenizer: object) -> None:
    old = take(old_make_dataloader(prepare, tokenizer, 4, 64, "val"), 20)
    loader = prepare.make_dataloader(tokenizer, 4, 64, "val", device="cpu", producers=2)
    for (x0, y0, e0), (x1, y1, e1) in zip(old, take(loader, 20)):
        assert torch.equal(x1, x0) and torch.equal(y1, y0) and e1 == e0
    loader.close()


def test_batches_never_share_storage(prepare: ModuleType, tokenizer: object) -> None:
    """Several batches held at once (as gradient accumulation holds them while copies are pending):
    no two of them may live in the same memory, and none may change after it was handed out."""
    loader = prepare.make_dataloader(tokenizer, B, T, "train", device="cpu", producers=2)
    held = take(loader, 8)
    copies = [(x.clone(), y.clone()) for x, y, _ in held]
    take(loader, 8)  # the producer writes more batches meanwhile
    loader.close()
    spans = []
    for k, (x, y, _) in enumerate(held):
        for name, t in (("inputs", x), ("targets", y)):
            assert t.shape == (B, T) and t.dtype == torch.int64 and t.is_contiguous(), f"batch {k} {name}"
            start = t.data_ptr()
            spans.append((start, start + t.numel() * t.element_size(), k))
        assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
        assert (x[:, 0] == tokenizer.get_bos_token_id()).all()  # type: ignore[attr-defined]
        storage = x.untyped_storage()
        assert storage.data_ptr() == y.untyped_storage().data_ptr()  # one buffer per batch, both halves
        spans_of_storage = (storage.data_ptr(), storage.data_ptr() + storage.nbytes())
        for j, (other, _, _) in enumerate(held[:k]):
            o = other.untyped_storage()
            assert spans_of_storage[1] <= o.data_ptr() or o.data_ptr() + o.nbytes() <= spans_of_storage[0], \
                f"batches {j} and {k} share storage"
    spans.sort()
    assert all(end <= next_start for (_, end, _), (next_start, _, _) in itertools.pairwise(spans))
    for k, ((x, y, _), (x0, y0)) in enumerate(zip(held, copies)):
        assert torch.equal(x, x0) and torch.equal(y, y0), f"batch {k} was overwritten after it was handed out"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batches_survive_pending_copies(prepare: ModuleType, tokenizer: object) -> None:
    """On CUDA the copies are non-blocking: take many batches without a sync, then compare."""
    expected = take(prepare.make_dataloader(tokenizer, B, T, "train", device="cpu", producers=1), 16)
    loader = prepare.make_dataloader(tokenizer, B, T, "train", device="cuda", producers=2)
    got = take(loader, 16)  # no synchronisation in between: copies may all be pending
    torch.cuda.synchronize()
    loader.close()
    for (x0, y0, _), (x1, y1, _) in zip(expected, got):
        assert x1.is_cuda and torch.equal(x1.cpu(), x0) and torch.equal(y1.cpu(), y0)


class FailingEncoding:
    """A tiktoken encoding that raises on its `fail_at`th call."""

    def __init__(self, enc: object, fail_at: int) -> None:
        self._enc = enc
        self._calls = itertools.count(1)
        self._fail_at = fail_at

    def encode_single_token(self, text: str) -> int:
        return self._enc.encode_single_token(text)  # type: ignore[attr-defined,no-any-return]

    def encode_ordinary(self, text: str) -> list[int]:
        if next(self._calls) == self._fail_at:
            raise ValueError("tokenizer broke")
        return self._enc.encode_ordinary(text)  # type: ignore[attr-defined,no-any-return]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("producers", [1, 2])
def test_producer_error_is_raised_at_next(prepare: ModuleType, tokenizer: object, producers: int) -> None:
    broken = prepare.Tokenizer(FailingEncoding(tokenizer.enc, fail_at=5000))  # type: ignore[attr-defined]
    loader = prepare.make_dataloader(broken, 4, 64, "train", device="cpu", producers=producers)
    with pytest.raises(ValueError, match="tokenizer broke") as caught:
        for _ in loader:
            pass
    names = [frame.name for frame in traceback.extract_tb(caught.tb)]
    assert "encode_ordinary" in names  # the producer's frames come with it
    assert not loader_threads()


def test_threads_stop_when_the_loader_is_closed_or_dropped(prepare: ModuleType, tokenizer: object) -> None:
    loader = prepare.make_dataloader(tokenizer, 4, 64, "train", device="cpu", producers=3)
    next(loader)
    threads = loader_threads()
    assert len(threads) == 4 and all(t.daemon for t in threads)  # the packer and 3 tokenizers
    loader.close()
    assert not any(t.is_alive() for t in threads)
    loader = prepare.make_dataloader(tokenizer, 4, 64, "train", device="cpu", producers=2)
    next(loader)
    threads = loader_threads()
    del loader
    gc.collect()
    assert threads and not any(t.is_alive() for t in threads)


@pytest.mark.parametrize("producers", [1, 2])
def test_the_process_exits_with_a_loader_open(lab: Path, shared_cache: Path, producers: int) -> None:
    """Dropped right after its first batch, while its threads are busy: exit 0, not a hang or an abort."""
    script = (f"from prepare import Tokenizer, make_dataloader\n"
              f"loader = make_dataloader(Tokenizer.from_directory(), 32, 1024, 'train', device='cpu', producers={producers})\n"
              f"next(loader)\n")
    env = {"PYTHONPATH": str(REPO / "src"), "AUTORESEARCH_CACHE": str(shared_cache), "AUTORESEARCH_DEVICE": "cpu"}
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", script], cwd=lab, env=env, capture_output=True, text=True,
                              timeout=120, check=False)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "terminate" not in proc.stderr


def test_no_train_refuses_the_training_split_only(prepare: ModuleType, tokenizer: object,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTORESEARCH_NO_TRAIN", "1")
    with pytest.raises(SystemExit, match="AUTORESEARCH_NO_TRAIN"):
        next(prepare.make_dataloader(tokenizer, 4, 64, "train", device="cpu"))
    assert not loader_threads()
    loader = prepare.make_dataloader(tokenizer, 4, 64, "val", device="cpu")
    x, _, _ = next(loader)
    assert x.shape == (4, 64)
    loader.close()


# ---------------------------------------------------------------------------
# The machinery alone
# ---------------------------------------------------------------------------


class Counting:
    """An iterator over range(n) that counts how many items were taken from it."""

    def __init__(self, n: int) -> None:
        self.taken = 0
        self._items = iter(range(n))

    def __iter__(self) -> Counting:
        return self

    def __next__(self) -> int:
        item = next(self._items)
        self.taken += 1
        return item


def shuffled_delay(i: int) -> int:
    """i squared, finishing out of order: items of the same worker wait on a later item's event."""
    threading.Event().wait(0.001 * ((i * 7) % 5))
    return i * i


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_ordered_map_keeps_the_order_and_stays_bounded(workers: int) -> None:
    source = Counting(200)
    results = ordered_map(shuffled_delay, source, workers, ahead=6)
    for k, value in enumerate(results):
        assert value == k * k
        assert source.taken <= k + 1 + (6 if workers > 1 else 0)  # never more than `ahead` in flight
    assert source.taken == 200


@pytest.mark.timeout(60)
def test_ordered_map_raises_at_the_failing_item_and_stops_its_workers() -> None:
    def fn(i: int) -> int:
        if i == 37:
            raise KeyError(i)
        return i

    seen: list[int] = []
    with pytest.raises(KeyError):
        seen.extend(ordered_map(fn, range(100), 3))  # keeps what came before the failure
    assert seen == list(range(37))
    assert not loader_threads()


@pytest.mark.timeout(60)
def test_background_forwards_the_producers_exception_with_its_traceback() -> None:
    def producing() -> Iterator[int]:
        yield 1
        yield 2
        raise OSError("disk gone")

    items = background(producing(), depth=2)
    assert next(items) == 1 and next(items) == 2
    with pytest.raises(OSError, match="disk gone") as caught:
        next(items)
    assert "producing" in [frame.name for frame in traceback.extract_tb(caught.tb)]
    assert not loader_threads()


def test_background_stays_at_most_depth_ahead_and_stops_on_close() -> None:
    source = Counting(10_000)
    items = background(source, depth=3)
    assert next(items) == 0
    items.close()
    # one handed out, three queued, one made when the queue was full and one after it drained
    assert source.taken <= 1 + 3 + 2
    assert not loader_threads()
    assert list(background(iter(range(5)), depth=2)) == [0, 1, 2, 3, 4]  # ends when the source does
