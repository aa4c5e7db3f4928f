"""Best-fit packing: BOS-aligned rows, no padding, long documents split instead of cropped."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np

from autoresearch.data.packing import (
    BestFitBuffer,
    document_pieces,
    pack_rows,
    pieces_of,
    shuffled_epochs,
    split_paragraphs,
)

BOS = 0


def encode(texts: list[str]) -> list[list[int]]:
    """Byte-level stand-in tokenizer: token = byte + 1, so 0 stays free for BOS."""
    return [[b + 1 for b in t.encode("utf-8")] for t in texts]


def make_docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "ünïcode", "数据", "speech", "union"]
    docs = []
    for _ in range(n):
        paragraphs = [" ".join(rng.choices(words, k=rng.randint(1, 60))) for _ in range(rng.randint(1, 12))]
        docs.append("\n\n".join(paragraphs))
    return docs


def test_split_paragraphs_is_lossless() -> None:
    for text in ["", "one", "a\n\nb", "a\n\n\n\nb\n\n", "\n\nx", "x\ny\n\nz"]:
        parts = split_paragraphs(text)
        assert "".join(parts) == text
        assert all(parts)


def test_pieces_fit_and_keep_every_token() -> None:
    paragraphs = [[1] * 5, [2] * 30, [3] * 7, [4] * 2]
    pieces = pieces_of(paragraphs, BOS, capacity=11)
    assert all(len(p) <= 11 and p[0] == BOS for p in pieces)
    assert [t for p in pieces for t in p[1:]] == [t for para in paragraphs for t in para]
    # whole paragraphs stay together when they fit: [1]*5 is its own piece, not glued to half of [2]*30
    assert list(pieces[0][1:]) == [1] * 5


def test_rows_are_bos_aligned_full_and_real() -> None:
    docs = make_docs(200)
    capacity = 65
    pieces = document_pieces(((d, 1) for d in docs), encode, BOS, capacity)
    rows = [row for row, _ in pack_rows(pieces, capacity, BOS)]
    assert rows, "no rows produced"
    source = Counter(t for d in docs for t in encode([d])[0])
    packed = Counter()
    for row in rows:
        assert len(row) == capacity  # no padding: every position holds a token
        assert row[0] == BOS  # every row starts with BOS
        packed.update(int(t) for t in row if t != BOS)
    # every packed token comes from a real document, and none is invented
    assert all(packed[t] <= source[t] for t in packed)
    # the epoch sees (nearly) every token: only the final partial row may be dropped
    assert sum(source.values()) - sum(packed.values()) < capacity


def test_long_documents_are_not_cropped() -> None:
    """A 10k-token speech at a 64-token context: the original packer would keep 63 tokens of it."""
    speech = "\n\n".join(" ".join(["word"] * 40) for _ in range(50))
    capacity = 65
    rows = [row for row, _ in pack_rows(document_pieces([(speech, 1)] * 3, encode, BOS, capacity), capacity, BOS)]
    used = sum(int((row != BOS).sum()) for row in rows)
    total = 3 * len(speech.encode())
    assert used / total > 0.98


def test_best_fit_buffer_takes_longest_fitting_earliest_first() -> None:
    buf = BestFitBuffer()
    for i, n in enumerate([5, 9, 3, 9, 12]):
        buf.add(np.full(n, i), epoch=1)
    piece, _ = buf.take_fitting(10)
    assert len(piece) == 9 and piece[0] == 1  # the first of the two 9s
    piece, _ = buf.take_fitting(10)
    assert len(piece) == 9 and piece[0] == 3
    assert buf.take_fitting(2) is None
    piece, _ = buf.take_shortest()
    assert len(piece) == 3


def test_shuffled_epochs_are_deterministic_and_complete() -> None:
    units = [lambda i=i: [f"doc{i}-{j}" for j in range(5)] for i in range(4)]
    a = shuffled_epochs(units, seed=1, shuffle=True)
    b = shuffled_epochs(units, seed=1, shuffle=True)
    epoch1 = [next(a) for _ in range(20)]
    assert epoch1 == [next(b) for _ in range(20)]
    assert sorted(d for d, _ in epoch1) == sorted(f"doc{i}-{j}" for i in range(4) for j in range(5))
    assert all(e == 1 for _, e in epoch1)
    epoch2 = [next(a) for _ in range(20)]
    assert all(e == 2 for _, e in epoch2)
    assert [d for d, _ in epoch2] != [d for d, _ in epoch1]  # a new order every epoch
    ordered = shuffled_epochs(units, seed=1, shuffle=False)
    assert [next(ordered)[0] for _ in range(6)] == [f"doc0-{j}" for j in range(5)] + ["doc1-0"]


def test_pieces_do_not_depend_on_the_number_of_workers() -> None:
    """Tokenizing on threads changes when batches of documents are encoded, never what comes out."""
    docs = [(d, 1 + i // 150) for i, d in enumerate(make_docs(300, seed=5))]
    expected = list(document_pieces(docs, encode, BOS, capacity=33, batch_docs=7))
    assert len(expected) > 300
    for workers in (2, 3, 8):
        got = list(document_pieces(docs, encode, BOS, capacity=33, batch_docs=7, workers=workers))
        assert [(p.tolist(), e) for p, e in got] == [(p.tolist(), e) for p, e in expected], f"workers={workers}"
