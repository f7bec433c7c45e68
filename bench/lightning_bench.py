"""
Benchmark of lightning attention on one GPU: this repo's Triton kernels vs the chunked PyTorch path, SDPA causal
flash attention (softmax, for scale) and fla's chunk_simple_gla (g_gamma = -slope, scale = 1) when importable.

    python bench/lightning_bench.py                 # table for the issue's shapes (D = E = 128, bf16)
    python bench/lightning_bench.py --sweep         # first tune launch configs at two shapes, then the table
    python bench/lightning_bench.py --shapes 4x32x8192 --impls ours,fla

Columns: forward ms, forward+backward ms (triton.testing.do_bench, mean, L2 flushed), and % of the roofline
T* = max(F / 790e12, bytes / 3.0e12) with F and bytes from KERNELS.md section 2 at C = 64 (the same T* for every
linear-attention implementation; for fwd+bwd T* = T*_fwd + T*_bwd). Accuracy: relative error vs fp64 (same
bf16-rounded inputs) of o, dq, dk, dv on B1 H8 N1000 with SiLU(randn) inputs and MiniMax slopes.
All implementations run in the same process on the same card; numbers from different cards are not comparable.
"""
import argparse
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import lightning_attn as la  # noqa: E402

try:
    from fla.ops.simple_gla import chunk_simple_gla
except Exception as e:  # noqa: BLE001 - any import failure just drops the column
    chunk_simple_gla = None
    FLA_ERR = repr(e)

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--shapes", default="4x32x2048,4x32x8192,4x32x32768,1x8x65536,8x64x4096",
                    help="comma-separated BxHxN (D = E = 128)")
parser.add_argument("--impls", default="ours,torch,sdpa,fla")
parser.add_argument("--sweep", action="store_true", help="tune launch configs before the table")
parser.add_argument("--no-bwd", action="store_true")
args = parser.parse_args()

dev = "cuda"
D = E = 128
C_ROOF = 64


def roofline_ms(B, H, N, fwd_only):
    """T* in ms (KERNELS.md section 2, bf16, C = 64)."""
    F_fwd = 2 * B * H * N * (C_ROOF * (D + E) + 2 * D * E)
    by_fwd = 2 * B * H * N * (2 * D + 2 * E)
    t = max(F_fwd / 790e12, by_fwd / 3.0e12)
    if not fwd_only:
        F_bwd = 2 * B * H * N * (C_ROOF * (3 * D + 2 * E) + 5 * D * E)
        by_bwd = 2 * B * H * N * (4 * D + 3 * E)
        t += max(F_bwd / 790e12, by_bwd / 3.0e12)
    return t * 1e3


def make(B, H, N, layout="bhnd", grad=False, seed=0):
    torch.manual_seed(seed)
    shape = (B, H, N, D) if layout == "bhnd" else (B, N, H, D)
    q, k, v = (F.silu(torch.randn(shape, device=dev)).to(torch.bfloat16).requires_grad_(grad) for _ in range(3))
    return q, k, v


# ---------------------------------------------------------------------------------------------------------------
# the implementations, each as fn(q, k, v, slope) -> o in its own native layout

OURS_C = 64                                                # our chunk size (the sweep may change it)


def run_ours(q, k, v, slope):
    return la.lightning_attn_triton(q, k, v, slope, chunk_size=OURS_C)[0]


def run_torch(q, k, v, slope):
    return la.lightning_attn_chunked(q, k, v, slope)[0]


def run_sdpa(q, k, v, slope):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def run_fla(q, k, v, slope):                                 # fla layout (B, N, H, D), natural-log decay
    return chunk_simple_gla(q, k, v, g_gamma=-slope, scale=1.0)[0]


IMPLS = {"ours": (run_ours, "bhnd"), "torch": (run_torch, "bhnd"), "sdpa": (run_sdpa, "bhnd"),
         "fla": (run_fla, "bnhd")}
NAMES = {"ours": "lightning_attn (Triton)", "torch": "chunked PyTorch", "sdpa": "SDPA flash causal",
         "fla": "fla chunk_simple_gla"}
impls = [i for i in args.impls.split(",") if i in IMPLS and (i != "fla" or chunk_simple_gla is not None)]


