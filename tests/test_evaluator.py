"""The trusted evaluator and prepare.py's side of the handoff, on a tiny-preset lab.

Models are built here, exported with torch.export like prepare.hand_off does, and scored both ways.
The adversarial ones look ahead, lie about their loss, return the wrong shape or NaN, call a custom
operator, or arrive as a doctored archive.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import pathlib
import pickle
import resource
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from autoresearch.errors import CacheCorrupt
from autoresearch.evaluator import (EvalResult, EvaluationRejected, EvaluatorFailed, EvaluatorProcess, Rejection,
                                   evaluate_model, run_evaluator)
from conftest import REPO, import_prepare, prepared_tiny_lab

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, shared_cache: Path) -> Path:
    return prepared_tiny_lab(tmp_path_factory.mktemp("evaluator"), shared_cache)


@pytest.fixture(autouse=True)
def _shared_cache(monkeypatch: pytest.MonkeyPatch, shared_cache: Path) -> None:
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(shared_cache))


@pytest.fixture(scope="module")
def prepare(lab: Path) -> ModuleType:
    """The lab's frozen prepare.py, imported in this process under a name of its own."""
    return import_prepare(lab, "evaluator_test_prepare")


class Mixer(nn.Module):
    """Embedding, one way of mixing positions, a linear head; `mix` picks the way (causal or not)."""

    def __init__(self, vocab: int, mix: str = "left", out: int | None = None, dim: int = 16) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.mix = mix
        self.emb = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, out or vocab)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
        h = self.emb(idx)
        T = idx.size(1)
        if self.mix == "left":  # running mean of the past: causal
            h = h + h.cumsum(1) / torch.arange(1, T + 1, device=idx.device)[None, :, None]
        elif self.mix == "right":  # running sum of the future
            h = h + h.flip(1).cumsum(1).flip(1) / T
        elif self.mix == "roll":  # the next token, the classic leak
            h = h + h.roll(-1, dims=1)
        elif self.mix == "attention":  # self-attention without the causal mask
            h = h + torch.softmax(h @ h.mT, dim=-1) @ h
        elif self.mix == "one_position":  # looks ahead at position 17 only
            ahead = torch.zeros_like(h)
            ahead[:, 17] = h[:, 18]
            h = h + ahead
        logits = self.head(h)
        if self.mix == "nan":
            logits = logits + torch.where(idx[..., None] == idx[0, 5], float("nan"), 0.0)
        if self.mix == "flat":
            logits = logits.sum(-1)
        if targets is None:
            return logits
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction=reduction)


