"""BOS-aligned best-fit packing of documents into fixed-length rows.

Every row starts with BOS and is filled to the last position: no padding. Documents longer than a
row are split at paragraph boundaries into pieces that fit (each piece starts with BOS), so a long
speech becomes several training rows instead of one cropped row with the rest thrown away. When no
buffered piece fits the space left in a row, the shortest piece fills it and its remainder goes back
into the buffer as a new piece: every token of the split is seen once per epoch (plus one BOS per
piece).
"""

from __future__ import annotations

import bisect
import functools
import itertools
import random
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np

from .loader import ordered_map

Encode = Callable[[list[str]], list[list[int]]]


def encode_each(encode_one: Callable[[str], list[int]]) -> Encode:
    """An Encode that calls `encode_one` on each text in turn. For tiktoken, preferred over
    encode_ordinary_batch: that one hands every text to a thread pool, and for paragraphs the
    hand-offs cost more than the encoding (3.0 vs 1.2 ms per 16 x 256 batch of rows on 2 cores)."""
    return lambda texts: [encode_one(t) for t in texts]


def split_paragraphs(text: str) -> list[str]:
    """Cut text after each blank line; the pieces concatenate back to the text exactly."""
    parts: list[str] = []
    start = 0
    while True:
        cut = text.find("\n\n", start)
        if cut < 0:
            break
        end = cut + 2
        while end < len(text) and text[end] == "\n":
            end += 1
        parts.append(text[start:end])
        start = end
    if start < len(text):
        parts.append(text[start:])
    return parts


def pieces_of(paragraphs: Sequence[Sequence[int]], bos: int, capacity: int) -> list[np.ndarray]:
    """Group one document's tokenized paragraphs into BOS-prefixed pieces of at most `capacity`.

    Paragraphs are kept whole when they fit; a paragraph longer than a row is cut at token
    boundaries.
    """
    room = capacity - 1  # one position is BOS
    assert room >= 1, "capacity must leave room for one token after BOS"
    out: list[np.ndarray] = []
    current: list[int] = []
    for para in paragraphs:
        if len(current) + len(para) <= room:
            current.extend(para)
            continue
        if current:
            out.append(np.array([bos, *current], dtype=np.int64))
            current = []
        for i in range(0, len(para), room):
            chunk = list(para[i : i + room])
            if len(chunk) == room:
                out.append(np.array([bos, *chunk], dtype=np.int64))
            else:
                current = chunk
    if current:
        out.append(np.array([bos, *current], dtype=np.int64))
    return out


def batch_pieces(
    batch: list[tuple[str, int]], encode: Encode, bos: int, capacity: int
) -> list[tuple[np.ndarray, int]]:
    """(piece, epoch) for each piece of each (text, epoch) document of `batch`, in order."""
    split = [split_paragraphs(text) for text, _ in batch]
    flat = encode([p for paras in split for p in paras])
    out: list[tuple[np.ndarray, int]] = []
    i = 0
    for (_, epoch), paras in zip(batch, split):
        encoded = flat[i : i + len(paras)]
        i += len(paras)
        out.extend((piece, epoch) for piece in pieces_of(encoded, bos, capacity))
    return out


def document_pieces(
    docs: Iterable[tuple[str, int]], encode: Encode, bos: int, capacity: int, batch_docs: int = 64,
    workers: int = 1,
) -> Iterator[tuple[np.ndarray, int]]:
    """(piece, epoch) for each (text, epoch) document, tokenizing `batch_docs` documents at a time.

    With `workers` > 1 the batches are tokenized on that many threads (`encode` must be
    thread-safe, as tiktoken's is), a few batches ahead; the pieces and their order are the same
    whatever the number of workers.
    """
    docs = iter(docs)
    batches = iter(lambda: list(itertools.islice(docs, batch_docs)), [])
    tokenize = functools.partial(batch_pieces, encode=encode, bos=bos, capacity=capacity)
    for pieces in ordered_map(tokenize, batches, workers):
        yield from pieces


class BestFitBuffer:
    """Pieces kept sorted by length, so the largest piece that fits is found by bisection."""

    def __init__(self) -> None:
        self._keys: list[tuple[int, int]] = []  # (length, arrival order): a stable, total order
        self._items: list[tuple[np.ndarray, int]] = []
        self._arrivals = itertools.count()

    def __len__(self) -> int:
        return len(self._keys)

    def add(self, piece: np.ndarray, epoch: int) -> None:
        key = (len(piece), next(self._arrivals))
        at = bisect.bisect_left(self._keys, key)
        self._keys.insert(at, key)
        self._items.insert(at, (piece, epoch))

    def take_fitting(self, room: int) -> tuple[np.ndarray, int] | None:
        """Remove and return the longest piece of length <= room (the earliest among equals)."""
        last = bisect.bisect_right(self._keys, (room, float("inf"))) - 1
        if last < 0:
            return None
        at = bisect.bisect_left(self._keys, (self._keys[last][0], -1))
        self._keys.pop(at)
        return self._items.pop(at)

    def take_shortest(self) -> tuple[np.ndarray, int]:
        self._keys.pop(0)
        return self._items.pop(0)


def pack_rows(
    pieces: Iterator[tuple[np.ndarray, int]], capacity: int, bos: int, buffer_size: int = 1000
) -> Iterator[tuple[np.ndarray, int]]:
    """Yield (row, epoch): rows of exactly `capacity` tokens, each starting with BOS.

    The buffer holds up to `buffer_size` pieces to choose from. The stream ends when the pieces
    run out and the buffer cannot fill another whole row.
    """
    buffer = BestFitBuffer()
    exhausted = False
    epoch = 1
    while True:
        row = np.empty(capacity, dtype=np.int64)
        pos = 0
        while pos < capacity:
            while not exhausted and len(buffer) < buffer_size:
                try:
                    piece, epoch = next(pieces)
                except StopIteration:
                    exhausted = True
                    break
                buffer.add(piece, epoch)
            if not buffer:
                return  # the last partial row is dropped: it would need padding
            room = capacity - pos
            found = buffer.take_fitting(room)
            if found is not None:
                piece, _ = found
                row[pos : pos + len(piece)] = piece
                pos += len(piece)
            else:
                piece, piece_epoch = buffer.take_shortest()
                row[pos:] = piece[:room]
                pos = capacity
                rest = piece[room:]
                buffer.add(np.concatenate(([bos], rest)), piece_epoch)
        yield row, epoch


def shuffled_epochs(units: Sequence[Callable[[], list[str]]], seed: int, shuffle: bool) -> Iterator[tuple[str, int]]:
    """(text, epoch) forever. A unit loads a slice of the split (one parquet row group); with
    `shuffle`, each epoch visits the units and the documents within each unit in a new seeded
    order, so memory holds one row group at a time, not the whole split."""
    for epoch in itertools.count(1):
        order = list(range(len(units)))
        rng = random.Random(seed * 1_000_003 + epoch)
        if shuffle:
            rng.shuffle(order)
        produced = False
        for index in order:
            docs = units[index]()
            if shuffle:
                rng.shuffle(docs)
            for text in docs:
                produced = True
                yield text, epoch
        if not produced:
            return
