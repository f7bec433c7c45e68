"""
Benchmark of moe.MoE on one GPU: forward+backward of
  (a) the whole MoE layer (route -> permute -> grouped experts -> combine, plus the aux loss),
  (b) its expert stage alone (3 grouped matmuls + SwiGLU) and the 3 grouped matmuls alone,
  (c) a dense SwiGLU MLP with the same active FLOPs (N = T*K rows through one D -> F -> D MLP),
  (d) per-expert Python loops: our loop twin (expert_impl="loop") and a Mixtral/HF-style reference layer
      (boolean mask per expert, index_add_ combine),
plus a forward breakdown of the layer's stages, a kernel profile (--profile D) and a correctness check on the
device (grouped vs loop twin in bf16, and vs an fp32 layer).

TFLOP/s counts the expert matmuls only: 3 GEMMs x 2*N*D*F x 3 (forward + two backward GEMMs), N = T*K;
the same FLOP count is used for every row so the rates compare directly.

Run (repo root): python bench/moe_bench.py                 (bf16, T=16384, E=32, K=2, D=512,1024,2048)
                 python bench/moe_bench.py --compile       (adds a torch.compile'd layer at each D)
CPU dry run:     python bench/moe_bench.py --device cpu --dtype float32 --T 256 --D 64 --reps 2
"""

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from moe import MoE, _Combine, grouped_mm  # noqa: E402

# -----------------------------------------------------------------------------
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--T", type=int, default=16384, help="tokens")
parser.add_argument("--E", type=int, default=32, help="experts")
parser.add_argument("--K", type=int, default=2, help="top-k")
parser.add_argument("--D", type=str, default="512,1024,2048", help="hidden sizes, comma-separated; F = 1.5 D")
parser.add_argument("--dtype", type=str, default="bfloat16")
parser.add_argument("--device", type=str, default="cuda")
parser.add_argument("--reps", type=int, default=30, help="timed repetitions (median reported)")
parser.add_argument("--warmup", type=int, default=5)
parser.add_argument("--loop-reps", type=int, default=5, help="repetitions for the slow loop layers")
parser.add_argument("--compile", action="store_true", help="also time torch.compile(layer)")
parser.add_argument("--profile", type=int, default=0, help="print a kernel table of one layer fwd+bwd at this D")
args = parser.parse_args()
# -----------------------------------------------------------------------------

device, dtype = torch.device(args.device), getattr(torch, args.dtype)
torch.manual_seed(0)
is_cuda = device.type == "cuda"


def timeit(fn, reps=args.reps, warmup=args.warmup):
    """Median GPU ms per call (CUDA events around each call) and mean host ms to issue one call."""
    for _ in range(warmup):
        fn()
    if not is_cuda:
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append(1e3 * (time.perf_counter() - t0))
        return statistics.median(ts), statistics.mean(ts)
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    host = 0.0
    for i in range(reps):
        starts[i].record()
        t0 = time.perf_counter()
        fn()
        host += time.perf_counter() - t0
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)), 1e3 * host / reps


def fwd_bwd(fn, inputs, grads):
    """A closure running fn(*inputs) forward and backward with fixed output grads; grads set to None first."""
    def step():
        for t in inputs:
            t.grad = None
        outs = fn()
        outs = outs if isinstance(outs, tuple) else (outs,)
        torch.autograd.backward(outs, grads[: len(outs)])
    return step


def hf_style_moe(m, x_TD):
    """Reference-implementation style layer (as in HF Mixtral/MiniMax): loop over experts with a mask."""
    T, D = x_TD.shape
    weights_TK, ids_TK, _, _ = m.route(x_TD)
    weights_TK = weights_TK.to(x_TD.dtype)
    out = torch.zeros_like(x_TD)
    mask_EKT = F.one_hot(ids_TK, m.num_experts).permute(2, 1, 0)  # (E, K, T)
    for e in range(m.num_experts):
        k_idx, t_idx = torch.where(mask_EKT[e])  # host sync (data-dependent shape)
        xe = x_TD[t_idx]
        ye = F.linear(F.silu(F.linear(xe, m.w1[e])) * F.linear(xe, m.w3[e]), m.w2[e])
        out.index_add_(0, t_idx, ye * weights_TK[t_idx, k_idx, None])  # atomics: not deterministic
    return out


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)).item()


