"""
Pretrain a small GPT on one device for a fixed wall-clock budget, then report val_bpb.

Usage (inside a lab, after `autoresearch prepare`):

    python train.py

This is the file experiments change: model, optimizer, hyperparameters, training loop. The data,
the tokenizer, the time budget and the metric live in prepare.py, which no experiment may touch.
The summary block printed at the end (`---`, then `key: value` lines) is read by the tools.
Runs on CUDA (FlashAttention-3 on Hopper when installed, else PyTorch SDPA), Apple MPS and CPU.
"""

import time

T_START = time.time()  # before `import torch` (~1.5 s), so the reported startup time is honest

import ctypes
import gc
import math
import sys
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from prepare import MAX_SEQ_LEN, TIME_BUDGET, Tokenizer, make_dataloader, evaluate_bpb, get_token_bytes  # noqa: F401
from prepare import detect_device, peak_flops, load_flash_attention

# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------


@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 8192
    n_layer: int = 8
    n_head: int = 4
    n_kv_head: int = 4
    n_embd: int = 512
    window_pattern: str = "SSSL"
    softcap: float = 15.0
    loss_chunk: int = 0  # rows of logits per chunk in the fused loss; 0 = plain loss over all logits
    compute_dtype: str = "float32"  # "bfloat16": matmuls under bf16 autocast, activations in bf16


class RMSNorm(torch.autograd.Function):
    """x / rms(x) in the input's dtype, with the sums in fp32. Off CUDA, F.rms_norm under bf16
    autocast runs in fp32 and composes 5 ops forward and more backward, with casts around them:
    1.9 ms per 4 M-byte activation (forward + backward, 2 CPU cores) against 0.6 ms here."""

    @staticmethod
    def forward(ctx, x):
        ms = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32).square_().div_(x.size(-1))
        r = ms.add_(torch.finfo(torch.float32).eps).rsqrt_()  # the eps of F.rms_norm in fp32
        y = x * r.to(x.dtype)
        ctx.save_for_backward(y, r)
        return y

    @staticmethod
    def backward(ctx, g):
        # d/dx of x r(x) is r (g - y mean(g y)) with y = x r
        y, r = ctx.saved_tensors
        dot = (g * y).sum(-1, keepdim=True, dtype=torch.float32)
        return torch.addcmul(g, y, dot.div_(-y.size(-1)).to(g.dtype)).mul_(r.to(g.dtype))


def on_gpu(x):
    # the fused-kernel paths (F.rms_norm, plain rotary, FlashAttention-3) are for CUDA, where
    # torch.compile fuses them further; the hand-written autograd Functions are for the CPU
    return x.is_cuda


def norm(x):
    # RMSNorm without a learnable gain: the per-layer scalars below do the scaling
    if on_gpu(x):
        # CUDA autocast runs rms_norm in fp32: cast back, or the residual stream turns fp32 and
        # FlashAttention-3 (bf16/fp16 only) gets fp32 q and k beside a bf16 v
        return F.rms_norm(x, (x.size(-1),)).to(x.dtype)
    return RMSNorm.apply(x)


def has_value_embedding(layer_idx, n_layer):
    # value embeddings on every other layer, always including the last one
    return layer_idx % 2 == (n_layer - 1) % 2


def rotate(x, cos, sin):
    # x: (B, T, H, D); rotates the pairs (x_i, x_{i+D/2}) of each head by the position's angles
    # (RoFormer, arxiv 2104.09864). cos = [cos, cos] and sin = [sin, -sin] over the two halves.
    d = x.size(-1) // 2
    return torch.addcmul(x * cos, torch.cat((x[..., d:], x[..., :d]), dim=-1), sin)


