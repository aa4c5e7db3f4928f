"""The trusted evaluator: turns a saved model into the lab's metric, in its own process.

    python -m autoresearch.evaluator --model HANDOFF/model.pt2 --lab LAB --split val [--out result.json]

The model is the forward pass prepare.py's `hand_off` exported with torch.export: a graph of ATen
operators and its weights, `idx (B, T) int64 -> logits (B, T, V)`. No code of the experiment runs
here. Before the graph is scored it must pass, in order:

1. the archive check: only plain tensors (nothing unpickled), every operator an ATen or prims op or
   a symbolic-shape helper, every name a plain dotted name, every shape expression arithmetic on
   shape symbols. A .pt2 file is read with pickle and FX code generation, so a hostile file could
   otherwise run code in this process, outside the sandbox, and report any number it likes;
2. the shape check: logits (B, T, V) with V >= the tokenizer's n_vocab. The loss is a log-softmax
   over all V columns: logits for ids the tokenizer never produces take probability mass from the
   real ones, so scoring only the first n_vocab columns would reward a model for padding V;
3. the causality check (see `check_causal`), and finite logits on every scored row.

Exit status: 0 scored, 2 the model was rejected (kind noncausal or bad_model), 1 our own failure
(kind data: the cache is missing, or a split's fingerprint does not match the manifest).
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import importlib
import io
import json
import math
import operator
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import SECRET_PATTERNS, load_config
from .data import load_encoding, load_prepared, load_token_bytes
from .data.evalrows import eval_rows
from .devices import detect_device
from .errors import AutoresearchError, ConfigError

# fp32 logits per forward pass: a pass whose logits fit in the CPU's cache runs ~2x faster per token
# than one that streams them through memory (cpu preset, 2 cores with 32 MB of L3: 0.48 s per 64
# rows in passes of 4 rows, 0.9-1.1 s in passes of 8-64 rows)
PASS_LOGITS_BYTES = 16 << 20
# On a GPU, passes are sized for its free memory instead (the run still holds its model and optimizer
# there while it waits): at most this fraction for ~4 copies of a pass's fp32 logits, and at most
# this many rows (the cuda preset's 10,240 validation rows then take 160 passes of 64 rows)
GPU_PASS_FRACTION = 0.25
GPU_PASS_ROWS = 64
CAUSAL_ROWS = 2  # rows of real tokens the causality check perturbs: 136 rows in all at the cpu preset
CAUSAL_CUTS = 64  # positions per row whose future it replaces (0 and T-2 always): every position when T <= 65
# Relative to the largest |logit|. A causal model's earlier logits do not depend on later tokens at
# all: the same kernels run on the same shapes, so they come out bit for bit the same in float32 or
# bfloat16 (measured: 0.0 for the lab's GPT on CPU). A real look-ahead moves them by O(0.1); a leak
# below 1e-4 of the scale changes a log-probability by at most 2e-4 of it, which buys no score.
CAUSAL_TOLERANCE = 1e-4
REJECTED, FAILED = 2, 1  # exit statuses

_NAME = re.compile(r"[A-Za-z0-9_.\-]*")
# keys whose strings may hold any text: debugging metadata, pytree specs (JSON resolved against a registry)
# and string arguments, which FX code generation writes with repr(); checked against torch 2.13
_FREE_TEXT = {"stack_trace", "nn_module_stack", "source_fn_stack", "torch_fn", "custom", "from_node",
              "in_spec", "out_spec", "as_string", "as_strings", "torch_version"}
_EXPR_TOKEN = re.compile(r"\s*(?:\d+(?:\.\d+)?|'[a-z]+\d+'|([A-Za-z_]\w*)|!=|[-+*/%(),<>=])")
_EXPR_WORDS = {"positive", "integer", "nonnegative", "negative", "real", "finite", "oo", "zoo", "nan"}
_OPERATOR_FUNCS = {"getitem", "add", "sub", "mul", "floordiv", "truediv", "mod", "neg", "pos", "eq", "ne",
                   "lt", "le", "gt", "ge", "and_", "or_", "lshift", "rshift", "trunc"}
_SYM_FUNCS = {"sym_int", "sym_float", "sym_max", "sym_min", "sym_not", "sym_ite", "_sym_sqrt"}
_HIGHER_ORDER = {"wrap_with_autocast", "wrap_with_set_grad_enabled"}
# modules torch.export.load imports the first time (torch 2.13), imported while the run trains
_LOAD_MODULES = ("torch._export.serde.serialize", "torch.export.pt2_archive._package", "torch.export.passes")
_ARCHIVE_ROOT = {"archive_format", "archive_version", "byteorder", ".data/version", ".data/serialization_id"}


class EvaluationRejected(AutoresearchError):
    """The model cannot be scored: `kind` is noncausal or bad_model."""

    def __init__(self, message: str, kind: str = "bad_model") -> None:
        super().__init__(message)
        self.kind = kind


class EvaluatorFailed(AutoresearchError):
    """The evaluator itself failed (crash, unreadable output); not the model's fault."""


