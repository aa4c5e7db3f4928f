"""
The fixed half of the lab: data, tokenizer, dataloader and the metric.

DO NOT MODIFY. autoresearch records this file's hash and rejects any experiment that changes it;
the numbers it produces are what every experiment of the lab is compared on.

Usage:
    python prepare.py                  # same as `autoresearch prepare`: shards + tokenizer into the cache
    python prepare.py --num-shards 4   # climbmix only: download fewer training shards

train.py imports from here (the same names as the original autoresearch's prepare.py, so a train.py
written for it works unchanged):
    MAX_SEQ_LEN, TIME_BUDGET, Tokenizer, make_dataloader, evaluate_bpb, get_token_bytes
and, for device handling: detect_device (the lab's device, never a silent fallback), peak_flops and
load_flash_attention (FlashAttention-3 from the cache, where `autoresearch prepare` fetched it).

The settings below come from the lab's autoresearch.toml ([task] and [lab].budget), written once by
`autoresearch init`. The data lives in ~/.cache/autoresearch/ (or $AUTORESEARCH_CACHE).
"""

import argparse
import gc
import itertools
import json
import math
import os
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

from autoresearch import data as _data
from autoresearch.config import load_config
from autoresearch.data.evalrows import eval_rows
from autoresearch.data.loader import background, default_producers
from autoresearch.data.packing import document_pieces, encode_each, pack_rows, shuffled_epochs
from autoresearch.data.tokenizer import BOS_TOKEN, load_encoding
from autoresearch.devices import lab_device, peak_flops  # noqa: F401  (re-exported for train.py)
from autoresearch.attention_kernels import load_flash_attention  # noqa: F401
from autoresearch import devices as _devices
from autoresearch import handoff as _handoff  # the names of the hand-off protocol, shared with the runner
from autoresearch.presets import get_preset
from autoresearch.errors import AutoresearchError

# ---------------------------------------------------------------------------
# Constants (fixed for the lab: they define the metric)
# ---------------------------------------------------------------------------

LAB_DIR = Path(__file__).resolve().parent
_config = load_config(LAB_DIR)
assert _config.task is not None, "autoresearch.toml has no [task] table: this prepare.py needs one"

DATASET = _config.task.dataset          # climbmix, tinystories, sotu or files:PATH
PRESET = _config.task.preset            # the device preset the lab was made for
MAX_SEQ_LEN = _config.task.max_seq_len  # context length of the evaluation (and default training length)
VOCAB_SIZE = _config.task.vocab_size    # BPE vocabulary, special tokens included
EVAL_TOKENS = _config.task.eval_tokens  # validation tokens scored by evaluate_bpb
# Training seconds. `autoresearch run --budget` sets AUTORESEARCH_BUDGET for one run; the runner
# also enforces the budget from outside, so this number is a promise train.py keeps, not a trust.
TIME_BUDGET = float(os.environ.get(_handoff.BUDGET_ENV) or _config.budget)

TRAIN_SEED = 1337  # document order of the training split (a new seeded order every epoch)

# ---------------------------------------------------------------------------
# Device
# ---------------------------------------------------------------------------


def detect_device():
    """The device this lab trains on: the one its preset is sized for (AUTORESEARCH_DEVICE overrides).

    A cuda or mps lab never falls back to the CPU: its model would train at a hundredth of the speed
    until the budget ran out, scored against runs that had the GPU. Instead: one line saying why the
    device cannot be used here (a CPU build of torch, CUDA_VISIBLE_DEVICES, missing /dev/nvidia*
    nodes, an address-space limit) and exit 1.
    """
    try:
        return _devices.detect_device(lab_device(get_preset(PRESET).device))
    except AutoresearchError as exc:
        sys.exit(f"error: {exc}")


# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------


def _prepared():
    """The lab's dataset in the cache; a one-line error and exit 1 when it is missing or damaged."""
    try:
        # Under autoresearch the model is handed to a trusted evaluator and the validation and test
        # shards are out of the run's reach: only the training split is checked here.
        splits = ("train",) if os.environ.get(_handoff.HANDOFF_ENV) else ("train", "val", "test")
        return _data.load_prepared(DATASET, VOCAB_SIZE, splits)
    except AutoresearchError as exc:
        sys.exit(f"error: {exc}")