def time_impl(name, B, H, N, slope, bwd=True):
    fn, layout = IMPLS[name]
    q, k, v = make(B, H, N, layout)
    t_f = do_bench(lambda: fn(q, k, v, slope), warmup=25, rep=100)
    t_fb = float("nan")
    if bwd:
        q, k, v = make(B, H, N, layout, grad=True)
        do = torch.randn_like(v)

        def fb():
            fn(q, k, v, slope).backward(do)
        t_fb = do_bench(fb, warmup=25, rep=100, grad_to_none=[q, k, v])
    del q, k, v
    torch.cuda.empty_cache()
    return t_f, t_fb


# ---------------------------------------------------------------------------------------------------------------
# accuracy vs fp64 (same bf16-rounded inputs), global and worst row


def accuracy(name, B=1, H=8, N=1000):
    fn, layout = IMPLS[name]
    q, k, v = make(B, H, N, "bhnd", seed=1)
    slope = torch.cat([la.build_slopes(H - 1, 0, 80), torch.tensor([4.9e-5])]).to(dev)   # fastest .. slowest
    go = torch.randn(B, H, N, E, device=dev).to(torch.bfloat16)
    leaves64 = [x.double().requires_grad_() for x in (q, k, v)]
    o64, _ = la.ref_parallel(*leaves64, slope.double())
    o64.backward(go.double())
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    if layout == "bnhd":
        o = fn(*(x.transpose(1, 2) for x in leaves), slope).transpose(1, 2)
    elif name == "sdpa":
        return None
    else:
        o = fn(*leaves, slope)
    o.backward(go)
    out = {}
    for n, x, r in zip(["o", "dq", "dk", "dv"], [o] + [x.grad for x in leaves], [o64] + [x.grad for x in leaves64]):
        d = x.double() - r
        out[n] = (d.norm() / r.norm()).item()
        out[n + "_row"] = (d.norm(dim=-1) / r.norm(dim=-1)).max().item()
    return out


# ---------------------------------------------------------------------------------------------------------------
# config sweep (our kernels): greedy, one knob group at a time, at the shapes that stress each design choice

def sweep():
    print("\n## sweep (ms, do_bench mean; fwd rows time the forward, the others forward+backward)\n")
    shapes = [(4, 32, 8192), (1, 8, 65536)]

    def measure(label, fwd_only):
        row = []
        for B, H, N in shapes:
            slope = la.build_slopes(H, 0, 80).to(dev)
            try:
                t_f, t_fb = time_impl("ours", B, H, N, slope, bwd=not fwd_only)
            except Exception as e:  # noqa: BLE001 - a config that does not compile is skipped
                print(f"  {label}: failed ({type(e).__name__}: {str(e)[:160]})", flush=True)
                return None
            row.append(t_f if fwd_only else t_fb)
        print(f"  {label}: " + "  ".join(f"B{s[0]}H{s[1]}N{s[2]} {t:.3f}" for s, t in zip(shapes, row)), flush=True)
        return sum(row)

    def pick(name, candidates, setter, fwd_only):
        """Greedy: try each candidate for one knob group, keep the fastest (sum over the two shapes)."""
        best = None
        for cand in candidates:
            old = setter(cand)
            t = measure(f"{name} {cand}", fwd_only)
            if t is not None and (best is None or t < best[0]):
                best = (t, cand)
            if best is None or best[1] is not cand:
                setter(old if best is None else best[1])
        if best is not None:
            setter(best[1])

    def set_cfg(key):
        def setter(cand):
            old, la._CONFIG[key] = la._CONFIG[key], dict(cand)
            return old
        return setter

    def set_seg(per_sm):
        old, la._SEG_PROGRAMS_PER_SM = la._SEG_PROGRAMS_PER_SM, per_sm
        return old

    def set_chunk(c):
        global OURS_C
        old, OURS_C = OURS_C, c
        return old

    slices = [(128, 8, 2), (128, 8, 3), (64, 4, 2), (64, 4, 3), (64, 8, 2), (64, 8, 3)]
    pick("fwd", [dict(BV=b, num_warps=w, num_stages=st) for b, w, st in slices], set_cfg("fwd"), True)
    pick("dq", [dict(BK=b, num_warps=w, num_stages=st) for b, w, st in slices], set_cfg("dq"), False)
    pick("dkdv", [dict(num_warps=w, num_stages=st) for w, st in [(8, 1), (8, 2), (8, 3), (4, 2)]],
         set_cfg("dkdv"), False)
    pick("segments/SM", [2, 0, 1, 4], set_seg, False)
    pick("chunk", [64, 32], set_chunk, False)
    print(f"\nchosen: C={OURS_C}  fwd {la._CONFIG['fwd']}  dq {la._CONFIG['dq']}  dkdv {la._CONFIG['dkdv']}  "
          f"_SEG_PROGRAMS_PER_SM={la._SEG_PROGRAMS_PER_SM}\n", flush=True)


