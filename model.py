"""
The MiniMax-Text-01 language model, top to bottom in one file: a hybrid of lightning (linear) attention and
softmax attention, a mixture-of-experts feed-forward in every layer, and a post-norm DeepNorm residual.

    tokens -> embed_tokens -> L x Block -> norm -> lm_head -> logits

    Block l (attention kind chosen by the layer index; 'hybrid': softmax where (l + 1) % 8 == 0):
        h = input_layernorm(x)
        x = alpha * h + beta * Attn_l(h)          Attn_l = LightningAttention or SoftmaxAttention
        h = post_attention_layernorm(x)
        x = alpha * h + beta * MoE(h)             moe.MoE: 32 SwiGLU experts, top-2 in the real model

The residual carries the *normed* input h (post-norm, as in the released model); alpha = (2N)^(1/4) keeps the
residual stream dominant in deep stacks (DeepNet). A lightning layer keeps one d x d state per head, so its cost
per generated token does not grow with the context; the softmax layers (1 in 8) keep a normal KV cache.

References:
  MiniMax-01 technical report, arXiv 2501.08313 (sections 2 and 4.2); ../shared/MINIMAX01.md has every detail with
  its source. DeepNet / DeepNorm, arXiv 2203.00555. RoPE, arXiv 2104.09864. Lightning Attention-2, 2401.04658.
  Outside reference for the tests: transformers' native MiniMaxForCausalLM (models/minimax/modeling_minimax.py).

Letters: B batch, T tokens, D hidden (hidden_size), H heads, Hkv KV heads, Dh head dim, V vocab, L layers,
E experts, K experts per token.

Run:  python model.py            (prints the presets' parameter counts; builds minimax-text-01 on 'meta')
Test: python -m pytest -q tests/test_model.py
"""

import glob
import json
import math
import os
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from lightning_attn import build_slopes, lightning_attn, lightning_attn_decode
from moe import MoE

# -----------------------------------------------------------------------------
# config