@dataclass(frozen=True)
class EvalResult:
    """A scored model."""

    split: str  # val or test
    bpb: float  # bits per byte
    tokens: int  # target tokens scored (special tokens excluded)
    bytes: int  # UTF-8 bytes those tokens stand for
    seconds: float  # load, checks and scoring
    fingerprint: str  # of the split, as pinned in the manifest
    causal: bool = True
    causal_seconds: float = 0.0  # of `seconds`, the causality check's

    def to_json(self) -> dict[str, Any]:
        return {f"{self.split}_bpb": self.bpb, "split": self.split, "tokens": self.tokens, "bytes": self.bytes,
                "causal": self.causal, "seconds": round(self.seconds, 3),
                "causal_seconds": round(self.causal_seconds, 3), "fingerprint": self.fingerprint}


@dataclass(frozen=True)
class Rejection:
    """A model the evaluator refused, and why."""

    kind: str  # noncausal, bad_model, timeout or crash
    error: str


def _check_strings(node: Any, key: str = "") -> None:
    """Every string in the serialized graph must be a plain name, free text torch never runs, or a
    shape expression that sympify can only turn into arithmetic."""
    if isinstance(node, dict):
        if isinstance(node.get("target"), str) and "inputs" in node:
            _check_target(node["target"])
        for k, v in node.items():
            if not _NAME.fullmatch(k):
                raise EvaluationRejected(f"the saved graph has an unexpected key {k[:60]!r}")
            _check_strings(v, k)
    elif isinstance(node, list):
        for item in node:
            _check_strings(item, key)
    elif isinstance(node, str) and key not in _FREE_TEXT:
        if key == "expr_str":
            _check_expression(node)
        elif not _NAME.fullmatch(node):
            raise EvaluationRejected(f"the saved graph has an unexpected {key or 'string'} {node[:60]!r}")


def _check_expression(text: str) -> None:
    position = 0
    while position < len(text.rstrip()):
        match = _EXPR_TOKEN.match(text, position)
        word = match.group(1) if match else None
        if match is None or word and not (re.fullmatch(r"[a-z]+\d+|[A-Z][A-Za-z0-9]*", word) or word in _EXPR_WORDS):
            raise EvaluationRejected(f"the saved graph has a shape expression it may not have: {text[:80]!r}")
        position = match.end()
    if "**" in text:
        raise EvaluationRejected(f"the saved graph has a shape expression with a power: {text[:80]!r}")


