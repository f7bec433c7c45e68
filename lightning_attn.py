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

Kernels: per (b, h) one sequential walk over chunks keeps the fp32 state in registers (no per-chunk states in
HBM); short-and-few sequences are cut into segments that walk in parallel after a cheap segment-state pass.
Forward 1 launch (3 when split), backward 2 (4 when split). On an H200 at B4 H32 N8192 D128 bf16: forward
0.385 ms, forward+backward 1.60 ms; fla's chunk_simple_gla 0.913 / 3.84 ms in the same process.

Run the tests:      python -m pytest -q tests/test_lightning_attn.py     (CPU: kernels in Triton's interpreter)
Run the benchmark:  python bench/lightning_bench.py                      (GPU)
"""
import math
import os
import sys

import torch

try:  # Triton is optional: without it everything still runs through the chunked PyTorch path
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # pragma: no cover
    HAS_TRITON = False

# Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when this module is imported: set it before.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

if HAS_TRITON and INTERPRET:
    # Triton 3.6's interpreter turns a loop bound into a Python int with int(ndarray of shape (1,)), which
    # NumPy >= 2.4 refuses ("only 0-dimensional arrays can be converted"), so any `for i in range(lo, hi)` with
    # runtime bounds fails on CPU. Re-patch that one conversion (the interpreter restores it after each launch).
    import triton.runtime.interpreter as _interp

    _patch_lang_tensor_orig = _interp._patch_lang_tensor

    def _patch_lang_tensor(tensor, scope):
        _patch_lang_tensor_orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    _interp._patch_lang_tensor = _patch_lang_tensor

_announced = set()


def _announce(path):
    """Say once per process, on stderr, which implementation ran (a user on a laptop should know it is the slow
    twin). Silent while torch.compile traces: a print there would split the compiled graph."""
    if path not in _announced and not torch.compiler.is_compiling():
        _announced.add(path)
        print(f"[lightning_attn] {path}", file=sys.stderr)


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
# Triton kernels
#
# Design (see KERNELS.md sections 2-3 for the byte counts): every main kernel is ONE sequential walk over the
# chunks of a segment that keeps the running (D, E) state in fp32 registers, so no per-chunk state ever goes to
# HBM (fla's chunk kernels write and re-read one state per chunk: ~1 KB per token-head, as much as q, k, v, o).
# When B*H programs are too few to fill the GPU (MiniMax TP8 prefill: B1 H8), the sequence is cut into
# segments of CPS chunks that walk in parallel; a cheap pre-pass computes each segment's own state contribution
# and a scan over segments gives the state entering each segment (forward) / leaving it (backward):
#
#   forward    _seg_state(K, V) -> _seg_scan -> _fwd           (one segment: _fwd alone)
#   backward   _seg_state(Q, dO, reverse) -> _seg_scan(reverse) -> _bwd_dq, _bwd_dkdv
#
# Per chunk (rows r, columns c, true length L), g = s*log2(e):  a_r = 2^(-g(r+1)),  b_r = 2^(-g(L-1-r)),
# Lam_rc = 2^(-g(r-c)) for r >= c else 0. Every exponent is <= 0 (masked with -inf BEFORE exp2), so nothing
# overflows for any slope and chunk size. Dot operands are in the input dtype (bf16 tensor cores) with fp32
# accumulation; fp32/fp16 inputs and the interpreter use fp32 operands (TF32 on GPU; the interpreter gives
# wrong bf16 dots, KERNELS.md section 9). fp16 operands are avoided because states grow ~N in slow heads.


if HAS_TRITON:

    @triton.jit
    def _op(x, DOT_FP32: tl.constexpr):
        """Cast a tile to the tensor-core operand dtype: bf16, or fp32 when DOT_FP32."""
        if DOT_FP32:
            return x.to(tl.float32)
        else:
            return x.to(tl.bfloat16)

    @triton.jit
    def _seg_state_kernel(X, Y, DELTA, SLOPE, N, H, CPS,
                          DX: tl.constexpr, DY: tl.constexpr, C: tl.constexpr, BX: tl.constexpr,
                          BY: tl.constexpr, REVERSE: tl.constexpr, DOT_FP32: tl.constexpr):
        """Each segment's own state, as if it started from zero. Forward: X=K, Y=V, weights b, walk forward:
        delta = sum_i lam^(tokens after chunk i) (K_i*b)^T V_i. Backward: X=Q, Y=dO, weights a, walk in reverse:
        delta = sum_i lam^(tokens before chunk i) (Q_i*a)^T dO_i. Grid (DX/BX * DY/BY, n_seg, B*H)."""
        pid_xy, pid_s, pid_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        n_seg = tl.num_programs(1)
        pid_x, pid_y = pid_xy // (DY // BY), pid_xy % (DY // BY)
        g = tl.load(SLOPE + pid_bh % H) * 1.4426950408889634                  # s * log2(e): exp2 decays
        offs_c = tl.arange(0, C)
        offs_x = pid_x * BX + tl.arange(0, BX)
        offs_y = pid_y * BY + tl.arange(0, BY)
        X += pid_bh.to(tl.int64) * N * DX                                        # this (b, h): (N, DX)
        Y += pid_bh.to(tl.int64) * N * DY
        i_first = pid_s * CPS
        n_chunks = tl.minimum(CPS, tl.cdiv(N, C) - i_first)
        acc = tl.zeros([BX, BY], dtype=tl.float32)                               # (BX, BY) fp32
        for j in range(0, n_chunks):
            if REVERSE:
                i = i_first + n_chunks - 1 - j
            else:
                i = i_first + j
            L = tl.minimum(C, N - i * C)                                         # true chunk length (tail)
            rows = i * C + offs_c
            x = tl.load(X + rows[:, None] * DX + offs_x[None, :], mask=(offs_c < L)[:, None], other=0.)
            y = tl.load(Y + rows[:, None] * DY + offs_y[None, :], mask=(offs_c < L)[:, None], other=0.)
            if REVERSE:
                w = tl.exp2(-g * (offs_c + 1).to(tl.float32))                    # a_r (query decay)
            else:
                w = tl.exp2(tl.where(offs_c < L, -g * (L - 1 - offs_c).to(tl.float32), float("-inf")))  # b_r
            # -- acc <- lam^L acc + X^T (Y * w) --
            acc = tl.dot(tl.trans(_op(x, DOT_FP32)), _op(y * w[:, None], DOT_FP32), acc * tl.exp2(-g * L))
        DELTA += (pid_bh.to(tl.int64) * n_seg + pid_s) * DX * DY
        tl.store(DELTA + offs_x[:, None] * DY + offs_y[None, :], acc)

    @triton.jit
    def _seg_scan_kernel(DELTA, STATES, SLOPE, INIT, FINAL, N, H, SEG_LEN, NSEG,
                         DE: tl.constexpr, BLOCK: tl.constexpr, REVERSE: tl.constexpr,
                         HAS_INIT: tl.constexpr, STORE_FINAL: tl.constexpr):
        """DELTA (B*H, NSEG, D*E) segment contributions in, STATES (same shape) segment boundary states out.
        Forward: STATES[g] = state entering segment g (from INIT = h0), FINAL = final state.
        Reverse: STATES[g] = gradient of the state leaving segment g (from INIT = d final), FINAL = d h0.
        (Out of place, so the loads of later segments can be prefetched while the chain runs.)"""
        pid_x, pid_bh = tl.program_id(0), tl.program_id(1)
        g = tl.load(SLOPE + pid_bh % H) * 1.4426950408889634
        offs = pid_x * BLOCK + tl.arange(0, BLOCK)
        DELTA += pid_bh.to(tl.int64) * NSEG * DE
        STATES += pid_bh.to(tl.int64) * NSEG * DE
        cur = tl.zeros([BLOCK], dtype=tl.float32)
        if HAS_INIT:
            cur = tl.load(INIT + pid_bh.to(tl.int64) * DE + offs)
        for j in range(0, NSEG):
            sg = NSEG - 1 - j if REVERSE else j
            seg_tokens = tl.minimum(SEG_LEN, N - sg * SEG_LEN)
            delta = tl.load(DELTA + sg * DE + offs)
            tl.store(STATES + sg * DE + offs, cur)
            cur = cur * tl.exp2(-g * seg_tokens) + delta                         # pass the state over segment sg
        if STORE_FINAL:
            tl.store(FINAL + pid_bh.to(tl.int64) * DE + offs, cur)

    @triton.jit
    def _fwd_kernel(Q, K, V, O, SLOPE, HS, HT, N, H, CPS,
                    D: tl.constexpr, E: tl.constexpr, C: tl.constexpr, BV: tl.constexpr,
                    HAS_HS: tl.constexpr, STORE_HT: tl.constexpr, DOT_FP32: tl.constexpr):
        """O for one (value slice, segment, b*h): walk the segment's chunks with the state h (D, BV) in registers.
        HS (B*H, n_seg, D, E): state entering each segment (h0 for segment 0); HT: final state out."""
        pid_v, pid_s, pid_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        n_seg = tl.num_programs(1)
        g = tl.load(SLOPE + pid_bh % H) * 1.4426950408889634                  # s * log2(e): exp2 decays
        offs_c = tl.arange(0, C)
        offs_d = tl.arange(0, D)
        offs_v = pid_v * BV + tl.arange(0, BV)
        Q += pid_bh.to(tl.int64) * N * D                                         # (N, D) of this (b, h)
        K += pid_bh.to(tl.int64) * N * D
        V += pid_bh.to(tl.int64) * N * E                                         # (N, E)
        O += pid_bh.to(tl.int64) * N * E
        # decays shared by every chunk (a tail chunk only changes b and lam^L)
        diff = (offs_c[:, None] - offs_c[None, :]).to(tl.float32)               # (C, C): r - c
        lam = tl.exp2(tl.where(diff >= 0, -g * diff, float("-inf")))             # (C, C) causal decay mask
        a = tl.exp2(-g * (offs_c + 1).to(tl.float32))                            # (C,) query decay lam^(r+1)
        h = tl.zeros([D, BV], dtype=tl.float32)                                  # (D, BV) fp32 running state
        if HAS_HS:
            h = tl.load(HS + (pid_bh.to(tl.int64) * n_seg + pid_s) * D * E + offs_d[:, None] * E + offs_v[None, :])
        i_first = pid_s * CPS
        i_last = tl.minimum(i_first + CPS, tl.cdiv(N, C))
        for i in range(i_first, i_last):
            L = tl.minimum(C, N - i * C)                                         # true chunk length (tail)
            rows = i * C + offs_c
            mask = (offs_c < L)[:, None]
            q = tl.load(Q + rows[:, None] * D + offs_d[None, :], mask=mask, other=0.)   # (C, D)
            k = tl.load(K + rows[:, None] * D + offs_d[None, :], mask=mask, other=0.)   # (C, D)
            v = tl.load(V + rows[:, None] * E + offs_v[None, :], mask=mask, other=0.)   # (C, BV)
            b = tl.exp2(tl.where(offs_c < L, -g * (L - 1 - offs_c).to(tl.float32), float("-inf")))  # (C,)
            # -- intra-chunk: ((Q K^T) * Lam) V --
            s = tl.dot(_op(q, DOT_FP32), tl.trans(_op(k, DOT_FP32)))             # (C, C) fp32
            o = tl.dot(_op(s * lam, DOT_FP32), _op(v, DOT_FP32))                 # (C, BV)
            # -- inter-chunk: (Q h) * a, the decay applied after the dot so q is not rounded twice --
            o += tl.dot(_op(q, DOT_FP32), _op(h, DOT_FP32)) * a[:, None]
            tl.store(O + rows[:, None] * E + offs_v[None, :], o.to(O.dtype.element_ty), mask=mask)
            # -- update state: h <- lam^L h + K^T (V * b) --
            h = tl.dot(tl.trans(_op(k, DOT_FP32)), _op(v * b[:, None], DOT_FP32), h * tl.exp2(-g * L))
        if STORE_HT:
            if pid_s == n_seg - 1:
                tl.store(HT + pid_bh.to(tl.int64) * D * E + offs_d[:, None] * E + offs_v[None, :], h)

    @triton.jit
    def _bwd_dq_kernel(K, V, DO, DQ, SLOPE, HS, N, H, CPS,
                       D: tl.constexpr, E: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
                       HAS_HS: tl.constexpr, DOT_FP32: tl.constexpr):
        """dQ = (dP K) + (dO h^T) * a with dP = (dO V^T) * Lam: a forward walk re-building the state slice
        h[k slice, :] (BK, E) from the saved segment-start states HS. Grid (D/BK, n_seg, B*H)."""
        pid_k, pid_s, pid_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        n_seg = tl.num_programs(1)
        g = tl.load(SLOPE + pid_bh % H) * 1.4426950408889634
        offs_c = tl.arange(0, C)
        offs_k = pid_k * BK + tl.arange(0, BK)
        offs_e = tl.arange(0, E)
        K += pid_bh.to(tl.int64) * N * D
        DQ += pid_bh.to(tl.int64) * N * D
        V += pid_bh.to(tl.int64) * N * E
        DO += pid_bh.to(tl.int64) * N * E
        diff = (offs_c[:, None] - offs_c[None, :]).to(tl.float32)
        lam = tl.exp2(tl.where(diff >= 0, -g * diff, float("-inf")))             # (C, C)
        a = tl.exp2(-g * (offs_c + 1).to(tl.float32))                            # (C,)
        h = tl.zeros([BK, E], dtype=tl.float32)                                  # (BK, E) state slice
        if HAS_HS:
            h = tl.load(HS + (pid_bh.to(tl.int64) * n_seg + pid_s) * D * E + offs_k[:, None] * E + offs_e[None, :])
        i_first = pid_s * CPS
        i_last = tl.minimum(i_first + CPS, tl.cdiv(N, C))
        for i in range(i_first, i_last):
            L = tl.minimum(C, N - i * C)
            rows = i * C + offs_c
            mask = (offs_c < L)[:, None]
            k = tl.load(K + rows[:, None] * D + offs_k[None, :], mask=mask, other=0.)   # (C, BK)
            v = tl.load(V + rows[:, None] * E + offs_e[None, :], mask=mask, other=0.)   # (C, E)
            do = tl.load(DO + rows[:, None] * E + offs_e[None, :], mask=mask, other=0.)  # (C, E)
            b = tl.exp2(tl.where(offs_c < L, -g * (L - 1 - offs_c).to(tl.float32), float("-inf")))
            # -- intra-chunk: dP = (dO V^T) * Lam, dQ = dP K --
            dp = tl.dot(_op(do, DOT_FP32), tl.trans(_op(v, DOT_FP32))) * lam     # (C, C)
            dq = tl.dot(_op(dp, DOT_FP32), _op(k, DOT_FP32))                     # (C, BK)
            # -- inter-chunk: (dO h^T) * a --
            dq += tl.dot(_op(do, DOT_FP32), tl.trans(_op(h, DOT_FP32))) * a[:, None]
            tl.store(DQ + rows[:, None] * D + offs_k[None, :], dq.to(DQ.dtype.element_ty), mask=mask)
            # -- update state slice: h <- lam^L h + K^T (V * b) --
            h = tl.dot(tl.trans(_op(k, DOT_FP32)), _op(v * b[:, None], DOT_FP32), h * tl.exp2(-g * L))

    @triton.jit
    def _bwd_dkdv_kernel(Q, K, V, DO, DK, DV, SLOPE, DHS, DH0, N, H, CPS,
                         D: tl.constexpr, E: tl.constexpr, C: tl.constexpr,
                         HAS_DHS: tl.constexpr, STORE_DH0: tl.constexpr, DOT_FP32: tl.constexpr):
        """dK, dV in one reverse walk with the state gradient dh (D, E) in registers:
            dV = A^T dO + (K dh) * b          A  = (Q K^T) * Lam
            dK = dP^T Q + (V dh^T) * b        dP = (dO V^T) * Lam
            dh <- lam^L dh + (Q * a)^T dO     (dh of the state entering the chunk)
        DHS (B*H, n_seg, D, E): gradient of the state leaving each segment (d final state for the last one).
        Grid (1, n_seg, B*H)."""
        pid_s, pid_bh = tl.program_id(1), tl.program_id(2)
        n_seg = tl.num_programs(1)
        g = tl.load(SLOPE + pid_bh % H) * 1.4426950408889634
        offs_c = tl.arange(0, C)
        offs_d = tl.arange(0, D)
        offs_e = tl.arange(0, E)
        Q += pid_bh.to(tl.int64) * N * D
        K += pid_bh.to(tl.int64) * N * D
        DK += pid_bh.to(tl.int64) * N * D
        V += pid_bh.to(tl.int64) * N * E
        DO += pid_bh.to(tl.int64) * N * E
        DV += pid_bh.to(tl.int64) * N * E
        diff = (offs_c[None, :] - offs_c[:, None]).to(tl.float32)               # (C, C) [c, r]: r - c
        lam_t = tl.exp2(tl.where(diff >= 0, -g * diff, float("-inf")))           # (C, C) Lam transposed
        a = tl.exp2(-g * (offs_c + 1).to(tl.float32))                            # (C,)
        dh = tl.zeros([D, E], dtype=tl.float32)                                  # (D, E) fp32 state gradient
        if HAS_DHS:
            dh = tl.load(DHS + (pid_bh.to(tl.int64) * n_seg + pid_s) * D * E + offs_d[:, None] * E + offs_e[None, :])
        i_first = pid_s * CPS
        n_chunks = tl.minimum(CPS, tl.cdiv(N, C) - i_first)
        for j in range(0, n_chunks):
            i = i_first + n_chunks - 1 - j                                       # walk the chunks backwards
            L = tl.minimum(C, N - i * C)
            rows = i * C + offs_c
            mask = (offs_c < L)[:, None]
            q = tl.load(Q + rows[:, None] * D + offs_d[None, :], mask=mask, other=0.)   # (C, D)
            k = tl.load(K + rows[:, None] * D + offs_d[None, :], mask=mask, other=0.)   # (C, D)
            v = tl.load(V + rows[:, None] * E + offs_e[None, :], mask=mask, other=0.)   # (C, E)
            do = tl.load(DO + rows[:, None] * E + offs_e[None, :], mask=mask, other=0.)  # (C, E)
            b = tl.exp2(tl.where(offs_c < L, -g * (L - 1 - offs_c).to(tl.float32), float("-inf")))
            dh_op = _op(dh, DOT_FP32)
            # -- dV = A^T dO + (K dh) * b --
            a_t = tl.dot(_op(k, DOT_FP32), tl.trans(_op(q, DOT_FP32))) * lam_t   # (C, C) = A^T
            dv = tl.dot(_op(a_t, DOT_FP32), _op(do, DOT_FP32))                   # (C, E)
            dv += tl.dot(_op(k, DOT_FP32), dh_op) * b[:, None]
            tl.store(DV + rows[:, None] * E + offs_e[None, :], dv.to(DV.dtype.element_ty), mask=mask)
            # -- dK = dP^T Q + (V dh^T) * b --
            dp_t = tl.dot(_op(v, DOT_FP32), tl.trans(_op(do, DOT_FP32))) * lam_t  # (C, C) = dP^T
            dk = tl.dot(_op(dp_t, DOT_FP32), _op(q, DOT_FP32))                   # (C, D)
            if DOT_FP32:
                # (dh V^T)^T: with fp32 (TF32) tiles, using dh_op both as B and as B^T gave a wrong dK on an
                # H200 (Triton 3.6, D=32, E=16; bf16 was right), so transpose the product instead
                dk += tl.trans(tl.dot(dh_op, tl.trans(_op(v, DOT_FP32)))) * b[:, None]
            else:
                dk += tl.dot(_op(v, DOT_FP32), tl.trans(dh_op)) * b[:, None]
            tl.store(DK + rows[:, None] * D + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=mask)
            # -- update state gradient: dh <- lam^L dh + Q^T (dO * a) --
            dh = tl.dot(tl.trans(_op(q, DOT_FP32)), _op(do * a[:, None], DOT_FP32), dh * tl.exp2(-g * L))
        if STORE_DH0:
            if pid_s == 0:
                tl.store(DH0 + pid_bh.to(tl.int64) * D * E + offs_d[:, None] * E + offs_e[None, :], dh)


# ---------------------------------------------------------------------------------------------------------------
# autograd Function: shape checks, allocation, grids, launches


_HEAD_DIMS = (16, 32, 64, 128)   # powers of two (no masks on D/E); > 128 would need a split state (registers)
_MIN_CHUNKS_PER_SEGMENT = 8      # below this, the segment pre-pass + scan cost more than the parallelism gains
_SEG_PROGRAMS_PER_SM = 2         # when B*H < SMs/2: split sequences into ~this many walks per SM (0: never split)


def _num_segments(n_chunks, n_programs, device, chunks_per_segment):
    """(number of segments, chunks per segment). Measured on an H200 (bench --sweep): B4 H32 N8192 fwd+bwd takes
    1.59 ms unsplit vs 2.02 ms in 3 segments (the pre-pass re-reads k, v / q, dO), while B1 H8 N65536 takes
    10.7 ms unsplit (8 walks for 132 SMs) vs 1.15 ms in 33 segments. So split only when B*H < SMs/2."""
    if chunks_per_segment is None:
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
        want = 1 if 2 * n_programs >= sms else math.ceil(_SEG_PROGRAMS_PER_SM * sms / n_programs)
        chunks_per_segment = n_chunks if want <= 1 else max(_MIN_CHUNKS_PER_SEGMENT, math.ceil(n_chunks / want))
    chunks_per_segment = max(1, min(chunks_per_segment, n_chunks))
    return math.ceil(n_chunks / chunks_per_segment), chunks_per_segment


def _segment_states(x, y, slope, init, final, n_seg, cps, C, reverse, dot_fp32):
    """Pre-pass + scan: (B*H, n_seg, Dx, Dy) fp32 states at segment boundaries (see _seg_state/_seg_scan)."""
    B, H, N, DX = x.shape
    DY = y.shape[-1]
    delta = torch.empty(B * H, n_seg, DX, DY, device=x.device, dtype=torch.float32)
    states = torch.empty_like(delta)
    BX, BY = min(64, DX), min(64, DY)
    _seg_state_kernel[((DX // BX) * (DY // BY), n_seg, B * H)](
        x, y, delta, slope, N, H, cps, DX=DX, DY=DY, C=C, BX=BX, BY=BY, REVERSE=reverse, DOT_FP32=dot_fp32,
        num_warps=4)
    BLOCK = min(1024, DX * DY)
    _seg_scan_kernel[(DX * DY // BLOCK, B * H)](
        delta, states, slope, init, final, N, H, cps * C, n_seg, DE=DX * DY, BLOCK=BLOCK, REVERSE=reverse,
        HAS_INIT=init is not None, STORE_FINAL=final is not None, num_warps=4)
    return states


# Launch parameters per kernel: one small table instead of an autotuner; `bench/lightning_bench.py --sweep`
# measures the alternatives. Chosen on an H200 at D = E = 128, C = 64 (fwd ms at B4 H32 N8192 / B1 H8 N65536):
#   fwd  BV = 64, 4 warps, 2 stages: 0.58 / 0.36 (BV = 128 with 8 warps, the state whole in registers: 0.67 /
#        0.41; BV = 64 with 8 warps: 0.76 / 0.45). Two value slices re-read q, k but double the programs.
#   dq   BK = 64, 4 warps, 2 stages (2-8 % better than BK = 128 / 8 warps in fwd+bwd).
#   dkdv the whole (D, E) state gradient in registers needs 8 warps; 3 stages beat 2 by 10 %, 1 stage by 20 %.
# C = 32 was 60 % slower than C = 64 in fwd+bwd; C = 128 does not fit the registers with these tiles.
_CONFIG = {"fwd": dict(BV=64, num_warps=4, num_stages=2),
           "dq": dict(BK=64, num_warps=4, num_stages=2),
           "dkdv": dict(num_warps=8, num_stages=3)}


def _launch_opts(name, D, E, C, dot_fp32, device):
    """_CONFIG[name] clipped to the head dims, with num_stages lowered until the pipelined chunk tiles fit in
    shared memory: stages * (bytes of one chunk's tiles) + (the state operand) <= the per-block limit. This
    model matches what Triton asked for on an H200 (fp32 dkdv, D=128, E=64: 3 stages = 311,296 B > 232,448 B;
    bf16 dkdv D = E = 128, 3 stages fits)."""
    cfg = dict(_CONFIG[name])
    for key, dim in (("BV", E), ("BK", D)):
        if key in cfg:
            cfg[key] = min(cfg[key], dim)
    if INTERPRET:
        cfg.pop("num_stages"), cfg.pop("num_warps")
        return cfg
    elt = 4 if dot_fp32 else 2                                                   # fp32 (TF32) or bf16 tiles
    per_stage, fixed = {"fwd": (C * (2 * D + cfg.get("BV", 0)), D * cfg.get("BV", 0)),
                        "dq": (C * (cfg.get("BK", 0) + 2 * E), cfg.get("BK", 0) * E),
                        "dkdv": (C * (2 * D + 2 * E), D * E)}[name]
    limit = torch.cuda.get_device_properties(device).shared_memory_per_block_optin
    cfg["num_stages"] = max(1, min(cfg["num_stages"], (limit - fixed * elt) // (per_stage * elt)))
    return cfg


class _LightningAttnFn(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, slope, h0, output_final_state, chunk_size, chunks_per_segment):
        B, H, N, D = q.shape
        E = v.shape[-1]
        C = chunk_size
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()                 # kernels assume (B, H, N, D)
        slope = slope.float().contiguous()
        h0 = None if h0 is None else h0.float().contiguous()
        dot_fp32 = INTERPRET or q.dtype != torch.bfloat16
        NT = triton.cdiv(N, C)
        n_seg, cps = _num_segments(NT, B * H, q.device, chunks_per_segment)
        o = torch.empty_like(v)                                                  # (B, H, N, E) in v's dtype
        ht = torch.empty(B, H, D, E, device=q.device, dtype=torch.float32) if output_final_state else None
        # -- states entering each segment (h0 for the first): a pre-pass + scan only if there are >1 segments --
        hs = h0
        if n_seg > 1:
            hs = _segment_states(k, v, slope, h0, ht, n_seg, cps, C, False, dot_fp32)
        cfg = _launch_opts("fwd", D, E, C, dot_fp32, q.device)
        _fwd_kernel[lambda META: (E // META["BV"], n_seg, B * H)](
            q, k, v, o, slope, hs, ht, N, H, cps, D=D, E=E, C=C, HAS_HS=hs is not None,
            STORE_HT=output_final_state and n_seg == 1, DOT_FP32=dot_fp32, **cfg)
        ctx.save_for_backward(q, k, v, slope, hs)
        ctx.meta = (h0 is not None, C, n_seg, cps, dot_fp32)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, slope, hs = ctx.saved_tensors
        has_h0, C, n_seg, cps, dot_fp32 = ctx.meta
        B, H, N, D = q.shape
        E = v.shape[-1]
        do = do.contiguous()
        dht = None if dht is None else dht.float().contiguous()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        dh0 = torch.empty(B, H, D, E, device=q.device, dtype=torch.float32) if has_h0 else None
        # -- gradients of the states leaving each segment (d final state for the last one) --
        dhs = dht
        if n_seg > 1:
            dhs = _segment_states(q, do, slope, dht, dh0, n_seg, cps, C, True, dot_fp32)
        cfg = _launch_opts("dq", D, E, C, dot_fp32, q.device)
        _bwd_dq_kernel[lambda META: (D // META["BK"], n_seg, B * H)](
            k, v, do, dq, slope, hs, N, H, cps, D=D, E=E, C=C, HAS_HS=hs is not None, DOT_FP32=dot_fp32, **cfg)
        _bwd_dkdv_kernel[(1, n_seg, B * H)](
            q, k, v, do, dk, dv, slope, dhs, dh0, N, H, cps, D=D, E=E, C=C, HAS_DHS=dhs is not None,
            STORE_DH0=has_h0 and n_seg == 1, DOT_FP32=dot_fp32, **_launch_opts("dkdv", D, E, C, dot_fp32, q.device))
        return dq, dk, dv, None, dh0, None, None, None


def lightning_attn_triton(q, k, v, slope, initial_state=None, output_final_state=False, chunk_size=64,
                          chunks_per_segment=None):
    """Lightning attention with the Triton kernels (CUDA, or CPU tensors under TRITON_INTERPRET=1).
    Same arguments and returns as lightning_attn; chunk_size (power of two, 16..128) and chunks_per_segment
    (None: enough segments to fill the GPU) are tuning knobs that do not change the result beyond rounding."""
    if not HAS_TRITON:
        raise RuntimeError("lightning_attn_triton: Triton is not installed; use lightning_attn_chunked")
    _check_inputs(q, k, v, slope, initial_state, (torch.float32, torch.bfloat16, torch.float16),
                  "lightning_attn_triton")
    D, E = q.shape[-1], v.shape[-1]
    if D not in _HEAD_DIMS or E not in _HEAD_DIMS:
        raise ValueError(f"lightning_attn_triton: head dims D={D}, E={E} not supported; the kernels take "
                         f"D, E in {_HEAD_DIMS} (use lightning_attn_chunked for other sizes)")
    if chunk_size not in (16, 32, 64, 128):
        raise ValueError(f"lightning_attn_triton: chunk_size must be 16, 32, 64 or 128, got {chunk_size}")
    if not q.is_cuda and not INTERPRET:
        raise ValueError("lightning_attn_triton: CPU tensors need TRITON_INTERPRET=1 set before importing "
                         "lightning_attn (or call lightning_attn / lightning_attn_chunked)")
    if initial_state is not None and initial_state.dtype != torch.float32:
        raise ValueError(f"lightning_attn_triton: initial_state must be fp32, got {initial_state.dtype}")
    return _LightningAttnFn.apply(q, k, v, slope, initial_state, output_final_state, chunk_size,
                                  chunks_per_segment)


# ---------------------------------------------------------------------------------------------------------------
# public wrapper


def lightning_attn(q, k, v, slope, initial_state=None, output_final_state=False):
    """Lightning attention, (o, final_state). CUDA tensors run the Triton kernels; anything else runs the chunked
    PyTorch path (printed once). q, k: (B, H, N, D); v: (B, H, N, E); slope (H,); initial_state (B, H, D, E) fp32.
    Differentiable in q, k, v and initial_state (not in slope: MiniMax's slopes are fixed buffers)."""
    kernel_ok = (q.dtype in (torch.float32, torch.bfloat16, torch.float16) and q.shape[-1] in _HEAD_DIMS
                 and v.shape[-1] in _HEAD_DIMS) if HAS_TRITON else False
    if q.is_cuda and kernel_ok:
        return lightning_attn_triton(q, k, v, slope, initial_state, output_final_state)
    why = "no CUDA tensors" if not q.is_cuda else f"{q.dtype}, D={q.shape[-1]}, E={v.shape[-1]} not in the kernels"
    _announce(f"lightning_attn: {why} -> pure-PyTorch chunked path (slow twin of the Triton kernels)")
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
