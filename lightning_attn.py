"""
Lightning attention (MiniMax-01's linear attention with per-head exponential decay): naive references, a
pure-PyTorch chunked path, Triton forward/backward kernels and a one-token decode step.

Per (batch, head), with decay rate s >= 0 (slope) and lambda = exp(-s), the output for token t is

    o_t = sum_{j <= t} lambda^(t - j) (q_t . k_j) v_j   ( + lambda^(t + 1) S0^T q_t  with an initial state S0 )

i.e. O = ((Q K^T) * M) V with M_tj = lambda^(t-j) for t >= j else 0: no 1/sqrt(d) scale, no normaliser, the
diagonal (j = t) included with weight 1. The same thing as a recurrence over a (D, E) state:
S_t = lambda * S_{t-1} + k_t v_t^T,  o_t = S_t^T q_t  (S_{-1} = S0 or 0); the final state is S_{N-1}.

References: Lightning Attention-2 (Qin et al., arXiv 2401.04658), MiniMax-01 (arXiv 2501.08313) section 2.2,
../shared/MINIMAX01.md sections 6-7 and ../shared/KERNELS.md (cost model, algorithm, numerics rules).

Layout. q, k: (B, H, N, D); v: (B, H, N, E); slope: (H,) fp32; states: (B, H, D, E) fp32.
Letters: B batch, H heads, N tokens, D key/query dim, E value dim, C chunk size, NT = cdiv(N, C) chunks.

Paths (all return (o, final_state), o in v's dtype):
    ref_parallel / ref_recurrent   the two oracles (run them in fp64)
    lightning_attn_chunked         chunk-wise PyTorch, any device, differentiable by autograd
    lightning_attn_triton          Triton kernels (CUDA, or CPU tensors under TRITON_INTERPRET=1)
    lightning_attn                 CUDA tensors -> Triton, otherwise -> chunked (says once which ran)
    lightning_attn_decode          one token, O(D*E): generation

Run the tests:      python -m pytest -q tests/test_lightning_attn.py     (CPU: kernels in Triton's interpreter)
Run the benchmark:  python bench/lightning_bench.py                      (GPU)
"""
import math
import os

import torch

try:  # Triton is optional: without it everything still runs through the chunked PyTorch path
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # pragma: no cover
    HAS_TRITON = False

# Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when this module is imported: set it before.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
LOG2E = 1.4426950408889634  # exp(-s x) = exp2(-s log2(e) x): the kernels use exp2 on pre-scaled slopes

_announced = set()


def _announce(path):
    """Print once per process which implementation ran (a user on a laptop should know it is the slow twin)."""
    if path not in _announced:
        _announced.add(path)
        print(f"[lightning_attn] {path}")


# ---------------------------------------------------------------------------------------------------------------
# MiniMax slopes


def _alibi_slopes(n):
    """ALiBi head slopes m_h = 2^(-8(h+1)/n) for n a power of two; other n interleave the next power (ALiBi paper)."""
    if n & (n - 1) == 0:
        return [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)]
    p = 2 ** math.floor(math.log2(n))
    return _alibi_slopes(p) + _alibi_slopes(2 * p)[0::2][: n - p]


def build_slopes(n_heads, layer_idx, n_layers):
    """MiniMax decay rates (H,) fp32 for one layer: s_h = m_h * (1 - l/(L-1) + 1e-5), l the GLOBAL layer index.

    Layer 0 head 0 of MiniMax-Text-01 (H=64, L=80) decays fastest (s = 0.917); the last layers barely decay
    (s ~ 4.9e-5). With a single layer the factor is 1 + 1e-5."""
    if n_heads < 1 or not (0 <= layer_idx < max(n_layers, 1)):
        raise ValueError(f"build_slopes: need n_heads >= 1 and 0 <= layer_idx < n_layers, got "
                         f"n_heads={n_heads}, layer_idx={layer_idx}, n_layers={n_layers}")
    factor = 1.0 + 1e-5 if n_layers == 1 else 1.0 - layer_idx / (n_layers - 1) + 1e-5
    return torch.tensor(_alibi_slopes(n_heads), dtype=torch.float32) * factor


# ---------------------------------------------------------------------------------------------------------------
# input checks shared by every path: a wrong shape should fail here with a message, not deep inside a kernel