class Tokenizer:
    """A tiktoken encoding trained by `prepare` with rustbpe, plus the BOS convention."""

    def __init__(self, enc):
        self.enc = enc
        self.bos_token_id = enc.encode_single_token(BOS_TOKEN)

    @classmethod
    def from_directory(cls, tokenizer_dir=None):
        directory = Path(tokenizer_dir) if tokenizer_dir else _prepared().tokenizer_dir
        return cls(load_encoding(directory))

    def get_vocab_size(self):
        return self.enc.n_vocab

    def get_bos_token_id(self):
        return self.bos_token_id

    def encode(self, text, prepend=None, num_threads=8):
        """A string gives a list of ids; a list of strings gives a list of lists."""
        if isinstance(text, str):
            ids = self.enc.encode_ordinary(text)
            return [prepend, *ids] if prepend is not None else ids
        if isinstance(text, list):
            rows = self.enc.encode_ordinary_batch(text, num_threads=num_threads)
            return [[prepend, *row] for row in rows] if prepend is not None else rows
        raise TypeError(f"encode() takes a str or a list of str, not {type(text).__name__}")

    def decode(self, ids):
        return self.enc.decode(ids)


def get_token_bytes(device="cpu"):
    """Exact UTF-8 byte length of every token (0 for special tokens), as an int32 tensor.

    Computed from each token's own bytes, not from decode([id]).encode(): a token that is part of a
    multi-byte character decodes to a 3-byte replacement character, which would overstate the bytes
    and make bits per byte look better than they are.
    """
    path = _prepared().tokenizer_dir / "token_bytes.pt"
    return torch.load(path, map_location=device)


# ---------------------------------------------------------------------------
# Dataloader
# ---------------------------------------------------------------------------


def _row_group_loaders(split):
    """One loader per parquet row group of the split: each returns that group's documents."""
    loaders = []
    for path in _prepared().files(split):
        for index in range(pq.ParquetFile(path).num_row_groups):
            def load(path=path, index=index):
                table = pq.ParquetFile(path).read_row_group(index, columns=["text"])
                return [t for t in table.column("text").to_pylist() if t]
            loaders.append(load)
    return loaders


def packed_rows(tokenizer, T, split, one_pass=False, workers=1):
    """(row, epoch) pairs: rows of T + 1 token ids, BOS first, best-fit packed, no padding.

    The training split is shuffled with a new seed each epoch; validation and test are read in
    file order, so evaluation always sees the same rows. Endless unless `one_pass`. `workers`
    threads tokenize; the rows do not depend on how many.
    """
    assert split in ("train", "val", "test"), f"unknown split {split!r}"
    capacity = T + 1
    bos = tokenizer.get_bos_token_id()
    docs = shuffled_epochs(_row_group_loaders(split), seed=TRAIN_SEED, shuffle=split == "train")
    if one_pass:
        docs = itertools.takewhile(lambda doc: doc[1] == 1, docs)
    pieces = document_pieces(docs, encode_each(tokenizer.enc.encode_ordinary), bos, capacity, workers=workers)
    return pack_rows(pieces, capacity, bos)


def make_dataloader(tokenizer, B, T, split, device=None, *, producers=None):
    """Yield (inputs, targets, epoch): (B, T) int64 tensors on `device` (default: detect_device()).

    Long documents are split at paragraph boundaries rather than cropped, so an epoch sees every
    token of the split. Pinned memory and non-blocking copies are used on CUDA only.

    Batches are made ahead on a background thread while the model trains, their documents
    tokenized on `producers` threads (default: one per core but one, at most 8; with 1 the packing
    thread tokenizes too). The batches are the same, in the same order, whatever the number.
    """
    if split == "train" and os.environ.get(_handoff.NO_TRAIN_ENV):
        # set for coding assistants that propose changes: the loop runs experiments, they do not
        sys.exit(f"error: training is disabled here ({_handoff.NO_TRAIN_ENV} is set): autoresearch runs experiments itself")
    device = torch.device(device) if device is not None else detect_device()
    cuda = device.type == "cuda"
    workers = default_producers() if producers is None else producers
    rows = packed_rows(tokenizer, T, split, workers=workers)

    def batches(rows):
        while True:
            # A new buffer for every batch, never one reused: on CUDA the non-blocking copy below
            # returns before the GPU has read the buffer, and with gradient accumulation the next
            # batch would be written into it meanwhile. Pinned tensors come from PyTorch's caching
            # host allocator (pytorch/pytorch aten/src/ATen/cuda/PinnedMemoryAllocator.h), which
            # hands a freed block out again only once the copies that read it are done:
            # copy_kernel_cuda (aten/src/ATen/native/cuda/Copy.cu) calls record_event on the block
            # after cudaMemcpyAsync, and free() (aten/src/ATen/core/CachingHostAllocator.h) holds a
            # block with recorded events back until they complete. After the first few batches
            # this reuses pinned blocks, without a cudaHostAlloc.
            # Inputs and targets side by side, each contiguous (a train.py may call .view on them).
            host = torch.empty((2, B, T), dtype=torch.long, pin_memory=cuda)
            view = host.numpy()
            for i in range(B):
                row, epoch = next(rows)
                view[0, i], view[1, i] = row[:-1], row[1:]
            yield host, epoch

    # Packing 128 x 2048 batches on one thread ran at 1.0-4.2 M tokens/s on 2 cores, an H100 trains
    # at ~1.7 M: made on a thread, at most 4 batches ahead, a batch is ready when the step asks.
    for host, epoch in background(batches(rows), depth=4):
        # the copy is queued here, on the training thread's stream, so the step that reads it waits for it
        batch = host.to(device, non_blocking=cuda) if device.type != "cpu" else host
        yield batch[0], batch[1], epoch