def _check_target(target: str) -> None:
    head, _, rest = target.rpartition(".")
    allowed = (target.startswith(("torch.ops.aten.", "torch.ops.prims."))
               or head == "_operator" and rest in _OPERATOR_FUNCS
               or head == "torch" and rest in _SYM_FUNCS
               or head == "math" and rest in {"trunc", "floor", "ceil", "sqrt"}
               or head == "torch.ops.higher_order" and rest in _HIGHER_ORDER)
    if not allowed:
        raise EvaluationRejected(f"the graph calls {target[:80]!r}: only ATen operators are accepted "
                                 "(custom ops, torch.library, extensions and FlashAttention kernels are not)")


def check_archive(data: bytes) -> None:
    """Reject a .pt2 archive that holds anything but JSON, raw tensor bytes and allowed names."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = archive.namelist()
            roots = {name.split("/", 1)[0] for name in names}
            if len(roots) != 1:
                raise EvaluationRejected("the saved model is not a single torch.export archive")
            files = {name.split("/", 1)[1]: name for name in names if "/" in name and not name.endswith("/")}
            models = [f for f in files if re.fullmatch(r"models/\w+\.json", f)]
            if len(models) != 1:
                raise EvaluationRejected("the saved model must hold exactly one exported program")
            for inner, full in files.items():
                config = re.fullmatch(r"data/(weights|constants)/\w+_(weights|constants)_config\.json", inner)
                if config:
                    _check_payloads(json.loads(archive.read(full)), config.group(1))
                elif not (inner in _ARCHIVE_ROOT or inner in models or inner.startswith("extra/")
                          or re.fullmatch(r"data/weights/weight_\d+|data/constants/tensor_\d+"
                                          r"|data/sample_inputs/\w+\.pt", inner)):
                    raise EvaluationRejected(f"the saved model holds {inner[:80]!r}, which the evaluator does not load")
            _check_strings(json.loads(archive.read(files[models[0]])))
    except (zipfile.BadZipFile, OSError, ValueError, KeyError, IndexError) as exc:
        raise EvaluationRejected(f"the saved model is not a readable torch.export archive: {exc}") from None


def _check_payloads(config: Any, what: str) -> None:
    for fqn, entry in config["config"].items():
        _check_strings(fqn, "fqn")
        prefix = "weight_" if what == "weights" else "tensor_"
        if entry.get("use_pickle") or not str(entry.get("path_name", "")).startswith(prefix):
            raise EvaluationRejected(f"the saved model stores {fqn[:60]!r} as a pickled object, not as a tensor")


@contextlib.contextmanager
def _weights_only() -> Iterator[None]:
    """Make every torch.load inside this block refuse pickled objects (torch falls back to full
    pickle for some archive parts otherwise)."""
    old = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"]
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = old


def load_program(path: Path, device: str) -> torch.nn.Module:
    """The checked, loaded graph as a callable module on `device`.

    The file is read once: the run that wrote it may still be writing to its folder, and what is
    checked must be what is loaded.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise EvaluationRejected(f"the saved model cannot be read: {exc}") from None
    check_archive(data)
    try:
        with _weights_only():
            program = torch.export.load(io.BytesIO(data))
        if len(program.graph_signature.user_inputs) != 1:
            raise EvaluationRejected("the exported forward must take one input, idx (B, T)")
        python_ops = {getattr(module, name) for module, names in ((operator, _OPERATOR_FUNCS), (torch, _SYM_FUNCS),
                      (math, {"trunc", "floor", "ceil", "sqrt"})) for name in names if hasattr(module, name)}
        for graph in program.graph_module.modules():
            for node in graph.graph.nodes if isinstance(graph, torch.fx.GraphModule) else ():
                target = node.target
                if node.op in ("call_method", "call_module"):
                    raise EvaluationRejected(f"the graph has a {node.op} node ({target})")
                if node.op != "call_function" or target in python_ops:
                    continue
                if isinstance(target, torch._ops.OpOverload):
                    _check_target(f"torch.ops.{target.namespace}.{target.__name__}")
                elif not (isinstance(target, torch._ops.HigherOrderOperator) and target.name() in _HIGHER_ORDER):
                    raise EvaluationRejected(f"the graph calls {target!r}")
        if str(device) != "cpu" or any(t.device.type != "cpu" for t in program.state_dict.values()):
            from torch.export.passes import move_to_device_pass

            program = move_to_device_pass(program, device)
        retarget_autocast(program, torch.device(device).type)
        return program.module()
    except EvaluationRejected:
        raise
    except Exception as exc:  # noqa: BLE001 - a graph that torch cannot load or rebuild, for whatever reason
        raise EvaluationRejected(f"the saved model cannot be loaded: {type(exc).__name__}: {exc}".splitlines()[0]) from None


