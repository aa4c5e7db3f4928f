"""Datasets and tokenizers in the cache: prepare them once, load them fast.

    data = prepare_dataset("sotu", vocab_size=4096, log=print)   # idempotent; repairs what is damaged
    data = load_prepared("sotu", 4096)                            # cheap checks only
    texts = iter_texts(data.files("train"))

The recipes (which files, which split) live in recipes.py, the manifest and shard writing in
manifest.py, downloads in download.py and the BPE tokenizer in tokenizer.py. This module holds the
two entry points that tie them together.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ..errors import CacheCorrupt, DataNotPrepared
from .manifest import (
    SHARDS_DIR,
    TOKEN_BYTES_FILE,
    TOKENIZER_FILE,
    Manifest,
    PreparedData,
    bad_shards,
    iter_texts,
    read_manifest,
    sha256_file,
    write_manifest,
)
from .recipes import VALID_SPECS, build_shards, dataset_dir, dataset_key, is_complete, parse_spec, source_paths
from .tokenizer import (
    BOS_TOKEN,
    SPECIAL_TOKENS,
    SPLIT_PATTERN,
    load_encoding,
    load_token_bytes,
    token_byte_lengths,
    train_tokenizer,
)

__all__ = [
    "BOS_TOKEN", "SPECIAL_TOKENS", "SPLIT_PATTERN", "VALID_SPECS", "PreparedData", "dataset_dir", "dataset_key",
    "iter_texts", "load_encoding", "load_prepared", "load_token_bytes", "prepare_dataset", "source_paths",
    "token_byte_lengths", "train_tokenizer",
]

PREPARE_HINT = "run `autoresearch prepare`"


def _quiet(_message: str) -> None:
    pass


def prepare_dataset(spec: str, vocab_size: int, *, num_shards: int | None = None, workers: int = 8,
                    log: Callable[[str], None] | None = None) -> PreparedData:
    """Download or derive the shards, write the manifest, train the tokenizer; safe to repeat.

    A re-run hashes every shard against the manifest and re-fetches or re-derives what is missing
    or damaged. `num_shards` (climbmix only) is the number of training shards, 10 by default;
    shards downloaded earlier are kept.
    """
    say = log or _quiet
    parsed = parse_spec(spec)
    root = dataset_dir(spec)
    old = read_manifest(root)
    if old is not None and old.get("dataset") != parsed.canonical:
        raise CacheCorrupt(f"{root} holds {old.get('dataset')!r}, not {parsed.canonical!r}",
                           f"delete {root} and run `autoresearch prepare`")
    bad = bad_shards(root, old) if old is not None else []
    if bad:
        say(f"{len(bad)} shard(s) missing or damaged, repairing: {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}")
    manifest: Manifest
    if old is None or bad or not is_complete(parsed, old, num_shards):
        say(f"preparing {parsed.canonical} in {root}")
        manifest = build_shards(parsed, root, old, bad, num_shards=num_shards, workers=workers, log=say)
        manifest["tokenizers"] = dict(old["tokenizers"]) if old is not None else {}
        write_manifest(root, manifest)
    else:
        manifest = old
    data = PreparedData(spec, root, manifest, vocab_size)
    if not _tokenizer_intact(data):
        manifest = dict(manifest, tokenizers=dict(manifest["tokenizers"]))
        manifest["tokenizers"][str(vocab_size)] = _train(data, say)
        write_manifest(root, manifest)
        data = PreparedData(spec, root, manifest, vocab_size)
    return data


def _tokenizer_intact(data: PreparedData) -> bool:
    entry = data.manifest["tokenizers"].get(str(data.vocab_size))
    folder = data.tokenizer_dir
    if entry is None or not (folder / TOKENIZER_FILE).is_file() or not (folder / TOKEN_BYTES_FILE).is_file():
        return False
    if sha256_file(folder / TOKENIZER_FILE) != entry["sha256"]:
        return False
    if sha256_file(folder / TOKEN_BYTES_FILE) != entry["token_bytes_sha256"]:
        return False
    try:
        load_encoding(folder)
    except CacheCorrupt:
        return False
    return True


def _train(data: PreparedData, say: Callable[[str], None]) -> dict[str, Any]:
    """Train the tokenizer on the train split and return its manifest record."""
    say(f"training a BPE tokenizer with vocab_size {data.vocab_size} on the train split")
    started = time.monotonic()
    enc = train_tokenizer(iter_texts(data.files("train")), data.vocab_size, data.tokenizer_dir)
    if enc.n_vocab < data.vocab_size:
        say(f"the train split ran out of pairs to merge: the tokenizer has {enc.n_vocab} tokens")
    say(f"tokenizer trained in {time.monotonic() - started:.1f}s")
    return {
        "sha256": sha256_file(data.tokenizer_dir / TOKENIZER_FILE),
        "token_bytes_sha256": sha256_file(data.tokenizer_dir / TOKEN_BYTES_FILE),
        "n_vocab": enc.n_vocab,
        "train_fingerprint": data.manifest["fingerprints"]["train"],
    }


def load_prepared(spec: str, vocab_size: int, splits: tuple[str, ...] = ("train", "val", "test")) -> PreparedData:
    """The prepared dataset, checked cheaply (file sizes, the tokenizer's sha256), not re-hashed.

    Only the shards of `splits` are checked: an experiment in the sandbox cannot see the validation
    and test shards, and needs only the training split. DataNotPrepared when something was never
    prepared; CacheCorrupt when a file differs.
    """
    root = dataset_dir(spec)
    manifest = read_manifest(root)
    if manifest is None:
        raise DataNotPrepared(f"dataset {spec} is not prepared (no {root / 'manifest.json'})", PREPARE_HINT)
    for entry in manifest["shards"]:
        if entry["split"] not in splits:
            continue
        path = root / SHARDS_DIR / entry["name"]
        if not path.is_file():
            raise DataNotPrepared(f"shard {path} is missing", PREPARE_HINT)
        if path.stat().st_size != entry["bytes"]:
            raise CacheCorrupt(f"shard {path} has {path.stat().st_size} bytes, the manifest says {entry['bytes']}",
                               "run `autoresearch prepare` to repair it")
    data = PreparedData(spec, root, manifest, vocab_size)
    entry = manifest["tokenizers"].get(str(vocab_size))
    folder = data.tokenizer_dir
    if entry is None or not (folder / TOKENIZER_FILE).is_file() or not (folder / TOKEN_BYTES_FILE).is_file():
        raise DataNotPrepared(f"no tokenizer with vocab_size {vocab_size} for {spec} in {root}", PREPARE_HINT)
    for name, key in ((TOKENIZER_FILE, "sha256"), (TOKEN_BYTES_FILE, "token_bytes_sha256")):
        if sha256_file(folder / name) != entry[key]:
            raise CacheCorrupt(f"{folder / name} differs from the manifest", "run `autoresearch prepare` to retrain it")
    return data