# ---- header: card and versions ----------------------------------------------------------------------------
if is_cuda:
    p = torch.cuda.get_device_properties(device)
    print(f"card: {p.name} ({p.total_memory / 2**30:.0f} GiB, sm{p.major}{p.minor}), CUDA {torch.version.cuda}")
try:
    import triton
    tv = triton.__version__
except ImportError:
    tv = "n/a"
print(f"torch {torch.__version__}, triton {tv}, python {sys.version.split()[0]}")
print(f"T={args.T} E={args.E} K={args.K} dtype={args.dtype} reps={args.reps} (median), warmup={args.warmup}")
print(" ".join(sys.argv))

T, E, K = args.T, args.E, args.K
N = T * K
rows = []
for D in [int(d) for d in args.D.split(",")]:
    F_ = 3 * D // 2
    flops = 3 * 2 * N * D * F_ * 3  # expert GEMMs, forward + backward
    m = MoE(D, F_, E, K).to(device, dtype)
    params = [m.gate.weight, m.w1, m.w3, m.w2]
    x = torch.randn(T, D, device=device, dtype=dtype, requires_grad=True)
    gy = torch.randn(T, D, device=device, dtype=dtype)
    one = torch.ones((), device=device)
    res = {}

    # (a) whole layer: output grad + the aux loss, like training
    def layer():
        y, aux = m(x)
        return y, aux["aux_loss"]
    res["layer"] = timeit(fwd_bwd(layer, [x] + params, (gy, one)))

    # real routing, reused for the expert-only rows
    with torch.no_grad():
        weights_TK, ids_TK, _, _ = m.route(x)
        order_N, counts_E, _, _ = m.sort_slots(ids_TK)
    xs = x.detach()[order_N // K].requires_grad_(True)  # (N, D) expert-major rows
    gs = torch.randn(N, D, device=device, dtype=dtype)
    load = counts_E.float() / counts_E.float().mean()

    # (b) expert stage alone, and the three grouped GEMMs alone (no activation)
    res["experts"] = timeit(fwd_bwd(lambda: m.experts_grouped(xs, counts_E), [xs] + params, (gs,)))
    offs_E = counts_E.cumsum(0).to(torch.int32)
    gf = torch.randn(N, F_, device=device, dtype=dtype)

    def gemms():
        a, b = grouped_mm(xs, m.w1, offs_E), grouped_mm(xs, m.w3, offs_E)
        return grouped_mm(a, m.w2, offs_E), b  # 3 GEMMs forward, 6 backward
    res["gemms"] = timeit(fwd_bwd(gemms, [xs] + params, (gs, gf)))

    # (c) dense SwiGLU MLP with the same active FLOPs: N rows through one D -> F -> D MLP
    W1, W3 = (torch.randn(F_, D, device=device, dtype=dtype) * D**-0.5 for _ in range(2))
    W2 = torch.randn(D, F_, device=device, dtype=dtype) * F_**-0.5
    for w in (W1, W3, W2):
        w.requires_grad_(True)
    res["dense"] = timeit(fwd_bwd(lambda: F.linear(F.silu(F.linear(xs, W1)) * F.linear(xs, W3), W2),
                                  [xs, W1, W3, W2], (gs,)))
    res["dense_gemms"] = timeit(fwd_bwd(lambda: (F.linear(F.linear(xs, W1), W2), F.linear(xs, W3)),
                                        [xs, W1, W3, W2], (gs, gf)))

    # (d) loops: our slow twin inside the layer, and the reference-style layer
    m.expert_impl = "loop"
    res["loop_layer"] = timeit(fwd_bwd(layer, [x] + params, (gy, one)), reps=args.loop_reps, warmup=1)
    m.expert_impl = "grouped"
    res["hf_loop_layer"] = timeit(fwd_bwd(lambda: hf_style_moe(m, x), [x] + params, (gy,)),
                                  reps=args.loop_reps, warmup=1)

    # forward breakdown of the layer's stages (each timed on its own, so the sum is not exactly the layer)
    dest_N = torch.empty_like(order_N).scatter_(0, order_N, torch.arange(N, device=device))
    with torch.no_grad():
        fwd = {}
        fwd["route"] = timeit(lambda: m.route(x))
        fwd["sort"] = timeit(lambda: m.sort_slots(ids_TK))
        fwd["gather"] = timeit(lambda: x.index_select(0, order_N // K))
        fwd["experts"] = timeit(lambda: m.experts_grouped(xs, counts_E))
        ys = m.experts_grouped(xs, counts_E)
        fwd["combine"] = timeit(lambda: _Combine.apply(ys, weights_TK, dest_N, order_N))
        fwd["layer"] = timeit(lambda: m(x))

    # combine variants, forward + backward: moe._Combine vs autograd of gather + bmm / gather + mul + sum
    ys_ = ys.detach().requires_grad_(True)
    wt = weights_TK.detach().requires_grad_(True)
    gather = lambda: ys_.index_select(0, dest_N).view(T, K, D)
    res["combine"] = timeit(fwd_bwd(lambda: _Combine.apply(ys_, wt, dest_N, order_N), [ys_, wt], (gy,)))
    res["combine_bmm"] = timeit(fwd_bwd(lambda: torch.bmm(wt.to(dtype).unsqueeze(1), gather()).squeeze(1),
                                        [ys_, wt], (gy,)))
    res["combine_mulsum"] = timeit(fwd_bwd(lambda: (gather() * wt.to(dtype)[..., None]).sum(1), [ys_, wt], (gy,)))

    if args.profile == D and is_cuda:  # where the layer's time goes, forward and backward, per kernel
        step = fwd_bwd(layer, [x] + params, (gy, one))
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                step()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20, max_name_column_width=50))
        kernel_us = sum(e.self_device_time_total for e in prof.key_averages()) / 3
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            step = fwd_bwd(lambda: m.experts_grouped(xs, counts_E), [xs] + params, (gs,))
            for _ in range(3):
                step()
            torch.cuda.synchronize()
        experts_us = sum(e.self_device_time_total for e in prof.key_averages()) / 3
        print(f"  summed kernel time per fwd+bwd (no host gaps): layer {kernel_us / 1e3:.3f} ms, "
              f"expert stage {experts_us / 1e3:.3f} ms, ratio {kernel_us / experts_us:.2f}")

    if args.compile:
        try:
            t0 = time.perf_counter()
            mc = torch.compile(m)
            def layer_c():
                y, aux = mc(x)
                return y, aux["aux_loss"]
            layer_c_step = fwd_bwd(layer_c, [x] + params, (gy, one))
            layer_c_step()
            if is_cuda:
                torch.cuda.synchronize()
            res["compile_s"] = (time.perf_counter() - t0, 0.0)
            res["layer_compiled"] = timeit(layer_c_step)
        except Exception as err:  # report and go on with the eager numbers
            print(f"torch.compile failed at D={D}: {type(err).__name__}: {str(err)[:300]}")

    # correctness on this device: grouped layer vs loop-twin layer (same dtype) and vs an fp32 loop layer,
    # dropless and with capacity 1.0. bf16: each path rounds its GEMM outputs to bf16 (eps 2^-8).
    Tc = min(T, 4096)
    xc = x.detach()[:Tc].clone().requires_grad_(True)
    gc = gy[:Tc]
    names = ["y", "dx", "dgate", "dw1", "dw3", "dw2"]
    def run(mod, inp):
        for t in [inp] + [mod.gate.weight, mod.w1, mod.w3, mod.w2]:
            t.grad = None
        y, _ = mod(inp)
        y.backward(gc.to(y.dtype))
        return [y.detach(), inp.grad, mod.gate.weight.grad, mod.w1.grad, mod.w3.grad, mod.w2.grad]
    checks = []
    for cf in (None, 1.0):
        m.capacity_factor, m.expert_impl = cf, "grouped"
        got = run(m, xc)
        m.expert_impl = "loop"
        loop = run(m, xc)
        m32 = MoE(D, F_, E, K, capacity_factor=cf, expert_impl="loop").to(device)
        m32.load_state_dict({k: v.float() for k, v in m.state_dict().items()})
        ref = run(m32, xc.detach().float().requires_grad_(True))
        # bf16 router logits flip the expert choice of near-tied tokens; such a token differs by O(1), so
        # also report the flip rate and the error over the tokens routed identically in both precisions
        with torch.no_grad():
            same = (m.route(xc)[1].sort(-1).values == m32.route(xc.float())[1].sort(-1).values).all(-1)
        checks.append(f"cf={cf}: grouped vs loop (bf16) max {max(rel(a, b) for a, b in zip(got, loop)):.1e}; "
                      "vs fp32 " + " ".join(f"{n} {rel(a, b):.1e}" for n, a, b in zip(names, got, ref))
                      + f"; routing flips {(~same).float().mean():.2%}, y on unflipped tokens "
                      f"{rel(got[0][same], ref[0][same]):.1e}")
    m.capacity_factor, m.expert_impl = None, "grouped"

    def line(name, key, note=""):
        ms, host = res[key]
        print(f"  {name:<44s} {ms:8.3f} ms {flops / ms / 1e9:7.1f} TF/s   host {host:6.3f} ms {note}")
    print(f"\nD={D} F={F_}: load max/min vs mean {load.max():.2f}/{load.min():.2f}; fwd+bwd, expert FLOPs "
          f"{flops / 1e9:.1f} GFLOP")
    line("(a) MoE layer (grouped)", "layer", f"= {res['layer'][0] / res['experts'][0]:.2f}x experts, "
         f"{res['layer'][0] / res['gemms'][0]:.2f}x gemms")
    if "layer_compiled" in res:
        line("(a') MoE layer, torch.compile", "layer_compiled", f"(compile {res['compile_s'][0]:.0f} s)")
    line("(b) expert stage: 3 grouped_mm + SwiGLU", "experts",
         f"= {res['dense'][0] / res['experts'][0] * 100:.0f}% of dense rate")
    line("(b') 3 grouped_mm only", "gemms", f"= {res['dense_gemms'][0] / res['gemms'][0] * 100:.0f}% of dense rate")
    line("(c) dense SwiGLU, same FLOPs", "dense")
    line("(c') dense 3 GEMMs only", "dense_gemms")
    line("(d) layer with loop twin (expert_impl=loop)", "loop_layer")
    line("(d') HF-style loop layer (mask + index_add)", "hf_loop_layer")
    print("  forward breakdown ms: " + ", ".join(f"{k} {v[0]:.3f}" for k, v in fwd.items())
          + f"; layer backward ~{res['layer'][0] - fwd['layer'][0]:.3f}")
    print(f"  combine fwd+bwd: moe._Combine {res['combine'][0]:.3f} ms, autograd gather+bmm "
          f"{res['combine_bmm'][0]:.3f} ms, gather+mul+sum {res['combine_mulsum'][0]:.3f} ms")
    for c in checks:
        print(f"  check T={Tc} rel err: {c}")
    rows.append((D, F_, res))
    del m, m32, xs, W1, W2, W3
    if is_cuda:
        torch.cuda.empty_cache()

# ---- markdown table for the README ------------------------------------------------------------------------
print("\n| D, F | (a) layer | (b) experts | (b') grouped GEMMs | (c) dense SwiGLU | (d) loop twin "
      "| (d') HF-style loop | a/b |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
for D, F_, res in rows:
    flops = 3 * 2 * N * D * F_ * 3
    cell = lambda k: f"{res[k][0]:.2f} ms ({flops / res[k][0] / 1e9:.0f})"
    print(f"| {D}, {F_} | {cell('layer')} | {cell('experts')} | {cell('gemms')} | {cell('dense')} | "
          f"{cell('loop_layer')} | {cell('hf_loop_layer')} | {res['layer'][0] / res['experts'][0]:.2f} |")