def _check_inputs(q, k, v, slope, initial_state, dtypes, name):
    for t, n in ((q, "q"), (k, "k"), (v, "v")):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name}: {n} must be a 4-D tensor (B, H, N, D), got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t)}")
    if q.shape != k.shape:
        raise ValueError(f"{name}: q and k must have the same shape (B, H, N, D), got {tuple(q.shape)} and "
                         f"{tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"{name}: v must be (B, H, N, E) with the (B, H, N) of q {tuple(q.shape[:3])}, got "
                         f"{tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"{name}: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}; cast them "
                         f"first (e.g. .to(torch.bfloat16))")
    if q.dtype not in dtypes:
        raise ValueError(f"{name}: dtype {q.dtype} is not supported here; use one of {dtypes}")
    B, H, N, D = q.shape
    E = v.shape[-1]
    devs = {q.device, k.device, v.device, slope.device if isinstance(slope, torch.Tensor) else None}
    if initial_state is not None:
        devs.add(initial_state.device)
    if len(devs) != 1:
        raise ValueError(f"{name}: q, k, v, slope (and initial_state) must be on one device, got "
                         f"{sorted(str(d) for d in devs)}")
    if not isinstance(slope, torch.Tensor) or slope.shape != (H,) or not slope.is_floating_point():
        raise ValueError(f"{name}: slope must be a float tensor of shape (H,) = ({H},), one decay rate per head "
                         f"(see build_slopes), got {tuple(slope.shape) if isinstance(slope, torch.Tensor) else slope}")
    if initial_state is not None and tuple(initial_state.shape) != (B, H, D, E):
        raise ValueError(f"{name}: initial_state must be (B, H, D, E) = {(B, H, D, E)}, got "
                         f"{tuple(initial_state.shape)}")
    if N == 0:
        raise ValueError(f"{name}: empty sequence (N = 0)")


def _decays(slope, n, dtype):
    """exp(-s * n) for integer tensor n >= 0, broadcast as (1, H, ...) : every exponent is <= 0 by construction."""
    return torch.exp(-slope.to(dtype).view(1, -1, *([1] * n.dim())) * n.to(dtype))


# ---------------------------------------------------------------------------------------------------------------
# naive references (the oracles: run them in fp64; they compute in the dtype they are given)


def ref_parallel(q, k, v, slope, initial_state=None):
    """Masked quadratic form: O = ((Q K^T) * M) V + (Q S0) * lambda^(t+1). O(N^2); differentiable."""
    _check_inputs(q, k, v, slope, initial_state, (torch.float64, torch.float32, torch.bfloat16, torch.float16),
                  "ref_parallel")
    N = q.shape[2]
    t = torch.arange(N, device=q.device)
    diff = t[:, None] - t[None, :]                                               # (N, N): t - j
    mask = _decays(slope, diff.clamp(min=0), q.dtype) * (diff >= 0)              # (1, H, N, N), exponents <= 0
    o = ((q @ k.transpose(-1, -2)) * mask) @ v                                   # (B, H, N, E)
    final = (k * _decays(slope, (N - 1 - t)[:, None], q.dtype)).transpose(-1, -2) @ v   # (B, H, D, E)
    if initial_state is not None:
        h0 = initial_state.to(q.dtype)
        o = o + (q @ h0) * _decays(slope, (t + 1)[:, None], q.dtype)             # S0 seen through lambda^(t+1)
        final = final + _decays(slope, torch.tensor([[N]], device=q.device), q.dtype) * h0
    return o, final


def ref_recurrent(q, k, v, slope, initial_state=None):
    """Token-by-token recurrence S = lambda S + k v^T, o = S^T q: O(N D E), the decode path's definition."""
    _check_inputs(q, k, v, slope, initial_state, (torch.float64, torch.float32, torch.bfloat16, torch.float16),
                  "ref_recurrent")
    B, H, N, D = q.shape
    lam = torch.exp(-slope.to(q.dtype)).view(1, H, 1, 1)
    S = torch.zeros(B, H, D, v.shape[-1], dtype=q.dtype, device=q.device) if initial_state is None \
        else initial_state.to(q.dtype)
    outs = []
    for t in range(N):
        S = lam * S + k[:, :, t, :, None] * v[:, :, t, None, :]                  # (B, H, D, E)
        outs.append(torch.einsum("bhd,bhde->bhe", q[:, :, t], S))                # (B, H, E)
    return torch.stack(outs, dim=2), S


# ---------------------------------------------------------------------------------------------------------------
# chunked PyTorch path (the slow twin of the kernels, same algorithm: KERNELS.md section 6, convention A)


