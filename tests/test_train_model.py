"""The lab template's train.py as a library: model, loss, attention, optimizer, schedule.

train.py is imported as a module with a stand-in `prepare` (the real one needs a prepared lab),
which also proves that importing it does not train.
"""

from __future__ import annotations

import ast
import importlib.util
import math
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

TRAIN_PY = Path(__file__).resolve().parent.parent / "src" / "autoresearch" / "template" / "train.py"
CALLS: list[str] = []


def _stub_prepare() -> types.ModuleType:
    """A `prepare` module with the names train.py imports; every entry point records its call."""
    mod = types.ModuleType("prepare")

    def record(name):
        def fn(*args, **kwargs):
            CALLS.append(name)
            raise AssertionError(f"prepare.{name} called at import time")
        return fn

    class Tokenizer:
        from_directory = staticmethod(record("Tokenizer.from_directory"))

    mod.MAX_SEQ_LEN = 64
    mod.TIME_BUDGET = 1.0
    mod.Tokenizer = Tokenizer
    mod.make_dataloader = record("make_dataloader")
    mod.evaluate_bpb = record("evaluate_bpb")
    mod.get_token_bytes = record("get_token_bytes")
    mod.detect_device = record("detect_device")
    mod.peak_flops = record("peak_flops")
    mod.load_flash_attention = record("load_flash_attention")
    return mod


@pytest.fixture(scope="module")
def train():
    saved = sys.modules.get("prepare")
    sys.modules["prepare"] = _stub_prepare()
    try:
        spec = importlib.util.spec_from_file_location("template_train", TRAIN_PY)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        if saved is None:
            sys.modules.pop("prepare", None)
        else:
            sys.modules["prepare"] = saved
    return module


def make_model(train, *, T=32, V=97, depth=2, dim=64, heads=2, pattern="L", chunk=0, seed=0, dtype="float32"):
    torch.manual_seed(seed)
    config = train.GPTConfig(sequence_len=T, vocab_size=V, n_layer=depth, n_head=heads, n_kv_head=heads,
                             n_embd=dim, window_pattern=pattern, loss_chunk=chunk, compute_dtype=dtype)
    model = train.GPT(config)
    model.init_weights()
    # the init zeroes output projections and the value-embedding gates; randomise them so every
    # path carries signal in the tests below
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2 and not p.any():
                p.normal_(std=0.05)
    return model


def test_import_does_not_train(train):
    assert CALLS == []
    assert hasattr(train, "GPT") and hasattr(train, "MuonAdamW")


def test_hyperparameters_are_literals_in_one_section():
    """The search agent rewrites `NAME = literal` in place: every capitalised constant must parse
    with ast.literal_eval, and the preset names must be there."""
    tree = ast.parse(TRAIN_PY.read_text())
    constants = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if name.isupper() and name not in ("POLAR_EXPRESS", "FLASH_ATTN_3", "T_START"):
                constants[name] = ast.literal_eval(node.value)
    for name in ("DEPTH", "ASPECT_RATIO", "HEAD_DIM", "WINDOW_PATTERN", "TOTAL_BATCH_SIZE", "DEVICE_BATCH_SIZE",
                 "EMBEDDING_LR", "UNEMBEDDING_LR", "MATRIX_LR", "SCALAR_LR", "WEIGHT_DECAY", "ADAM_BETAS",
                 "WARMUP_RATIO", "WARMDOWN_RATIO", "FINAL_LR_FRAC"):
        assert name in constants, name
    assert constants["TOTAL_BATCH_SIZE"] % constants["DEVICE_BATCH_SIZE"] == 0


def test_forward_reductions(train):
    model = make_model(train)
    x = torch.randint(0, 97, (3, 32))
    y = torch.randint(0, 97, (3, 32))
    per_token = model(x, y, reduction="none")
    assert per_token.numel() == 3 * 32 and per_token.dtype == torch.float32
    mean = model(x, y)
    assert mean.ndim == 0
    torch.testing.assert_close(mean, per_token.mean())
    logits = model(x)
    assert logits.shape == (3, 32, 97)
    assert logits.abs().max() <= model.config.softcap
    torch.testing.assert_close(per_token, F.cross_entropy(logits.view(-1, 97), y.view(-1), reduction="none"))