class Rotary(torch.autograd.Function):
    """rotate() whose backward is the inverse rotation, in 3 passes: autograd's walks the slices and
    the concatenation (0.68 vs 0.92 ms per bf16 q of 1 M values, forward + backward, 2 CPU cores)."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, g):
        cos, sin = ctx.saved_tensors
        return rotate(g, cos, -sin), None, None


def apply_rotary(x, cos, sin):
    return rotate(x, cos, sin) if on_gpu(x) else Rotary.apply(x, cos, sin)


# FlashAttention-3's flash_attn_func, set in the setup section on CUDA when `autoresearch prepare`
# fetched the kernel (Hugging Face `kernels`, as the original); None means PyTorch SDPA
FLASH_ATTN_3 = None
_MASKS = {}


def window_mask(T, window, device):
    # True where query i may attend to key j: causal (j <= i) and within the window (i - j < window)
    key = (T, window, str(device))
    if key not in _MASKS:
        i = torch.arange(T, device=device)[:, None]
        j = torch.arange(T, device=device)[None, :]
        _MASKS[key] = (j <= i) & (i - j < window)
    return _MASKS[key]


def window_bias(T, window, device, dtype):
    # 0 where window_mask allows, -inf elsewhere: added to the scores inside the matmul
    key = (T, window, str(device), dtype)
    if key not in _MASKS:
        bias = torch.zeros(T, T, device=device, dtype=dtype)
        _MASKS[key] = bias.masked_fill_(~window_mask(T, window, device), float("-inf"))
    return _MASKS[key]


class MatmulAttention(torch.autograd.Function):
    """Masked attention as batched matmuls, for CPU. Everything stays in bf16 (softmax and its
    backward accumulate in fp32 inside their kernels) and only the probabilities are kept for the
    backward. The mask and the scale ride in the first matmul (baddbmm), and q, k, v are made
    contiguous first: bmm on the strided head views ran 1.7x slower than copy + bmm. 6.7 ms per
    layer (forward + backward, batch 16, 2 heads of 128, T=256, 2 cores), against 8.4 ms without
    these two changes and 18.6 ms for SDPA's CPU flash kernel. Memory grows as T^2: short contexts only."""

    @staticmethod
    def forward(ctx, q, k, v, bias):
        B, H, T, D = q.shape
        q, k, v = (t.contiguous().view(B * H, T, D) for t in (q, k, v))
        p = torch.softmax(torch.baddbmm(bias, q, k.mT, alpha=D**-0.5), dim=-1)
        ctx.save_for_backward(q, k, v, p)
        return (p @ v).view(B, H, T, D)

    @staticmethod
    def backward(ctx, dy):
        q, k, v, p = ctx.saved_tensors
        B, H, T, D = dy.shape
        dy = dy.contiguous().view(B * H, T, D)
        ds = torch._softmax_backward_data(dy @ v.mT, p, -1, p.dtype)  # p (dp - rowsum(dp p)), one pass
        dq, dk, dv = (ds @ k).mul_(D**-0.5), (ds.mT @ q).mul_(D**-0.5), p.mT @ dy
        return dq.view(B, H, T, D), dk.view(B, H, T, D), dv.view(B, H, T, D), None


def attention(q, k, v, window):
    # q, k, v: (B, T, H, D). A query sees `window` tokens, itself included.
    T = q.size(1)
    # FA3 takes only bf16/fp16 (fp32 would fail at the first step), and it is a custom op: export uses SDPA
    if (FLASH_ATTN_3 is not None and on_gpu(q) and q.dtype in (torch.bfloat16, torch.float16)
            and not torch.compiler.is_exporting()):
        out = FLASH_ATTN_3(q, k, v, causal=True, window_size=(window - 1, 0))
        return out[0] if isinstance(out, tuple) else out  # some FA3 versions also return the LSE
    if k.size(2) != q.size(2):  # grouped-query attention: share each k/v head among q heads
        k = k.repeat_interleave(q.size(2) // k.size(2), dim=2)
        v = v.repeat_interleave(q.size(2) // v.size(2), dim=2)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if q.device.type == "cpu" and T <= 1024:
        y = MatmulAttention.apply(q, k, v, window_bias(T, window, q.device, q.dtype))
    elif window >= T:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=window_mask(T, window, q.device))
    return y.transpose(1, 2)


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        assert config.n_embd % config.n_head == 0 and config.n_head % config.n_kv_head == 0
        kv_dim = self.n_kv_head * self.head_dim
        self.c_q = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.c_k = nn.Linear(config.n_embd, kv_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, kv_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.ve_gate_channels = min(32, config.n_embd)
        self.ve_gate = None
        if has_value_embedding(layer_idx, config.n_layer):
            self.ve_gate = nn.Linear(self.ve_gate_channels, self.n_kv_head, bias=False)

    def forward(self, x, ve, cos, sin, window):
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:
            # value embedding mixed in by an input-dependent gate in (0, 2), 1 at init
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., : self.ve_gate_channels]))
            v = v + gate.unsqueeze(-1) * ve.view_as(v)
        q = norm(apply_rotary(q, cos, sin))  # QK-norm keeps attention logits bounded
        k = norm(apply_rotary(k, cos, sin))
        y = attention(q, k, v, window).reshape(B, T, C)
        return self.c_proj(y)