@dataclass
class MiniMaxConfig:
    # the defaults are a small runnable model (MINIMAX01.md section 10's toy config); presets are below
    vocab_size: int = 50304
    hidden_size: int = 512
    num_hidden_layers: int = 8
    num_attention_heads: int = 8  # both attention kinds
    num_key_value_heads: int = 2  # softmax layers only (GQA)
    head_dim: int = 64
    intermediate_size: int = 768  # hidden size F of ONE expert
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    rotary_dim: int | None = None  # RoPE on the first rotary_dim dims of a head; None -> head_dim // 2
    rope_theta: float = 1e7
    rms_norm_eps: float = 1e-5  # decoder norms (the lightning output norm uses 1e-6, as the reference)
    block_size: int = 64  # lightning chunk of the reference code; our kernels pick their own (the math is exact)
    max_position_embeddings: int = 1024  # longest sequence (prompt + generated) the model accepts
    layer_pattern: str = "hybrid"  # 'hybrid' | 'softmax' | 'lightning' | 'custom' (layer_types given)
    softmax_every: int = 8  # 'hybrid': softmax attention at layers l with (l + 1) % softmax_every == 0
    layer_types: list[str] | None = None  # derived: 'linear_attention' / 'full_attention' per layer
    # DeepNorm residual x = alpha * h + beta * f(h), per sub-layer (HF names); alpha None -> (2N)^(1/4)
    full_attn_alpha_factor: float | None = None
    linear_attn_alpha_factor: float | None = None
    mlp_alpha_factor: float | None = None
    full_attn_beta_factor: float = 1.0
    linear_attn_beta_factor: float = 1.0
    mlp_beta_factor: float = 1.0
    # MoE training knobs (moe.MoE): None = dropless; Switch balance loss and router z-loss coefficients
    capacity_factor: float | None = None
    router_aux_loss_coef: float = 0.01
    router_z_loss_coef: float = 0.0

    def __post_init__(self):
        def bad(msg):
            raise ValueError(f"MiniMaxConfig: {msg}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "intermediate_size", "num_local_experts",
                     "num_experts_per_tok", "block_size", "max_position_embeddings", "softmax_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                bad(f"{name} must be a positive int, got {v!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            bad(f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}")
        if self.num_experts_per_tok > self.num_local_experts:
            bad(f"num_experts_per_tok={self.num_experts_per_tok} > num_local_experts={self.num_local_experts}")
        if self.rotary_dim is None:
            self.rotary_dim = self.head_dim // 2  # MiniMax-01 rotates half of each head [P section 2.4]
        if self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim:
            bad(f"rotary_dim must be even and in (0, head_dim={self.head_dim}], got {self.rotary_dim}")
        # the hybrid layout: one field (layer_pattern) and one helper (layer_types_for)
        L = self.num_hidden_layers
        if self.layer_pattern == "custom":
            if self.layer_types is None or len(self.layer_types) != L:
                bad(f"layer_pattern='custom' needs layer_types, a list of {L} entries")
            if not set(self.layer_types) <= {"linear_attention", "full_attention"}:
                bad(f"layer_types entries must be 'linear_attention' or 'full_attention', got {self.layer_types}")
            self.layer_types = list(self.layer_types)
        else:
            derived = layer_types_for(self.layer_pattern, L, self.softmax_every)
            if self.layer_types is not None and list(self.layer_types) != derived:
                bad(f"layer_types {self.layer_types} contradict layer_pattern={self.layer_pattern!r} with "
                    f"{L} layers; pass layer_pattern='custom' to give layer_types explicitly")
            self.layer_types = derived
        alpha = (2 * L) ** 0.25  # DeepNorm residual scale [P section 4.2]
        for name in ("full_attn_alpha_factor", "linear_attn_alpha_factor", "mlp_alpha_factor"):
            if getattr(self, name) is None:
                setattr(self, name, alpha)

    @classmethod
    def from_preset(cls, name, **overrides):
        """MiniMaxConfig.from_preset('tiny', vocab_size=257): a named size with some fields replaced."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


def layer_types_for(pattern, num_layers, softmax_every=8):
    """The attention kind of every layer: 'full_attention' (softmax) or 'linear_attention' (lightning)."""
    if pattern == "hybrid":  # MiniMax-01: 7 lightning layers, then 1 softmax layer, repeated
        return ["full_attention" if (l + 1) % softmax_every == 0 else "linear_attention" for l in range(num_layers)]
    if pattern == "softmax":
        return ["full_attention"] * num_layers
    if pattern == "lightning":
        return ["linear_attention"] * num_layers
    raise ValueError(f"unknown layer_pattern {pattern!r}; choose 'hybrid', 'softmax', 'lightning' or 'custom'")


# Named sizes. The vocabulary belongs to the tokenizer, not the preset: train.py overrides vocab_size from the
# dataset's meta.json (257 for bytes, 50257 for gpt2, 100277 for cl100k); the values here are defaults.
PRESETS = {
    # CPU tests in seconds: 4 layers, softmax at layers 1 and 3, 4 experts
    "tiny": dict(vocab_size=512, hidden_size=64, num_hidden_layers=4, softmax_every=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, rotary_dim=8, intermediate_size=96, num_local_experts=4,
                 num_experts_per_tok=2, block_size=16, max_position_embeddings=512),
    # GPU demo: 16 layers (softmax at 7, 15), ~97M active / ~325M total parameters without the embeddings
    "small": dict(vocab_size=50304, hidden_size=512, num_hidden_layers=16, num_attention_heads=8,
                  num_key_value_heads=2, head_dim=64, rotary_dim=32, intermediate_size=1536, num_local_experts=8,
                  num_experts_per_tok=2, block_size=64, max_position_embeddings=4096),
    # the benchmark shape (bench/): 8 layers with softmax attention at layer 7 only
    "bench": dict(vocab_size=32768, hidden_size=1024, num_hidden_layers=8, num_attention_heads=16,
                  num_key_value_heads=4, head_dim=64, rotary_dim=32, intermediate_size=1536, num_local_experts=16,
                  num_experts_per_tok=2, block_size=256, max_position_embeddings=65536),
    # the released model's shape (MINIMAX01.md section 1): 456B total / 45.9B active parameters
    "minimax-text-01": dict(vocab_size=200064, hidden_size=6144, num_hidden_layers=80, num_attention_heads=64,
                            num_key_value_heads=8, head_dim=128, rotary_dim=64, rope_theta=1e7,
                            intermediate_size=9216, num_local_experts=32, num_experts_per_tok=2, block_size=256,
                            max_position_embeddings=10240000),
}

# -----------------------------------------------------------------------------
# small pieces: RMSNorm and rotary embeddings


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, returned in x's dtype.

    torch's F.rms_norm: on CUDA one fused kernel each way with fp32 accumulation. The spelled-out formula
    (rms_norm_reference, the twin in tests/test_speed_paths.py) launches ~7 kernels and keeps fp32 copies of x
    for the backward: the largest item of an eager training step (bench/NOTES_speed.md). When x and the weight
    differ in dtype, both go to fp32 first.
    """

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        if x.dtype == self.weight.dtype:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


def rms_norm_reference(x, weight, eps):
    """RMSNorm spelled out: fp32 math (fp64 for fp64 input), one rounding to x's dtype at the end."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    x32 = x.to(acc)
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.to(acc)).to(x.dtype)


def rope_cos_sin(positions, inv_freq):
    """positions (T,) int -> cos, sin (T, rotary_dim) fp32, the frequencies laid out twice (rotate-half)."""
    freqs = torch.outer(positions.float(), inv_freq)  # (T, rotary_dim / 2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, rotary_dim)
    return emb.cos(), emb.sin()


def apply_rotary(x, cos, sin):
    """Rotate the first rotary_dim dims of every head of x (B, H, T, Dh); the rest pass through unchanged.

    NeoX "rotate-half" pairing inside the rotary dims: dim i pairs with dim i + rotary_dim/2 (as the released
    MiniMax code and vLLM; transformers' native MiniMax does the same over the full head dim).
    """
    rd = cos.shape[-1]
    x_rot, x_pass = x[..., :rd].float(), x[..., rd:]  # (B, H, T, rd), (B, H, T, Dh - rd)
    x1, x2 = x_rot.chunk(2, dim=-1)
    x_rot = x_rot * cos + torch.cat((-x2, x1), dim=-1) * sin  # cos/sin (T, rd) broadcast over B, H
    return torch.cat((x_rot.to(x.dtype), x_pass), dim=-1)


# -----------------------------------------------------------------------------
# the two attention kinds


KV_CHUNK = 256  # KV-cache slots per chunk in the static decode step (the cache is allocated in whole chunks)


class SoftmaxAttention(nn.Module):
    """Causal GQA softmax attention with partial RoPE (10 of the 80 layers of MiniMax-Text-01)."""

    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = (config.num_attention_heads, config.num_key_value_heads,
                                                      config.head_dim)
        D, inner, kv = config.hidden_size, self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        self.q_proj = nn.Linear(D, inner, bias=False)
        self.k_proj = nn.Linear(D, kv, bias=False)
        self.v_proj = nn.Linear(D, kv, bias=False)
        self.o_proj = nn.Linear(inner, D, bias=False)

    def forward(self, x, cos, sin, cache=None, pos=0):
        """x (B, T, D) -> (B, T, D). With a cache: the new k, v go to slots [pos, pos + T), then attend to all."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, Dh)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, T, Dh)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, T, Dh)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is None:  # training / plain forward
            y = self.attend(q, k, v)  # (B, H, T, Dh)
        elif isinstance(pos, torch.Tensor):  # static decode step (CUDA graphs): the position is a device tensor
            y = self.attend_static(q, k, v, cache, pos)  # (B, H, 1, Dh)
        else:  # prefill or eager decode
            y = self.attend_cache(q, k, v, cache, pos)  # (B, H, T, Dh)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, H * Dh)
        return self.o_proj(y)

    def attend(self, q, k, v):
        """Causal attention among the T tokens of a plain forward (no cache): q (B, H, T, Dh), k, v (B, Hkv, T, Dh)
        after RoPE -> (B, H, T, Dh). The seam for sequence parallelism: parallel.py replaces it on an instance
        with a version that gathers the keys and values of the whole sequence."""
        # SDPA: scale 1/sqrt(Dh); the flash/efficient kernels and the math path all take the softmax in fp32.
        # enable_gqa lets each group of H / Hkv query heads share one KV head without materialising copies.
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    def attend_cache(self, q, k, v, cache, pos):
        """Write the new k, v to cache slots [pos, pos + T) and attend to everything cached so far.
        q (B, H, T, Dh), k, v (B, Hkv, T, Dh) -> (B, H, T, Dh). Position pos is a host int."""
        T = q.shape[2]
        cache["k"][:, :, pos:pos + T] = k  # the cache is preallocated: writes in place, no re-allocation
        cache["v"][:, :, pos:pos + T] = v
        # prefill (pos == 0): the new keys are all there is, so plain causal attention (flash kernel, no (T, T)
        # mask: at T = 64k that mask alone would be 4 GB). The SDPA call of attend, not a call of attend itself:
        # parallel.py may swap that one, and a cache always holds whole sequences on one rank.
        if pos == 0:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        # continue after earlier tokens: attend to everything cached so far
        k = cache["k"][:, :, :pos + T].to(q.dtype)  # (B, Hkv, pos + T, Dh)
        v = cache["v"][:, :, :pos + T].to(q.dtype)
        mask = None
        if T > 1:  # query i sits at position pos + i and sees keys 0 .. pos + i
            q_pos = torch.arange(pos, pos + T, device=q.device)
            mask = torch.arange(pos + T, device=q.device)[None, :] <= q_pos[:, None]  # (T, pos + T)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=False, enable_gqa=True)

    def attend_static(self, q, k, v, cache, pos):
        """One new token whose position is the device tensor pos (shape ()), attending over the WHOLE
        preallocated cache with a mask: the same shapes and no host values at every step, so a CUDA graph can
        capture it. q (B, H, 1, Dh), k, v (B, Hkv, 1, Dh) -> (B, H, 1, Dh). Twin: attend_cache."""
        B, G = q.shape[0], self.n_head // self.n_kv_head
        cache["k"].index_copy_(2, pos.view(1), k.to(cache["k"].dtype))  # write slot pos in place
        cache["v"].index_copy_(2, pos.view(1), v.to(cache["v"].dtype))
        # Flash-decoding with torch ops. One query per head gives SDPA (or one matmul over all keys) only
        # 16 rows of work, so a 64k cache ran on a handful of SMs (+1 to +2 ms per token on an H200). Here the
        # keys go in chunks of KV_CHUNK: one batched matmul scores every chunk in parallel, one max and one sum
        # over all chunks make the softmax exact. fp32 operands: scores as exact as flash attention's fp32
        # accumulation (bf16 values are exact in fp32 and TF32).
        L, Hkv, Dh = cache["k"].shape[2], self.n_kv_head, self.head_dim
        C = KV_CHUNK if L % KV_CHUNK == 0 else L  # new_cache allocates multiples of KV_CHUNK
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        q_g = q.view(B, Hkv, 1, G, Dh).to(acc)  # GQA: head h = kv * G + g (enable_gqa's order)
        k_c = cache["k"].view(B, Hkv, L // C, C, Dh).to(acc)  # (B, Hkv, S, C, Dh), S = L / C chunks
        v_c = cache["v"].view(B, Hkv, L // C, C, Dh).to(acc)
        scores = q_g @ k_c.transpose(-1, -2) * Dh ** -0.5  # (B, Hkv, S, G, C)
        seen = (torch.arange(L, device=q.device) <= pos).view(L // C, 1, C)  # slots written so far
        scores = scores.masked_fill(~seen, float("-inf"))
        p = torch.exp(scores - scores.amax(dim=(2, 4), keepdim=True))  # max over ALL keys; slot 0 is always seen
        y = (p @ v_c).sum(2) / p.sum(dim=(2, 4)).unsqueeze(-1)  # (B, Hkv, G, Dh)
        return y.to(q.dtype).view(B, self.n_head, 1, Dh)


class LightningAttention(nn.Module):
    """Linear attention with a per-head exponential decay (70 of the 80 layers of MiniMax-Text-01).

    Per head h, with lambda_h = exp(-slope_h):  o_t = sum_{j <= t} lambda_h^(t - j) (q_t . k_j) v_j
    (no 1/sqrt(d), no softmax, no normaliser; the RMSNorm over the heads' outputs plays that role). Equivalently
    a recurrence over a d x d state S_t = lambda S_{t-1} + k_t v_t^T, o_t = S_t^T q_t: that is what the cache
    holds. The chunked kernels of lightning_attn.py compute the same thing for a whole sequence.
    """

    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx, self.num_layers = layer_idx, config.num_hidden_layers
        self.n_head, self.head_dim = config.num_attention_heads, config.head_dim
        D, inner = config.hidden_size, self.n_head * self.head_dim
        self.qkv_proj = nn.Linear(D, 3 * inner, bias=False)  # per head [q_h | k_h | v_h], NOT [all q | all k | ..]
        self.output_gate = nn.Linear(D, inner, bias=False)
        self.norm = RMSNorm(inner, eps=1e-6)  # ONE norm over all heads jointly (reference eps 1e-6)
        self.out_proj = nn.Linear(inner, D, bias=False)
        # decay slopes, fixed (not trained, not in checkpoints): set in MiniMax._init_buffers from the GLOBAL
        # layer index, so the softmax layers count in the per-layer scaling
        self.register_buffer("slope", torch.empty(self.n_head), persistent=False)

    def forward(self, x, cache=None, pos=0):
        """x (B, T, D) -> (B, T, D). With a cache: start from its state and leave the final state there."""
        B, T, _ = x.shape
        H, Dh = self.n_head, self.head_dim
        qkv = F.silu(self.qkv_proj(x)).view(B, T, H, 3 * Dh)  # SiLU on q, k AND v
        q, k, v = qkv.transpose(1, 2).split(Dh, dim=-1)  # each (B, H, T, Dh)
        if cache is None:  # training / plain forward: chunked kernel from a zero state
            o = self.attend(q, k, v)  # (B, H, T, Dh)
        elif T == 1:  # decode: one recurrence step, O(Dh^2) per head whatever the context length
            o, state = lightning_attn_decode(q[:, :, 0], k[:, :, 0], v[:, :, 0], self.slope, cache["state"])
            cache["state"].copy_(state)  # in place: the cache tensors keep their addresses (CUDA-graph friendly)
            o = o.to(v.dtype).unsqueeze(2)  # (B, H, 1, Dh)
        else:  # prefill (or a multi-token step): chunked kernel that continues from and returns the state
            initial = cache["state"] if pos > 0 else None
            o, state = lightning_attn(q, k, v, self.slope, initial_state=initial, output_final_state=True)
            cache["state"].copy_(state)
        o = o.transpose(1, 2).reshape(B, T, H * Dh)  # (B, T, H * Dh)
        o = self.norm(o)
        o = torch.sigmoid(self.output_gate(x)) * o  # output gate from the same (normed) layer input
        return self.out_proj(o)

    def attend(self, q, k, v):
        """Lightning attention over the T tokens of a plain forward, from a zero state: q, k, v (B, H, T, Dh)
        after SiLU -> o (B, H, T, Dh). The seam for sequence parallelism: parallel.py replaces it on an instance
        with LASP+ (the same kernel on a slice, plus the decayed states of the earlier slices)."""
        o, _ = lightning_attn(q, k, v, self.slope)
        return o


# -----------------------------------------------------------------------------
# the loss without the logits tensor


class _ChunkedCrossEntropy(torch.autograd.Function):
    """mean over rows with targets != -1 of CE(x @ w^T, targets), holding (chunk, V) logits at a time.

    The forward also computes the gradients, chunk by chunk: d loss / d logits = (softmax - onehot) / n_valid,
    then dx = g @ w and dw += g^T @ x_chunk. The backward only scales them by the incoming gradient. Same
    matmul FLOPs as the plain lm_head + F.cross_entropy (no recompute); memory O(chunk * V) instead of about
    4 (N, V) tensors (bf16 logits, their fp32 copy, log-softmax, its gradient). Twin: forward(logits=True).
    """

    @staticmethod
    def forward(ctx, x_ND, w_VD, targets_N, chunk, need_grad):
        acc = torch.float64 if x_ND.dtype == torch.float64 else torch.float32  # softmax precision (fp64 tests)
        valid_N = targets_N != -1
        n_valid = valid_N.sum()  # a device tensor: no host sync
        loss = torch.zeros((), device=x_ND.device, dtype=acc)
        dx_ND = torch.empty_like(x_ND) if need_grad else None
        dw_VD = torch.zeros(w_VD.shape, device=w_VD.device, dtype=acc) if need_grad else None
        for s in range(0, x_ND.shape[0], chunk):
            x_nD, t_n, ok_n = x_ND[s:s + chunk], targets_N[s:s + chunk].clamp(min=0), valid_N[s:s + chunk]
            logits_nV = (x_nD @ w_VD.t()).to(acc)  # (n, V): the matmul in x's dtype, like the plain path
            lse_n = torch.logsumexp(logits_nV, dim=-1)  # (n,)
            loss += ((lse_n - logits_nV.gather(1, t_n[:, None]).squeeze(1)) * ok_n).sum()
            if need_grad:
                g_nV = logits_nV.sub_(lse_n[:, None]).exp_()  # softmax, in place over the logits
                g_nV.scatter_add_(1, t_n[:, None], -torch.ones_like(lse_n)[:, None])  # - onehot(target)
                g_nV = (g_nV * (ok_n.to(acc) / n_valid)[:, None]).to(x_ND.dtype)  # ignored rows get no gradient
                dx_ND[s:s + chunk] = g_nV @ w_VD  # (n, D)
                dw_VD += (g_nV.t() @ x_nD).to(acc)  # (V, D), summed over chunks in fp32
        ctx.save_for_backward(dx_ND, dw_VD)
        ctx.w_dtype = w_VD.dtype
        return loss / n_valid

    @staticmethod
    def backward(ctx, g):
        dx_ND, dw_VD = ctx.saved_tensors
        return (dx_ND * g).to(dx_ND.dtype), (dw_VD * g).to(ctx.w_dtype), None, None, None


def chunked_cross_entropy(x_ND, w_VD, targets_N, chunk=None):
    """F.cross_entropy((x @ w^T).float(), targets, ignore_index=-1) without materialising the (N, V) logits.
    x (N, D) final hidden states, w (V, D) the lm_head weight, targets (N,). chunk: rows per step (default
    about 2^27 / V, i.e. 512 MB of fp32 logits)."""
    chunk = chunk or max(1, 2 ** 27 // w_VD.shape[0])
    need_grad = torch.is_grad_enabled() and (x_ND.requires_grad or w_VD.requires_grad)
    return _ChunkedCrossEntropy.apply(x_ND, w_VD, targets_N, chunk, need_grad)


# -----------------------------------------------------------------------------
# the decoder block


class Block(nn.Module):
    """Attention (kind chosen by layer_types[layer_idx]) + MoE, each with the post-norm DeepNorm residual."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_type = config.layer_types[layer_idx]
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if self.layer_type == "linear_attention":
            self.self_attn = LightningAttention(config, layer_idx)
            self.attn_alpha, self.attn_beta = config.linear_attn_alpha_factor, config.linear_attn_beta_factor
        else:
            self.self_attn = SoftmaxAttention(config)
            self.attn_alpha, self.attn_beta = config.full_attn_alpha_factor, config.full_attn_beta_factor
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.block_sparse_moe = MoE(config.hidden_size, config.intermediate_size, config.num_local_experts,
                                    top_k=config.num_experts_per_tok, capacity_factor=config.capacity_factor,
                                    aux_loss_coef=config.router_aux_loss_coef,
                                    z_loss_coef=config.router_z_loss_coef)
        self.mlp_alpha, self.mlp_beta = config.mlp_alpha_factor, config.mlp_beta_factor

    def forward(self, x, cos, sin, cache=None, pos=0, stats=True):
        """x (B, T, D) -> (x (B, T, D), the MoE's aux dict; {} with stats=False)."""
        h = self.input_layernorm(x)  # the residual below is h, the NORMED input (post-norm)
        if self.layer_type == "linear_attention":
            a = self.self_attn(h, cache, pos)  # lightning layers have no positional encoding
        else:
            a = self.self_attn(h, cos, sin, cache, pos)
        x = self.attn_alpha * h + self.attn_beta * a
        h = self.post_attention_layernorm(x)
        y, aux = self.block_sparse_moe(h, stats=stats)
        x = self.mlp_alpha * h + self.mlp_beta * y
        return x, aux


# -----------------------------------------------------------------------------
# the inference cache


@dataclass
class Cache:
    """What generation keeps between steps: one dict per layer, allocated once for max_len tokens.

    softmax layer:   {'k': (B, Hkv, slots, Dh), 'v': (B, Hkv, slots, Dh)}       filled up to pos
                     (slots = max_len rounded up to whole KV_CHUNKs)
    lightning layer: {'state': (B, H, Dh, Dh) fp32}                              size independent of pos
    pos: tokens already in the cache (the next token's position). Every tensor is written in place, so the
    addresses never change: StaticDecoder captures a decode step on them in a CUDA graph (with the position
    in a device tensor and the softmax layers attending over all max_len slots under a mask).
    """
    layers: list
    max_len: int
    pos: int = 0


def _fp32(logits):
    """Sampling precision: fp32 (fp64 stays fp64, for the fp64 tests)."""
    return logits if logits.dtype == torch.float64 else logits.float()


class StaticDecoder:
    """model.decode_step on fixed input buffers, replayed from a CUDA graph: one launch per token instead of
    ~70 kernel launches per layer from Python (batch-1 decoding is launch-bound: the weights a token reads
    take ~0.1 ms at HBM speed). Tied to one cache (the graph holds its addresses), so capture is once per
    generate call; a server would keep one cache + decoder per batch size.

    decoder(next_id (B, 1)) -> logits (B, V) for the token at cache.pos, and advances cache.pos. On CUDA the
    first call runs the step eagerly (warm-up: cuBLAS handles, allocator) and then captures the graph; later
    calls replay it. The returned logits live in the graph's output buffer: use them before the next call.
    Off CUDA (tests) it runs the same static step without a graph.
    """

    def __init__(self, model, cache):
        B = cache.layers[0]["state" if "state" in cache.layers[0] else "k"].shape[0]
        device = model.lm_head.weight.device
        self.model, self.cache = model, cache
        self.idx = torch.zeros(B, 1, dtype=torch.long, device=device)  # static input buffers
        self.pos = torch.zeros((), dtype=torch.long, device=device)
        self.use_graph = device.type == "cuda"
        self.graph, self.logits = None, None

    @torch.no_grad()
    def __call__(self, next_id):
        if self.cache.pos >= self.cache.max_len:
            raise ValueError(f"StaticDecoder: the cache is full ({self.cache.max_len} tokens)")
        self.idx.copy_(next_id)
        self.pos.fill_(self.cache.pos)  # host int -> device scalar: a tiny kernel, no sync
        self.cache.pos += 1
        if not self.use_graph:
            return self.model.decode_step(self.idx, self.cache, self.pos)
        if self.graph is not None:
            self.graph.replay()
            return self.logits
        # first call: a real step on a side stream (it also fills this position's cache), then capture
        # (capturing records kernels without running them, so the cache is not touched twice)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            logits = self.model.decode_step(self.idx, self.cache, self.pos)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self.model.decode_step(self.idx, self.cache, self.pos)
        return logits


# -----------------------------------------------------------------------------
# the model


class MiniMax(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([Block(config, l) for l in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)  # untied from embed_tokens
        # RoPE inverse frequencies theta^(-2i / rotary_dim), i = 0 .. rotary_dim/2 - 1 (set in _init_buffers)
        self.register_buffer("inv_freq", torch.empty(config.rotary_dim // 2), persistent=False)
        self.last_stats = {}  # detached numbers for the training log, refreshed by forward(..., targets)
        # speed knobs (bench/NOTES_speed.md), each with its plain twin tested in tests/test_speed_paths.py:
        self.checkpoint_layers = 0  # recompute the first n blocks in the backward (activation checkpointing)
        self.check_ids = True  # validate token ids: one host sync per forward; tight training loops may skip it
        # sequence parallelism (parallel.py sets it): the T tokens of a forward without a cache are slice i of
        # n equal slices of longer sequences, so their RoPE positions are i*T .. i*T + T-1. Default (0, 1): whole
        # sequences. A forward with a cache ignores it (generation runs on one rank, whole sequences).
        self.seq_slice = (0, 1)
        self._init_buffers()
        self.init_weights()

    # ---- initialisation --------------------------------------------------------------------------------

    @torch.no_grad()
    def init_weights(self):
        """Initialise every parameter (Xavier + DeepNorm, MiniMax-01 section 4.2; DeepNet arXiv 2203.00555).

        N = num_hidden_layers, beta = (8N)^(-1/4) is the init GAIN (0.354 for N = 8, 0.199 for N = 80); the
        residual scale alpha = (2N)^(1/4) lives in the config (*_alpha_factor), the branch multiplier
        (*_beta_factor) is 1. Xavier normal: std = gain * sqrt(2 / (fan_in + fan_out)).

        | tensor                                     | shape                  | init                             |
        | ------------------------------------------ | ---------------------- | -------------------------------- |
        | embed_tokens.weight                        | (V, D)                 | normal(0, 1): layer 0 normalises |
        | softmax self_attn.q_proj, k_proj           | (H*Dh, D), (Hkv*Dh, D) | Xavier, gain 1                   |
        | softmax self_attn.v_proj, o_proj           | (Hkv*Dh, D), (D, H*Dh) | Xavier, gain beta                |
        | lightning self_attn.qkv_proj: q, k rows    | 2 x (H*Dh, D)          | Xavier of (H*Dh, D), gain 1      |
        | lightning self_attn.qkv_proj: v rows       | (H*Dh, D)              | Xavier of (H*Dh, D), gain beta   |
        | lightning self_attn.output_gate            | (H*Dh, D)              | Xavier, gain 1                   |
        | lightning self_attn.out_proj               | (D, H*Dh)              | Xavier, gain beta                |
        | lightning self_attn.norm.weight            | (H*Dh,)                | ones                             |
        | input_layernorm, post_attention_layernorm  | (D,)                   | ones                             |
        | block_sparse_moe.gate.weight (router)      | (E, D)                 | Xavier, gain 1                   |
        | block_sparse_moe.w1, w3                    | (E, F, D)              | Xavier of each (F, D), gain beta |
        | block_sparse_moe.w2                        | (E, D, F)              | Xavier of each (D, F), gain beta |
        | norm.weight (final)                        | (D,)                   | ones                             |
        | lm_head.weight                             | (V, D)                 | Xavier, gain 1                   |

        Buffers (lightning slopes, RoPE frequencies) are constants, set by _init_buffers, not here.
        Call again after building on the 'meta' device and .to_empty(device=...).
        """
        beta = (8 * self.config.num_hidden_layers) ** -0.25

        def xavier(w, gain):  # w (..., out, in): Xavier per trailing matrix (also per expert)
            std = gain * math.sqrt(2.0 / (w.shape[-1] + w.shape[-2]))
            nn.init.normal_(w, 0.0, std)

        nn.init.normal_(self.embed_tokens.weight, 0.0, 1.0)
        for block in self.layers:
            attn = block.self_attn
            if block.layer_type == "linear_attention":
                H, Dh = attn.n_head, attn.head_dim
                qkv = attn.qkv_proj.weight.view(H, 3 * Dh, -1)  # (H, 3 Dh, D): per head [q_h | k_h | v_h]
                std = math.sqrt(2.0 / (H * Dh + qkv.shape[-1]))  # Xavier std of one (H*Dh, D) part
                nn.init.normal_(qkv[:, :2 * Dh], 0.0, std)  # q and k rows
                nn.init.normal_(qkv[:, 2 * Dh:], 0.0, beta * std)  # v rows
                xavier(attn.output_gate.weight, 1.0)
                xavier(attn.out_proj.weight, beta)
                nn.init.ones_(attn.norm.weight)
            else:
                xavier(attn.q_proj.weight, 1.0)
                xavier(attn.k_proj.weight, 1.0)
                xavier(attn.v_proj.weight, beta)
                xavier(attn.o_proj.weight, beta)
            moe = block.block_sparse_moe
            xavier(moe.gate.weight, 1.0)
            for w in (moe.w1, moe.w3, moe.w2):
                xavier(w, beta)
            nn.init.ones_(block.input_layernorm.weight)
            nn.init.ones_(block.post_attention_layernorm.weight)
        nn.init.ones_(self.norm.weight)
        xavier(self.lm_head.weight, 1.0)

    @torch.no_grad()
    def _init_buffers(self):
        """(Re)compute the constant buffers in fp32 on the model's device: RoPE frequencies and decay slopes."""
        cfg, device = self.config, self.embed_tokens.weight.device
        rd = cfg.rotary_dim
        self.inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, rd, 2, dtype=torch.float32, device=device) / rd))
        for l, block in enumerate(self.layers):
            if block.layer_type == "linear_attention":
                block.self_attn.slope = build_slopes(cfg.num_attention_heads, l, cfg.num_hidden_layers).to(
                    device=device, dtype=torch.float32)

    def _apply(self, fn, *args, **kwargs):
        # .to(device/dtype), .cuda(), .bfloat16(), .to_empty() all end here. Recompute the constant buffers
        # afterwards, so they stay fp32 (a bf16 RoPE frequency or slope would be far off at long range) and
        # are valid after to_empty() on a meta-built model.
        super()._apply(fn, *args, **kwargs)
        self._init_buffers()
        return self

    # ---- parameter counts and FLOPs ----------------------------------------------------------------------

    def num_params(self):
        """All parameters, embeddings and lm_head included (works on the 'meta' device)."""
        return sum(p.numel() for p in self.parameters())

    def num_active_params(self):
        """Parameters used per token: without embed_tokens and lm_head, and only K of the E experts."""
        K, E = self.config.num_experts_per_tok, self.config.num_local_experts
        n = 0
        for name, p in self.named_parameters():
            if name.startswith(("embed_tokens.", "lm_head.")):
                continue
            is_expert = re.search(r"block_sparse_moe\.w[123]$", name) is not None
            n += p.numel() * K // E if is_expert else p.numel()
        return n

    def estimate_flops_per_token(self, seq_len):
        """Training FLOPs (forward + backward) per token for sequences of seq_len tokens.

        Matmuls: 2 FLOPs per multiply-add forward, 2x that backward -> 6 per weight per token, over the weights a
        token actually multiplies: num_active_params() + lm_head (the embedding lookup is free).
        Attention mixing, forward, per token and layer (x3 for forward + backward):
          softmax:   QK^T and AV against on average T/2 earlier keys (causal): 2 * 2 * H * Dh * T/2
          lightning: intra-chunk QK^T and AV on the causal half of a C x C tile: 2 * 2 * H * Dh * C/2, plus the
                     inter-chunk q S and the state update k v^T: 2 * 2 * H * Dh * Dh.  C = min(block_size, T).
        So a lightning layer costs O(Dh * (C + Dh)) per token whatever T is; a softmax layer O(Dh * T).
        C is the reference algorithm's chunk (config.block_size); the kernels may tile differently (the GPU
        kernels use 64) for the same result, so this is a model-FLOPs convention, like not counting the
        masked-out half of a causal tile.
        """
        cfg = self.config
        H, Dh, T = cfg.num_attention_heads, cfg.head_dim, seq_len
        C = min(cfg.block_size, T)
        n_soft = cfg.layer_types.count("full_attention")
        n_light = cfg.num_hidden_layers - n_soft
        dense = 6 * (self.num_active_params() + self.lm_head.weight.numel())
        softmax = n_soft * 3 * (2 * H * Dh * T)
        lightning = n_light * 3 * (2 * H * Dh * C + 4 * H * Dh * Dh)
        return dense + softmax + lightning

    def estimate_mfu(self, tokens_per_iter, dt, seq_len, peak_flops=989e12):
        """Model FLOPs utilisation: forward + backward over tokens_per_iter TOKENS (not sequences, unlike
        nanoGPT), in sequences of seq_len, took dt seconds on one GPU whose peak is peak_flops (default: H100
        SXM dense bf16, 989 TFLOP/s). Per GPU: pass the tokens of this rank."""
        flops = self.estimate_flops_per_token(seq_len) * tokens_per_iter
        return flops / dt / peak_flops

    # ---- forward -----------------------------------------------------------------------------------------

    def _check_inputs(self, idx, inputs_embeds, cache):
        if (idx is None) == (inputs_embeds is None):
            raise ValueError("MiniMax: pass exactly one of idx (B, T) token ids or inputs_embeds (B, T, hidden)")
        if idx is not None:
            if idx.dim() != 2 or idx.dtype not in (torch.int64, torch.int32):
                raise ValueError(f"MiniMax: idx must be a (B, T) integer tensor, got {idx.dtype} {tuple(idx.shape)}")
            # host sync (.any() -> Python bool), one per forward: an out-of-range id would otherwise be a CUDA
            # device-side assert that kills the process without saying which id. Skipped under torch.compile.
            if (self.check_ids and not torch.compiler.is_compiling()
                    and ((idx < 0) | (idx >= self.config.vocab_size)).any()):
                bad = idx[(idx < 0) | (idx >= self.config.vocab_size)]
                raise ValueError(f"MiniMax: token ids must be in [0, vocab_size={self.config.vocab_size}), got "
                                 f"{bad[:8].tolist()}; check that the tokenizer matches the model's vocab_size")
            T = idx.shape[1]
        else:
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.hidden_size:
                raise ValueError(f"MiniMax: inputs_embeds must be (B, T, {self.config.hidden_size}), got "
                                 f"{tuple(inputs_embeds.shape)}")
            T = inputs_embeds.shape[1]
        i, n = self.seq_slice
        if cache is not None:
            length, what = cache.pos + T, f" (position {cache.pos} + {T} new)"
        else:  # a slice (sequence parallelism): the whole sequence must fit
            length, what = n * T, f" (slice {i} of {n}, {T} tokens each)" if n > 1 else ""
        if length > self.config.max_position_embeddings:
            raise ValueError(f"MiniMax: sequence of {length} tokens{what} is longer than "
                             f"max_position_embeddings={self.config.max_position_embeddings}; crop the input or "
                             "build the model with a larger max_position_embeddings")
        return T

    def _hidden(self, idx=None, inputs_embeds=None, cache=None, stats=False):
        """The decoder stack: -> (final-normed hidden states (B, T, D), list of the L MoE aux dicts).

        stats: compute the MoE losses and statistics (only a forward with targets reads them; without, the aux
        dicts are empty and the ~10 small kernels per layer they cost are skipped, e.g. in generation).
        """
        T = self._check_inputs(idx, inputs_embeds, cache)
        pos = cache.pos if cache is not None else 0  # tokens already in the cache
        if cache is not None and pos + T > cache.max_len:
            raise ValueError(f"MiniMax: the cache holds {cache.max_len} tokens, {pos} used, {T} more do not fit")
        x = self.embed_tokens(idx) if inputs_embeds is None else inputs_embeds  # (B, T, D)
        start = pos if cache is not None else self.seq_slice[0] * T  # position of the first of the T tokens
        positions = torch.arange(start, start + T, device=x.device)
        cos, sin = rope_cos_sin(positions, self.inv_freq)  # (T, rotary_dim) each, shared by all softmax layers
        auxes = []
        for l, block in enumerate(self.layers):
            if l < self.checkpoint_layers and cache is None and torch.is_grad_enabled():
                # activation checkpointing: keep only the block's input; the backward reruns the block
                x, aux = torch.utils.checkpoint.checkpoint(block, x, cos, sin, stats=stats, use_reentrant=False)
            else:
                x, aux = block(x, cos, sin, None if cache is None else cache.layers[l], pos, stats)
            auxes.append(aux)
        if cache is not None:
            cache.pos = pos + T
        return self.norm(x), auxes

    def forward(self, idx, targets=None, inputs_embeds=None, cache=None, logits=True):
        """idx (B, T) token ids -> (logits (B, T, V), loss or None).

        loss = cross-entropy (fp32, targets == -1 ignored) + mean over the layers of the MoE aux['aux_loss']
        (already weighted by router_aux_loss_coef / router_z_loss_coef). After a forward with targets,
        self.last_stats holds detached tensors for logging (no host sync): 'ce', 'aux_loss', 'balance_loss',
        'z_loss' (means over layers), 'load' (L, E) and 'dropped' (L, E).
        inputs_embeds (B, T, D) replaces the embedding lookup (vision.py); pass idx=None then.
        cache (see new_cache) makes this an incremental step: the T new tokens sit at positions cache.pos ...
        logits=False (with targets): the loss by chunked_cross_entropy, never holding the (B, T, V) logits
        (at T = 64k they are 4 GB in bf16 plus 3 fp32 copies in the plain path); returns (None, loss).
        """
        x, auxes = self._hidden(idx, inputs_embeds, cache, stats=targets is not None)
        if targets is None or logits:
            logits = self.lm_head(x)  # (B, T, V)
            if targets is None:
                return logits, None
            ce = F.cross_entropy(_fp32(logits).view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        else:
            logits = None
            ce = chunked_cross_entropy(x.reshape(-1, x.size(-1)), self.lm_head.weight, targets.reshape(-1))
        aux_loss = torch.stack([a["aux_loss"] for a in auxes]).mean()
        self.last_stats = {
            "ce": ce.detach(),
            "aux_loss": aux_loss.detach(),
            "balance_loss": torch.stack([a["balance_loss"] for a in auxes]).mean().detach(),
            "z_loss": torch.stack([a["z_loss"] for a in auxes]).mean().detach(),
            "load": torch.stack([a["load"] for a in auxes]),  # (L, E) fraction of slots per expert
            "dropped": torch.stack([a["dropped"] for a in auxes]),  # (L, E) fraction of each expert's slots dropped
        }
        return logits, ce + aux_loss

    # ---- generation --------------------------------------------------------------------------------------

    def new_cache(self, batch_size, max_len, device=None, dtype=None):
        """An empty Cache for batch_size sequences of up to max_len tokens (prompt + generated).

        KV in dtype (default: the autocast dtype when autocast is on, else the parameters' dtype); lightning
        states always fp32 (a bf16 state drifts over long generations; vLLM moved to fp32 for that reason).
        """
        cfg, p = self.config, self.lm_head.weight
        device = p.device if device is None else torch.device(device)
        if dtype is None:
            autocast = torch.is_autocast_enabled(device.type)
            dtype = torch.get_autocast_dtype(device.type) if autocast else p.dtype
        layers = []
        for block in self.layers:
            if block.layer_type == "linear_attention":
                H, Dh = cfg.num_attention_heads, cfg.head_dim
                sdt = torch.float64 if p.dtype == torch.float64 else torch.float32  # fp64 only in fp64 tests
                layers.append({"state": torch.zeros(batch_size, H, Dh, Dh, device=device, dtype=sdt)})
            else:
                slots = -(-max_len // KV_CHUNK) * KV_CHUNK  # whole chunks for attend_static; extra slots unused
                shape = (batch_size, cfg.num_key_value_heads, slots, cfg.head_dim)
                layers.append({"k": torch.zeros(shape, device=device, dtype=dtype),
                               "v": torch.zeros(shape, device=device, dtype=dtype)})
        return Cache(layers=layers, max_len=max_len)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, cuda_graph=False):
        """Continue the prompts idx (B, T0) by max_new_tokens tokens -> (B, T0 + max_new_tokens).

        Prefill: one forward over the prompt with the chunked kernels, filling the KV caches and the lightning
        states. Then one token at a time from the cache: a lightning layer does one O(Dh^2)-per-head state
        update, a softmax layer attends to its cached keys. temperature 0 -> greedy (argmax); top_k keeps the
        k most likely tokens before sampling. Uses the model in its current mode (call model.eval() first).
        cuda_graph=True: decode with StaticDecoder (one CUDA graph replay per token on CUDA; the same static
        step without a graph elsewhere). Same tokens as the eager loop up to rounding.
        """
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        B, T0 = idx.shape
        if T0 == 0:
            raise ValueError("generate needs a prompt of at least one token")
        if T0 + max_new_tokens > self.config.max_position_embeddings:
            raise ValueError(f"prompt ({T0}) + max_new_tokens ({max_new_tokens}) exceeds max_position_embeddings="
                             f"{self.config.max_position_embeddings}")
        cache = self.new_cache(B, T0 + max_new_tokens)
        decoder = StaticDecoder(self, cache) if cuda_graph else None
        out = [idx]
        logits = self.prefill(idx, cache)  # (B, V)
        for step in range(max_new_tokens):
            if temperature == 0:
                next_id = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]  # (B, 1)
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                next_id = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)  # (B, 1)
            out.append(next_id)
            if step < max_new_tokens - 1:  # decode one token
                if decoder is not None:
                    logits = decoder(next_id)
                else:
                    x, _ = self._hidden(next_id, cache=cache)  # (B, 1, D)
                    logits = _fp32(self.lm_head(x[:, -1]))
        return torch.cat(out, dim=1)

    @torch.no_grad()
    def prefill(self, idx, cache):
        """Run the prompts idx (B, T0) into an empty cache -> logits of the last position (B, V) fp32."""
        x, _ = self._hidden(idx, cache=cache)  # (B, T0, D)
        return _fp32(self.lm_head(x[:, -1]))  # only the last position is needed

    @torch.no_grad()
    def decode_step(self, idx, cache, pos):
        """One token per sequence, idx (B, 1), at the position held in the device tensor pos (shape ()) ->
        logits (B, V) fp32. Fixed shapes, no host syncs, no Python-side position: what StaticDecoder captures
        in a CUDA graph. Does not advance cache.pos (the caller does). Twin: _hidden(idx, cache=cache)."""
        x = self.embed_tokens(idx)  # (B, 1, D)
        cos, sin = rope_cos_sin(pos.view(1), self.inv_freq)  # (1, rotary_dim)
        for l, block in enumerate(self.layers):
            x, _ = block(x, cos, sin, cache.layers[l], pos, stats=False)
        return _fp32(self.lm_head(self.norm(x)[:, -1]))

    # ---- loading a transformers checkpoint -----------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype=None):
        """Load a directory written by transformers' MiniMaxForCausalLM.save_pretrained (config.json +
        model.safetensors, or sharded model-*.safetensors + model.safetensors.index.json). The released
        MiniMax-Text-01 checkpoint has the same tensor names; its config.json field names are mapped too.

        Every tensor must be used and every parameter filled: otherwise a ValueError lists the names.
        dtype: cast the floating-point weights (default: keep the checkpoint's dtype).
        """
        from safetensors.torch import load_file  # test/loading dependency only

        cfg_path = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            raise ValueError(f"from_pretrained: no config.json in {path!r}")
        with open(cfg_path) as f:
            config = config_from_hf(json.load(f))
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if not files:
            raise ValueError(f"from_pretrained: no *.safetensors files in {path!r}")
        ckpt = {}
        for fname in files:
            ckpt.update(load_file(fname, device=str(device)))
        state = convert_hf_state_dict(ckpt, config)

        with torch.device("meta"):  # no memory and no init work for weights that are overwritten anyway
            model = cls(config)
        model.to_empty(device=device)  # also recomputes the constant buffers (see _apply)
        expected = model.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        wrong = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                 for k in sorted(set(state) & set(expected)) if state[k].shape != expected[k].shape]
        if missing or unexpected or wrong:
            def show(names):
                return ", ".join(names[:12]) + (f" ... ({len(names)} in all)" if len(names) > 12 else "")
            raise ValueError(f"from_pretrained: checkpoint {path!r} does not match the model built from its "
                             f"config.json.\n  missing: {show(missing) or '-'}\n  unexpected: "
                             f"{show(unexpected) or '-'}\n  wrong shape: {show(wrong) or '-'}")
        model.load_state_dict(state, strict=True)
        if dtype is not None:
            model.to(dtype)
        return model


# -----------------------------------------------------------------------------
# transformers / released checkpoint -> this file: the one place that knows the outside names


def config_from_hf(hf):
    """A transformers MiniMax config.json dict (native 'minimax' or the released 'MiniMaxText01') -> MiniMaxConfig.

    Missing fields take transformers' defaults, so the model computes what transformers would compute.
    """
    def get(*names, default=None):
        for n in names:
            if hf.get(n) is not None:
                return hf[n]
        return default

    # what this file does not implement: refuse rather than load a model that computes something else
    if not get("postnorm", default=True):
        raise ValueError("config.json: postnorm=false (pre-norm) is not implemented; only the released post-norm")
    if get("tie_word_embeddings", default=False):
        raise ValueError("config.json: tie_word_embeddings=true is not supported (MiniMax unties lm_head)")
    if get("shared_intermediate_size", default=0):
        raise ValueError("config.json: a shared expert (shared_intermediate_size > 0) is not implemented")
    if get("hidden_act", default="silu") != "silu":
        raise ValueError(f"config.json: hidden_act={hf['hidden_act']!r}; only 'silu' is implemented")
    if get("sliding_window") is not None:
        raise ValueError("config.json: sliding_window attention is not implemented")
    rope = get("rope_parameters", "rope_scaling", default={}) or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"config.json: rope type {rope.get('rope_type')!r} is not implemented (only 'default')")

    L, H = hf["num_hidden_layers"], hf["num_attention_heads"]
    head_dim = get("head_dim", default=hf["hidden_size"] // H)
    if "layer_types" in hf:
        layer_types = list(hf["layer_types"])
    elif "attn_type_list" in hf:  # released config: 0 = lightning, 1 = softmax
        layer_types = ["full_attention" if t == 1 else "linear_attention" for t in hf["attn_type_list"]]
    else:
        raise ValueError("config.json has neither layer_types nor attn_type_list: the layer layout is unknown")
    return MiniMaxConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_hidden_layers=L,
        num_attention_heads=H,
        num_key_value_heads=get("num_key_value_heads", default=H),
        head_dim=head_dim,
        intermediate_size=hf["intermediate_size"],
        num_local_experts=get("num_local_experts", "num_experts", default=8),
        num_experts_per_tok=get("num_experts_per_tok", default=2),
        # released: rotary_dim (64 of 128); transformers' native MiniMax rotates the FULL head dim
        rotary_dim=get("rotary_dim", default=head_dim),
        rope_theta=float(rope.get("rope_theta", get("rope_theta", default=1e6))),
        rms_norm_eps=get("rms_norm_eps", default=1e-5),
        block_size=get("block_size", default=256),
        max_position_embeddings=get("max_position_embeddings", default=4096 * 32),
        layer_pattern="custom",
        layer_types=layer_types,
        full_attn_alpha_factor=get("full_attn_alpha_factor", "layernorm_full_attention_alpha", default=1.0),
        linear_attn_alpha_factor=get("linear_attn_alpha_factor", "layernorm_linear_attention_alpha", default=1.0),
        mlp_alpha_factor=get("mlp_alpha_factor", "layernorm_mlp_alpha", default=1.0),
        full_attn_beta_factor=get("full_attn_beta_factor", "layernorm_full_attention_beta", default=1.0),
        linear_attn_beta_factor=get("linear_attn_beta_factor", "layernorm_linear_attention_beta", default=1.0),
        mlp_beta_factor=get("mlp_beta_factor", "layernorm_mlp_beta", default=1.0),
        router_aux_loss_coef=get("router_aux_loss_coef", default=0.001),
    )


# The name map. Checkpoint names (transformers save_pretrained = the released checkpoint), "model." stripped:
#
#   checkpoint                                                 this file
#   embed_tokens.weight, norm.weight, lm_head.weight            same
#   layers.{l}.input_layernorm / post_attention_layernorm       same
#   layers.{l}.self_attn.{q,k,v,o}_proj.weight                  same (softmax layers)
#   layers.{l}.self_attn.{qkv_proj,output_gate,norm,out_proj}   same (lightning layers)
#   layers.{l}.self_attn.slope_rate (H, 1, 1)                   checked against build_slopes, then dropped
#   layers.{l}.self_attn.{query,key,diagonal}_decay             dropped (derived from the slopes)
#   layers.{l}.block_sparse_moe.gate.weight (E, D)              same
#   layers.{l}.block_sparse_moe.experts.{i}.w1.weight (F, D)    layers.{l}.block_sparse_moe.w1[i] (E, F, D)
#     ... w3 (F, D), w2 (D, F)                                    ... w3[i], w2[i]
# transformers' in-memory layout, should a checkpoint carry it:
#   layers.{l}.mlp.gate.weight                                  layers.{l}.block_sparse_moe.gate.weight
#   layers.{l}.mlp.experts.gate_up_proj (E, 2F, D)              w1 = rows [:F], w3 = rows [F:]
#   layers.{l}.mlp.experts.down_proj (E, D, F)                  w2
_EXPERT = re.compile(r"^layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight$")
_DECAY = re.compile(r"^layers\.(\d+)\.self_attn\.(slope_rate|query_decay|key_decay|diagonal_decay)$")
_FUSED = re.compile(r"^layers\.(\d+)\.mlp\.(gate\.weight|experts\.gate_up_proj|experts\.down_proj)$")


def convert_hf_state_dict(ckpt, config):
    """Checkpoint tensors -> this file's state_dict names (see the map above). Leftovers are kept under their
    own names, so from_pretrained reports them as unexpected; absent experts surface as missing w1/w2/w3."""
    E = config.num_local_experts
    out, experts = {}, {}  # experts[(l, 'w1')][i] = tensor
    for name, t in ckpt.items():
        name = name[len("model."):] if name.startswith("model.") else name
        if m := _EXPERT.match(name):
            experts.setdefault((int(m[1]), m[3]), {})[int(m[2])] = t
        elif m := _DECAY.match(name):
            l = int(m[1])
            if l >= config.num_hidden_layers or config.layer_types[l] != "linear_attention":
                out[name] = t  # a decay buffer on a non-lightning layer: the layouts disagree, report it
            elif m[2] == "slope_rate":
                ours = build_slopes(config.num_attention_heads, l, config.num_hidden_layers)
                # the reference's layer factor 1 - l/(L-1+1e-5) + 1e-5 differs from ours by < 1e-6 relative
                if t.numel() != ours.numel() or not torch.allclose(t.float().flatten().cpu(), ours, rtol=1e-4):
                    raise ValueError(f"checkpoint {name} = {t.flatten()[:4].tolist()}... differs from "
                                     f"build_slopes = {ours[:4].tolist()}...: a different decay formula")
        elif m := _FUSED.match(name):
            prefix = f"layers.{m[1]}.block_sparse_moe."
            if m[2] == "gate.weight":
                out[prefix + "gate.weight"] = t
            elif m[2] == "experts.gate_up_proj":
                F_ = t.shape[1] // 2
                out[prefix + "w1"], out[prefix + "w3"] = t[:, :F_].contiguous(), t[:, F_:].contiguous()
            else:
                out[prefix + "w2"] = t
        else:
            out[name] = t
    for (l, w), per_expert in experts.items():
        if sorted(per_expert) == list(range(E)):
            out[f"layers.{l}.block_sparse_moe.{w}"] = torch.stack([per_expert[i] for i in range(E)])
        else:  # incomplete or too many experts: keep the loose names so the error lists them
            for i, t in per_expert.items():
                out[f"layers.{l}.block_sparse_moe.experts.{i}.{w}.weight"] = t
    return out


# -----------------------------------------------------------------------------

if __name__ == "__main__":
    for name in PRESETS:
        cfg = MiniMaxConfig.from_preset(name)
        with torch.device("meta"):
            model = MiniMax(cfg)
        n_soft = cfg.layer_types.count("full_attention")
        print(f"{name:16s} L={cfg.num_hidden_layers:3d} ({n_soft} softmax)  total {model.num_params() / 1e9:8.3f}B"
              f"  active {model.num_active_params() / 1e9:7.3f}B  "
              f"train GFLOP/token @4096: {model.estimate_flops_per_token(4096) / 1e9:8.2f}")
