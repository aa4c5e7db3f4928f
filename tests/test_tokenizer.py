"""The BPE tokenizer: training, saving, loading, and byte lengths that are exact per token."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import tiktoken
import torch
from data_fixtures import make_texts

from autoresearch.data import BOS_TOKEN, SPECIAL_TOKENS, load_encoding, load_token_bytes, token_byte_lengths
from autoresearch.data.packing import encode_each
from autoresearch.data.tokenizer import MIN_VOCAB_SIZE, _capped, build_encoding, train_tokenizer
from autoresearch.errors import CacheCorrupt, ConfigError

MIXED = [
    "The quick brown fox jumps over the lazy dog. ",
    "我们的研究从一个简单的问题开始：模型能学到什么？",
    "Привет, мир! Как дела у нейронных сетей сегодня?",
    "مرحبا بالعالم، هذه جملة عربية قصيرة للاختبار.",
    "Emoji: 🚀🔥😀👍🏽 and flags 🇫🇷🇯🇵, café naïve ",
    "Combining marks: e\u0301 a\u0308 o\u0302 n\u0303 \u1e9b\u0323 ",
    "Ελληνικά γράμματα και ひらがな カタカナ 한국어 텍스트",
]


@pytest.fixture(scope="module")
def mixed_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tokenizer trained on mixed-script text, saved to disk."""
    folder = tmp_path_factory.mktemp("mixed-tokenizer")
    corpus = [" ".join(MIXED[j % len(MIXED)] for j in range(i, i + 4)) for i in range(200)]
    train_tokenizer(corpus, 400, folder)
    return folder


def test_token_bytes_are_exact(mixed_dir: Path) -> None:
    enc = load_encoding(mixed_dir)
    lengths = load_token_bytes(mixed_dir)
    text = "".join(MIXED) + " 🦀 新しいテキスト ё"
    ids = enc.encode_ordinary(text)
    assert enc.decode(ids) == text
    exact = sum(int(lengths[i]) for i in ids)
    assert exact == len(text.encode("utf-8"))

    # The naive count (decode one token, then re-encode) turns partial UTF-8 tokens into U+FFFD
    # (3 bytes) and so overstates: the test would be toothless without such a token.
    naive = {i: len(enc.decode([i]).encode("utf-8")) for i in set(ids)}
    partial = [i for i in set(ids) if naive[i] != int(lengths[i])]
    assert partial, "expected at least one token holding part of a multi-byte character"
    assert all("\ufffd" in enc.decode([i]) for i in partial)
    assert sum(naive[i] for i in ids) > exact


def test_encode_each_gives_the_batch_encoders_tokens(mixed_dir: Path) -> None:
    """The loader encodes paragraphs one by one (faster): the rows must not change by it."""
    enc = load_encoding(mixed_dir)
    texts = [*MIXED, "", "\n\n", MIXED[0] * 3]
    assert encode_each(enc.encode_ordinary)(texts) == enc.encode_ordinary_batch(texts)


def test_token_bytes_file(mixed_dir: Path) -> None:
    enc = load_encoding(mixed_dir)
    lengths = load_token_bytes(mixed_dir)
    assert lengths.dtype == torch.int32 and lengths.shape == (enc.n_vocab,)
    assert lengths.tolist() == token_byte_lengths(enc)
    specials = [enc.encode_single_token(name) for name in SPECIAL_TOKENS]
    assert specials == list(range(enc.n_vocab - len(SPECIAL_TOKENS), enc.n_vocab))
    assert all(lengths[i] == 0 for i in specials)
    assert all(lengths[i] == 1 for i in range(256))  # the single bytes come first
    assert all(lengths[i] >= 2 for i in range(256, specials[0]))  # every merge joins two tokens


def test_bos_and_pattern(mixed_dir: Path) -> None:
    enc = load_encoding(mixed_dir)
    assert BOS_TOKEN == "<|reserved_0|>" and SPECIAL_TOKENS[3] == "<|reserved_3|>"
    bos = enc.encode_single_token(BOS_TOKEN)
    assert enc.encode(BOS_TOKEN + "hi", allowed_special="all")[0] == bos
    assert r"\p{N}{1,2}" in enc._pat_str
    digits = build_encoding(["12345 678 12345 678"] * 50, 300)
    pieces = [digits.decode([t]) for t in digits.encode_ordinary("12345")]
    assert pieces == ["12", "34", "5"]  # numbers split in runs of at most two digits, never merged further


def test_training_stops_early_on_tiny_text(tmp_path: Path) -> None:
    enc = train_tokenizer(["ab ab ab abab"] * 3, 1000, tmp_path)
    assert 256 + len(SPECIAL_TOKENS) < enc.n_vocab < 1000
    assert load_encoding(tmp_path).n_vocab == enc.n_vocab
    assert len(load_token_bytes(tmp_path)) == enc.n_vocab
    assert enc.decode(enc.encode_ordinary("abab ba")) == "abab ba"
    assert enc.encode_single_token(SPECIAL_TOKENS[-1]) == enc.n_vocab - 1


def test_training_on_nothing_gives_bytes_only(tmp_path: Path) -> None:
    enc = train_tokenizer([], MIN_VOCAB_SIZE + 10, tmp_path)
    assert enc.n_vocab == MIN_VOCAB_SIZE
    assert enc.decode(enc.encode_ordinary("héllo")) == "héllo"


def test_vocab_too_small(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=str(MIN_VOCAB_SIZE)):
        train_tokenizer(["hello"], 259, tmp_path)


def test_training_is_deterministic() -> None:
    texts = make_texts(200, 1)
    first = build_encoding(texts, 400)
    second = build_encoding(texts, 400)
    assert pickle.dumps(first) == pickle.dumps(second)


def test_caps() -> None:
    assert list(_capped(["abcdef", "ghij", "klm"], max_chars=8, doc_cap=5)) == ["abcde", "ghi"]
    assert list(_capped(["abc", "def"], max_chars=100, doc_cap=2)) == ["ab", "de"]
    capped = build_encoding(make_texts(200, 2), 400, doc_cap=3)  # three characters: few pairs to merge
    assert capped.n_vocab < build_encoding(make_texts(200, 2), 400).n_vocab


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(CacheCorrupt, match="missing"):
        load_encoding(tmp_path)
    with pytest.raises(CacheCorrupt, match="missing"):
        load_token_bytes(tmp_path)
    (tmp_path / "tokenizer.pkl").write_bytes(b"\x80\x04garbage")
    with pytest.raises(CacheCorrupt, match="cannot be unpickled"):
        load_encoding(tmp_path)
    (tmp_path / "tokenizer.pkl").write_bytes(pickle.dumps({"not": "an encoding"}))
    with pytest.raises(CacheCorrupt, match="not a tiktoken.Encoding"):
        load_encoding(tmp_path)
    (tmp_path / "token_bytes.pt").write_bytes(b"junk")
    with pytest.raises(CacheCorrupt, match="unreadable"):
        load_token_bytes(tmp_path)


def test_saved_encoding_round_trips(tmp_path: Path) -> None:
    enc = train_tokenizer(make_texts(100, 4), 300, tmp_path)
    loaded = load_encoding(tmp_path)
    assert isinstance(loaded, tiktoken.Encoding)
    text = make_texts(1, 9)[0]
    assert loaded.encode_ordinary(text) == enc.encode_ordinary(text)
    assert not list(tmp_path.glob("*.tmp"))