@pytest.mark.parametrize("chunk", [7, 32, 1000])
def test_chunked_loss_matches_plain_loss_and_gradients(train, chunk):
    plain = make_model(train, chunk=0)
    fused = make_model(train, chunk=chunk)
    fused.load_state_dict(plain.state_dict())
    x = torch.randint(0, 97, (3, 32))
    y = torch.randint(0, 97, (3, 32))
    y[0, :5] = -1  # ignored targets
    torch.testing.assert_close(fused(x, y, reduction="none"), plain(x, y, reduction="none"), rtol=1e-5, atol=1e-5)
    for model in (plain, fused):
        model(x, y).backward()
    for (name, a), b in zip(plain.named_parameters(), fused.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_bf16_autocast_close_to_fp32(train):
    exact_model = make_model(train, chunk=16)
    model = make_model(train, chunk=16, dtype="bfloat16")
    model.load_state_dict(exact_model.state_dict())
    x = torch.randint(0, 97, (2, 32))
    y = torch.randint(0, 97, (2, 32))
    exact = exact_model(x, y)
    assert model(x, y, reduction="none").numel() == 64  # no autocast needed by the caller
    approx = model(x, y)
    approx.backward()
    assert approx.dtype == torch.float32
    assert abs(approx.item() - exact.item()) < 0.05
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in model.parameters())


def test_rotary_rotates_pairs_and_its_backward_is_autograds(train):
    torch.manual_seed(0)
    model = make_model(train, chunk=16)
    T, D = 10, model.cos.size(-1)
    x = torch.randn(2, T, 3, D, dtype=torch.float64, requires_grad=True)
    cos, sin = model.cos[:, :T].double(), model.sin[:, :T].double()
    out = train.apply_rotary(x, cos, sin)
    # each pair (x_i, x_{i+D/2}) turns by the angle of its position and frequency
    theta = torch.outer(torch.arange(T, dtype=torch.float64),
                        1.0 / 10000 ** (torch.arange(0, D, 2, dtype=torch.float64) / D))[None, :, None, :]
    x1, x2 = x[..., : D // 2], x[..., D // 2 :]
    expected = torch.cat((x1 * theta.cos() + x2 * theta.sin(), x2 * theta.cos() - x1 * theta.sin()), dim=-1)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)  # the tables are fp32
    g = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, x, g)[0],
                               torch.autograd.grad(train.rotate(x, cos, sin), x, g)[0])
    torch.testing.assert_close(out.detach().norm(dim=-1), x.detach().norm(dim=-1))  # a rotation


def test_norm_matches_rms_norm_with_gradients(train):
    torch.manual_seed(0)
    x = (torch.randn(3, 5, 64) * 4).requires_grad_()
    out, ref = train.norm(x), F.rms_norm(x, (64,))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(out)
    (ref_grad,) = torch.autograd.grad(ref, x, g)
    torch.testing.assert_close(torch.autograd.grad(out, x, g)[0], ref_grad, rtol=1e-4, atol=1e-6)
    # bf16 in, bf16 out, within a few bf16 steps of the fp32 result
    xb = x.detach().bfloat16().requires_grad_()
    outb = train.norm(xb)
    assert outb.dtype == torch.bfloat16
    torch.testing.assert_close(outb.float(), ref.detach(), rtol=0.02, atol=0.02)
    (gb,) = torch.autograd.grad(outb, xb, g.bfloat16())
    assert gb.dtype == torch.bfloat16
    torch.testing.assert_close(gb.float(), ref_grad, rtol=0.05, atol=0.02)


@pytest.mark.parametrize("pattern", ["L", "SL", "SSSL"])
def test_causal(train, pattern):
    """Changing tokens after position t leaves the losses at positions <= t unchanged."""
    model = make_model(train, depth=4, pattern=pattern)
    x = torch.randint(0, 97, (2, 32))
    y = torch.randint(0, 97, (2, 32))
    before = model(x, y, reduction="none").view(2, 32)
    t = 20
    x2, y2 = x.clone(), y.clone()
    x2[:, t + 1 :] = torch.randint(0, 97, (2, 32 - t - 1))
    y2[:, t + 1 :] = torch.randint(0, 97, (2, 32 - t - 1))
    after = model(x2, y2, reduction="none").view(2, 32)
    torch.testing.assert_close(after[:, : t + 1], before[:, : t + 1])
    assert not torch.allclose(after[:, t + 1 :], before[:, t + 1 :])