def export(prepare: ModuleType, model: nn.Module, path: Path) -> Path:
    """What prepare.hand_off saves, without the waiting."""
    example = torch.randint(0, 512, (2, prepare.MAX_SEQ_LEN))
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    with torch.no_grad():
        program = torch.export.export(prepare._Forward(model.eval(), None), (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, path)
    return path


def rewrite(source: Path, target: Path, edit: Callable[[str, bytes], bytes]) -> Path:
    """Copy a .pt2 archive, passing each member's (name, bytes) through `edit`."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for info in old.infolist():
            new.writestr(info, edit(info.filename, old.read(info)))
    return target


def vocab(prepare: ModuleType) -> int:
    return int(prepare.Tokenizer.from_directory().get_vocab_size())


# ---------------------------------------------------------------------------
# Manual mode and the evaluator agree
# ---------------------------------------------------------------------------


def test_eval_rows_are_the_rows_the_dataloader_packs(prepare: ModuleType) -> None:
    from autoresearch.data.evalrows import eval_rows

    tok = prepare.Tokenizer.from_directory()
    wanted = prepare.EVAL_TOKENS // prepare.MAX_SEQ_LEN
    packed = [row for row, _ in itertools.islice(prepare.packed_rows(tok, prepare.MAX_SEQ_LEN, "val", one_pass=True), wanted)]
    rows = eval_rows(tok.enc, prepare._prepared().files("val"), prepare.MAX_SEQ_LEN, prepare.EVAL_TOKENS)
    assert rows.shape == (wanted, prepare.MAX_SEQ_LEN + 1)
    assert (rows == np.stack(packed)).all()


def test_manual_mode_is_unchanged_and_agrees_with_the_evaluator(prepare: ModuleType, lab: Path, tmp_path: Path) -> None:
    model = Mixer(vocab(prepare))
    tok = prepare.Tokenizer.from_directory()
    # the evaluation as it was before the evaluator existed, line for line
    token_bytes = prepare.get_token_bytes()
    rows = itertools.islice(prepare.packed_rows(tok, prepare.MAX_SEQ_LEN, "val", one_pass=True),
                            prepare.EVAL_TOKENS // prepare.MAX_SEQ_LEN)
    nats, nbytes_total = 0.0, 0
    with torch.no_grad():
        while chunk := [row for row, _ in itertools.islice(rows, 16)]:
            batch = torch.from_numpy(np.stack(chunk))
            x, y = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
            loss = model(x, y, reduction="none").reshape(-1).float()
            nbytes = token_bytes[y.reshape(-1)]
            nats += (loss * (nbytes > 0)).sum().item()
            nbytes_total += nbytes.sum().item()
    before = nats / (math.log(2) * nbytes_total)
    manual = prepare.evaluate_bpb(model, tok, 16)
    assert manual == before
    assert prepare.evaluate_bpb(model, tok, 5) == pytest.approx(manual, rel=1e-6)  # batch size does not matter
    result = evaluate_model(export(prepare, model, tmp_path / "model.pt2"), lab)
    assert result.bpb == pytest.approx(manual, rel=1e-4)
    assert result.causal and result.split == "val" and result.tokens > 0 and result.bytes > result.tokens
    assert result.fingerprint == prepare._prepared().fingerprint("val")


# ---------------------------------------------------------------------------
# The handoff: the run prints the evaluator's number, not its own
# ---------------------------------------------------------------------------

LIAR = '''
import torch, torch.nn as nn
from prepare import Tokenizer, evaluate_bpb
class Liar(nn.Module):
    """Honest logits, but a loss of zero whenever it is asked for one."""
    def __init__(self, vocab):
        super().__init__()
        torch.manual_seed(0)
        self.table = nn.Embedding(vocab, vocab)
    def forward(self, idx, targets=None, reduction="mean"):
        logits = self.table(idx)
        if targets is None:
            return logits
        return torch.zeros(targets.numel()) if reduction == "none" else logits.sum() * 0
tok = Tokenizer.from_directory()
print(f"val_bpb: {evaluate_bpb(Liar(tok.get_vocab_size()), tok, 8):.6f}")
'''


def play_orchestrator(command: list[str], lab: Path, handoff: Path, extra_env: dict[str, str]) -> tuple[EvalResult, str]:
    """Start the run, wait for `ready`, score model.pt2 in the evaluator, write result.json."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "AUTORESEARCH_HANDOFF": str(handoff), **extra_env}
    proc = subprocess.Popen(command, cwd=lab, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (handoff / "ready").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    ready = json.loads((handoff / "ready").read_text())
    assert ready["pid"] == proc.pid and ready["printed_by"] == "evaluate_bpb" and ready["n_params"] > 0
    result = run_evaluator(handoff / "model.pt2", lab, "val", timeout=120)
    assert isinstance(result, EvalResult), result
    (handoff / "result.json").write_text(json.dumps(result.to_json()))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    return result, out


def test_a_run_prints_the_trusted_value_not_its_own(lab: Path, tmp_path: Path) -> None:
    (lab / "liar.py").write_text(LIAR)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    alone = subprocess.run([sys.executable, "liar.py"], cwd=lab, env=env, capture_output=True, text=True, timeout=120)
    assert alone.stdout.strip() == "val_bpb: 0.000000", alone.stderr  # by hand, the lie works
    result, out = play_orchestrator([sys.executable, "liar.py"], lab, tmp_path, {})
    assert out.strip() == f"val_bpb: {result.bpb:.6f}" and result.bpb > 1.0


def test_the_real_train_py_hands_off(lab: Path, tmp_path: Path) -> None:
    result, out = play_orchestrator([sys.executable, "train.py"], lab, tmp_path, {"AUTORESEARCH_BUDGET": "1"})
    assert f"val_bpb:          {result.bpb:.6f}" in out
    assert 0 < result.bpb < 9


def test_a_model_the_evaluator_cannot_take_ends_the_run(lab: Path, tmp_path: Path) -> None:
    (lab / "flat.py").write_text(LIAR.replace("return logits\n", "return logits.sum(-1)\n"))
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "AUTORESEARCH_HANDOFF": str(tmp_path)}
    proc = subprocess.run([sys.executable, "flat.py"], cwd=lab, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: model(idx) must return logits of shape (B, T, V)")
    assert "(B, T, V)" in json.loads((tmp_path / "handoff-error.json").read_text())["error"]
    assert not (tmp_path / "ready").exists()
    (tmp_path / "ready").write_text("{}")  # a second hand-off in one run is refused, not answered with a stale result
    (lab / "liar.py").write_text(LIAR)
    proc = subprocess.run([sys.executable, "liar.py"], cwd=lab, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "once per run" in proc.stderr


# ---------------------------------------------------------------------------
# Rejected models
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("mix", ["roll", "right", "attention", "one_position"])
def test_a_model_that_looks_ahead_is_rejected(prepare: ModuleType, lab: Path, tmp_path: Path, mix: str) -> None:
    path = export(prepare, Mixer(vocab(prepare), mix), tmp_path / "model.pt2")
    with pytest.raises(EvaluationRejected, match="not causal") as caught:
        evaluate_model(path, lab)
    assert caught.value.kind == "noncausal"
    if mix == "one_position":
        assert "position 17 " in str(caught.value)


@pytest.mark.parametrize(("mix", "out", "message"), [
    ("flat", None, "must return logits"),
    ("left", 500, "V >= 512"),  # fewer columns than the tokenizer has tokens
    ("nan", None, "non-finite"),
])
def test_wrong_shapes_and_nan_are_bad_models(prepare: ModuleType, lab: Path, tmp_path: Path,
                                             mix: str, out: int | None, message: str) -> None:
    path = export(prepare, Mixer(vocab(prepare), mix, out=out), tmp_path / "model.pt2")
    with pytest.raises(EvaluationRejected, match=message) as caught:
        evaluate_model(path, lab)
    assert caught.value.kind == "bad_model"


def test_extra_logit_columns_take_probability_mass(prepare: ModuleType, lab: Path, tmp_path: Path) -> None:
    base = Mixer(vocab(prepare))
    wider = Mixer(vocab(prepare), out=vocab(prepare) + 64)
    with torch.no_grad():
        wider.emb.weight.copy_(base.emb.weight)
        wider.head.weight[: vocab(prepare)] = base.head.weight
        wider.head.bias[: vocab(prepare)] = base.head.bias
    a = evaluate_model(export(prepare, base, tmp_path / "a.pt2"), lab).bpb
    b = evaluate_model(export(prepare, wider, tmp_path / "b.pt2"), lab).bpb
    assert b > a  # scored over all V columns, not just the first n_vocab


def test_a_custom_operator_is_rejected(prepare: ModuleType, lab: Path, tmp_path: Path) -> None:
    @torch.library.custom_op("autoresearch_evaluator_test::scale", mutates_args=())
    def scale(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    @scale.register_fake
    def _(x: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(x)

    class Custom(Mixer):
        def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
            return scale(self.head(self.emb(idx)))

    path = export(prepare, Custom(vocab(prepare)), tmp_path / "model.pt2")
    with pytest.raises(EvaluationRejected, match="only ATen operators"):
        evaluate_model(path, lab)  # registered in this process, and still refused
    rejection = run_evaluator(path, lab, "val", timeout=120)  # the evaluator's own process never heard of it
    assert isinstance(rejection, Rejection) and rejection.kind == "bad_model"


class Boom:
    """Unpickling this touches a file: what a hostile archive would do with os.system instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return (pathlib.Path.touch, (self.marker,))


def test_doctored_archives_are_refused_before_torch_reads_them(prepare: ModuleType, lab: Path, tmp_path: Path) -> None:
    good = export(prepare, Mixer(vocab(prepare)), tmp_path / "good.pt2")
    marker = tmp_path / "pwned"

    def pickled_weight(name: str, data: bytes) -> bytes:
        if name.endswith("_weights_config.json"):
            config = json.loads(data)
            next(iter(config["config"].values()))["use_pickle"] = True
            return json.dumps(config).encode()
        return pickle.dumps(Boom(marker)) if name.endswith("data/weights/weight_0") else data

    def graph_text(old: str, new: str) -> Callable[[str, bytes], bytes]:
        return lambda name, data: data.replace(old.encode(), new.encode()) if name.endswith("models/model.json") else data

    cases = {
        "pickled object": pickled_weight,
        "calls 'torch.save'": graph_text('"torch.ops.aten.embedding.default"', '"torch.save"'),
        "unexpected": graph_text('.emb.weight"', '.emb.weight\\nimport os"'),
        "shape expression": graph_text("Symbol(", "__import__('pathlib').Path('%s').touch() or Symbol(" % marker),
        "does not load": lambda name, data: data,
    }
    for message, edit in cases.items():
        doctored = rewrite(good, tmp_path / "doctored.pt2", edit)
        if message == "does not load":
            with zipfile.ZipFile(doctored, "a") as archive:
                archive.writestr("good/data/aotinductor/model/model.so", b"\x7fELF")
        with pytest.raises(EvaluationRejected, match=message):
            evaluate_model(doctored, lab)
    assert not marker.exists()
    assert evaluate_model(good, lab).causal


# ---------------------------------------------------------------------------
# Data, process and command line
# ---------------------------------------------------------------------------


def test_a_corrupted_val_shard_is_a_data_error(prepare: ModuleType, lab: Path, tmp_path: Path, shared_cache: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    path = export(prepare, Mixer(vocab(prepare)), tmp_path / "model.pt2")
    cache = tmp_path / "cache"
    shutil.copytree(shared_cache, cache)
    val = next((cache / "sotu" / "shards").glob("val*.parquet"))
    data = bytearray(val.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the fingerprint check can see it
    val.write_bytes(bytes(data))
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(cache))
    with pytest.raises(CacheCorrupt, match="differs from the manifest"):
        evaluate_model(path, lab)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run([sys.executable, "-m", "autoresearch.evaluator", "--model", str(path), "--lab", str(lab)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert json.loads(proc.stdout.splitlines()[-1])["kind"] == "data"
    with EvaluatorProcess(lab) as evaluator:  # started before the model: fails while preparing, says so when asked
        with pytest.raises(EvaluatorFailed, match="differs from the manifest"):
            evaluator.score(path, timeout=120)


def test_the_evaluator_process_imports_nothing_from_the_lab_or_the_handoff(prepare: ModuleType, lab: Path,
                                                                         tmp_path: Path) -> None:
    handoff = tmp_path / "handoff"
    handoff.mkdir()
    path = export(prepare, Mixer(vocab(prepare), "roll"), handoff / "model.pt2")
    marker = tmp_path / "imported"
    plant = f"import pathlib; pathlib.Path({str(marker)!r}).touch()\n"
    train = (lab / "train.py").read_text()
    try:
        (lab / "train.py").write_text(plant)
        for name in ("json.py", "torch.py", "numpy.py", "train.py"):
            (handoff / name).write_text(plant)
        rejection = run_evaluator(path, lab, "val", timeout=120)
    finally:
        (lab / "train.py").write_text(train)
    assert isinstance(rejection, Rejection) and rejection.kind == "noncausal", rejection
    assert "position" in rejection.error
    assert not marker.exists()


def test_an_evaluation_past_its_time_limit_is_stopped_and_rejected(prepare: ModuleType, lab: Path,
                                                                  tmp_path: Path) -> None:
    path = export(prepare, Mixer(vocab(prepare)), tmp_path / "model.pt2")
    started = time.monotonic()
    rejection = run_evaluator(path, lab, "val", timeout=0.5)
    assert isinstance(rejection, Rejection) and rejection.kind == "timeout"
    assert time.monotonic() - started < 10


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def _wait_until_idle(pid: int, limit: float = 120) -> None:
    """Until the process has used no CPU for a second: it has prepared and waits for its model."""
    deadline, last = time.monotonic() + limit, -1
    while time.monotonic() < deadline:
        ticks = _cpu_ticks(pid)
        if ticks == last:
            return
        last = ticks
        time.sleep(1.0)
    raise AssertionError("the evaluator never settled")


def _children_cpu() -> float:
    """CPU seconds of this process's children that have ended and been waited for."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def test_an_evaluator_started_with_the_run_prepares_first_and_scores_faster(prepare: ModuleType, lab: Path,
                                                                            tmp_path: Path) -> None:
    # CPU seconds of the evaluator processes, not wall seconds (~1.2 s against ~2.9 s either way on a quiet
    # machine): another job that shares the cores during one of the two scorings only stretches wall time
    before = _children_cpu()
    with EvaluatorProcess(lab) as evaluator:
        _wait_until_idle(evaluator._proc.pid)  # the run trains meanwhile: the model does not exist yet
        path = export(prepare, Mixer(vocab(prepare)), tmp_path / "model.pt2")
        prepared = _cpu_ticks(evaluator._proc.pid) / os.sysconf("SC_CLK_TCK")
        warm = evaluator.score(path, timeout=120)
    warm_cpu = _children_cpu() - before - prepared  # from the model's hand-off to the evaluator's exit
    before = _children_cpu()
    cold = run_evaluator(path, lab, "val", timeout=120)
    cold_cpu = _children_cpu() - before
    assert isinstance(warm, EvalResult) and isinstance(cold, EvalResult), (warm, cold)
    assert warm.bpb == cold.bpb == evaluate_model(path, lab).bpb
    assert warm_cpu < 0.8 * cold_cpu, (warm_cpu, cold_cpu)  # no interpreter, torch or split to load


def test_an_evaluator_never_handed_a_model_leaves_nothing_behind(lab: Path) -> None:
    evaluator = EvaluatorProcess(lab)
    pid, scratch = evaluator._proc.pid, Path(evaluator._scratch.name)
    evaluator.close()  # the run crashed before its hand-off
    assert evaluator._proc.returncode is not None and not scratch.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    evaluator = EvaluatorProcess(lab)  # the orchestrator died: standard input ends and so does the evaluator
    try:
        assert evaluator._proc.stdin is not None
        evaluator._proc.stdin.close()
        assert evaluator._proc.wait(timeout=120) == 0
        assert not Path(evaluator._out).exists()
    finally:
        evaluator.close()
