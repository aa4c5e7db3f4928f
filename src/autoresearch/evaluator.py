"""The trusted evaluator: turns a saved model into the lab's metric, in its own process.

    python -m autoresearch.evaluator --model HANDOFF/model.pt2 --lab LAB --split val [--out result.json]

The model is the forward pass prepare.py's `hand_off` exported with torch.export: a graph of ATen
operators and its weights, `idx (B, T) int64 -> logits (B, T, V)`. No code of the experiment runs
here. Before the graph is scored it must pass, in order:

1. the archive check: only plain tensors (nothing unpickled), every operator an ATen or prims op or
   a symbolic-shape helper, every name a plain dotted name, every shape expression arithmetic on
   shape symbols. A .pt2 file is read with pickle and FX code generation, so a hostile file could
   otherwise run code in this process, outside the sandbox, and report any number it likes;
2. the state check (see `check_stateless`): the graph may not write into its weights, buffers or
   constants, so every forward pass is a function of its batch alone; the evaluator also gives each
   pass a fresh copy of its rows, reseeds the random generators before it and zero-fills the memory
   of `torch.empty`-like tensors, so nothing from an earlier pass can reach a later one;
3. the shape check: logits (B, T, V) with V >= the tokenizer's n_vocab. The loss is a log-softmax
   over all V columns: logits for ids the tokenizer never produces take probability mass from the
   real ones, so scoring only the first n_vocab columns would reward a model for padding V;
4. the causality and batch-invariance checks, run among the scoring passes (see `plan_passes`), and
   finite logits on every pass.

The checks compare what is scored, each target token's log-probability (log_softmax in fp32), with
an absolute tolerance, and take their references from the scoring passes themselves: check passes
have the scoring passes' batch size, every row in them is a real row of the split, each at most once,
and a row whose future is replaced gets it from other real rows. All passes run in an order drawn
from os.urandom. A model that tells a check pass from a scoring pass gains nothing by it: to pass,
its log-probabilities in the check pass must equal those it gave in the row's scoring pass, which it
cannot know to be checked.

What a model can still detect, and what it can still get away with:
  - within one batch: a row whose future was replaced (the text does not flow at the cut), a batch
    whose rows come from all over the split (scoring batches are consecutive rows), a batch of one
    row (on the CPU only; scoring batches have one row only when the split's last one does). The
    graph keeps no state, so it cannot count passes, see which came first or that a row came twice;
  - the causality check cuts CAUSAL_CUTS positions per evaluation (one row each; every position when
    T <= 65): a model that looks ahead at k of the T - 1 positions escapes one evaluation with a
    chance of about (1 - k / (T - 1)) ** CAUSAL_CUTS (k = 8 at the cpu preset: 13 %), and each
    evaluation (repeats, the test split) draws new cuts. When the split's rows are not a multiple of
    the batch size, the short last pass (a size of its own) is checked by one pass of that size
    only, one random cut per row;
  - a dependence on later tokens or on other rows smaller than CAUSAL_TOLERANCE nats per token;
  - time: a graph can see no clock, but a slow one runs into the time limit, a hungry one into the
    memory limit (see `EvaluatorProcess`).

Exit status: 0 scored, 2 the model was rejected (kind noncausal, batch_dependent, bad_model or oom),
1 our own failure (kind data: the cache is missing, or a split's fingerprint does not match the
manifest).
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
import random
import re
import resource
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

import psutil
import torch
import torch.utils._pytree as pytree

from .config import SECRET_PATTERNS, load_config
from .data import load_encoding, load_prepared, load_token_bytes
from .data.evalrows import eval_rows
from .devices import detect_device
from .errors import AutoresearchError, ConfigError
from .handoff import MODEL, RESULT

# fp32 logits per forward pass: a pass whose logits fit in the CPU's cache runs ~2x faster per token
# than one that streams them through memory (cpu preset, 2 cores with 32 MB of L3: 0.48 s per 64
# rows in passes of 4 rows, 0.9-1.1 s in passes of 8-64 rows)
PASS_LOGITS_BYTES = 16 << 20
# On a GPU, passes are sized for its free memory instead (the run still holds its model and optimizer
# there while it waits): at most this fraction for ~4 copies of a pass's fp32 logits, and at most
# this many rows (the cuda preset's 10,240 validation rows then take 160 passes of 64 rows)
GPU_PASS_FRACTION = 0.25
GPU_PASS_ROWS = 64
CAUSAL_CUTS = 64  # positions whose future the check replaces, each on a row of its own (0 and T - 2 always): every position when T <= 65
INVARIANCE_ROWS = 8  # rows scored again, unchanged, among other rows than in their scoring pass
ALONE_ROWS = 2  # rows scored in a batch of their own, on the CPU only (a GPU picks other kernels for other shapes)
# Absolute, in nats, on the scored log-probabilities. A model whose log-probabilities do not depend on
# later tokens or on other rows gives bit-identical values in every comparison, as the same kernels
# run on the same shapes (measured: 0.0 for the lab's GPT on CPU in fp32 and bf16 autocast, also for a
# row alone against batches of 4 and 64). A look-ahead moves them by O(0.1); 1e-4 nats per token is
# 1.4e-4 bits, ~1e-4 of a typical 1-3 bpb, below anything the judge could keep. A tolerance relative to
# the largest logit could be inflated at will: a constant added to every logit changes no probability.
CAUSAL_TOLERANCE = 1e-4
# Memory the evaluator may take, once it has prepared the split, to load and score a model: half the
# machine's RAM, at most EVAL_MEMORY_CAP (measured at the cpu preset: +0.28 GB resident, +0.33 GB of
# address space; the cuda preset's host side is unmeasured); on a GPU, at most GPU_MEMORY_SHARE of
# the GPU memory free at the hand-off
EVAL_MEMORY_CAP = 16 << 30
GPU_MEMORY_SHARE = 0.9
MEMORY_POLL = 0.05  # seconds between looks at the evaluator's resident memory
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
    """The model cannot be scored: `kind` is noncausal, batch_dependent, bad_model or oom."""

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
    causal_seconds: float = 0.0  # of `seconds`, the passes and comparisons of the causality and batch checks

    def to_json(self) -> dict[str, Any]:
        return {f"{self.split}_bpb": self.bpb, "split": self.split, "tokens": self.tokens, "bytes": self.bytes,
                "causal": self.causal, "seconds": round(self.seconds, 3),
                "causal_seconds": round(self.causal_seconds, 3), "fingerprint": self.fingerprint}


@dataclass(frozen=True)
class Rejection:
    """A model the evaluator refused, and why."""

    kind: str  # noncausal, batch_dependent, bad_model, oom, timeout or crash
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


# ops that point a tensor at other memory or grow it: a write the schemas cannot follow
_STORAGE_OPS = {"set_", "resize_", "resize_as_", "_resize_output_", "resize_as_sparse_", "sparse_resize_",
                "sparse_resize_and_clear_", "_set_storage_offset"}
# factories whose memory is not initialised: it may hold what an earlier pass left there
_EMPTY_OPS = {"empty", "empty_like", "empty_strided", "empty_permuted", "new_empty", "new_empty_strided"}


def check_stateless(program: torch.export.ExportedProgram) -> None:
    """Reject a graph that writes into its weights, buffers or constants (in place, through a view,
    or with copy_): the next forward pass would see what this one left, and a model that keeps
    state can tell a check pass from a scoring pass by what came before it. Which tensors an op
    writes and which outputs alias its inputs come from the ATen schemas (`Tensor(a!)`)."""
    signature = program.graph_signature
    names = {**signature.inputs_to_parameters, **signature.inputs_to_buffers,
             **signature.inputs_to_lifted_tensor_constants}
    _check_writes(program.graph_module, {name: frozenset([fqn]) for name, fqn in names.items()})


def _check_writes(module: torch.fx.GraphModule, held: Mapping[str, frozenset[str]]) -> frozenset[str]:
    """The weights the graph's outputs may alias; EvaluationRejected when a node writes into one.
    `held` maps placeholder names to the weights each may alias."""
    aliases: dict[torch.fx.Node, frozenset[str]] = {}

    def of(value: Any) -> frozenset[str]:
        return frozenset().union(*(aliases.get(leaf, frozenset()) for leaf in pytree.tree_leaves(value)
                                   if isinstance(leaf, torch.fx.Node)))

    for node in module.graph.nodes:
        target = node.target
        if node.op == "placeholder":
            aliases[node] = held.get(node.name, frozenset())
        elif node.op == "output":
            return of(node.args)
        elif node.op != "call_function":
            continue
        elif isinstance(target, torch._ops.OpOverload):
            schema = target._schema
            if schema.name.split("::")[-1] in _STORAGE_OPS:
                raise EvaluationRejected(f"the graph calls {schema.name}, which points a tensor at other memory")
            bound = [node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
                     for i, arg in enumerate(schema.arguments)]
            written = of([v for v, arg in zip(bound, schema.arguments) if arg.alias_info and arg.alias_info.is_write])
            if written:
                raise EvaluationRejected(f"the graph writes into {', '.join(sorted(written)[:3])} ({schema.name}): "
                                         "a model must compute its logits from its input alone, keeping no state "
                                         "from one batch to the next")
            if any(r.alias_info for r in schema.returns) and not _converts(node):  # a view, or may return its input
                aliases[node] = of([v for v, arg in zip(bound, schema.arguments) if arg.alias_info])
        elif isinstance(target, torch._ops.HigherOrderOperator):  # wrap_with_autocast(..., body, *operands)
            at = next(i for i, a in enumerate(node.args) if isinstance(a, torch.fx.Node) and a.op == "get_attr")
            body = getattr(module, node.args[at].target)
            inner = [n.name for n in body.graph.nodes if n.op == "placeholder"]
            aliases[node] = _check_writes(body, {name: of(a) for name, a in zip(inner, node.args[at + 1 :])})
        else:  # getitem on a multi-output op, symbolic shape arithmetic
            aliases[node] = of(node.args)
    return frozenset()


def _converts(node: torch.fx.Node) -> bool:
    """Whether a `to` call changes dtype or device, and so returns a copy rather than its input."""
    source = node.args[0] if node.args else None
    new, old = node.meta.get("val"), source.meta.get("val") if isinstance(source, torch.fx.Node) else None
    return (str(getattr(node.target, "__name__", "")).startswith("to.") and isinstance(new, torch.Tensor)
            and isinstance(old, torch.Tensor)
            and (new.dtype != old.dtype or new.device != old.device))


def _define_empty(module: torch.nn.Module) -> None:
    """Zero the memory of every tensor the graph makes with torch.empty and its kin (the caching
    allocator hands out blocks an earlier pass wrote, and reading them would be state)."""
    for graph_module in module.modules():
        if not isinstance(graph_module, torch.fx.GraphModule):
            continue
        nodes = [n for n in graph_module.graph.nodes if n.op == "call_function"
                 and isinstance(n.target, torch._ops.OpOverload) and n.target._schema.name.split("::")[-1] in _EMPTY_OPS]
        for node in nodes:
            with graph_module.graph.inserting_after(node):
                zeroed = graph_module.graph.call_function(torch.ops.aten.zero_.default, (node,))
            node.replace_all_uses_with(zeroed, delete_user_cb=lambda user, z=zeroed: user is not z)
        if nodes:
            graph_module.recompile()


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
        check_stateless(program)
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
        module = program.module()
        _define_empty(module)
        return module
    except EvaluationRejected:
        raise
    except Exception as exc:  # noqa: BLE001 - a graph that torch cannot load or rebuild, for whatever reason
        raise _failure(exc, "the saved model cannot be loaded") from None


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


def _failure(exc: BaseException, what: str) -> EvaluationRejected:
    """`what` went wrong in torch: kind oom when it ran out of memory, else bad_model."""
    text = f"{type(exc).__name__}: {exc}".splitlines()[0][:400] if str(exc) else type(exc).__name__
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in text \
            or "out of memory" in text.lower():
        return EvaluationRejected(f"{what}: it needs more memory than the evaluator may use ({text})", kind="oom")
    return EvaluationRejected(f"{what}: {text}")


def _nats(forward: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, n_vocab: int) -> torch.Tensor:
    """-log p(y) under the model, (B, T) fp32: what is scored."""
    try:
        out = forward(x)
    except Exception as exc:  # noqa: BLE001 - the graph's own failure (shape guards, dtype errors, memory)
        raise _failure(exc, f"the model failed on a batch of {x.shape[0]} rows") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 3 or out.shape[:2] != x.shape or out.shape[2] < n_vocab:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise EvaluationRejected(f"the model must return logits (B, T, V) = ({x.shape[0]}, {x.shape[1]}, V >= {n_vocab}), "
                                 f"not {got}")
    if not out.is_floating_point():
        raise EvaluationRejected(f"the model returned {out.dtype} logits, not floating point")
    if not torch.isfinite(out).all():  # also keeps NaN from hiding a change in the checks
        raise EvaluationRejected(f"the model returned non-finite logits (NaN or inf) for a batch of {x.shape[0]} rows")
    try:
        return -out.float().log_softmax(dim=-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
    except RuntimeError as exc:  # logits too wide to take their log-softmax
        raise _failure(exc, f"the model's logits for a batch of {x.shape[0]} rows cannot be scored") from None


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


@dataclass(frozen=True)
class Pass:
    """One forward pass: rows of the split (each at most once), in this order."""

    rows: tuple[int, ...]
    kind: str = "score"  # score; check (rows elsewhere than in their scoring pass); alone; replay (a scoring pass again)
    # per row of a check pass: the row's own tokens are kept up to `cuts[i]` (T - 1: all of them),
    # the later ones are tokens of row `donors[i]`, from its position `offsets[i]` on
    cuts: tuple[int, ...] = ()
    donors: tuple[int, ...] = ()
    offsets: tuple[int, ...] = ()


def plan_passes(rows: torch.Tensor, batch: int, rng: random.Random, alone: bool = True) -> list[Pass]:
    """The scoring passes over the split's `rows` (n, T + 1), in batches of `batch` consecutive rows as always,
    and the check passes among them, all in a random order:

    - CAUSAL_CUTS rows whose future is replaced after a cut (0 and T - 2 always, the rest distinct
      positions drawn at random) by a stretch of another real row (one whose first token differs
      from the one replaced, and that makes no row equal to another of the pass: every row starts
      with BOS, so a row cut at 0 and continued by another row at the same positions would be a
      copy of it), and INVARIANCE_ROWS rows unchanged, together in check passes of
      the scoring batch size: each check row's log-probabilities up to its cut must equal those of
      its scoring pass, where it had other companions, another place in the batch and its own future;
    - ALONE_ROWS rows in a batch of their own (`alone`: where other shapes give the same bits);
    - one scoring pass again, to tell a model that is not deterministic from one that looks ahead.

    Check rows come from full-size scoring passes, so that every comparison is between passes of
    one shape (the same kernels); when the split's last pass is shorter, its rows get a check pass
    of their own, of its size, each cut at a random position. Donors come from outside the check
    row's pass where the split allows it.
    """
    inputs = rows[:, :-1]
    n, T = inputs.shape
    batch = min(batch, n)
    scoring = [Pass(tuple(range(start, min(start + batch, n)))) for start in range(0, n, batch)]
    pool = n if len(scoring) == 1 else n // batch * batch
    inner = rng.sample(range(1, T - 2), min(max(0, CAUSAL_CUTS - 2), max(0, T - 3)))
    cuts = sorted({0, T - 2, *inner}) if T > 1 else []
    slots = -(-(len(cuts) + INVARIANCE_ROWS) // batch) * batch
    planned = [*cuts, *[T - 1] * (slots - len(cuts))]
    rng.shuffle(planned)
    checks: list[Pass] = []
    stream: list[int] = []
    for start in range(0, slots, batch):
        picked: list[int] = []
        while len(picked) < batch:
            if not stream:
                stream = rng.sample(range(pool), pool)
            row = stream.pop()
            if row in picked:  # a fresh permutation began inside this pass
                stream.insert(0, row)
            else:
                picked.append(row)
        checks.append(_check_pass(rows, picked, planned[start : start + batch], rng))
    last = list(scoring[-1].rows)
    if len(last) < batch:  # the short last pass has a shape of its own: its rows get a check pass of that shape
        checks.append(_check_pass(rows, rng.sample(last, len(last)), [rng.randrange(T) for _ in last], rng))
    if alone:
        checks += [Pass((row,), "alone") for row in rng.sample(range(pool), min(ALONE_ROWS, pool))]
    checks.append(Pass(rng.choice(scoring[: max(1, pool // batch)]).rows, "replay"))
    passes = scoring + checks
    rng.shuffle(passes)
    return passes


def _check_pass(rows: torch.Tensor, picked: list[int], cuts: list[int], rng: random.Random) -> Pass:
    """A check pass of the rows `picked`, each cut at its `cuts` entry (T - 1: left whole)."""
    inputs = rows[:, :-1]
    T = inputs.shape[1]
    futures = [(row, 0) if cut == T - 1 else _donor(inputs, row, cut, picked, rng) for row, cut in zip(picked, cuts)]
    for _ in range(8):  # redraw the futures of rows that came out equal to another row of the pass
        x = _batch(rows, Pass(tuple(picked), "check", tuple(cuts), *map(tuple, zip(*futures))))[0]
        same = (x[:, None, :] == x[None, :, :]).all(dim=-1).sum(dim=1) > 1
        twins = [i for i in range(len(picked)) if cuts[i] < T - 1 and same[i]]
        if not twins:
            break
        for i in twins:
            futures[i] = _donor(inputs, picked[i], cuts[i], picked, rng)
    return Pass(tuple(picked), "check", tuple(cuts), *map(tuple, zip(*futures)))


def _donor(inputs: torch.Tensor, row: int, cut: int, taken: list[int], rng: random.Random) -> tuple[int, int]:
    """Where `row`'s future after `cut` comes from: (another row, the position its stretch starts
    at) whose first token differs from the one it replaces, outside this pass where a few draws
    find one (at the tiny preset every pass holds every row)."""
    n, T = inputs.shape
    length = T - cut - 1
    for outside in (True, False):
        for _ in range(16):
            j, offset = rng.randrange(n), rng.randint(0, T - length)
            if j != row and not (outside and j in taken) and inputs[j, offset] != inputs[row, cut + 1]:
                return j, offset
    return next((j for j in range(n) if j != row), row), rng.randint(0, T - length)


def _batch(rows: torch.Tensor, step: Pass) -> tuple[torch.Tensor, torch.Tensor]:
    """A pass's inputs, a fresh tensor of its own (a view would let the graph read the whole split
    through its storage), and its rows' own targets."""
    index = torch.tensor(step.rows, device=rows.device)
    x, y = rows[index, : rows.shape[1] - 1], rows[index, 1:]
    T = x.shape[1]
    for i, (cut, donor, offset) in enumerate(zip(step.cuts, step.donors, step.offsets)):
        if cut < T - 1:
            x[i, cut + 1 :] = rows[donor, offset : offset + T - cut - 1]
    return x, y