def retarget_autocast(program: torch.export.ExportedProgram, device_type: str) -> int:
    """Make every autocast region of the graph name `device_type`; returns how many were changed.

    A model exported on CUDA records `torch.autocast("cuda", bf16)` as a wrap_with_autocast node.
    move_to_device_pass moves weights and device arguments but not that node, and on another
    device a "cuda" autocast does nothing: bf16 activations then meet fp32 weights and the graph
    fails ("expected m1 and m2 to have the same dtype"), or computes in fp32 what was trained in
    bf16. Retargeted, a CPU re-score of a CUDA model computes what the GPU computed, up to kernels.
    """
    changed = 0
    for module in program.graph_module.modules():
        if not isinstance(module, torch.fx.GraphModule):
            continue
        for node in module.graph.nodes:
            if (node.op == "call_function" and isinstance(node.target, torch._ops.HigherOrderOperator)
                    and node.target.name() == "wrap_with_autocast" and node.args
                    and isinstance(node.args[0], str) and node.args[0] != device_type):
                node.args = (device_type, *node.args[1:])
                changed += 1
        if changed:
            module.recompile()
    return changed


def _logits(forward: torch.nn.Module, x: torch.Tensor, n_vocab: int) -> torch.Tensor:
    try:
        out = forward(x)
    except Exception as exc:  # noqa: BLE001 - the graph's own failure (shape guards, dtype errors)
        raise EvaluationRejected(f"the model failed on a batch of {x.shape[0]} rows: {type(exc).__name__}: {exc}"
                                 .splitlines()[0]) from None
    if not isinstance(out, torch.Tensor) or out.dim() != 3 or out.shape[:2] != x.shape or out.shape[2] < n_vocab:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise EvaluationRejected(f"the model must return logits (B, T, V) = ({x.shape[0]}, {x.shape[1]}, V >= {n_vocab}), "
                                 f"not {got}")
    if not out.is_floating_point():
        raise EvaluationRejected(f"the model returned {out.dtype} logits, not floating point")
    if not torch.isfinite(out).all():  # also keeps NaN from hiding a change in the causality check
        raise EvaluationRejected(f"the model returned non-finite logits (NaN or inf) for a batch of {x.shape[0]} rows")
    return out.float()


