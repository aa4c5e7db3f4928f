"""Models that try to fool the trusted evaluator's checks, and the limits it runs under.

Each attack is written from its description (issue 13, items 2, 3 and 10) and must be rejected with
a clear reason: (a) a look-ahead hidden under a huge softmax-invariant constant, (b) a look-ahead
only in batches that look like scoring batches, (c) rows that depend on the rest of their batch,
(d) a graph that materialises a huge intermediate; also graphs that keep state between passes (a
counter, random numbers, uninitialised memory). Honest models score exactly as they did.
"""

from __future__ import annotations

import difflib
import math
import random
import subprocess
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autoresearch.evaluator import (CAUSAL_CUTS, EvalResult, EvaluationRejected, EvaluatorProcess, Rejection, Scorer,
                                    check_stateless, evaluate_model, load_program, plan_passes, rows_per_pass,
                                    run_evaluator)
from autoresearch.ledger import Ledger
from conftest import import_prepare, prepared_tiny_lab, run_cli
from test_evaluator import Mixer, export, vocab


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, shared_cache: Path) -> Path:
    return prepared_tiny_lab(tmp_path_factory.mktemp("adversarial-eval"), shared_cache)


@pytest.fixture(autouse=True)
def _shared_cache(monkeypatch: pytest.MonkeyPatch, shared_cache: Path) -> None:
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(shared_cache))


@pytest.fixture(scope="module")
def prepare(lab: Path) -> ModuleType:
    return import_prepare(lab, "adversarial_eval_prepare")


