"""Shards and the manifest that records them: every shard with its split, size and sha256.

A folder `<cache>/<key>/` holds `shards/*.parquet`, `manifest.json` and one `tokenizer-<vocab>/`
per vocabulary size. The manifest is the single record of what was prepared: `prepare` checks every
shard against it and repairs what differs; `load_prepared` trusts it after a cheap size check; the
evaluator re-hashes the validation split before it scores a model. Validation and test splits are
pinned by a fingerprint, the sha256 over their shards' names and hashes. Shards are written here
too, so that every recipe produces the same layout: one `text` column, fixed-size row groups.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import CacheCorrupt, UnknownDataset

VERSION = 1
SPLITS = ("train", "val", "test")
MANIFEST_FILE = "manifest.json"
SHARDS_DIR = "shards"
TOKENIZER_FILE = "tokenizer.pkl"
TOKEN_BYTES_FILE = "token_bytes.pt"
REPAIR_HINT = "run `autoresearch prepare` to repair it"
VAL_BUCKETS = 5  # of 100 hash buckets: 0..4 validation
TEST_BUCKETS = 5  # 5..9 test, the rest train
ROW_GROUP_ROWS = 1024  # rows per parquet row group, the unit iter_texts reads...
ROW_GROUP_BYTES = 64 << 20  # ...or fewer, so long documents (books) keep a row group near this size
SCHEMA = pa.schema([("text", pa.string())])

Manifest = dict[str, Any]
Document = tuple[str, str]  # (key that decides the split, text)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def read_manifest(root: Path) -> Manifest | None:
    """The folder's manifest, or None when there is none yet; CacheCorrupt when it is unreadable."""
    path = root / MANIFEST_FILE
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CacheCorrupt(f"{path} is unreadable: {exc}", f"delete {root} and run `autoresearch prepare`") from None
    if not isinstance(manifest, dict) or manifest.get("version") != VERSION or "shards" not in manifest:
        raise CacheCorrupt(f"{path} is not a version-{VERSION} manifest",
                           f"delete {root} and run `autoresearch prepare`")
    return manifest


def write_manifest(root: Path, manifest: Manifest) -> None:
    atomic_write_bytes(root / MANIFEST_FILE, (json.dumps(manifest, indent=2) + "\n").encode("utf-8"))


def new_manifest(spec: str, source: str, entries: list[dict[str, Any]], **extra: Any) -> Manifest:
    """A manifest for freshly written shards; `extra` holds recipe fields such as source_sha256."""
    manifest: Manifest = {"version": VERSION, "dataset": spec, "source": source}
    manifest.update(extra)
    manifest["shards"] = sorted(entries, key=lambda e: e["name"])
    manifest["fingerprints"] = {split: fingerprint(entries, split) for split in SPLITS}
    manifest.setdefault("tokenizers", {})
    return manifest


def shard_entry(path: Path, split: str, sha256: str | None = None) -> dict[str, Any]:
    """The manifest record of one shard; the row count comes from the parquet footer."""
    return {
        "name": path.name,
        "split": split,
        "sha256": sha256 or sha256_file(path),
        "bytes": path.stat().st_size,
        "rows": pq.read_metadata(path).num_rows,
    }


def fingerprint(entries: Iterable[dict[str, Any]], split: str) -> str:
    """sha256 over `name sha256` lines of one split's shards, sorted by name."""
    lines = sorted(f"{e['name']} {e['sha256']}\n" for e in entries if e["split"] == split)
    return hashlib.sha256("".join(lines).encode("utf-8")).hexdigest()


def bad_shards(root: Path, manifest: Manifest) -> list[str]:
    """Names of shards that are missing or whose sha256 differs from the manifest (hashes them all)."""
    bad = []
    for entry in manifest["shards"]:
        path = root / SHARDS_DIR / entry["name"]
        if not path.is_file() or path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
            bad.append(entry["name"])
    return bad


def check_pinned(root: Path, spec: str, old: Manifest | None, entries: list[dict[str, Any]]) -> None:
    """CacheCorrupt when rebuilt shards would change the validation or test split a lab relies on."""
    if old is None:
        return
    for split in ("val", "test"):
        if old["fingerprints"].get(split) != fingerprint(entries, split):
            raise CacheCorrupt(
                f"the {split} split of {spec} would change: its source differs from the one prepared in {root}",
                f"past results were measured on the old split; delete {root} and run `autoresearch prepare` "
                "to start over with the new data",
            )


# --- writing shards ---------------------------------------------------------------------------