def verdict(passes: list[Pass], nats: list[torch.Tensor], T: int) -> None:
    """EvaluationRejected when a check pass's log-probabilities differ from the scoring passes'.
    `nats[i]` is what pass i gave (-log p of each target token)."""
    reference = {row: out[i] for step, out in zip(passes, nats) if step.kind == "score" for i, row in enumerate(step.rows)}
    found: list[tuple[int, str, int, int, torch.Tensor]] = []  # (order, kind, row, cut, moved at each position)
    for step, out in zip(passes, nats):
        if step.kind == "score":
            continue
        cuts = step.cuts or (T - 1,) * len(step.rows)
        expected = torch.stack([reference[row] for row in step.rows])
        keep = torch.arange(T, device=out.device)[None, :] <= torch.tensor(cuts, device=out.device)[:, None]
        moved = ((out - expected).abs() * keep).max(dim=1)
        for i, (row, cut) in enumerate(zip(step.rows, cuts)):
            # the most telling first: a model that is not deterministic fails every comparison, one that
            # mixes rows fails the unchanged ones too, and one that behaves otherwise on a batch of one row
            # (a batch size that scoring never uses) may well be cheating in the others
            order = {"replay": 0, "alone": 3}.get(step.kind, 1 if cut == T - 1 else 2)
            found.append((order, step.kind, row, cut, torch.stack([moved.values[i], moved.indices[i].float()])))
    if not found:
        return
    values = torch.stack([f[4] for f in found]).cpu().tolist()  # one sync for all of them
    for (order, kind, row, cut, _), (change, position) in sorted(zip(found, values), key=lambda pair: pair[0][0]):
        if change <= CAUSAL_TOLERANCE:
            continue
        at = f"at position {int(position)} change by {change:.3g} nats"
        if order == 0:
            raise EvaluationRejected(f"the model gives different log-probabilities for the same batch twice "
                                     f"(row {row} {at}): its logits must be a function of its input")
        if order in (1, 3):
            where = "scored alone" if kind == "alone" else "scored among other rows"
            raise EvaluationRejected(f"the model's rows depend on the rest of their batch: row {row}'s log-probabilities "
                                     f"{at} when it is {where} than in its scoring pass", kind="batch_dependent")
        if order == 2:
            raise EvaluationRejected(f"the model is not causal: its log-probabilities {at} when only tokens "
                                     f"after {cut} change", kind="noncausal")


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
        self.host_rows = torch.from_numpy(eval_rows(self.enc, prepared.files(split), task.max_seq_len,
                                                    task.eval_tokens))
        self.rows = self.host_rows.to(device)
        if len(self.rows) == 0:
            raise ConfigError(f"the {split} split is too small for one row of {task.max_seq_len} tokens")
        counted = self.token_bytes[self.rows[:, 1:]]  # special tokens stand for no bytes and are not scored
        self.tokens, self.bytes = int((counted > 0).sum()), int(counted.sum())
        for module in _LOAD_MODULES:  # what torch.export.load imports on first use: ~1.5 s on 2 cores
            with contextlib.suppress(ImportError):
                importlib.import_module(module)

    def score(self, model_path: Path, seed: int | None = None) -> EvalResult:
        """The model's bits per byte on the split; EvaluationRejected when it may not be scored.
        Its `seconds` count from here: loading, checks and scoring. `seed` fixes the check passes
        (tests); by default they come from os.urandom."""
        started = time.monotonic()
        rng = random.Random(int.from_bytes(os.urandom(16), "little") if seed is None else seed)
        rows, n_vocab, device = self.rows, self.enc.n_vocab, torch.device(self.device)
        if device.type == "cuda":  # a graph that asks for more gets torch.OutOfMemoryError
            free, total = torch.cuda.mem_get_info(device)
            share = (torch.cuda.memory_reserved(device) + GPU_MEMORY_SHARE * free) / total
            torch.cuda.set_per_process_memory_fraction(min(1.0, share), device)
        forward = load_program(model_path, self.device)
        batch = rows_per_pass(self.seq_len, n_vocab, self.device)
        began = time.monotonic()
        passes = plan_passes(self.host_rows, batch, rng, alone=device.type == "cpu")
        checking = time.monotonic() - began  # the checks' time: planning, their passes, the comparisons
        outputs: list[torch.Tensor] = []
        sums: dict[int, torch.Tensor] = {}
        with torch.no_grad():
            for step in passes:
                began = time.monotonic()
                torch.manual_seed(rng.getrandbits(63))  # a random op's numbers say nothing about earlier passes
                x, y = _batch(rows, step)
                nats = _nats(forward, x, y, n_vocab)
                outputs.append(nats)
                if step.kind == "score":  # sums stay on the device (float64, exact enough for 10^8 tokens)
                    sums[step.rows[0]] = (nats * (self.token_bytes[y] > 0)).sum(dtype=torch.float64)
                else:
                    checking += time.monotonic() - began
            began = time.monotonic()
            verdict(passes, outputs, rows.shape[1] - 1)
            checking += time.monotonic() - began
            total_nats = torch.zeros((), dtype=torch.float64, device=rows.device)
            for start in sorted(sums):  # in the order of the rows, whatever the order of the passes
                total_nats += sums[start]
        bpb = float(total_nats) / (math.log(2) * self.bytes)
        return EvalResult(self.split, bpb, self.tokens, self.bytes, time.monotonic() - started, self.fingerprint,
                          causal_seconds=checking)


