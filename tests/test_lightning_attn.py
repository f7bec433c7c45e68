"""Tests for lightning_attn.py: the Triton kernels, the chunked PyTorch path and the decode step against fp64
references (masked quadratic form and token recurrence), forward AND every gradient.

    python -m pytest -q tests/test_lightning_attn.py

Without a GPU the Triton kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, fp32 tiles, chunk C = 16 so
the shapes stay tiny); on a CUDA machine the same tests compile and run the real kernels (C = 64), with TF32
tolerances for the fp32 cases. Inputs are SiLU(randn) unscaled, like MiniMax's q, k, v (scaled-down inputs make
such tests vacuous, KERNELS.md section 8). Errors are checked per row (a global norm hides chunk-boundary bugs).
"""
import os

import torch

if not torch.cuda.is_available():  # must precede the import of lightning_attn (Triton reads it at decoration)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import lightning_attn as la  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
C = 64 if CUDA else 16                                    # kernel chunk size under test
# Slopes: fastest MiniMax head (layer 0, head 0), a middle one, the slowest lightning layer's, and no decay.
SLOPES = [0.917, 0.0927, 4.9e-5, 0.0]
# fp32 kernels vs fp64: the interpreter multiplies in exact fp32 (eps 1.2e-7): sums of <= 3C+17 positive-ish
# terms plus random-sign upstream gradients stay < 1e-5 per row; we allow 1e-4. On GPU fp32 tiles run as TF32
# (10-bit mantissa, unit roundoff 4.9e-4; KERNELS.md measured 1.4e-3 globally for TF32): 2e-2 per row.
FP32_ROW_TOL = 2e-2 if CUDA else 1e-4


def silu_randn(*shape, dtype=torch.float64):
    return torch.nn.functional.silu(torch.randn(*shape, dtype=torch.float64)).to(DEVICE, dtype)


def row_err(x, ref):
    """max over rows (last dim = features) of ||x_row - ref_row|| / ||ref_row||. Rows whose reference is ~0 (e.g.
    no-decay heads with zero input are not generated here) are floored at 1e-6 of the largest row norm."""
    ref = ref.double()
    num = (x.double() - ref).norm(dim=-1)
    den = ref.norm(dim=-1)
    return (num / den.clamp_min(1e-6 * den.max())).max().item()