def _hash(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")


def assign_splits(keys: Iterable[str], what: str = "the dataset") -> dict[str, str]:
    """Split by sha256 of each key into 100 buckets: 0..4 val, 5..9 test, the rest train.

    A split left empty takes the lowest-hash document of the largest split (train, in practice).
    """
    ranked = sorted((_hash(key), key) for key in keys)
    if len(ranked) < 3:
        raise UnknownDataset(f"{what} has {len(ranked)} document(s)", "need at least 3: one each for train, val, test")
    splits = {}
    for value, key in ranked:
        bucket = value % 100
        splits[key] = "val" if bucket < VAL_BUCKETS else "test" if bucket < VAL_BUCKETS + TEST_BUCKETS else "train"
    for empty in ("val", "test", "train"):
        counts = {s: sum(1 for v in splits.values() if v == s) for s in ("train", "val", "test")}
        if counts[empty] == 0:
            donor = max(counts, key=lambda s: counts[s])
            splits[next(key for _, key in ranked if splits[key] == donor)] = empty
    return splits


def hash_split(docs: Callable[[], Iterator[Document]], staging: Path, what: str,
               max_rows: int | None = None) -> list[dict[str, Any]]:
    """Two passes over `docs`: one to assign splits, one to write the shards in document order."""
    splits = assign_splits((key for key, _ in docs()), what)
    writers = {"train": ShardWriter(staging, "train", max_rows),
               "val": ShardWriter(staging, "val"), "test": ShardWriter(staging, "test")}
    pending: dict[str, list[str]] = {split: [] for split in writers}
    pending_chars = dict.fromkeys(writers, 0)
    for key, text in docs():
        split = splits.get(key)
        if split is None:
            raise UnknownDataset(f"{what} changed while it was being read", "run `autoresearch prepare` again")
        pending[split].append(text)
        pending_chars[split] += len(text)
        if len(pending[split]) >= ROW_GROUP_ROWS or pending_chars[split] >= ROW_GROUP_BYTES:
            writers[split].add(pa.array(pending[split], pa.string()))
            pending[split], pending_chars[split] = [], 0
    for split, texts in pending.items():
        writers[split].add(pa.array(texts, pa.string()))
    return [entry for writer in writers.values() for entry in writer.close()]


class ShardWriter:
    """Writes one split as parquet files of ROW_GROUP_ROWS-row groups, at most `max_rows` per file."""

    def __init__(self, folder: Path, split: str, max_rows: int | None = None) -> None:
        self.folder, self.split, self.max_rows = folder, split, max_rows
        self.paths: list[Path] = []
        self._writer: pq.ParquetWriter | None = None
        self._rows = 0  # rows written to the open file
        self._pending: list[pa.Array] = []
        self._pending_rows = 0
        self._pending_bytes = 0

    def add(self, texts: pa.Array) -> None:
        while len(texts):
            if self.max_rows is not None and self._rows + self._pending_rows >= self.max_rows:
                self._flush()
                self._close_file()
            room = ROW_GROUP_ROWS - self._pending_rows
            if self.max_rows is not None:
                room = min(room, self.max_rows - self._rows - self._pending_rows)
            piece = texts.slice(0, min(room, len(texts)))
            texts = texts.slice(len(piece))
            self._pending.append(piece)
            self._pending_rows += len(piece)
            self._pending_bytes += piece.nbytes
            if self._pending_rows >= ROW_GROUP_ROWS or self._pending_bytes >= ROW_GROUP_BYTES:
                self._flush()

    def _flush(self) -> None:
        if not self._pending_rows:
            return
        if self._writer is None:
            name = f"train_{len(self.paths):05d}.parquet" if self.split == "train" else f"{self.split}.parquet"
            self.paths.append(self.folder / name)
            self._writer = pq.ParquetWriter(self.paths[-1], SCHEMA)
        column = pa.concat_arrays(self._pending)
        self._writer.write_table(pa.Table.from_arrays([column], schema=SCHEMA))
        self._rows += self._pending_rows
        self._pending, self._pending_rows, self._pending_bytes = [], 0, 0

    def _close_file(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer, self._rows = None, 0

    def close(self) -> list[dict[str, Any]]:
        self._flush()
        self._close_file()
        return [shard_entry(path, self.split) for path in self.paths]


@dataclass(frozen=True)
class PreparedData:
    """A prepared dataset: its folder, manifest and the tokenizer of one vocabulary size."""

    spec: str
    dir: Path
    manifest: Manifest
    vocab_size: int

    def _entries(self, split: str) -> list[dict[str, Any]]:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
        return sorted((e for e in self.manifest["shards"] if e["split"] == split), key=lambda e: e["name"])

    def files(self, split: str) -> list[Path]:
        """Shard paths of one split (train, val or test), sorted by name."""
        return [self.dir / SHARDS_DIR / e["name"] for e in self._entries(split)]

    @property
    def tokenizer_dir(self) -> Path:
        return self.dir / f"tokenizer-{self.vocab_size}"

    @property
    def n_vocab(self) -> int:
        """The tokenizer's actual vocabulary size (smaller than vocab_size if training ran out of pairs)."""
        return int(self.manifest["tokenizers"][str(self.vocab_size)]["n_vocab"])

    def fingerprint(self, split: str) -> str:
        """The split's fingerprint as recorded when it was prepared."""
        self._entries(split)
        return str(self.manifest["fingerprints"][split])

    def verify_split(self, split: str) -> None:
        """Re-hash every shard of a split; CacheCorrupt if any differs from the manifest."""
        entries = self._entries(split)
        for entry in entries:
            path = self.dir / SHARDS_DIR / entry["name"]
            if not path.is_file() or sha256_file(path) != entry["sha256"]:
                raise CacheCorrupt(f"{path} is missing or differs from the manifest", REPAIR_HINT)
        if fingerprint(entries, split) != self.manifest["fingerprints"][split]:
            raise CacheCorrupt(f"the {split} fingerprint in {self.dir / MANIFEST_FILE} does not match its shards",
                               f"delete {self.dir} and run `autoresearch prepare`")


def iter_texts(paths: list[Path]) -> Iterator[str]:
    """The documents of parquet shards in order, read one row group at a time."""
    for path in paths:
        try:
            shard = pq.ParquetFile(path)
            for group in range(shard.num_row_groups):
                texts = shard.read_row_group(group, columns=["text"]).column("text").to_pylist()
                yield from (text for text in texts if text)
        except (OSError, pa.ArrowException, KeyError) as exc:
            raise CacheCorrupt(f"{path} is not a readable parquet file with a 'text' column: {exc}",
                               REPAIR_HINT) from None