def evaluate_model(model_path: Path, lab: Path, split: str = "val", device: str = "cpu") -> EvalResult:
    """Score a saved model on the lab's pinned split; EvaluationRejected when it may not be scored.

    The lab's [task] table fixes the dataset, context length and number of tokens.
    """
    return Scorer(lab, split, device).score(model_path)


def default_memory_limit() -> int:
    """What an evaluation may take beyond the prepared evaluator: half the RAM, at most EVAL_MEMORY_CAP."""
    return min(psutil.virtual_memory().total // 2, EVAL_MEMORY_CAP)


def _limit_memory(limit: int, address_space: bool) -> None:
    """This process's side of the limits (see EvaluatorProcess): let the out-of-memory killer take it
    first, and on the CPU cap its address space at what it holds now plus `limit`."""
    with contextlib.suppress(OSError):
        Path("/proc/self/oom_score_adj").write_text("1000\n")
    if address_space:
        cap = psutil.Process().memory_info().vms + limit
        hard = resource.getrlimit(resource.RLIMIT_AS)[1]
        cap = cap if hard == resource.RLIM_INFINITY else min(cap, hard)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))  # the hard limit too: no model lifts it again


class EvaluatorProcess:
    """The evaluator in a subprocess of its own, started before there is a model to score.

    It prepares the split at once (importing torch, checking the split, tokenizing its rows: about
    a third of an evaluation at the cpu preset) and then waits for `score`, so that a lab's loop
    can start it with a run and only loading and scoring the model remain after the hand-off.

    The process starts in an empty temporary directory with PYTHONSAFEPATH set, so neither the
    lab's nor the handoff folder's files can shadow a module it imports; secrets are left out of
    its environment. `close` (or leaving the `with` block) ends it if it is still waiting.

    It runs outside the sandbox, so the model's appetite is bounded: once prepared, it may take
    `memory_limit` bytes more (default: `default_memory_limit`) to load and score the model.
    - On the CPU the process caps its own address space there (RLIMIT_AS, set by itself once the
      split is ready, so the cap is counted from what it holds then): an allocation past it fails
      at once, before any page is touched, and the model is rejected with kind oom.
    - On CUDA an address-space cap cannot be used (the driver reserves far more address space than
      it ever uses, and would not start), so the GPU side is torch's per-process memory fraction
      (GPU_MEMORY_SHARE of what is free at the hand-off; past it torch raises OutOfMemoryError: kind
      oom) and the host side a watchdog here: the process's resident memory is read every
      MEMORY_POLL seconds and past the limit it is killed (kind oom). RLIMIT_DATA was the other
      choice; whether the CUDA driver's own mappings count against it could not be checked here.
    The watchdog runs on every device (on the CPU the address-space cap comes first); `limit_address_space`
    (default: on the CPU only) turns the cap off to test it. The process also asks the kernel's
    out-of-memory killer to take it first (oom_score_adj 1000), so that a host short of memory loses
    the evaluation, never the loop.
    """

    def __init__(self, lab: Path, split: str = "val", device: str = "cpu",
                 extra_env: Mapping[str, str] | None = None, memory_limit: int | None = None,
                 limit_address_space: bool | None = None) -> None:
        package_root = str(Path(__file__).resolve().parent.parent)
        env = {k: v for k, v in os.environ.items() if not any(fnmatch.fnmatchcase(k.upper(), p.upper())
                                                               for p in SECRET_PATTERNS)}
        env.update(extra_env or {})  # the run's GPU: CUDA_VISIBLE_DEVICES and CUDA_DEVICE_ORDER
        env.update(PYTHONPATH=os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")])),
                   PYTHONSAFEPATH="1", TORCH_FORCE_WEIGHTS_ONLY_LOAD="1")
        self.split = split
        self.memory_limit = default_memory_limit() if memory_limit is None else int(memory_limit)
        if limit_address_space is None:
            limit_address_space = torch.device(device).type == "cpu"
        self._scratch = tempfile.TemporaryDirectory(prefix="autoresearch-eval-")
        self._out = Path(self._scratch.name) / RESULT
        self._log = open(Path(self._scratch.name) / "log", "w+")  # noqa: SIM115 - closed in close()
        command = [sys.executable, "-m", "autoresearch.evaluator", "--model", "-", "--lab", str(Path(lab).resolve()),
                   "--split", split, "--device", device, "--out", str(self._out),
                   "--memory-limit", str(self.memory_limit), "--address-space" if limit_address_space else "--no-address-space"]
        try:
            self._proc = subprocess.Popen(command, cwd=self._scratch.name, env=env, stdin=subprocess.PIPE,
                                          stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        except OSError:
            self._log.close()
            self._scratch.cleanup()
            raise

    def score(self, model_path: Path, timeout: float = 600.0) -> EvalResult | Rejection:
        """Hand the model over and wait for its score, at most `timeout` seconds from now.

        A Rejection when the model is refused, runs past `timeout` (kind timeout) or past the memory
        limit (kind oom), or takes the process down without a result (kind crash: the kernel's
        out-of-memory killer, a kernel fault); EvaluatorFailed
        when the evaluator reports a failure of its own (the cache is missing or does not match its
        manifest). Once only.
        """
        assert self._proc.stdin is not None and not self._proc.stdin.closed, "score() is called once"
        with contextlib.suppress(BrokenPipeError):  # it already failed while preparing: its result says why
            self._proc.stdin.write(f"{Path(model_path).resolve()}\n".encode())
            self._proc.stdin.close()
        code = self._wait(timeout)
        if isinstance(code, Rejection):
            self.close()
            return code
        try:
            result = json.loads(self._out.read_text())
        except (OSError, ValueError):
            self._log.seek(0)
            last = self._log.read()[-2000:].strip().splitlines()[-1:] or ["no output"]
            why = " (SIGKILL: most likely the kernel's out-of-memory killer)" if code == -signal.SIGKILL else ""
            return Rejection("crash", f"the evaluator died with status {code}{why} while scoring the model: {last[0]}")
        finally:
            self.close()
        if code == 0 and f"{self.split}_bpb" in result:
            return EvalResult(self.split, float(result[f"{self.split}_bpb"]), int(result["tokens"]),
                              int(result["bytes"]), float(result["seconds"]), str(result["fingerprint"]),
                              bool(result["causal"]), float(result.get("causal_seconds", 0.0)))
        if code == REJECTED:
            return Rejection(str(result.get("kind", "bad_model")), str(result.get("error")))
        raise EvaluatorFailed(f"the evaluator failed ({result.get('kind', 'error')}): {result.get('error')}")

    def _wait(self, timeout: float) -> int | Rejection:
        """The exit status, or a Rejection once it runs past `timeout` or its memory limit."""
        deadline = time.monotonic() + timeout
        try:
            cap = psutil.Process(self._proc.pid).memory_info().rss + self.memory_limit
        except psutil.Error:  # it has already ended
            cap = math.inf
        while True:
            try:
                return self._proc.wait(timeout=max(0.0, min(MEMORY_POLL, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                pass
            if time.monotonic() >= deadline:
                return Rejection("timeout", f"the evaluation took longer than {timeout:g}s")
            with contextlib.suppress(psutil.Error):
                rss = psutil.Process(self._proc.pid).memory_info().rss
                if rss > cap:
                    return Rejection("oom", f"the evaluator was stopped while scoring the model: it held "
                                            f"{rss / 2**30:.1f} GiB, past its limit ({self.memory_limit / 2**30:.1f} GiB "
                                            "more than before the model)")

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
                  device: str = "cpu", extra_env: Mapping[str, str] | None = None,
                  memory_limit: int | None = None) -> EvalResult | Rejection:
    """Score a model that already exists in an EvaluatorProcess of its own (see there), killed as a
    group at `timeout` or past `memory_limit`."""
    with EvaluatorProcess(lab, split, device, extra_env, memory_limit) as evaluator:
        return evaluator.score(model_path, timeout)


def main(argv: list[str] | None = None) -> int:
    """Score one saved model; print the result as JSON and write it to --out."""
    parser = argparse.ArgumentParser(prog="python -m autoresearch.evaluator", description=main.__doc__)
    parser.add_argument("--model", required=True,
                        help=f"the {MODEL} that evaluate_bpb saved, or - to prepare the split first and then "
                             "read the model's path from standard input (an empty line: nothing to score)")
    parser.add_argument("--lab", type=Path, required=True, help="the lab whose autoresearch.toml fixes the task")
    parser.add_argument("--split", choices=("val", "test"), default="val")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    parser.add_argument("--memory-limit", type=int, default=None,
                        help="bytes the evaluation may take once the split is ready (default: half the RAM, at most 16 GiB)")
    parser.add_argument("--address-space", action=argparse.BooleanOptionalAction, default=None,
                        help="enforce the memory limit as an address-space limit (default: on the CPU)")
    args = parser.parse_args(argv)
    status = 0
    try:
        scorer = Scorer(args.lab, args.split, args.device)
        address_space = torch.device(args.device).type == "cpu" if args.address_space is None else args.address_space
        _limit_memory(default_memory_limit() if args.memory_limit is None else args.memory_limit, address_space)
        model = sys.stdin.readline().strip() if args.model == "-" else args.model
        if not model:
            return 0
        result: dict[str, Any] = scorer.score(Path(model)).to_json()
    except EvaluationRejected as exc:
        result, status = {"error": str(exc), "kind": exc.kind}, REJECTED
    except MemoryError:  # in our own code, past the address-space limit
        result, status = {"error": "the model needs more memory than the evaluator may use", "kind": "oom"}, REJECTED
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