def make_inputs(B, H, N, D, E, h0, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    q, k, v = (silu_randn(B, H, N, d, dtype=dtype) for d in (D, D, E))
    slope = torch.tensor((SLOPES * H)[:H], dtype=torch.float64, device=DEVICE)
    s0 = torch.randn(B, H, D, E, dtype=torch.float64, device=DEVICE) if h0 else None
    return q, k, v, slope, s0


def ref_with_grads(q, k, v, slope, s0, go, gs):
    """fp64 autograd of the masked quadratic form: (o, final, dq, dk, dv, ds0) for upstream grads (go, gs)."""
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    h = None if s0 is None else s0.detach().clone().requires_grad_()
    o, final = la.ref_parallel(*leaves, slope, h)
    ((o * go).sum() + (final * gs).sum()).backward()
    return o, final, *(x.grad for x in leaves), (None if h is None else h.grad)


# ---------------------------------------------------------------------------------------------------------------
# slopes and the two references


def test_build_slopes_minimax_values():
    s = la.build_slopes(64, 0, 80)
    assert s.dtype == torch.float32 and s.shape == (64,)
    # MINIMAX01.md section 6 table: layer 0 head 0 0.9170, head 63 0.003906; layer 78 head 63 4.9e-5
    assert abs(s[0].item() - 0.9170132) < 1e-6 and abs(s[63].item() - 0.00390629) < 1e-8
    assert abs(la.build_slopes(64, 78, 80)[63].item() - 4.9485e-5) < 1e-8
    # non-power-of-two head count: ALiBi interleave (6 heads = 4 heads' slopes + every other of 8 heads')
    expect = [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3]
    assert torch.allclose(la.build_slopes(6, 0, 1), torch.tensor(expect) * (1 + 1e-5))
    with pytest.raises(ValueError):
        la.build_slopes(8, 5, 4)


def test_references_agree():
    q, k, v, slope, s0 = make_inputs(2, 4, 45, 8, 6, h0=True)
    o1, f1 = la.ref_parallel(q, k, v, slope, s0)
    o2, f2 = la.ref_recurrent(q, k, v, slope, s0)
    # two fp64 evaluation orders of the same sums: agree to ~1e-15 relative; 1e-12 leaves room for growth in N
    assert row_err(o1, o2) < 1e-12 and row_err(f1, f2) < 1e-12


# ---------------------------------------------------------------------------------------------------------------
# chunked PyTorch path (fp64: same algorithm as the kernels, so any indexing/decay bug shows as O(1) errors)


@pytest.mark.parametrize("N", [1, 15, 16, 17, 65])
@pytest.mark.parametrize("h0", [False, True])
def test_chunked_matches_reference(N, h0):
    q, k, v, slope, s0 = make_inputs(2, 4, N, 8, 6, h0)
    go, gs = torch.randn_like(v), torch.randn(2, 4, 8, 6, dtype=torch.float64, device=DEVICE)
    o_r, f_r, *grads_r = ref_with_grads(q, k, v, slope, s0, go, gs)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)] + ([s0.clone().requires_grad_()] if h0 else [None])
    o, f = la.lightning_attn_chunked(*leaves[:3], slope, leaves[3], output_final_state=True, chunk_size=16)
    ((o * go).sum() + (f * gs).sum()).backward()
    # fp64 both sides, different summation order: ~1e-15 relative; 1e-12 flags anything that is not rounding
    assert row_err(o, o_r) < 1e-12 and row_err(f, f_r) < 1e-12
    for x, g_r in zip(leaves, grads_r):
        if x is not None:
            assert row_err(x.grad, g_r) < 1e-12


# ---------------------------------------------------------------------------------------------------------------
# Triton kernels (interpreter on CPU) in fp32 vs fp64, forward and backward


def check_triton(B, H, N, D, E, h0, chunks_per_segment=None, seed=0):
    q, k, v, slope, s0 = make_inputs(B, H, N, D, E, h0, seed=seed)
    go = torch.randn_like(v)
    gs = torch.randn(B, H, D, E, dtype=torch.float64, device=DEVICE)
    o_r, f_r, dq_r, dk_r, dv_r, ds0_r = ref_with_grads(q, k, v, slope, s0, go, gs)
    leaves = [x.float().requires_grad_() for x in (q, k, v)]
    h = None if s0 is None else s0.float().requires_grad_()
    o, f = la.lightning_attn_triton(*leaves, slope.float(), h, output_final_state=True, chunk_size=C,
                                    chunks_per_segment=chunks_per_segment)
    assert o.dtype == torch.float32 and f.dtype == torch.float32 and f.shape == (B, H, D, E)
    ((o * go.float()).sum() + (f * gs.float()).sum()).backward()
    errs = {"o": row_err(o, o_r), "final": row_err(f, f_r), "dq": row_err(leaves[0].grad, dq_r),
            "dk": row_err(leaves[1].grad, dk_r), "dv": row_err(leaves[2].grad, dv_r)}
    if h0:
        errs["dh0"] = row_err(h.grad, ds0_r)
    bad = {n: e for n, e in errs.items() if not e < FP32_ROW_TOL}
    assert not bad, f"per-row relative error above {FP32_ROW_TOL}: {bad} (all: {errs})"


@pytest.mark.parametrize("N", [1, C - 1, C, C + 1, 3 * C + 17])
@pytest.mark.parametrize("h0", [False, True])
def test_triton_matches_reference(N, h0):
    check_triton(2, 4, N, 32, 16, h0)                     # E != D on purpose; B > 1 checks the (b, h) indexing


@pytest.mark.parametrize("cps", [1, 2])
def test_triton_segments(cps):
    """Several segments per sequence (pre-pass + scan over segment states), tail segment shorter."""
    check_triton(1, 4, 4 * C + 3, 16, 32, h0=True, chunks_per_segment=cps, seed=1)


