"""The rows the metric is computed on, in one place.

prepare.py's `evaluate_bpb` (manual mode) and the trusted evaluator both call `eval_rows`, so the two
cannot drift apart: the first `eval_tokens // max_seq_len` rows of one pass over the split in file
order, packed by the same code as the training dataloader (BOS first, paragraphs kept whole where
they fit, best-fit packing, no padding).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import tiktoken

from ..errors import CacheCorrupt
from .manifest import REPAIR_HINT
from .packing import document_pieces, encode_each, pack_rows, shuffled_epochs
from .tokenizer import BOS_TOKEN


def row_group_loaders(files: Sequence[Path]) -> list[Callable[[], list[str]]]:
    """One loader per parquet row group, in file order: each returns that group's non-empty texts."""
    loaders: list[Callable[[], list[str]]] = []
    for path in files:
        try:
            groups = pq.ParquetFile(path).num_row_groups
        except (OSError, pa.ArrowException) as exc:
            raise CacheCorrupt(f"{path} is not a readable parquet file: {exc}", REPAIR_HINT) from None
        for index in range(groups):
            def load(path: Path = path, index: int = index) -> list[str]:
                table = pq.ParquetFile(path).read_row_group(index, columns=["text"])
                return [t for t in table.column("text").to_pylist() if t]
            loaders.append(load)
    return loaders


def eval_rows(enc: tiktoken.Encoding, files: Sequence[Path], max_seq_len: int, eval_tokens: int) -> np.ndarray:
    """(rows, max_seq_len + 1) int64: inputs are row[:-1], targets row[1:].

    Always the same rows for the same split and settings, whatever the batch size of the caller;
    never more than one pass over the split (fewer rows when the split is small).
    """
    wanted = max(1, eval_tokens // max_seq_len)
    capacity = max_seq_len + 1
    bos = enc.encode_single_token(BOS_TOKEN)
    docs = shuffled_epochs(row_group_loaders(files), seed=0, shuffle=False)
    first_pass = itertools.takewhile(lambda doc: doc[1] == 1, docs)
    pieces = document_pieces(first_pass, encode_each(enc.encode_ordinary), bos, capacity)
    rows = [row for row, _ in itertools.islice(pack_rows(pieces, capacity, bos), wanted)]
    if not rows:
        return np.empty((0, capacity), dtype=np.int64)
    return np.stack(rows)
