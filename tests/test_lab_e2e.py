"""End to end as a user runs it: init, prepare, train, on the tiny preset with budgets of seconds."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, run_cli

pytestmark = pytest.mark.slow

# A train.py written for the original autoresearch: it uses exactly the original's public names.
ORIGINAL_STYLE_TRAIN = '''
import time
import torch
import torch.nn as nn
import torch.nn.functional as F
from prepare import MAX_SEQ_LEN, TIME_BUDGET, Tokenizer, make_dataloader, evaluate_bpb, get_token_bytes

class Bigram(nn.Module):
    def __init__(self, vocab):
        super().__init__()
        self.table = nn.Embedding(vocab, vocab)
    def forward(self, idx, targets=None, reduction="mean"):
        logits = self.table(idx)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), reduction=reduction)

tokenizer = Tokenizer.from_directory()
token_bytes = get_token_bytes(device="cpu")
assert token_bytes.numel() == tokenizer.get_vocab_size()
model = Bigram(tokenizer.get_vocab_size())
opt = torch.optim.AdamW(model.parameters(), lr=0.1)
loader = make_dataloader(tokenizer, 8, MAX_SEQ_LEN, "train")
x, y, epoch = next(loader)
assert x.shape == (8, MAX_SEQ_LEN) and (x[:, 0] == tokenizer.get_bos_token_id()).all()
untrained = evaluate_bpb(model, tokenizer, 16)
steps, t0 = 0, time.time()  # the budget is for training: a loaded machine can take it all to get here
while time.time() - t0 < TIME_BUDGET:
    loss = model(x, y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    x, y, epoch = next(loader)
    steps += 1
val_bpb = evaluate_bpb(model, tokenizer, 16)
print("---")
print(f"val_bpb:          {val_bpb:.6f}")
print(f"untrained_bpb:    {untrained:.6f}")
print(f"num_steps:        {steps}")
'''


def summary(text: str) -> dict[str, float]:
    out = {}
    for line in text.split("---")[-1].splitlines():
        if ":" in line:
            key, value = line.split(":", 1)
            try:
                out[key.strip()] = float(value)
            except ValueError:
                pass
    return out


@pytest.fixture
def lab(tmp_path: Path, shared_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(shared_cache))
    proc = run_cli("init", "lab", "--preset", "tiny", "--budget", "4", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("prepare", cwd=tmp_path / "lab")
    assert proc.returncode == 0, proc.stderr
    return tmp_path / "lab"


def test_prepare_is_idempotent(lab: Path) -> None:
    proc = run_cli("prepare", cwd=lab)
    assert proc.returncode == 0 and "Ready: sotu" in proc.stdout


def test_train_prints_the_summary_block_and_learns(lab: Path) -> None:
    proc = run_cli("train", cwd=lab)
    assert proc.returncode == 0, proc.stderr[-2000:]
    fields = summary(proc.stdout)
    for key in ("val_bpb", "training_seconds", "total_seconds", "peak_vram_mb", "mfu_percent",
                "total_tokens_M", "num_steps", "num_params_M", "depth"):
        assert key in fields, key
    assert math.isfinite(fields["val_bpb"]) and 0 < fields["val_bpb"] < 9  # log2(512) per byte is the ceiling
    assert fields["num_steps"] > 1 and fields["depth"] == 2
    # python train.py directly, as a person would, gives the same summary format
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "AUTORESEARCH_BUDGET": "1"}
    direct = subprocess.run([sys.executable, "train.py"], cwd=lab, env=env, capture_output=True, text=True, timeout=300)
    assert direct.returncode == 0, direct.stderr[-2000:]
    assert "val_bpb" in summary(direct.stdout)


def test_a_train_py_written_for_the_original_works(lab: Path) -> None:
    (lab / "train.py").write_text(ORIGINAL_STYLE_TRAIN)
    proc = run_cli("train", "--budget", "3", cwd=lab)
    assert proc.returncode == 0, proc.stderr[-2000:]
    fields = summary(proc.stdout)
    assert fields["num_steps"] > 5
    assert fields["val_bpb"] < fields["untrained_bpb"]  # training helped, measured the same way


def test_evaluation_is_deterministic_and_batch_size_independent(lab: Path) -> None:
    script = '''
import torch, torch.nn as nn, torch.nn.functional as F
from prepare import Tokenizer, evaluate_bpb
torch.manual_seed(0)
class M(nn.Module):
    def __init__(s, v):
        super().__init__(); s.e = nn.Embedding(v, v)
    def forward(s, x, y, reduction="mean"):
        return F.cross_entropy(s.e(x).flatten(0, 1), y.flatten(), reduction=reduction)
tok = Tokenizer.from_directory()
m = M(tok.get_vocab_size())
print(repr(evaluate_bpb(m, tok, 4)), repr(evaluate_bpb(m, tok, 4)), repr(evaluate_bpb(m, tok, 7)))
'''
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run([sys.executable, "-c", script], cwd=lab, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    a, b, c = (float(v) for v in proc.stdout.split())
    assert a == b
    assert c == pytest.approx(a, rel=1e-5)  # same rows whatever the batch size


def test_corrupt_cache_is_reported_then_repaired(lab: Path, shared_cache: Path) -> None:
    val = next((shared_cache / "sotu" / "shards").glob("val*.parquet"))
    original = val.read_bytes()
    try:
        val.write_bytes(original[: len(original) // 2])
        proc = run_cli("train", "--budget", "1", cwd=lab)
        assert proc.returncode != 0
        assert "error:" in proc.stderr and "prepare" in proc.stderr and "Traceback" not in proc.stderr
        proc = run_cli("prepare", cwd=lab)
        assert proc.returncode == 0, proc.stderr
        assert val.read_bytes() == original  # rebuilt from the package, bit for bit
    finally:
        val.write_bytes(original)


def test_demo(tmp_path: Path, shared_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(shared_cache))
    proc = run_cli("demo", "demo", "--preset", "tiny", "--budget", "2", "--experiments", "2", "--plain", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    demo = tmp_path / "demo"
    assert (demo / "progress.png").stat().st_size > 10_000
    assert "baseline val_bpb" in (demo / "report.md").read_text()
    rows = (demo / "results.tsv").read_text().splitlines()
    assert len(rows) == 4 and rows[1].split("\t")[3] == "keep"
    proc = run_cli("status", "--json", cwd=demo)
    import json

    data = json.loads(proc.stdout)["experiments"]
    base = data[0]
    assert base["kind"] == "baseline" and base["sandbox"] == "bwrap"
    assert base["test_metric"] is not None and 0 < base["test_metric"] < 9  # held out, measured for champions
    assert base["printed_metric"] == pytest.approx(base["metric"], rel=1e-4)  # the run printed the trusted value
    assert base["handoff_seconds"] is not None and base["handoff_seconds"] < 2 + 60
    assert "held-out test split" in (demo / "report.md").read_text()


def test_an_epoch_of_the_split_sees_nearly_every_token(lab: Path) -> None:
    """Long speeches at a 64-token context: packing must keep (nearly) all of them, not crop."""
    script = '''
import itertools
from prepare import Tokenizer, packed_rows, _prepared
from autoresearch.data import iter_texts
tok = Tokenizer.from_directory()
bos = tok.get_bos_token_id()
source = sum(len(ids) for ids in tok.encode(list(iter_texts(_prepared().files("val")))))
rows = [row for row, _ in packed_rows(tok, 64, "val", one_pass=True)]
packed = sum(int((row != bos).sum()) for row in rows)
assert all(row[0] == bos for row in rows) and all(len(row) == 65 for row in rows)
print(source, packed)
'''
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run([sys.executable, "-c", script], cwd=lab, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    source, packed = (int(v) for v in proc.stdout.split())
    assert source > 50_000  # the sotu validation split: several whole speeches
    assert packed / source > 0.99  # paragraph splitting may retokenize a boundary; nothing is dropped


def test_loop_rejects_a_frozen_edit_and_survives_a_deleted_train_py(lab: Path, tmp_path: Path) -> None:
    import difflib

    prepare = (lab / "prepare.py").read_text()
    train = (lab / "train.py").read_text()
    hacked = prepare.replace("TRAIN_SEED = 1337", "TRAIN_SEED = 1")
    patches = tmp_path / "patches"
    patches.mkdir()
    edit = "".join(difflib.unified_diff(prepare.splitlines(True), hacked.splitlines(True), "a/prepare.py", "b/prepare.py"))
    (patches / "1.patch").write_text("edit prepare.py\n\n" + edit)
    gone = "".join(difflib.unified_diff(train.splitlines(True), [], "a/train.py", "/dev/null"))
    (patches / "2.patch").write_text("delete train.py\n\n" + gone)
    proc = run_cli("run", "--agent", f"patches:{patches}", "--budget", "2", "--plain", "--tag", "faults", cwd=lab)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from autoresearch.ledger import Ledger

    with Ledger(lab / ".autoresearch" / "ledger.db") as ledger:
        rows = [e for e in ledger.experiments("faults") if e.kind != "repeat"]
    assert [e.status for e in rows] == ["keep", "invalid", "crash"]
    assert "prepare.py" in (rows[1].reason or "")
    assert "train.py" in (rows[2].reason or "")