def test_triton_head_dim_128():
    check_triton(1, 2, C + 5, 128, 64, h0=True, chunks_per_segment=1, seed=2)


def test_triton_low_precision_inputs_keep_dtype():
    """bf16/fp16 inputs: o in v's dtype, state fp32; values match the fp64 reference on the same rounded inputs."""
    q, k, v, slope, s0 = make_inputs(1, 4, 2 * C + 3, 32, 32, h0=True)
    for dt in (torch.bfloat16, torch.float16):
        qd, kd, vd = q.to(dt), k.to(dt), v.to(dt)
        o, f = la.lightning_attn_triton(qd, kd, vd, slope.float(), s0.float(), True, chunk_size=C)
        o_r, f_r = la.ref_parallel(qd.double(), kd.double(), vd.double(), slope, s0)
        assert o.dtype == dt and f.dtype == torch.float32
        # output rounded to bf16 (unit roundoff 3.9e-3) on top of bf16 MMA operands on GPU; per row 1e-2
        # (KERNELS.md section 8). Triton's interpreter TRUNCATES fp32 -> bf16 (measured 2.9e-3 mean relative vs
        # 1.4e-3 for round-to-nearest), still inside 1e-2. The fp32 state only sees operand rounding: 5e-3.
        assert row_err(o, o_r) < 1e-2 and row_err(f, f_r) < 5e-3


def test_noncontiguous_inputs():
    q, k, v, slope, _ = make_inputs(2, 4, C + 7, 16, 16, h0=False)
    qt = q.float().transpose(1, 2).contiguous().transpose(1, 2)           # (B, H, N, D) view of (B, N, H, D)
    o, _ = la.lightning_attn_triton(qt, k.float(), v.float(), slope.float(), chunk_size=C)
    o_r, _ = la.ref_parallel(q, k, v, slope)
    assert row_err(o, o_r) < FP32_ROW_TOL


# ---------------------------------------------------------------------------------------------------------------
# the public wrapper, bf16, prefill + decode, state chaining


def test_wrapper_bf16_accuracy():
    """lightning_attn in bf16 (Triton kernels on GPU, chunked path on CPU) vs fp64 on the same rounded inputs,
    output and gradients."""
    q, k, v, slope, _ = make_inputs(2, 4, 300, 64, 64, h0=False, dtype=torch.bfloat16)
    go = torch.randn_like(v)
    o_r, _, dq_r, dk_r, dv_r, _ = ref_with_grads(q.double(), k.double(), v.double(), slope.double(), None,
                                                 go.double(), 0.0)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    o, f = la.lightning_attn(*leaves, slope.float(), output_final_state=True)
    assert o.dtype == torch.bfloat16 and f.dtype == torch.float32
    o.backward(go)
    # global <= 5e-3 (issue target; correct kernels measure 1.7e-3 fwd, 1.9-2.8e-3 grads). Per row: output 1e-2
    # (KERNELS.md section 8); gradients 2e-2, because the random-sign upstream gradient makes some dq rows
    # cancel: worst dq row measured 8.9e-3 on an H200 for this kernel AND for fla's (B1 H8 N1000).
    for x, r, row_tol in zip([o] + [x.grad for x in leaves], [o_r, dq_r, dk_r, dv_r], [1e-2, 2e-2, 2e-2, 2e-2]):
        assert x.dtype == torch.bfloat16
        assert ((x.double() - r).norm() / r.norm()).item() < 5e-3 and row_err(x, r) < row_tol