# ---------------------------------------------------------------------------
# Evaluation (the metric: DO NOT CHANGE)
# ---------------------------------------------------------------------------

HANDOFF_POLL = 0.05  # seconds between looks for the evaluator's result.json


@torch.no_grad()
def evaluate_bpb(model, tokenizer, batch_size, split="val"):
    """Bits per byte on the pinned validation split: vocabulary-independent.

    Under `autoresearch run` (AUTORESEARCH_HANDOFF is set) the number does not come from here: the
    model is handed to the trusted evaluator, which scores it in its own process, and this returns
    the evaluator's value (see hand_off). Run by hand, it is computed here, as in the original:

    Sums the per-token cross-entropy (nats) the model returns for `model(x, y, reduction='none')`,
    sums the exact byte lengths of the target tokens, and converts nats/byte to bits/byte. Special
    tokens (BOS, 0 bytes) count in neither sum. Always the same rows: the first EVAL_TOKENS tokens
    of the split packed at MAX_SEQ_LEN, whatever the batch size, and never more than one pass.
    """
    handoff = os.environ.get(_handoff.HANDOFF_ENV)
    if handoff:
        return hand_off(model, Path(handoff))
    prepared = _prepared()
    prepared.verify_split(split)  # the pinned split's fingerprint must match the manifest
    device = next(model.parameters()).device
    token_bytes = get_token_bytes(device=device)
    rows = eval_rows(tokenizer.enc, prepared.files(split), MAX_SEQ_LEN, EVAL_TOKENS)
    total_nats, total_bytes = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = torch.from_numpy(rows[start : start + batch_size]).to(device)
        x, y = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
        loss = model(x, y, reduction="none").reshape(-1).float()
        nbytes = token_bytes[y.reshape(-1)]
        total_nats += (loss * (nbytes > 0)).sum().item()
        total_bytes += nbytes.sum().item()
    assert total_bytes > 0, f"the {split} split produced no tokens to evaluate"
    return total_nats / (math.log(2) * total_bytes)


class _Forward(torch.nn.Module):
    """idx (B, T) -> logits (B, T, V), under the autocast the caller had on (export does not record
    an autocast entered outside the exported module, only one entered inside it)."""

    def __init__(self, model, autocast_dtype):
        super().__init__()
        self.model = model
        self.autocast_dtype = autocast_dtype

    def forward(self, idx):
        if self.autocast_dtype is None:
            return self.model(idx)
        with torch.autocast(idx.device.type, dtype=self.autocast_dtype):
            return self.model(idx)