def kernel_breakdown(B, H, N):
    """Per-kernel device time of one forward+backward of ours (torch.profiler), for the notes."""
    slope = la.build_slopes(H, 0, 80).to(dev)
    q, k, v = make(B, H, N, grad=True)
    do = torch.randn_like(v)
    for _ in range(3):
        run_ours(q, k, v, slope).backward(do)
    torch.cuda.synchronize()
    reps = 5
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            q.grad = k.grad = v.grad = None                 # no gradient accumulation kernels in the profile
            run_ours(q, k, v, slope).backward(do)
        torch.cuda.synchronize()
    print(f"\nper-kernel device time, B{B} H{H} N{N} (mean of {reps} fwd+bwd):")
    for e in sorted(prof.key_averages(), key=lambda e: -getattr(e, "device_time_total", 0)):
        t = getattr(e, "device_time_total", 0) / reps / 1e3
        if t > 0.001:
            print(f"  {e.key[:60]:60s} {t:8.3f} ms  ({e.count // reps} launches)")


# ---------------------------------------------------------------------------------------------------------------

props = torch.cuda.get_device_properties(0)
print(f"card: {props.name} ({props.multi_processor_count} SMs) | torch {torch.__version__} | triton "
      f"{triton.__version__} | fla {'not importable: ' + FLA_ERR if chunk_simple_gla is None else 'fla-core'}")
print(f"command: python {' '.join(sys.argv)}")

if args.sweep:
    sweep()

print("\n## accuracy vs fp64 (B1 H8 N1000 bf16, SiLU(randn) inputs, slopes 0.917 .. 4.9e-5), rel. error "
      "global / worst row\n")
print("| impl | o | dq | dk | dv |")
print("| --- | --- | --- | --- | --- |")
for name in impls:
    acc = accuracy(name)
    if acc is None:
        continue
    print(f"| {NAMES[name]} | " + " | ".join(f"{acc[n]:.2e} / {acc[n + '_row']:.1e}" for n in ("o", "dq", "dk", "dv"))
          + " |", flush=True)

print("\n## time (D = E = 128, bf16; % of T* = max(F/790e12, bytes/3.0e12), KERNELS.md section 2 at C = 64)\n")
print("| shape | impl | fwd ms | fwd % T* | fwd+bwd ms | fwd+bwd % T* |")
print("| --- | --- | --- | --- | --- | --- |")
for shp in args.shapes.split(","):
    B, H, N = (int(x) for x in shp.split("x"))
    slope = la.build_slopes(H, 0, 80).to(dev)
    for name in impls:
        t0 = time.time()
        try:
            t_f, t_fb = time_impl(name, B, H, N, slope, bwd=not args.no_bwd)
        except Exception as e:  # noqa: BLE001 - e.g. out of memory for the PyTorch path: report and go on
            print(f"| B{B} H{H} N{N} | {NAMES[name]} | failed: {type(e).__name__} {str(e)[:80]} | | | |")
            torch.cuda.empty_cache()
            continue
        lin = name != "sdpa"
        pf = f"{100 * roofline_ms(B, H, N, True) / t_f:.0f} %" if lin else "-"
        pfb = f"{100 * roofline_ms(B, H, N, False) / t_fb:.0f} %" if lin and t_fb == t_fb else "-"
        print(f"| B{B} H{H} N{N} | {NAMES[name]} | {t_f:.3f} | {pf} | {t_fb:.3f} | {pfb} |", flush=True)
print(f"\nT* (C = 64): " + ", ".join(f"{s}: fwd {roofline_ms(*map(int, s.split('x')), True):.3f} / fwd+bwd "
                                       f"{roofline_ms(*map(int, s.split('x')), False):.3f} ms"
                                       for s in args.shapes.split(",")))
print(f"our launch configs: C={OURS_C}  fwd {la._CONFIG['fwd']}  dq {la._CONFIG['dq']}  dkdv {la._CONFIG['dkdv']}  "
      f"segments per SM {la._SEG_PROGRAMS_PER_SM}")

if "ours" in impls:
    kernel_breakdown(4, 32, 8192)
    kernel_breakdown(1, 8, 65536)