def rows_per_pass(T: int, n_vocab: int, device: str = "cpu", free_bytes: int | None = None) -> int:
    """Rows of T tokens per forward pass. On the CPU: as many as keep the pass's logits within
    PASS_LOGITS_BYTES. On a GPU: sized for its free memory (`free_bytes`; read from the device when
    None), so that the few copies of the logits a pass makes (the graph's bf16 and fp32 ones, the
    log-softmax) take at most GPU_PASS_FRACTION of it, and never more than GPU_PASS_ROWS."""
    row = 4 * T * n_vocab  # fp32 logits of one row: 64 MB at the cuda preset's T = 2048, V = 8192
    if torch.device(device).type != "cuda":
        return max(1, PASS_LOGITS_BYTES // row)
    if free_bytes is None:
        free_bytes = torch.cuda.mem_get_info(torch.device(device))[0]
    return max(1, min(GPU_PASS_ROWS, int(free_bytes * GPU_PASS_FRACTION) // (4 * row)))


def check_causal(forward: torch.nn.Module, rows: torch.Tensor, n_vocab: int, seed: int) -> None:
    """Replace every token after position t with random ones: logits[:, :t + 1] must not move.

    At up to CAUSAL_CUTS positions t per row (0 and T - 2 always, the rest drawn at random), on
    CAUSAL_ROWS rows of real tokens. The same rows twice must also give the same logits, so that
    noise is not mistaken for looking ahead (and a random graph is named as such).
    """
    generator = torch.Generator().manual_seed(seed)
    x = rows[:CAUSAL_ROWS]
    n, T = x.shape
    inner = torch.randperm(T - 3, generator=generator)[: max(0, CAUSAL_CUTS - 2)] + 1 if T > 3 else torch.empty(0)
    cuts = sorted({0, max(0, T - 2), *(int(t) for t in inner)})
    # every pass has the same shape as the reference, so the same kernels run on the same sizes
    per_pass = min(len(cuts), max(1, rows_per_pass(T, n_vocab, str(x.device)) // n))
    base = _logits(forward, x.repeat(per_pass, 1), n_vocab)
    tolerance = CAUSAL_TOLERANCE * max(1.0, float(base.abs().max()))
    if float((_logits(forward, x.repeat(per_pass, 1), n_vocab) - base).abs().max()) > tolerance:
        raise EvaluationRejected("the model gives different logits for the same input twice")
    for start in range(0, len(cuts), per_pass):
        group = cuts[start : start + per_pass]
        group += group[-1:] * (per_pass - len(group))
        changed = x.repeat(per_pass, 1)
        for i, t in enumerate(group):
            noise = torch.randint(0, n_vocab, (n, T - t - 1), generator=generator).to(x.device)
            changed[i * n : (i + 1) * n, t + 1 :] = noise
        out = _logits(forward, changed, n_vocab)
        for i, t in enumerate(group):
            moved = float((out[i * n : (i + 1) * n, : t + 1] - base[i * n : (i + 1) * n, : t + 1]).abs().max())
            if moved > tolerance:
                raise EvaluationRejected(f"the model is not causal: its logits at position {t} change by {moved:.3g} "
                                         f"when only tokens after {t} change", kind="noncausal")


class Scorer:
    """A split made ready for scoring: the task read, the split's fingerprint checked against the
    manifest and its rows tokenized. Everything here comes before a model exists, so a lab's loop
    can do it while the run trains (see EvaluatorProcess).

    Data problems raise DataNotPrepared or CacheCorrupt (the split is re-hashed every time).
    """

    def __init__(self, lab: Path, split: str = "val", device: str = "cpu") -> None:
        task = load_config(lab).task
        if task is None:
            raise ConfigError(f"{lab} has no [task] table", "the evaluator scores the built-in GPT task only")
        prepared = load_prepared(task.dataset, task.vocab_size)
        prepared.verify_split(split)
        detect_device(device)  # the run's device, or DeviceUnavailable saying why this process cannot use it
        self.split, self.device, self.seq_len = split, device, task.max_seq_len
        self.fingerprint = prepared.fingerprint(split)
        self.enc = load_encoding(prepared.tokenizer_dir)
        self.token_bytes = load_token_bytes(prepared.tokenizer_dir).to(device)
        self.rows = torch.from_numpy(eval_rows(self.enc, prepared.files(split), task.max_seq_len,
                                               task.eval_tokens)).to(device)
        if len(self.rows) == 0:
            raise ConfigError(f"the {split} split is too small for one row of {task.max_seq_len} tokens")
        for module in _LOAD_MODULES:  # what torch.export.load imports on first use: ~1.5 s on 2 cores
            with contextlib.suppress(ImportError):
                importlib.import_module(module)

    def score(self, model_path: Path) -> EvalResult:
        """The model's bits per byte on the split; EvaluationRejected when it may not be scored.
        Its `seconds` count from here: loading, checks and scoring."""
        started = time.monotonic()
        rows, n_vocab = self.rows, self.enc.n_vocab
        forward = load_program(model_path, self.device)
        with torch.no_grad():
            checking = time.monotonic()
            check_causal(forward, rows[:, :-1], n_vocab, seed=int.from_bytes(os.urandom(4), "little"))
            causal_seconds = time.monotonic() - checking
            # sums stay on the device (float64, exact enough for 10^8 tokens): one sync at the end
            total_nats = torch.zeros((), dtype=torch.float64, device=rows.device)
            total_bytes = torch.zeros((), dtype=torch.int64, device=rows.device)
            total_tokens = torch.zeros((), dtype=torch.int64, device=rows.device)
            batch = rows_per_pass(self.seq_len, n_vocab, self.device)
            for start in range(0, len(rows), batch):
                x, y = rows[start : start + batch, :-1], rows[start : start + batch, 1:]
                logits = _logits(forward, x, n_vocab)
                nats = -logits.log_softmax(dim=-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
                nbytes = self.token_bytes[y]
                total_nats += (nats * (nbytes > 0)).sum(dtype=torch.float64)
                total_bytes += nbytes.sum()
                total_tokens += (nbytes > 0).sum()
        bpb = float(total_nats) / (math.log(2) * int(total_bytes))
        return EvalResult(self.split, bpb, int(total_tokens), int(total_bytes), time.monotonic() - started,
                          self.fingerprint, causal_seconds=causal_seconds)


def evaluate_model(model_path: Path, lab: Path, split: str = "val", device: str = "cpu") -> EvalResult:
    """Score a saved model on the lab's pinned split; EvaluationRejected when it may not be scored.

    The lab's [task] table fixes the dataset, context length and number of tokens.
    """
    return Scorer(lab, split, device).score(model_path)


class EvaluatorProcess:
    """The evaluator in a subprocess of its own, started before there is a model to score.

    It prepares the split at once (importing torch, checking the split, tokenizing its rows: about
    a third of an evaluation at the cpu preset) and then waits for `score`, so that a lab's loop
    can start it with a run and only loading and scoring the model remain after the hand-off.

    The process starts in an empty temporary directory with PYTHONSAFEPATH set, so neither the
    lab's nor the handoff folder's files can shadow a module it imports; secrets are left out of
    its environment. `close` (or leaving the `with` block) ends it if it is still waiting.
    """

    def __init__(self, lab: Path, split: str = "val", device: str = "cpu",
                 extra_env: Mapping[str, str] | None = None) -> None:
        package_root = str(Path(__file__).resolve().parent.parent)
        env = {k: v for k, v in os.environ.items() if not any(fnmatch.fnmatchcase(k.upper(), p.upper())
                                                               for p in SECRET_PATTERNS)}
        env.update(extra_env or {})  # the run's GPU: CUDA_VISIBLE_DEVICES and CUDA_DEVICE_ORDER
        env.update(PYTHONPATH=os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")])),
                   PYTHONSAFEPATH="1", TORCH_FORCE_WEIGHTS_ONLY_LOAD="1")
        self.split = split
        self._scratch = tempfile.TemporaryDirectory(prefix="autoresearch-eval-")
        self._out = Path(self._scratch.name) / "result.json"
        self._log = open(Path(self._scratch.name) / "log", "w+")  # noqa: SIM115 - closed in close()
        command = [sys.executable, "-m", "autoresearch.evaluator", "--model", "-", "--lab", str(Path(lab).resolve()),
                   "--split", split, "--device", device, "--out", str(self._out)]
        try:
            self._proc = subprocess.Popen(command, cwd=self._scratch.name, env=env, stdin=subprocess.PIPE,
                                          stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        except OSError:
            self._log.close()
            self._scratch.cleanup()
            raise

    def score(self, model_path: Path, timeout: float = 600.0) -> EvalResult | Rejection:
        """Hand the model over and wait for its score, at most `timeout` seconds from now.

        A Rejection when the model is refused, runs past `timeout` (kind timeout) or takes the
        process down without a result (kind crash: out of memory, a kernel fault); EvaluatorFailed
        when the evaluator reports a failure of its own (the cache is missing or does not match its
        manifest). Once only.
        """
        assert self._proc.stdin is not None and not self._proc.stdin.closed, "score() is called once"
        with contextlib.suppress(BrokenPipeError):  # it already failed while preparing: its result says why
            self._proc.stdin.write(f"{Path(model_path).resolve()}\n".encode())
            self._proc.stdin.close()
        try:
            code = self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.close()
            return Rejection("timeout", f"the evaluation took longer than {timeout:g}s")
        try:
            result = json.loads(self._out.read_text())
        except (OSError, ValueError):
            self._log.seek(0)
            last = self._log.read()[-2000:].strip().splitlines()[-1:] or ["no output"]
            return Rejection("crash", f"the evaluator died with status {code} while scoring the model: {last[0]}")
        finally:
            self.close()
        if code == 0 and f"{self.split}_bpb" in result:
            return EvalResult(self.split, float(result[f"{self.split}_bpb"]), int(result["tokens"]),
                              int(result["bytes"]), float(result["seconds"]), str(result["fingerprint"]),
                              bool(result["causal"]), float(result.get("causal_seconds", 0.0)))
        if code == REJECTED:
            return Rejection(str(result.get("kind", "bad_model")), str(result.get("error")))
        raise EvaluatorFailed(f"the evaluator failed ({result.get('kind', 'error')}): {result.get('error')}")

    def close(self) -> None:
        """End the process (and anything it started) if it still runs, and remove its scratch folder."""
        if self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGKILL)
        self._proc.wait()
        if self._proc.stdin is not None:
            with contextlib.suppress(BrokenPipeError):
                self._proc.stdin.close()
        self._log.close()
        self._scratch.cleanup()

    def __enter__(self) -> EvaluatorProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_evaluator(model_path: Path, lab: Path, split: str = "val", timeout: float = 600.0,
                  device: str = "cpu", extra_env: Mapping[str, str] | None = None) -> EvalResult | Rejection:
    """Score a model that already exists in an EvaluatorProcess of its own (see there), killed as a
    group at `timeout`."""
    with EvaluatorProcess(lab, split, device, extra_env) as evaluator:
        return evaluator.score(model_path, timeout)


def main(argv: list[str] | None = None) -> int:
    """Score one saved model; print the result as JSON and write it to --out."""
    parser = argparse.ArgumentParser(prog="python -m autoresearch.evaluator", description=main.__doc__)
    parser.add_argument("--model", required=True,
                        help="the model.pt2 that evaluate_bpb saved, or - to prepare the split first and then "
                             "read the model's path from standard input (an empty line: nothing to score)")
    parser.add_argument("--lab", type=Path, required=True, help="the lab whose autoresearch.toml fixes the task")
    parser.add_argument("--split", choices=("val", "test"), default="val")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    status = 0
    try:
        scorer = Scorer(args.lab, args.split, args.device)
        model = sys.stdin.readline().strip() if args.model == "-" else args.model
        if not model:
            return 0
        result: dict[str, Any] = scorer.score(Path(model)).to_json()
    except EvaluationRejected as exc:
        result, status = {"error": str(exc), "kind": exc.kind}, REJECTED
    except AutoresearchError as exc:
        result, status = {"error": str(exc), "kind": "data"}, FAILED
    text = json.dumps(result)
    if args.out is not None:
        args.out.with_name(args.out.name + ".tmp").write_text(text + "\n")
        os.replace(args.out.with_name(args.out.name + ".tmp"), args.out)
    print(text)
    return status


if __name__ == "__main__":
    status = main()
    sys.stdout.flush()
    os._exit(status)  # the result is written: skip tearing down torch (~0.5 s), which the loop would wait for