def _handoff_fail(folder, message):
    """Record why the model could not be handed over, say it in one line, exit 1."""
    (folder / _handoff.ERROR).write_text(json.dumps({"error": message}) + "\n")
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def hand_off(model, folder):
    """Save the model's forward pass for the trusted evaluator and return the val_bpb it measures.

    Why an exported graph: torch.export records the forward pass `idx (B, T) int64 -> logits
    (B, T, V)` as a graph of ATen operators plus its weights. The evaluator runs that graph in its
    own process, outside the sandbox, on the pinned validation split: none of train.py's Python
    runs there, so train.py cannot wrap or replace the evaluation, print its own number, read the
    labels, or learn which split is being scored. The evaluator also checks that the graph is
    causal (changing later tokens must not change earlier logits), that the logits are finite and
    of the right shape, and that it holds nothing but ATen operators.

    Threats this leaves open:
      - the weights and constants inside the graph may encode anything the run could read while it
        trained; that is why the sandbox hides the val and test shards from the run;
      - a graph can be slow or hungry: the evaluator runs under a time limit, and a model that
        exceeds it, or takes the evaluator's process down, is rejected;
      - the causality check cuts the future of up to 64 rows per evaluation at one position each,
        in passes shaped like the scoring passes and mixed in among them: a model that looks ahead
        at a few positions only may escape one evaluation (about 13% at 8 positions of 256), and
        gains only at those positions; see autoresearch.evaluator for what it checks;
      - custom operators registered by train.py (torch.library, C++ extensions) do not exist in the
        evaluator's process, so such a model is rejected rather than run;
      - on CUDA with FlashAttention-3 the attention kernel is not an ATen operator: export fails or
        records a custom op, and the model is rejected, unless train.py takes its SDPA path while
        torch.compiler.is_exporting() is true. Not verified on a GPU;
      - reading a .pt2 file means unpickling and generating Python code, so a doctored file could
        run code in the evaluator: it accepts only raw tensors, ATen operators, plain names and
        arithmetic shape expressions before torch reads the file (checked against torch 2.13; a
        new torch version needs the check reviewed).

    Protocol (autoresearch.handoff names its files and variables; the loop's side is in
    autoresearch.runner and autoresearch.evaluator): write model.pt2, then `ready`; wait for
    result.json, at most AUTORESEARCH_HANDOFF_TIMEOUT seconds (default 600).
    """
    if (folder / _handoff.READY).exists():
        _handoff_fail(folder, "evaluate_bpb hands the model to the evaluator once per run: call it once, at the end")
    model = getattr(model, "_orig_mod", model)  # a torch.compile wrapper shares the module's weights
    model.eval()
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    autocast_dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
    example = torch.randint(0, _prepared().n_vocab, (2, MAX_SEQ_LEN), device=device)
    try:
        logits = _Forward(model, autocast_dtype)(example)  # also fills caches a forward builds lazily
    except Exception as exc:  # noqa: BLE001 - whatever train.py's forward raises, it ends the run here
        _handoff_fail(folder, f"model(idx) failed: {type(exc).__name__}: {exc}".splitlines()[0])
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or tuple(logits.shape[:2]) != (2, MAX_SEQ_LEN):
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        _handoff_fail(folder, f"model(idx) must return logits of shape (B, T, V) = (2, {MAX_SEQ_LEN}, V), not {got}")
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    try:
        with torch.autocast(device.type, enabled=False):
            program = torch.export.export(_Forward(model, autocast_dtype), (example,), dynamic_shapes=({0: batch},))
    except Exception as exc:  # noqa: BLE001 - export fails in many ways; each ends the run with its reason
        _handoff_fail(folder, f"the forward pass cannot be exported: {type(exc).__name__}: {exc}".splitlines()[0])
    with open(folder / f"{_handoff.MODEL}.tmp", "wb") as handle:  # a file object: torch warns about the name otherwise
        torch.export.save(program, handle)
    os.replace(folder / f"{_handoff.MODEL}.tmp", folder / _handoff.MODEL)
    if device.type == "cuda":
        # the evaluator loads the model on this same GPU while the run waits: give the allocator's
        # cached blocks (the training batch's activations, export's copies) back to the driver
        gc.collect()  # train.py may have turned the collector off
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()
    n_params = sum(p.numel() for p in model.parameters())
    ready = {"pid": os.getpid(), "time": time.time(), "printed_by": "evaluate_bpb", "n_params": n_params}
    (folder / f"{_handoff.READY}.tmp").write_text(json.dumps(ready) + "\n")
    os.replace(folder / f"{_handoff.READY}.tmp", folder / _handoff.READY)
    timeout = float(os.environ.get(_handoff.HANDOFF_TIMEOUT_ENV) or _handoff.DEFAULT_TIMEOUT)
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = json.loads((folder / _handoff.RESULT).read_text())
            break
        except (FileNotFoundError, ValueError):  # not written yet, or half written
            if time.monotonic() > deadline:
                print(f"error: no result from the evaluator after {timeout:g}s", file=sys.stderr)
                sys.exit(1)
            time.sleep(HANDOFF_POLL)
    if "error" in result:
        print(f"error: {result['error']}", file=sys.stderr)
        sys.exit(1)
    return float(result["val_bpb"])


# ---------------------------------------------------------------------------
# Main: prepare data and tokenizer (what `autoresearch prepare` runs)
# ---------------------------------------------------------------------------

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Download or build the lab's dataset and train its tokenizer.")
    parser.add_argument("--num-shards", type=int, default=None, help="climbmix: training shards to download")
    parser.add_argument("--workers", type=int, default=8, help="parallel downloads")
    args = parser.parse_args()
    try:
        prepared = _data.prepare_dataset(DATASET, VOCAB_SIZE, num_shards=args.num_shards,
                                         workers=args.workers, log=print)
    except AutoresearchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    print(f"ready: {DATASET} in {prepared.dir} (vocabulary {VOCAB_SIZE})")
    if get_preset(PRESET).device == "cuda":  # FlashAttention-3 for train.py, which loads it offline
        from autoresearch.attention_kernels import fetch_flash_attention

        print(fetch_flash_attention(print))