def reference_attention(q, k, v, window):
    # (B, T, H, D) in, naive softmax attention with an explicit causal window
    T = q.size(1)
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    allowed = (j <= i) & (i - j < window)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) / q.size(-1) ** 0.5
    p = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return torch.einsum("bhij,bjhd->bihd", p, v)


@pytest.mark.parametrize("window", [1, 5, 16, 32])
def test_attention_matches_reference_with_gradients(train, window):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 32, 2, 8, requires_grad=True) for _ in range(3))
    out = train.attention(q, k, v, window)
    ref = reference_attention(q, k, v, window)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("window", [1040, 300])
def test_sdpa_branch_for_long_contexts(train, window):
    """Past 1024 tokens the CPU also takes the SDPA branch that CUDA and MPS use."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1040, 1, 8) for _ in range(3))
    torch.testing.assert_close(train.attention(q, k, v, window), reference_attention(q, k, v, window),
                               rtol=1e-4, atol=1e-5)


def test_sdpa_path_matches_matmul_path(train, monkeypatch):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 32, 2, 8) for _ in range(3))
    fast = train.attention(q, k, v, 12)
    sdpa = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          attn_mask=train.window_mask(32, 12, q.device)).transpose(1, 2)
    torch.testing.assert_close(fast, sdpa, rtol=1e-4, atol=1e-5)


def test_sliding_window_hides_old_tokens(train):
    """In a windowed layer, a key further back than the window has no influence; one inside does."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 32, 2, 8) for _ in range(3))
    window, i = 8, 20
    out = train.attention(q, k, v, window)
    far, near = i - window, i - window + 1  # far is just outside, near just inside
    for j, should_change in ((far, False), (near, True)):
        k2, v2 = k.clone(), v.clone()
        k2[:, j] += 3.0
        v2[:, j] += 3.0
        changed = not torch.allclose(train.attention(q, k2, v2, window)[:, i], out[:, i])
        assert changed == should_change, j


def test_window_sizes(train):
    config = train.GPTConfig(sequence_len=64, n_layer=6, window_pattern="SSL")
    assert train.GPT.compute_window_sizes(config) == [32, 32, 64, 32, 32, 64]
    config = train.GPTConfig(sequence_len=64, n_layer=3, window_pattern="S")
    assert train.GPT.compute_window_sizes(config) == [32, 32, 64]  # the last layer is always long
    with pytest.raises(AssertionError):
        train.GPT.compute_window_sizes(train.GPTConfig(window_pattern="SXL"))


def test_param_count_and_flops(train):
    model = make_model(train, T=32, V=97, depth=3, dim=64, heads=2)
    d, V, L = 64, 97, 3
    n_ve = 2  # layers 0 and 2 of 3 carry value embeddings
    blocks = L * (4 * d * d + 8 * d * d) + n_ve * 32 * 2  # attention + MLP matrices, ve gates
    expected = V * d + V * d + n_ve * V * d + blocks + 2 * L
    assert model.num_params() == expected
    assert model.estimate_flops() == 6 * (blocks + V * d) + L * 12 * d * 32


def test_training_reduces_loss_on_a_fixed_batch(train):
    model = make_model(train, chunk=16, seed=1)
    model.init_weights()
    optimizer = train.build_optimizer(model, 64)
    kinds = {g["kind"] for g in optimizer.param_groups}
    assert kinds == {"adamw", "muon"}
    x = torch.randint(0, 97, (4, 32), generator=torch.Generator().manual_seed(0))
    y = torch.roll(x, -1, dims=1)
    losses = []
    for _ in range(12):
        loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0, losses
    assert all(math.isfinite(v) for v in losses)


def test_orthogonalize_flattens_the_spectrum(train):
    torch.manual_seed(0)
    spread = torch.diag(torch.logspace(-2, 0, 16))  # singular values over two decades
    for g in (torch.randn(3, 64, 16) @ spread, spread @ torch.randn(3, 16, 64)):
        s = torch.linalg.svdvals(train.orthogonalize(g).float())
        shape = tuple(g.shape)
        assert s.min() > 0.5 and s.max() < 1.3, (shape, s.min(), s.max())