@pytest.mark.parametrize("impl", ["lightning_attn", "lightning_attn_triton"])
def test_prefill_then_decode_equals_full(impl):
    n_pre, n_dec = C + 3, 5
    q, k, v, slope, s0 = make_inputs(2, 4, n_pre + n_dec, 32, 16, h0=True)
    o_full, f_full = la.ref_parallel(q, k, v, slope, s0)
    fn = getattr(la, impl)
    qf, kf, vf = q.float(), k.float(), v.float()
    o_pre, state = fn(qf[:, :, :n_pre], kf[:, :, :n_pre], vf[:, :, :n_pre], slope.float(), s0.float(),
                      output_final_state=True)
    outs = [o_pre]
    for t in range(n_pre, n_pre + n_dec):
        o_t, state = la.lightning_attn_decode(qf[:, :, t], kf[:, :, t], vf[:, :, t], slope.float(), state)
        assert state.dtype == torch.float32
        outs.append(o_t[:, :, None])
    # prefill (kernel tolerance) followed by fp32 decode steps (exact fp32 arithmetic, ~1e-7)
    assert row_err(torch.cat(outs, dim=2), o_full) < FP32_ROW_TOL
    assert row_err(state, f_full) < FP32_ROW_TOL


def test_state_chaining_two_halves():
    q, k, v, slope, _ = make_inputs(1, 4, 2 * C + 9, 16, 16, h0=False)
    qf, kf, vf, sf = q.float(), k.float(), v.float(), slope.float()
    cut = C + 5                                                          # not on a chunk boundary
    o1, s1 = la.lightning_attn_triton(qf[:, :, :cut], kf[:, :, :cut], vf[:, :, :cut], sf, None, True, C)
    o2, s2 = la.lightning_attn_triton(qf[:, :, cut:], kf[:, :, cut:], vf[:, :, cut:], sf, s1, True, C)
    o_r, f_r = la.ref_parallel(q, k, v, slope)
    assert row_err(torch.cat([o1, o2], dim=2), o_r) < FP32_ROW_TOL and row_err(s2, f_r) < FP32_ROW_TOL


def test_wrapper_says_which_path_once(capsys):
    la._announced.clear()
    q, k, v, slope, _ = make_inputs(1, 2, 5, 16, 16, h0=False, dtype=torch.float32)
    la.lightning_attn(q, k, v, slope.float())
    la.lightning_attn(q, k, v, slope.float())
    err = capsys.readouterr().err  # stderr: stdout stays the caller's (sample.py streams text there)
    if not CUDA:
        assert err.count("chunked path") == 1


# ---------------------------------------------------------------------------------------------------------------
# bad input: a clear ValueError, not a kernel crash


def test_bad_inputs_raise():
    q, k, v, slope, s0 = make_inputs(1, 2, 8, 16, 16, h0=True, dtype=torch.float32)
    slope, s0 = slope.float(), s0.float()
    for fn in (la.lightning_attn, la.lightning_attn_triton, la.lightning_attn_chunked):
        with pytest.raises(ValueError, match="same shape"):
            fn(q, k[:, :, :4], v, slope)
        with pytest.raises(ValueError, match="v must be"):
            fn(q, k, v[:, :1], slope)
        with pytest.raises(ValueError, match="one dtype"):
            fn(q, k.double(), v, slope)
        with pytest.raises(ValueError, match="slope must be"):
            fn(q, k, v, slope[:1])
        with pytest.raises(ValueError, match="initial_state must be"):
            fn(q, k, v, slope, s0[:, :, :8])
        with pytest.raises(ValueError, match="one device"):
            fn(q, k, v, slope.to("meta"))
        with pytest.raises(ValueError, match="4-D"):
            fn(q[0], k[0], v[0], slope)
    with pytest.raises(ValueError, match="head dims"):
        q48 = torch.randn(1, 2, 8, 48, device=DEVICE)
        la.lightning_attn_triton(q48, q48, v, slope)
    with pytest.raises(ValueError, match="head dims"):
        q256 = torch.randn(1, 2, 8, 256, device=DEVICE)
        la.lightning_attn_triton(q256, q256, v, slope)
    with pytest.raises(ValueError, match="chunk_size"):
        la.lightning_attn_triton(q, k, v, slope, chunk_size=48)
    with pytest.raises(ValueError, match="dtype"):
        la.lightning_attn_triton(q.double(), k.double(), v.double(), slope)
    with pytest.raises(ValueError, match="state must be"):
        la.lightning_attn_decode(q[:, :, 0], k[:, :, 0], v[:, :, 0], slope, s0[:, :1])
