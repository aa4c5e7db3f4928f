"""BPE tokenizer: trained with rustbpe, used through tiktoken, as the original autoresearch does.

Two files per vocabulary size: `tokenizer.pkl` (a pickled tiktoken.Encoding) and `token_bytes.pt`
(int32 tensor, one entry per token id: how many UTF-8 bytes the token stands for, 0 for special
tokens). Bits per byte divides the summed loss by the summed byte lengths of the target tokens, so
these lengths must be exact. A byte-level BPE token can hold part of a multi-byte character (the
first two of the three bytes of 中, say); `decode([id])` turns such a token into U+FFFD, whose own
encoding is three bytes, so a decode-then-encode count overstates. We count the token's raw bytes.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import rustbpe
import tiktoken

from ..errors import CacheCorrupt, ConfigError
from .manifest import TOKEN_BYTES_FILE, TOKENIZER_FILE, atomic_write_bytes

if TYPE_CHECKING:
    import torch

# GPT-4's split pattern with numbers split into runs of at most two digits (not three): the
# original's choice, which suits small vocabularies.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)
SPECIAL_TOKENS = [f"<|reserved_{i}|>" for i in range(4)]
BOS_TOKEN = SPECIAL_TOKENS[0]  # every document starts with it
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)  # all single bytes plus the special tokens
MAX_CHARS = 1_000_000_000  # characters of training text read at most
DOC_CAP = 200_000  # characters per document: long documents (a speech is ~50k) are read whole, yet one book cannot dominate


def _capped(texts: Iterable[str], max_chars: int, doc_cap: int) -> Iterator[str]:
    total = 0
    for text in texts:
        if total >= max_chars:
            return
        piece = text[: min(doc_cap, max_chars - total)]
        total += len(piece)
        yield piece


def build_encoding(
    texts: Iterable[str], vocab_size: int, *, max_chars: int = MAX_CHARS, doc_cap: int = DOC_CAP
) -> tiktoken.Encoding:
    """Train BPE on `texts` and wrap it as a tiktoken Encoding with the special tokens last.

    When the text has too few distinct pairs, training stops early and the encoding is smaller
    than `vocab_size`: its `n_vocab` is the true size.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ConfigError(f"vocab_size {vocab_size} is too small", f"use at least {MIN_VOCAB_SIZE}")
    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(_capped(texts, max_chars, doc_cap), vocab_size - len(SPECIAL_TOKENS),
                                pattern=SPLIT_PATTERN)
    ranks = {bytes(token): rank for token, rank in trainer.get_mergeable_ranks()}
    assert sorted(ranks.values()) == list(range(len(ranks))), "rustbpe ranks must be 0..n-1"
    specials = {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}
    return tiktoken.Encoding(name=f"rustbpe-{len(ranks) + len(specials)}", pat_str=trainer.get_pattern(),
                             mergeable_ranks=ranks, special_tokens=specials)


def token_byte_lengths(enc: tiktoken.Encoding) -> list[int]:
    """Exact UTF-8 byte count of every token id; 0 for special tokens."""
    special_ids = {enc.encode_single_token(name) for name in enc.special_tokens_set}
    lengths = []
    for token in range(enc.n_vocab):
        lengths.append(0 if token in special_ids else len(enc.decode_single_token_bytes(token)))
    return lengths


def save_tokenizer(enc: tiktoken.Encoding, out_dir: Path) -> None:
    """Write tokenizer.pkl and token_bytes.pt, each atomically."""
    import torch

    atomic_write_bytes(out_dir / TOKENIZER_FILE, pickle.dumps(enc, protocol=pickle.HIGHEST_PROTOCOL))
    buffer = io.BytesIO()
    torch.save(torch.tensor(token_byte_lengths(enc), dtype=torch.int32), buffer)
    atomic_write_bytes(out_dir / TOKEN_BYTES_FILE, buffer.getvalue())


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, out_dir: Path, *, max_chars: int = MAX_CHARS, doc_cap: int = DOC_CAP
) -> tiktoken.Encoding:
    """Train on `texts` (the train split only), save to `out_dir`, and return the encoding."""
    enc = build_encoding(texts, vocab_size, max_chars=max_chars, doc_cap=doc_cap)
    save_tokenizer(enc, out_dir)
    return enc


def load_encoding(tokenizer_dir: Path) -> tiktoken.Encoding:
    """The pickled encoding; CacheCorrupt when it is missing or cannot be unpickled."""
    path = tokenizer_dir / TOKENIZER_FILE
    try:
        with open(path, "rb") as handle:
            enc = pickle.load(handle)
    except FileNotFoundError:
        raise CacheCorrupt(f"{path} is missing", "run `autoresearch prepare` to train the tokenizer") from None
    except Exception as exc:  # noqa: BLE001 - a damaged pickle can raise almost any exception
        raise CacheCorrupt(f"{path} cannot be unpickled: {type(exc).__name__}: {exc}",
                           "run `autoresearch prepare` to retrain it") from None
    if not isinstance(enc, tiktoken.Encoding):
        raise CacheCorrupt(f"{path} holds a {type(enc).__name__}, not a tiktoken.Encoding",
                           "run `autoresearch prepare` to retrain it")
    return enc


def load_token_bytes(tokenizer_dir: Path) -> torch.Tensor:
    """The int32 tensor of token byte lengths; CacheCorrupt when it is missing or unreadable."""
    import torch

    path = tokenizer_dir / TOKEN_BYTES_FILE
    try:
        lengths = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CacheCorrupt(f"{path} is missing", "run `autoresearch prepare`") from None
    except Exception as exc:  # noqa: BLE001 - as for the pickle: zip, pickle and torch errors alike
        raise CacheCorrupt(f"{path} is unreadable: {exc}", "run `autoresearch prepare` to rebuild it") from None
    if not isinstance(lengths, torch.Tensor) or lengths.dtype != torch.int32 or lengths.dim() != 1:
        raise CacheCorrupt(f"{path} is not a 1-d int32 tensor", "run `autoresearch prepare` to rebuild it")
    return lengths