class ReluSquared(torch.autograd.Function):
    """relu(x)^2 (Primer, arxiv 2109.08668) saving one tensor and with a 2-pass backward
    (2 relu(x) g): autograd's version walks the 4x-wide activation ~5 times in backward."""

    @staticmethod
    def forward(ctx, x):
        r = torch.relu(x)
        ctx.save_for_backward(r)
        return r.square()  # twice as fast as r * r in bf16

    @staticmethod
    def backward(ctx, g):
        (r,) = ctx.saved_tensors
        return (g * r).mul_(2)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(ReluSquared.apply(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos, sin, window):
        x = x + self.attn(norm(x), ve, cos, sin, window)
        return x + self.mlp(norm(x))


def softcap_logits(h, w, softcap):
    # softcap * tanh(z / softcap) = 2 softcap * sigmoid(2 z / softcap) - softcap, and the constant
    # cancels in the cross-entropy. Dropping it gives logits in [0, 2 softcap] and replaces tanh
    # by sigmoid: 0.2 vs 1.2-5 ns per element on CPU. Returns sigmoid(2 z / softcap) in fp32.
    return (h @ w.t()).float().mul_(2 / softcap).sigmoid_()


def chunked_loss(h, w, targets, softcap, chunk):
    # per-token losses without gradients (evaluation), `chunk` rows of logits at a time
    losses = torch.empty(h.size(0), dtype=torch.float32, device=h.device)
    for s in range(0, h.size(0), chunk):
        z = softcap_logits(h[s : s + chunk], w, softcap).mul_(2 * softcap)
        losses[s : s + chunk] = F.cross_entropy(z, targets[s : s + chunk], ignore_index=-1, reduction="none")
    return losses


class FusedSoftcapCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of softcapped logits, and its gradients, computed chunk by chunk.

    The plain loss materialises B*T x vocab fp32 logits (134 MB at 8192 x 4096) and walks them
    ~10 times forward and backward: 590-690 ms per 8192 tokens at width 256 on 2 CPU cores,
    against 180-260 ms here. A chunk of logits stays in cache; forward computes the loss and
    d(loss)/d(logits) at once and folds the latter into the gradients of h and w; backward only
    scales them by the incoming gradient.
    """

    @staticmethod
    def forward(ctx, h, w, targets, softcap, chunk):
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
        g = torch.empty(min(chunk, h.size(0)), w.size(0), dtype=h.dtype, device=h.device)
        k = 2 * softcap / math.log(2)  # t = k sig = (logits + softcap) / ln 2
        for s in range(0, h.size(0), chunk):
            hc, tc = h[s : s + chunk], targets[s : s + chunk]
            t = softcap_logits(hc, w, softcap).mul_(k)
            e = torch.exp2(t)  # exp(logits + softcap) <= e^30: no max-subtraction; exp2 is 4x faster than exp on CPU
            sumexp = e.sum(dim=-1, keepdim=True)
            valid = (tc >= 0)[:, None]
            tc = tc.clamp(min=0)[:, None]
            loss += ((sumexp.log() - math.log(2) * t.gather(1, tc)) * valid).sum()
            # d(loss)/d(z) = (softmax - onehot(target)) * (1 - tanh^2), and 1 - tanh^2 = 4 sig (1 - sig)
            # = (4 / k) (t - t^2 / k); written to use few passes over the chunk, the last one into bf16
            e.mul_(4 / k * valid / sumexp).scatter_add_(1, tc, -4 / k * valid)
            gc = torch.mul(e, torch.addcmul(t, t, t, value=-1 / k), out=g[: hc.size(0)])
            grad_h[s : s + chunk] = gc @ w
            grad_w += gc.t() @ hc
        ctx.save_for_backward(grad_h, grad_w.to(w.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_loss.to(grad_h.dtype), grad_w * grad_loss.to(grad_w.dtype), None, None, None


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.window_sizes = self.compute_window_sizes(config)
        head_dim = config.n_embd // config.n_head
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList([Block(config, i) for i in range(config.n_layer)])
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)  # untied from wte
        self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))  # scales the residual stream
        self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))  # mixes the embedding back in
        self.value_embeds = nn.ModuleDict({
            str(i): nn.Embedding(config.vocab_size, config.n_kv_head * head_dim)
            for i in range(config.n_layer) if has_value_embedding(i, config.n_layer)
        })
        inv_freq = 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)
        angles = torch.outer(torch.arange(config.sequence_len).float(), inv_freq)[None, :, None, :]
        self.register_buffer("cos", torch.cat((angles.cos(), angles.cos()), dim=-1), persistent=False)
        self.register_buffer("sin", torch.cat((angles.sin(), -angles.sin()), dim=-1), persistent=False)

    @staticmethod
    def compute_window_sizes(config):
        pattern = config.window_pattern.upper()
        assert pattern and set(pattern) <= set("SL"), f"WINDOW_PATTERN must be S/L letters, got {pattern!r}"
        sizes = {"L": config.sequence_len, "S": config.sequence_len // 2}
        windows = [sizes[pattern[i % len(pattern)]] for i in range(config.n_layer)]
        windows[-1] = config.sequence_len  # the last layer always sees the whole context
        return windows

    @torch.no_grad()
    def init_weights(self):
        s = 3**0.5 * self.config.n_embd**-0.5  # uniform(-s, s) has the std of normal(0, 1/sqrt(d))
        nn.init.normal_(self.wte.weight, std=1.0)
        nn.init.normal_(self.lm_head.weight, std=0.001)
        for block in self.blocks:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                nn.init.uniform_(lin.weight, -s, s)
            nn.init.zeros_(block.attn.c_proj.weight)  # each block starts as the identity
            nn.init.zeros_(block.mlp.c_proj.weight)
            if block.attn.ve_gate is not None:
                nn.init.zeros_(block.attn.ve_gate.weight)
        for ve in self.value_embeds.values():
            nn.init.uniform_(ve.weight, -s, s)
        self.resid_lambdas.fill_(1.0)
        self.x0_lambdas.fill_(0.1)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def estimate_flops(self):
        # FLOPs per token of forward + backward: 6 per weight of every matmul (embedding lookups
        # are not matmuls), plus attention's QK^T and AV counted over each layer's full window
        # (the usual convention, although a causal mask halves the real work)
        embeddings = self.wte.weight.numel() + sum(ve.weight.numel() for ve in self.value_embeds.values())
        scalars = self.resid_lambdas.numel() + self.x0_lambdas.numel()
        matmul_params = self.num_params() - embeddings - scalars
        attn = sum(12 * self.config.n_embd * min(w, self.config.sequence_len) for w in self.window_sizes)
        return 6 * matmul_params + attn

    def forward(self, idx, targets=None, reduction="mean"):
        # the model sets its own precision, so callers (the evaluation too) need no autocast
        dtype = getattr(torch, self.config.compute_dtype)
        if dtype == torch.float32:
            return self.forward_in(idx, targets, reduction, dtype)
        with torch.autocast(idx.device.type, dtype=dtype):
            return self.forward_in(idx, targets, reduction, dtype)

    def forward_in(self, idx, targets, reduction, dtype):
        B, T = idx.shape
        assert T <= self.config.sequence_len, f"sequence of {T} tokens exceeds {self.config.sequence_len}"
        # activations in the compute dtype: bf16 halves the memory traffic, and fp32 rotary tables
        # would promote bf16 q and k back to fp32
        cos, sin = self.cos[:, :T].to(dtype), self.sin[:, :T].to(dtype)
        x = x0 = norm(self.wte(idx).to(dtype))
        for i, block in enumerate(self.blocks):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx).to(dtype) if str(i) in self.value_embeds else None
            x = block(x, ve, cos, sin, self.window_sizes[i])
        x = norm(x)
        softcap, chunk = self.config.softcap, self.config.loss_chunk
        if targets is None:  # logits (what the trusted evaluator scores): the same softcap, in place and
            # via sigmoid, as tanh over B*T*V fp32 logits took a quarter of an evaluation on CPU
            return softcap_logits(x, self.lm_head.weight, softcap).mul_(2 * softcap).sub_(softcap)
        h, t = x.reshape(B * T, -1), targets.reshape(B * T)
        if not chunk:
            logits = softcap * torch.tanh(self.lm_head(h).float() / softcap)
            return F.cross_entropy(logits, t, ignore_index=-1, reduction=reduction)
        w = self.lm_head.weight.to(dtype)
        if torch.is_grad_enabled() and reduction != "none":
            total = FusedSoftcapCrossEntropy.apply(h, w, t, softcap, chunk)
        else:
            losses = chunked_loss(h, w, t, softcap, chunk)
            if reduction == "none":
                return losses
            total = losses.sum()
        return total / (t >= 0).sum().clamp(min=1) if reduction == "mean" else total


# ---------------------------------------------------------------------------
# Optimizer: Muon for the blocks' matrices, AdamW for everything else
# ---------------------------------------------------------------------------

# Polar Express coefficients (Amsel, Persson, Musco, Gower 2025, arxiv 2505.16932): one
# (a, b, c) per iteration of X <- a X + b (X X^T) X + c (X X^T)^2 X, for 5 iterations
POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


def orthogonalize(g):
    # approximately U V^T of g = U S V^T, batched over the leading dim; in bf16, which the
    # iteration tolerates and which runs 4x faster than fp32 on CPUs with AVX512-BF16
    if g.dim() == 2:
        return orthogonalize(g[None])[0]
    x = g.float() if g.device.type == "mps" else g.bfloat16()  # MPS: bf16 needs macOS 14 and a recent torch
    x = x / (x.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)  # spectral norm <= 1
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT  # iterate on the wide orientation: the Gram matrix is the smaller one
    for a, b, c in POLAR_EXPRESS:
        gram = x @ x.mT
        # x <- a x + (b gram + c gram^2) x, the scalings fused into the matmuls (baddbmm): 30%
        # faster than separate elementwise passes at the cpu preset's sizes
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


def muon_step(params, grads, state, lr, momentum, weight_decay, beta2):
    # Muon (Jordan et al. 2024) with Nesterov momentum, NorMuon's per-neuron second moment
    # (arxiv 2510.05491) and cautious weight decay (only where update and weight agree in sign)
    # `grads` is a fresh stack of the gradients, free to be overwritten; the elementwise work is
    # written as few passes as possible (it took 30% of the optimizer's time when written plainly)
    state["momentum"].lerp_(grads, 1 - momentum)
    g = grads.lerp_(state["momentum"], momentum)
    u = orthogonalize(g).to(torch.float32, memory_format=torch.contiguous_format)
    red_dim = -1 if u.size(-2) >= u.size(-1) else -2
    n = u.size(red_dim)
    v_mean = u.square().mean(dim=red_dim, keepdim=True)  # vector_norm is 8x slower over dim -2
    v_norm = (v_mean.sum(dim=(-2, -1), keepdim=True) * n).sqrt()
    state["second"].lerp_(v_mean, 1 - beta2)
    scale = state["second"].clamp(min=1e-10).rsqrt()
    new_norm = (v_mean * n * scale.square()).sum(dim=(-2, -1), keepdim=True).sqrt()
    factor = scale * v_norm / new_norm.clamp(min=1e-10)  # same overall size, rescaled per neuron
    agree = torch.mul(u, params).gt_(0)  # the factor is positive: it does not change signs
    params.addcmul_(agree, params, value=-lr * weight_decay)
    params.addcmul_(u, factor, value=-lr)


def adamw_step(params, state, lr, betas, eps, weight_decay):
    # AdamW (Loshchilov & Hutter 2019) for a list of tensors, in PyTorch's fused kernel: one pass
    # per tensor, where the plain formula took 8.6 ms per step on the cpu preset's 4 M embedding
    # and unembedding weights and this takes 1.5 ms
    torch._foreach_add_(state["step"], 1)
    torch._fused_adamw_(params, [p.grad for p in params], state["m"], state["v"], [], state["step"], lr=lr,
                        beta1=betas[0], beta2=betas[1], weight_decay=weight_decay, eps=eps, amsgrad=False,
                        maximize=False)


class MuonAdamW(torch.optim.Optimizer):
    """One optimizer, two kinds of group: 'muon' groups hold same-shaped matrices that are
    updated stacked (one batched orthogonalisation per shape), 'adamw' groups anything else."""

    def __init__(self, groups):
        super().__init__(groups, defaults={})
        for group in self.param_groups:
            group["initial_lr"] = group["lr"]

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if group["kind"] == "adamw":
                for p in params:
                    if not self.state[p]:
                        self.state[p].update(step=torch.zeros((), device=p.device), m=torch.zeros_like(p),
                                             v=torch.zeros_like(p))
                state = {key: [self.state[p][key] for p in params] for key in ("step", "m", "v")}
                adamw_step(params, state, group["lr"], group["betas"], group["eps"], group["weight_decay"])
                continue
            stacked = torch.stack(params)
            state = self.state[params[0]]
            if not state:
                rows, cols = stacked.shape[-2:]
                shape = (len(params), rows, 1) if rows >= cols else (len(params), 1, cols)
                state.update(momentum=torch.zeros_like(stacked), second=stacked.new_zeros(shape))
            lr = group["lr"] * max(1.0, stacked.size(-2) / stacked.size(-1)) ** 0.5
            muon_step(stacked, torch.stack([p.grad for p in params]), state, lr,
                      group["momentum"], group["weight_decay"], group["beta2"])
            torch._foreach_copy_(params, list(stacked.unbind(0)))


def build_optimizer(model, model_dim):
    scale = (model_dim / 768) ** -0.5  # Adam LRs were tuned at width 768; scale as 1/sqrt(width)
    matrices = [p for p in model.blocks.parameters() if p.ndim == 2]
    by_shape = {}
    for p in matrices:
        by_shape.setdefault(tuple(p.shape), []).append(p)
    adam = dict(kind="adamw", betas=ADAM_BETAS, eps=1e-10, weight_decay=0.0)
    groups = [
        dict(adam, params=[model.lm_head.weight], lr=UNEMBEDDING_LR * scale),
        dict(adam, params=[model.wte.weight, *model.value_embeds.parameters()], lr=EMBEDDING_LR * scale),
        dict(adam, params=[model.resid_lambdas], lr=SCALAR_LR * 0.01),
        dict(adam, params=[model.x0_lambdas], lr=SCALAR_LR, betas=(0.96, 0.95)),
    ]
    for shape in sorted(by_shape):
        groups.append(dict(kind="muon", params=by_shape[shape], lr=MATRIX_LR, momentum=MUON_MOMENTUM[1],
                           weight_decay=WEIGHT_DECAY, beta2=0.95))
    n_grouped = sum(len(g["params"]) for g in groups)
    assert n_grouped == len(list(model.parameters())), "every parameter needs exactly one group"
    return MuonAdamW(groups)


# ---------------------------------------------------------------------------
# Hyperparameters (edit these in place; literal values only)
# ---------------------------------------------------------------------------

# model shape
DEPTH = 8                      # number of transformer layers
ASPECT_RATIO = 64              # model_dim = DEPTH * ASPECT_RATIO, rounded up to a multiple of HEAD_DIM
HEAD_DIM = 128                 # channels per attention head
WINDOW_PATTERN = "SSSL"        # attention window per layer, repeated: L = full context, S = half
# batch
TOTAL_BATCH_SIZE = 524288      # tokens per optimizer step; gradient accumulation fills it
DEVICE_BATCH_SIZE = 128        # sequences per forward/backward pass
# optimizer
EMBEDDING_LR = 0.6             # AdamW, token and value embeddings (x (dim/768)^-0.5)
UNEMBEDDING_LR = 0.004         # AdamW, lm_head (x (dim/768)^-0.5)
MATRIX_LR = 0.04               # Muon, the blocks' matrices
SCALAR_LR = 0.5                # AdamW, per-layer x0 mixing (resid scalars get 1% of it)
WEIGHT_DECAY = 0.2             # Muon's cautious weight decay, decays linearly to 0 over the run
ADAM_BETAS = (0.8, 0.95)       # AdamW (beta1, beta2)
MUON_MOMENTUM = (0.85, 0.95)   # Muon momentum ramps from the first to the second value ...
MUON_WARMUP_RATIO = 0.3        # ... over this fraction of the time budget
# schedule (progress = training seconds / TIME_BUDGET)
WARMUP_RATIO = 0.0             # fraction of the budget spent ramping LRs up from 0
WARMDOWN_RATIO = 0.5           # fraction of the budget spent decaying LRs at the end
FINAL_LR_FRAC = 0.0            # LR at the end, as a fraction of the peak
# numerics and speed
SOFTCAP = 15.0                 # logits = SOFTCAP * tanh(logits / SOFTCAP)
LOSS_CHUNK = 256               # logit rows per chunk of the fused loss off CUDA; 0 = plain loss
CPU_BF16 = True                # bf16 autocast on CPU: see the setup section for the measurement
COMPILE = True                 # torch.compile the model on CUDA (never elsewhere: see setup)

# ---------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------


def lr_multiplier(progress):
    if progress < WARMUP_RATIO:
        return progress / WARMUP_RATIO
    if progress < 1.0 - WARMDOWN_RATIO:
        return 1.0
    cooldown = (1.0 - progress) / WARMDOWN_RATIO
    return cooldown + (1.0 - cooldown) * FINAL_LR_FRAC


def muon_momentum(progress):
    frac = min(progress / MUON_WARMUP_RATIO, 1.0) if MUON_WARMUP_RATIO > 0 else 1.0
    return (1 - frac) * MUON_MOMENTUM[0] + frac * MUON_MOMENTUM[1]


def check_loss(loss):
    # fast fail: a NaN or exploding loss never recovers, so stop now and say so
    if math.isnan(loss) or loss > 100:
        print("FAIL")
        sys.exit(1)


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1024**2  # this run's GPU, not device 0
    if device.type == "mps":
        return torch.mps.driver_allocated_memory() / 1024**2  # no peak counter: the driver's total at the end
    try:
        import resource  # CPU: the process's peak resident set size (Unix only)
    except ImportError:
        return 0.0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024**2 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux


def keep_freed_memory():
    # glibc hands every freed block over 128 KB back to the OS, so each new activation tensor pays
    # a page fault per 4 KB page on first touch: ~4000 for a 16 MB bf16 activation, which made
    # elementwise ops 2-3x slower on 2 cores. Serving blocks up to 32 MB from the heap and never
    # trimming it lets the training loop reuse the same pages (~15% faster steps).
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return  # not glibc
    libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
    libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD


if __name__ == "__main__":
    torch.manual_seed(42)
    device = detect_device()
    if device.type == "cpu":
        keep_freed_memory()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        # fetched by `autoresearch prepare`, loaded from the cache: the run has no network
        FLASH_ATTN_3, attention_line = load_flash_attention()  # "attention: fa3 (...)" or "attention: sdpa (why)"
    elif device.type == "cpu" and MAX_SEQ_LEN <= 1024:
        attention_line = "attention: matmul (MatmulAttention, CPU)"
    else:
        attention_line = f"attention: sdpa ({device.type})"
    # bf16: always on CUDA; on CPU with AVX512-BF16 (Zen 4+, Sapphire Rapids+) a bf16 matmul runs
    # ~4x faster than fp32 (810 vs 190 GFLOP/s on 2 Zen 5 cores) and a whole training step 1.9x
    # faster, so set CPU_BF16 = False on CPUs without bf16 instructions. MPS stays in fp32: bf16
    # autocast there depends on the macOS and torch versions.
    use_bf16 = device.type == "cuda" or (device.type == "cpu" and CPU_BF16)
    compute_dtype = torch.bfloat16 if use_bf16 else torch.float32

    tokenizer = Tokenizer.from_directory()
    vocab_size = tokenizer.get_vocab_size()
    model_dim = -(-DEPTH * ASPECT_RATIO // HEAD_DIM) * HEAD_DIM
    config = GPTConfig(
        sequence_len=MAX_SEQ_LEN, vocab_size=vocab_size, n_layer=DEPTH, n_head=model_dim // HEAD_DIM,
        n_kv_head=model_dim // HEAD_DIM, n_embd=model_dim, window_pattern=WINDOW_PATTERN,
        softcap=SOFTCAP, loss_chunk=0 if device.type == "cuda" else LOSS_CHUNK,
        compute_dtype=str(compute_dtype).removeprefix("torch."),
    )
    with torch.device(device):
        model = GPT(config)
    model.init_weights()
    num_params = model.num_params()
    flops_per_token = model.estimate_flops()
    tokens_per_pass = DEVICE_BATCH_SIZE * MAX_SEQ_LEN
    assert TOTAL_BATCH_SIZE % tokens_per_pass == 0, "TOTAL_BATCH_SIZE must be a multiple of DEVICE_BATCH_SIZE * MAX_SEQ_LEN"
    grad_accum_steps = TOTAL_BATCH_SIZE // tokens_per_pass
    optimizer = build_optimizer(model, model_dim)
    # torch.compile pays on CUDA (~1 min of compiling, repaid within a 5-minute budget). On CPU it
    # does not: the budget is wall clock measured from outside, and on 2 cores compiling took 44 s
    # (3 s from a warm cache) to make steps at most 10% faster, as the matmuls and attention
    # dominate. No dropout or batch norm, so train and eval modes compute the same thing and the
    # compiled model also serves the evaluation.
    if COMPILE and device.type == "cuda":
        model = torch.compile(model, dynamic=False)
    peak = peak_flops(device, compute_dtype)  # measured once per machine on CPU and MPS, then cached
    train_loader = make_dataloader(tokenizer, DEVICE_BATCH_SIZE, MAX_SEQ_LEN, "train", device=device)
    x, y, epoch = next(train_loader)
    print(f"model: {num_params / 1e6:.2f}M params, {DEPTH} layers, dim {model_dim}, {config.n_head} heads, "
          f"windows {GPT.compute_window_sizes(config)}")
    print(f"batch: {TOTAL_BATCH_SIZE} tokens = {grad_accum_steps} x {DEVICE_BATCH_SIZE} x {MAX_SEQ_LEN}, "
          f"{flops_per_token / 1e6:.1f} MFLOP/token, peak {peak / 1e12:.3f} TFLOP/s ({compute_dtype}, {device})")
    print(attention_line)
    print(f"startup: {time.time() - T_START:.1f}s, budget {TIME_BUDGET:.0f}s", flush=True)

    # ---------------------------------------------------------------------------
    # Training loop
    # ---------------------------------------------------------------------------

    t_train = time.time()  # every step counts, the first (slow) ones included
    training_time, step, smooth_loss, last_print = 0.0, 0, 0.0, 0.0
    while True:
        for _ in range(grad_accum_steps):
            loss = model(x, y)
            (loss / grad_accum_steps).backward()
            x, y, epoch = next(train_loader)
        progress = min(training_time / TIME_BUDGET, 1.0)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lr_multiplier(progress)
            if group["kind"] == "muon":
                group["momentum"] = muon_momentum(progress)
                group["weight_decay"] = WEIGHT_DECAY * (1 - progress)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        train_loss = loss.item()  # the one device sync per step
        check_loss(train_loss)
        training_time = time.time() - t_train
        step += 1
        if step == 1:
            # nothing here makes reference cycles, and a full collection costs ~0.5 s: freeze the
            # heap built so far and turn the collector off
            gc.collect()
            gc.freeze()
            gc.disable()
        smooth_loss = 0.9 * smooth_loss + 0.1 * train_loss
        done = training_time >= TIME_BUDGET
        if done or time.time() - last_print >= 2.0:
            last_print = time.time()
            loss_shown = smooth_loss / (1 - 0.9**step)  # debiased EMA
            tok_s = step * TOTAL_BATCH_SIZE / training_time
            print(f"step {step:05d} | {100 * progress:5.1f}% | loss {loss_shown:.4f} | "
                  f"{tok_s / 1e3:.1f}k tok/s | mfu {100 * flops_per_token * tok_s / peak:.1f}% | "
                  f"epoch {epoch} | {max(TIME_BUDGET - training_time, 0):.0f}s left", flush=True)
        if done:
            break

    # ---------------------------------------------------------------------------
    # Evaluation and summary
    # ---------------------------------------------------------------------------

    val_bpb = evaluate_bpb(model, tokenizer, DEVICE_BATCH_SIZE)
    total_tokens = step * TOTAL_BATCH_SIZE
    mfu = 100 * flops_per_token * total_tokens / training_time / peak
    print("---")
    print(f"val_bpb:          {val_bpb:.6f}")
    print(f"training_seconds: {training_time:.1f}")
    print(f"total_seconds:    {time.time() - T_START:.1f}")
    print(f"peak_vram_mb:     {peak_memory_mb(device):.1f}")  # CPU: peak RSS of this process
    print(f"mfu_percent:      {mfu:.2f}")
    print(f"total_tokens_M:   {total_tokens / 1e6:.1f}")
    print(f"num_steps:        {step}")
    print(f"num_params_M:     {num_params / 1e6:.1f}")
    print(f"depth:            {DEPTH}")
    print(f"attention:        {attention_line.split()[1]}")