def plain_bpb(path: Path, lab: Path) -> float:
    """The score as the evaluator computed it before it had any check: consecutive passes of
    rows_per_pass rows, float64 sums in row order."""
    scorer = Scorer(lab)
    forward = load_program(path, "cpu")
    rows, batch = scorer.rows, rows_per_pass(scorer.seq_len, scorer.enc.n_vocab)
    total, nbytes = torch.zeros((), dtype=torch.float64), 0
    with torch.no_grad():
        for start in range(0, len(rows), batch):
            x, y = rows[start : start + batch, :-1], rows[start : start + batch, 1:]
            nats = -forward(x).float().log_softmax(-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
            counted = scorer.token_bytes[y]
            total += (nats * (counted > 0)).sum(dtype=torch.float64)
            nbytes += int(counted.sum())
    return float(total) / (math.log(2) * nbytes)


class LookAhead(Mixer):
    """Mixer 'left' plus `bonus` on the logit of the next input token, where `gate` lets it.

    constant: added to every logit (changes no probability, only the largest |logit|);
    gate "always"; "scoring": only in a batch of `scoring` rows none of which is repeated, which
    is what the old check's batches were not (each of its 2 rows 63 times, 126 rows a batch)."""

    def __init__(self, vocab: int, constant: float = 0.0, gate: str = "always", scoring: int = 64) -> None:
        super().__init__(vocab)
        self.constant, self.gate, self.scoring = constant, gate, scoring

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
        logits = super().forward(idx)
        following = F.one_hot(idx[:, 1:], logits.shape[-1]).float()
        ahead = torch.cat([following, torch.zeros_like(following[:, :1])], dim=1) * 5.0
        if self.gate == "scoring":
            twins = (idx[:, None, :] == idx[None, :, :]).all(-1).float().sum() - idx.shape[0]
            size = torch.ones((), device=idx.device) * idx.shape[0]
            ahead = ahead * ((twins == 0) & (size == self.scoring)).float()
        return logits + ahead + self.constant


class BatchMean(Mixer):
    """Causal within each row, but every row's hidden state takes in the mean over the batch."""

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
        h = self.emb(idx)
        h = h + h.cumsum(1) / torch.arange(1, idx.size(1) + 1, device=idx.device)[None, :, None]
        return self.head(h + h.mean(0, keepdim=True))


class Counter(Mixer):
    """Counts its calls in a buffer and looks ahead from the second one on (the old check ran first)."""

    def __init__(self, vocab: int) -> None:
        super().__init__(vocab)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
        self.calls.add_(1)
        logits = super().forward(idx)
        following = F.one_hot(idx[:, 1:], logits.shape[-1]).float()
        return logits + torch.cat([following, torch.zeros_like(following[:, :1])], dim=1) * 5.0 * (self.calls > 1)


class Leftovers(Mixer):
    """Adds memory it never wrote (torch.empty) or random numbers to its logits."""

    def __init__(self, vocab: int, source: str) -> None:
        super().__init__(vocab)
        self.source = source

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
        logits = super().forward(idx)
        extra = torch.empty_like(logits) if self.source == "empty" else torch.rand_like(logits)
        return logits + extra


class Bomb(Mixer):
    """Honest logits, after materialising a (B, T, V, k * B) intermediate."""

    def __init__(self, vocab: int, k: int) -> None:
        super().__init__(vocab)
        self.k = k

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
        logits = super().forward(idx)
        huge = logits[..., None].expand(*logits.shape, self.k * idx.shape[0]).contiguous()
        return logits + huge.sum(-1) * 0


# ---------------------------------------------------------------------------
# The plan: check passes look like scoring passes
# ---------------------------------------------------------------------------


def split_rows(n: int, T: int, seed: int = 0) -> torch.Tensor:
    """(n, T + 1) token rows that start with BOS (id 0), like the packed split."""
    rows = torch.randint(1, 512, (n, T + 1), generator=torch.Generator().manual_seed(seed))
    rows[:, 0] = 0
    return rows


@pytest.mark.parametrize(("n", "T", "batch"), [(128, 256, 4), (64, 64, 128), (130, 64, 8)])
def test_check_passes_have_the_scoring_passes_shape_and_makeup(n: int, T: int, batch: int) -> None:
    rows = split_rows(n, T)
    passes = plan_passes(rows, batch, random.Random(1))
    size = min(batch, n)
    scoring = [p for p in passes if p.kind == "score"]
    assert sorted(r for p in scoring for r in p.rows) == list(range(n))  # every row scored once ...
    assert all(list(p.rows) == list(range(p.rows[0], p.rows[0] + len(p.rows))) for p in scoring)  # ... in order
    full = n if n <= batch else n // batch * batch
    short = set(range(full, n))  # the short last pass's rows: checked in a pass of their own, of its size
    cuts: list[int] = []
    for p in passes:
        assert len(set(p.rows)) == len(p.rows)  # no row twice in a batch
        if p.kind == "score":
            continue
        if p.kind == "check" and set(p.rows) == short:
            assert sum(c < T - 1 for c in p.cuts) > 0
            continue
        assert len(p.rows) == (1 if p.kind == "alone" else size) and max(p.rows) < full
        if p.kind != "check":
            continue
        x = torch.stack([rows[r, :-1].clone() for r in p.rows])
        for i, (row, cut, donor, offset) in enumerate(zip(p.rows, p.cuts, p.donors, p.offsets)):
            if cut == T - 1:
                continue
            cuts.append(cut)
            x[i, cut + 1 :] = rows[donor, offset : offset + T - cut - 1]
            assert donor != row and x[i, cut + 1] != rows[row, cut + 1]  # a real row's tokens, another next token
            assert donor not in p.rows or n <= batch
        assert len({tuple(r.tolist()) for r in x}) == len(x)  # no two rows of the pass equal
    assert len(cuts) == len(set(cuts)) == min(CAUSAL_CUTS, T - 1) and {0, T - 2} <= set(cuts)
    assert [p.kind for p in passes].count("replay") == 1 and [p.kind for p in passes].count("alone") == 2
    first = [[p.kind for p in plan_passes(rows, batch, random.Random(seed))].index("score") for seed in range(10)]
    assert len(set(first)) > 1  # checks come before, among and after the scoring passes, in a random order
    again = plan_passes(rows, batch, random.Random(1))
    assert again == passes and plan_passes(rows, batch, random.Random(2)) != passes
    assert not [p for p in plan_passes(rows, batch, random.Random(1), alone=False) if p.kind == "alone"]


def test_every_position_is_cut_when_the_rows_are_short() -> None:
    passes = plan_passes(split_rows(64, 64), 64, random.Random(3))
    cuts = {c for p in passes if p.kind == "check" for c in p.cuts}
    assert cuts == set(range(64))  # 0 .. T - 2 replaced once each, T - 1: rows left whole


# ---------------------------------------------------------------------------
# Graphs that keep state between passes
# ---------------------------------------------------------------------------


class Stateful(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.register_buffer("seen", torch.zeros(4))
        self.plain = torch.zeros(4)  # a plain attribute: a lifted constant
        self.weight = nn.Parameter(torch.ones(4), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float() * 2
        if self.how == "in place":
            self.seen.add_(1)
        elif self.how == "through a view":
            self.seen[1:3].mul_(h[0, :2])
        elif self.how == "copy":
            self.plain.copy_(h[0])
        elif self.how == "index":
            self.weight[0] = h[0, 0]
        elif self.how == "reshaped":
            self.seen.reshape(2, 2).transpose(0, 1)[0].add_(1)
        elif self.how == "cast":  # to() its own dtype returns the weight itself
            self.weight.to(torch.float32).mul_(2)
        elif self.how == "scratch":  # in place on its own intermediates (a cast to bf16 is a copy): fine
            h.add_(1).mul_(self.seen + self.weight + self.plain)
            h = h + self.weight.to(torch.bfloat16).mul_(2).float()
        return h + self.seen


@pytest.mark.parametrize("how", ["in place", "through a view", "copy", "index", "reshaped", "cast"])
def test_a_graph_that_writes_into_its_weights_is_refused(how: str) -> None:
    with torch.no_grad():
        program = torch.export.export(Stateful(how), (torch.zeros(2, 4),))
    with pytest.raises(EvaluationRejected, match="writes into .*keeping no state"):
        check_stateless(program)


def test_a_graph_that_writes_only_into_its_own_intermediates_is_accepted() -> None:
    with torch.no_grad():
        program = torch.export.export(Stateful("scratch"), (torch.zeros(2, 4),))
    check_stateless(program)


# ---------------------------------------------------------------------------
# Scored models (tiny-preset lab)
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_an_honest_model_scores_as_it_did_before_the_checks(prepare: ModuleType, lab: Path, tmp_path: Path) -> None:
    path = export(prepare, Mixer(vocab(prepare)), tmp_path / "model.pt2")
    scorer = Scorer(lab)
    first, second = scorer.score(path, seed=1), scorer.score(path, seed=2)
    assert first.bpb == second.bpb == plain_bpb(path, lab)  # bit for bit, whatever the order of the passes
    assert 0 < first.causal_seconds < first.seconds


@pytest.mark.slow
@pytest.mark.parametrize(("name", "model", "kind", "message"), [
    ("a huge constant", lambda v: LookAhead(v, constant=1e6), "noncausal", "not causal: its log-probabilities at position"),
    ("b scoring batches only", lambda v: LookAhead(v, gate="scoring"), "noncausal", "not causal"),
    ("c batch mean", BatchMean, "batch_dependent", "depend on the rest of their batch"),
    ("counter", Counter, "bad_model", "writes into model.calls"),
    ("random numbers", lambda v: Leftovers(v, "rand"), "bad_model", "same batch twice"),
])
def test_an_attack_on_the_checks_is_rejected(prepare: ModuleType, lab: Path, tmp_path: Path,
                                             name: str, model, kind: str, message: str) -> None:
    path = export(prepare, model(vocab(prepare)), tmp_path / "model.pt2")
    if name[0] in "ab":  # a real gain: what it would score if nothing checked it
        honest = export(prepare, Mixer(vocab(prepare)), tmp_path / "honest.pt2")
        assert plain_bpb(path, lab) < plain_bpb(honest, lab) - 1.0
    for seed in (1, 2, 3):
        with pytest.raises(EvaluationRejected, match=message) as caught:
            Scorer(lab).score(path, seed=seed)
        assert caught.value.kind == kind
    rejection = run_evaluator(path, lab, "val", timeout=120)  # the evaluator's own process, seeded from os.urandom
    assert isinstance(rejection, Rejection) and rejection.kind == kind and message.split(":")[0] in rejection.error


@pytest.mark.slow
def test_uninitialised_memory_reads_as_zeros(prepare: ModuleType, lab: Path, tmp_path: Path) -> None:
    honest = evaluate_model(export(prepare, Mixer(vocab(prepare)), tmp_path / "honest.pt2"), lab)
    leftovers = evaluate_model(export(prepare, Leftovers(vocab(prepare), "empty"), tmp_path / "empty.pt2"), lab)
    assert leftovers.bpb == honest.bpb


# ---------------------------------------------------------------------------
# Memory limits
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_a_memory_bomb_is_stopped_by_the_address_space_limit(prepare: ModuleType, lab: Path, tmp_path: Path) -> None:
    # 64 rows x 64 x 512 x (8 x 64) fp32: a 4 GiB intermediate against 1 GiB allowed; it fails before
    # a page is touched, and the next evaluation in a fresh process is unaffected
    path = export(prepare, Bomb(vocab(prepare), 8), tmp_path / "bomb.pt2")
    rejection = run_evaluator(path, lab, "val", timeout=120, memory_limit=1 << 30)
    assert isinstance(rejection, Rejection) and rejection.kind == "oom", rejection
    assert "needs more memory than the evaluator may use" in rejection.error
    honest = run_evaluator(export(prepare, Mixer(vocab(prepare)), tmp_path / "honest.pt2"), lab, "val", timeout=120,
                           memory_limit=1 << 30)
    assert isinstance(honest, EvalResult)


@pytest.mark.slow
def test_a_memory_bomb_is_stopped_by_the_watchdog_without_an_address_space_limit(prepare: ModuleType, lab: Path,
                                                                                  tmp_path: Path) -> None:
    # the CUDA arrangement, on the CPU: no address-space cap, resident memory watched from outside;
    # the 4 GiB are written as they are allocated, and the process is killed at ~0.5 GiB more
    path = export(prepare, Bomb(vocab(prepare), 8), tmp_path / "bomb.pt2")
    with EvaluatorProcess(lab, memory_limit=1 << 29, limit_address_space=False) as evaluator:
        rejection = evaluator.score(path, timeout=120)
    assert isinstance(rejection, Rejection) and rejection.kind == "oom", rejection
    assert "stopped while scoring the model" in rejection.error and "0.5 GiB more" in rejection.error


@pytest.mark.slow
def test_a_memory_bomb_from_train_py_ends_its_run_invalid(tmp_path: Path, shared_cache: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # end to end, with the default limit: the intermediate is (B, T, V, 512 B) in fp32, 256 MiB in the
    # run's own hand-off (B = 2) and 256 GiB in the evaluator's passes of 64 rows
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(shared_cache))
    assert run_cli("init", "lab", "--preset", "tiny", "--budget", "2", cwd=tmp_path).returncode == 0
    lab = tmp_path / "lab"
    toml = lab / "autoresearch.toml"
    toml.write_text(toml.read_text().replace("startup_allowance = 60", "startup_allowance = 20")
                    .replace('mode = "noise"', 'mode = "strict"'))
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "limits"], cwd=lab, check=True)
    assert run_cli("prepare", cwd=lab).returncode == 0
    train = (lab / "train.py").read_text()
    anchor = "            return softcap_logits(x, self.lm_head.weight, softcap).mul_(2 * softcap).sub_(softcap)\n"
    assert train.count(anchor) == 1
    bomb = train.replace(anchor, anchor.replace("return ", "logits = ") +
                         "            return logits + logits[..., None].expand(*logits.shape, 512 * B).contiguous().sum(-1) * 0\n")
    patches = tmp_path / "patches"
    patches.mkdir()
    body = "".join(difflib.unified_diff(train.splitlines(True), bomb.splitlines(True), "a/train.py", "b/train.py"))
    (patches / "00.patch").write_text(f"materialise a huge intermediate\n\n{body}")
    proc = run_cli("run", "--agent", f"patches:{patches}", "--plain", "--tag", "bomb", cwd=lab)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with Ledger(lab / ".autoresearch" / "ledger.db") as ledger:
        rows = ledger.experiments("bomb")
    base = next(e for e in rows if e.kind == "baseline")
    attack = next(e for e in rows if e.kind == "experiment")
    assert base.status == "keep"
    assert attack.status == "invalid" and "oom" in (attack.reason or "") and "memory" in (attack.reason or ""), attack
    branch = subprocess.run(["git", "rev-parse", "autoresearch/bomb"], cwd=lab, capture_output=True, text=True, check=True)
    assert branch.stdout.strip() == base.commit_sha