def reference_muon_step(params, grads, state, lr, momentum, weight_decay, beta2, orthogonalize):
    # the update written plainly: Nesterov momentum, orthogonalisation, NorMuon's per-neuron
    # rescaling to the same overall size, cautious weight decay
    state["momentum"] = state["momentum"] + (1 - momentum) * (grads - state["momentum"])
    g = grads + momentum * (state["momentum"] - grads)
    u = orthogonalize(g).float()
    red_dim = -1 if u.size(-2) >= u.size(-1) else -2
    v_mean = (u * u).mean(dim=red_dim, keepdim=True)
    state["second"] = state["second"] + (1 - beta2) * (v_mean - state["second"])
    scaled = u / state["second"].clamp(min=1e-10).sqrt()
    u = scaled * u.norm(dim=(-2, -1), keepdim=True) / scaled.norm(dim=(-2, -1), keepdim=True)
    decay = torch.where(u * params > 0, params, torch.zeros_like(params))
    return params - lr * (u + weight_decay * decay)


@pytest.mark.parametrize("shape", [(4, 32, 32), (2, 16, 48), (2, 48, 16)])
def test_muon_step_matches_the_plain_formula(train, shape):
    torch.manual_seed(0)
    rows, cols = shape[-2:]
    second_shape = (shape[0], rows, 1) if rows >= cols else (shape[0], 1, cols)
    params = torch.randn(shape) * 0.1
    expected = params.clone()
    state = dict(momentum=torch.zeros(shape), second=torch.zeros(second_shape))
    ref_state = {k: v.clone() for k, v in state.items()}
    for _ in range(3):
        grads = torch.randn(shape)
        ref_grads = grads.clone()
        train.muon_step(params, grads, state, 0.02, 0.9, 0.3, 0.95)
        expected = reference_muon_step(expected, ref_grads, ref_state, 0.02, 0.9, 0.3, 0.95, train.orthogonalize)
        torch.testing.assert_close(params, expected, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(state["second"], ref_state["second"])


def test_adamw_step_matches_torch_adamw(train):
    torch.manual_seed(0)
    params = [torch.randn(5, 3), torch.randn(4)]
    ref = [p.clone().requires_grad_() for p in params]
    ref_opt = torch.optim.AdamW(ref, lr=0.05, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1, foreach=False)
    state = dict(step=[torch.zeros(()) for _ in params], m=[torch.zeros_like(p) for p in params],
                 v=[torch.zeros_like(p) for p in params])
    for _ in range(4):
        for p, r in zip(params, ref):
            p.grad = torch.randn_like(p)
            r.grad = p.grad.clone()
        train.adamw_step(params, state, 0.05, (0.8, 0.95), 1e-10, 0.1)
        ref_opt.step()
        for p, r in zip(params, ref):
            torch.testing.assert_close(p, r.detach())
    assert [s.item() for s in state["step"]] == [4.0, 4.0]


def test_schedules(train, monkeypatch):
    monkeypatch.setattr(train, "WARMUP_RATIO", 0.1)
    monkeypatch.setattr(train, "WARMDOWN_RATIO", 0.5)
    monkeypatch.setattr(train, "FINAL_LR_FRAC", 0.1)
    assert train.lr_multiplier(0.0) == 0.0
    assert train.lr_multiplier(0.05) == pytest.approx(0.5)
    assert train.lr_multiplier(0.3) == 1.0
    assert train.lr_multiplier(0.75) == pytest.approx(0.55)
    assert train.lr_multiplier(1.0) == pytest.approx(0.1)
    monkeypatch.setattr(train, "MUON_MOMENTUM", (0.85, 0.95))
    monkeypatch.setattr(train, "MUON_WARMUP_RATIO", 0.2)
    assert train.muon_momentum(0.0) == pytest.approx(0.85)
    assert train.muon_momentum(0.1) == pytest.approx(0.90)
    assert train.muon_momentum(0.9) == pytest.approx(0.95)


@pytest.mark.parametrize("value", [float("nan"), 101.0, float("inf")])
def test_fast_fail(train, capsys, value):
    with pytest.raises(SystemExit) as exc:
        train.check_loss(value)
    assert exc.value.code == 1
    assert capsys.readouterr().out.strip() == "FAIL"


def test_healthy_loss_passes(train, capsys):
    train.check_loss(4.2)
    assert capsys.readouterr().out == ""