def lightning_attn_chunked(q, k, v, slope, initial_state=None, output_final_state=False, chunk_size=64):
    """Chunk-wise lightning attention in plain PyTorch (any device, autograd-differentiable).

    Per chunk of L <= C rows (local index r), with h the state entering the chunk:
        O_chunk = ((Q K^T) * Lam) V + (Q h) * lambda^(r+1)       Lam_rc = lambda^(r-c) for r >= c else 0
        h      <- lambda^L h + (K * lambda^(L-1-r))^T V          L is the TRUE length of a tail chunk
    Computes in fp32 (fp64 for fp64 inputs) and returns o in v's dtype, the final state in the compute dtype."""
    _check_inputs(q, k, v, slope, initial_state, (torch.float64, torch.float32, torch.bfloat16, torch.float16),
                  "lightning_attn_chunked")
    B, H, N, D = q.shape
    E = v.shape[-1]
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf, kf, vf = q.to(cdt), k.to(cdt), v.to(cdt)
    h = torch.zeros(B, H, D, E, dtype=cdt, device=q.device) if initial_state is None else initial_state.to(cdt)
    outs = []
    for t0 in range(0, N, chunk_size):
        L = min(chunk_size, N - t0)
        qc, kc, vc = qf[:, :, t0:t0 + L], kf[:, :, t0:t0 + L], vf[:, :, t0:t0 + L]   # (B, H, L, D|E)
        r = torch.arange(L, device=q.device)
        diff = r[:, None] - r[None, :]                                           # (L, L)
        lam_rc = _decays(slope, diff.clamp(min=0), cdt) * (diff >= 0)            # (1, H, L, L)
        a = _decays(slope, (r + 1)[:, None], cdt)                                # (1, H, L, 1)  query decay
        b = _decays(slope, (L - 1 - r)[:, None], cdt)                            # (1, H, L, 1)  key decay
        # -- output: intra-chunk (masked quadratic) + inter-chunk (through the carried state) --
        outs.append(((qc @ kc.transpose(-1, -2)) * lam_rc) @ vc + (qc @ h) * a)
        # -- update state --
        h = _decays(slope, torch.tensor([[L]], device=q.device), cdt) * h + (kc * b).transpose(-1, -2) @ vc
    o = torch.cat(outs, dim=2).to(v.dtype)                                       # (B, H, N, E)
    return o, (h if output_final_state else None)


# ---------------------------------------------------------------------------------------------------------------
# public wrapper


def lightning_attn(q, k, v, slope, initial_state=None, output_final_state=False):
    """Lightning attention, (o, final_state). CUDA tensors run the Triton kernels; anything else runs the chunked
    PyTorch path (printed once). q, k: (B, H, N, D); v: (B, H, N, E); slope (H,); initial_state (B, H, D, E) fp32.
    Differentiable in q, k, v and initial_state (not in slope: MiniMax's slopes are fixed buffers)."""
    if q.is_cuda and HAS_TRITON and "lightning_attn_triton" in globals():
        return lightning_attn_triton(q, k, v, slope, initial_state, output_final_state)
    _announce("lightning_attn: no CUDA tensors -> pure-PyTorch chunked path (slow twin of the Triton kernels)")
    o, final = lightning_attn_chunked(q, k, v, slope, initial_state, output_final_state)
    return o, (final.float() if final is not None and final.dtype != torch.float64 else final)


# ---------------------------------------------------------------------------------------------------------------
# decode: one new token per sequence, O(D*E) per head, the recurrence itself


def lightning_attn_decode(q, k, v, slope, state):
    """One generation step. q, k: (B, H, D); v: (B, H, E); state (B, H, D, E) fp32 (S after the previous token).
    S = lambda S + k v^T; o = S^T q. Returns (o (B, H, E) in v's dtype, new state fp32)."""
    if q.dim() != 3 or k.shape != q.shape or v.dim() != 3 or v.shape[:2] != q.shape[:2]:
        raise ValueError(f"lightning_attn_decode: q, k must be (B, H, D) and v (B, H, E), got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, H, D = q.shape
    E = v.shape[-1]
    if state.shape != (B, H, D, E):
        raise ValueError(f"lightning_attn_decode: state must be (B, H, D, E) = {(B, H, D, E)}, got "
                         f"{tuple(state.shape)}")
    if slope.shape != (H,):
        raise ValueError(f"lightning_attn_decode: slope must be (H,) = ({H},), got {tuple(slope.shape)}")
    sdt = torch.float64 if state.dtype == torch.float64 else torch.float32      # fp32 state (fp64 in tests)
    lam = torch.exp(-slope.to(sdt)).view(1, H, 1, 1)
    new_state = lam * state.to(sdt) + k.to(sdt)[..., :, None] * v.to(sdt)[..., None, :]   # (B, H, D, E)
    o = torch.einsum("bhd,bhde->bhe", q.to(sdt), new_state)                     # (B, H, E)
    return o.to(v.dtype), new_state
