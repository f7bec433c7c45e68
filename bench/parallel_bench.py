"""
Benchmark of parallel.py on the GPUs of one machine: training tokens/s and peak memory per GPU for data
parallel (torch DDP, and parallel.sync_gradients), expert parallel (EP=2) and LASP+ sequence parallel (SP=2),
and the longest context one training step fits in, per GPU count. Before timing, the 2-GPU run checks that EP=2
and SP=2 give the same loss and gradients as one GPU holding the whole model and sequence (bf16 autocast).

Run (the README table is made from both outputs):
    python bench/parallel_bench.py                            # 1 GPU: baselines, longest context on one GPU
    torchrun --nproc_per_node=2 bench/parallel_bench.py       # 2 GPUs: check, DDP, DP, EP=2, SP=2, longest context
CPU smoke test of the script itself (gloo, no memory numbers):
    torchrun --nproc_per_node=2 bench/parallel_bench.py --preset tiny --seq 64 --batch 2 --long 256 --no-search

What is measured: a full optimizer step (forward, backward, gradient sync, fused AdamW), fp32 weights with bf16
autocast (train.py's policy), the chunked cross-entropy (no (T, V) logits), random tokens. tokens/s counts the
tokens of all GPUs; "same per-GPU batch" means each GPU runs `batch x seq` tokens per step in every data-parallel
row. Longest context: batch 1, the sequence doubled (then refined by a linear fit of peak memory vs length) while
the predicted peak stays under 90 % of the card; one step must succeed. Memory = torch's max_memory_allocated
(the caching allocator reserves a little more).
"""
import argparse
import gc
import json
import os
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: flat modules
import parallel  # noqa: E402
from model import MiniMax, MiniMaxConfig  # noqa: E402

# -----------------------------------------------------------------------------
p = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--preset", default="bench", help="model.py preset")
p.add_argument("--seq", type=int, default=4096, help="sequence length of the data-parallel rows")
p.add_argument("--batch", type=int, default=8, help="sequences per GPU in the data-parallel rows")
p.add_argument("--long", type=int, default=65536, help="sequence length of the long-context rows (batch 1)")
p.add_argument("--steps", type=int, default=5, help="timed steps per row (after --warmup)")
p.add_argument("--warmup", type=int, default=2)
p.add_argument("--no-search", action="store_true", help="skip the longest-context search")
p.add_argument("--search-start", type=int, default=32768, help="first length of the longest-context search")
p.add_argument("--search-max", type=int, default=1 << 21, help="stop the search at this length")
p.add_argument("--out", default=None, help="append the rows as JSON lines to this file")
args = p.parse_args()
# -----------------------------------------------------------------------------

layout0 = parallel.init_distributed(timeout_s=600)  # world, rank, device (groups of each mode built below)
world, device, master = layout0.world, layout0.device, layout0.master_process
cuda = device.type == "cuda"
autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
if cuda:
    torch.backends.cuda.matmul.allow_tf32 = True


def print0(*a):
    if master:
        print(*a, flush=True)


def max_over_ranks(x):
    t = torch.tensor(float(x), device=device)
    if world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


cfg = MiniMaxConfig.from_preset(args.preset, max_position_embeddings=1 << 23)  # RoPE has no table: any length


def build(layout, ddp=False):
    """The preset model with identical weights on every rank, EP/SP applied, fused AdamW. -> (model, runner, opt)"""
    torch.manual_seed(0)
    with torch.device(device):
        model = MiniMax(cfg)
    parallel.apply_expert_parallel(model, layout)
    parallel.apply_sequence_parallel(model, layout)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=cuda)
    runner = torch.nn.parallel.DistributedDataParallel(model, device_ids=[layout.local_rank] if cuda else None) \
        if ddp else model
    return model, runner, opt


def batch(layout, B, T, seed=0):
    """Random tokens; the ranks of one SP group share the sequences (seeded by dp_rank), then take their slice."""
    g = torch.Generator(device=device).manual_seed(1000 * seed + layout.dp_rank)
    data = torch.randint(0, cfg.vocab_size, (B, T + 1), device=device, generator=g)
    return parallel.split_sequence(data[:, :-1], layout), parallel.split_sequence(data[:, 1:], layout)


def train_step(model, runner, opt, layout, x, y, ddp=False):
    with autocast:
        _, loss = runner(x, y, logits=False)  # chunked cross-entropy: no (B, T, V) logits
    loss.backward()
    if not ddp:
        parallel.sync_gradients(model, layout)  # (torch DDP all-reduced during the backward)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def sync():
    if cuda:
        torch.cuda.synchronize()


def free():
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


rows = []


def record(row):
    row.update(world=world, card=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__)
    rows.append(row)
    if master and args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")


def throughput(name, ep, sp, B, T, ddp=False):
    """Time `args.steps` optimizer steps of one layout. -> row dict (tokens/s over all GPUs, peak GB per GPU)."""
    layout = parallel.init_distributed(ep=ep, sp=sp)
    free()
    model, runner, opt = build(layout, ddp)
    x, y = batch(layout, B, T)
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            sync()
            t0 = time.perf_counter()
        loss = train_step(model, runner, opt, layout, x, y, ddp)
    sync()
    dt = (time.perf_counter() - t0) / args.steps
    tokens = B * T * layout.dp_size  # tokens per optimizer step, all GPUs (an SP group shares its sequences)
    peak = max_over_ranks(torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0)
    row = dict(name=name, ep=ep, sp=sp, batch=B, seq=T, step_ms=1000 * dt, tok_s=tokens / dt, peak_gb=peak,
               loss=loss.item())
    record(row)
    print0(f"{name:24s} ep={ep} sp={sp} B={B:2d} T={T:7d}  {1000 * dt:8.1f} ms/step  {tokens / dt:10.0f} tok/s  "
           f"peak {peak:6.2f} GB/GPU")
    del model, runner, opt
    free()
    return row


def check(ep, sp, T=4096):
    """EP/SP on this machine == one GPU holding the whole model and sequence: loss and gradients (bf16 autocast:
    differences are bf16 rounding, ~1e-3 relative; a real bug is O(1))."""
    layout = parallel.init_distributed(ep=ep, sp=sp)
    free()
    (model, _, _), (ref, _, _) = build(layout), build(parallel.Layout(device=device))
    g = torch.Generator(device=device).manual_seed(7)
    data = torch.randint(0, cfg.vocab_size, (2, T + 1), device=device, generator=g)  # the same tokens on every rank
    x, y = data[:, :-1], data[:, 1:]
    with autocast:
        _, loss = model(parallel.split_sequence(x, layout), parallel.split_sequence(y, layout), logits=False)
        _, ref_loss = ref(x, y, logits=False)
    loss.backward()
    ref_loss.backward()
    parallel.sync_gradients(model, layout)
    loss = loss.detach().clone()
    dist.all_reduce(loss)
    loss /= world
    experts = parallel._expert_names(model)
    ref_params = dict(ref.named_parameters())
    num, den = torch.zeros((), device=device), torch.zeros((), device=device)
    for name, p_ in model.named_parameters():
        g_ref = ref_params[name].grad
        g_ref = parallel._shard_experts(g_ref, layout) if name in experts else g_ref
        num += (p_.grad - g_ref).float().square().sum()
        den += g_ref.float().square().sum()
    rel = max_over_ranks((num / den).sqrt().item())
    dloss = abs(loss.item() - ref_loss.item()) / abs(ref_loss.item())
    ok = dloss < 1e-2 and rel < 5e-2
    print0(f"check ep={ep} sp={sp} T={T}: loss {loss.item():.5f} vs one GPU {ref_loss.item():.5f} (rel {dloss:.1e}), "
           f"gradients rel. L2 error {rel:.1e} -> {'OK' if ok else 'MISMATCH'}")
    record(dict(name=f"check ep={ep} sp={sp}", loss_rel=dloss, grad_rel=rel, ok=ok))
    del model, ref
    free()


def longest_context(sp):
    """Largest batch-1 sequence for which one training step fits (see docstring). -> row dict."""
    layout = parallel.init_distributed(sp=sp)
    free()
    model, runner, opt = build(layout)
    train_step(model, runner, opt, layout, *batch(layout, 1, 4096))  # allocates the AdamW state once
    cap = torch.cuda.get_device_properties(device).total_memory / 2**30
    fits = []  # (T, peak GB) of the steps that ran

    def trial(T):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        train_step(model, runner, opt, layout, *batch(layout, 1, T))
        sync()
        peak = max_over_ranks(torch.cuda.max_memory_allocated() / 2**30)
        fits.append((T, peak))
        print0(f"  longest context, sp={sp}: T={T:8d} fits, peak {peak:6.2f} GB of {cap:.1f} "
               f"({time.perf_counter() - t0:.1f} s)")

    def predict(T):  # linear fit through the last two points: memory is O(T) (flash, lightning, MoE)
        (t1, m1), (t2, m2) = fits[-2], fits[-1]
        return m2 + (m2 - m1) / (t2 - t1) * (T - t2)

    T = args.search_start * sp
    while T <= args.search_max and (len(fits) < 2 or predict(T) < 0.9 * cap):
        trial(T)
        T *= 2
    if len(fits) >= 2:  # refine: the longest multiple of 8192 * sp predicted to stay under 90 %
        (t1, m1), (t2, m2) = fits[-2], fits[-1]
        unit = 8192 * sp
        T = int((t2 + (0.9 * cap - m2) / ((m2 - m1) / (t2 - t1))) // unit * unit)
        if fits[-1][0] < T <= args.search_max:
            trial(T)
    T, peak = fits[-1]
    row = dict(name=f"longest context, {world} GPU{'s' if world > 1 else ''}", sp=sp, ep=1, batch=1, seq=T,
               peak_gb=peak, cap_gb=cap)
    record(row)
    del model, runner, opt
    free()
    return row


# -----------------------------------------------------------------------------

if cuda:
    import triton
    print0(f"card: {torch.cuda.get_device_name()} x {world}; torch {torch.__version__}, CUDA {torch.version.cuda}, "
           f"triton {triton.__version__}; preset {args.preset}")
if world == 1:
    throughput("1 GPU", 1, 1, args.batch, args.seq)
    throughput("1 GPU long", 1, 1, 1, args.long)
elif world == 2:
    check(2, 1)
    check(1, 2)
    throughput("DDP (torch DDP)", 1, 1, args.batch, args.seq, ddp=True)
    throughput("DP (sync_gradients)", 1, 1, args.batch, args.seq)
    throughput("EP=2", 2, 1, args.batch, args.seq)
    throughput("SP=2 long", 1, 2, 1, args.long)
else:
    print0(f"world size {world}: this benchmark is written for 1 or 2 processes")
if cuda and not args.no_search and world <= 2:
    r = longest_context(sp=world)
    print0(f"longest context that trains: {r['seq']} tokens on {world} GPU(s) (peak {r['peak_gb']:.1f} GB)")
if world > 1:
    dist.destroy_process_group()

# Measured (2x NVIDIA H200 of one host, torch 2.11.0+cu130, CUDA 13.0, Triton 3.6.0, preset bench):
#   1 GPU                    ep=1 sp=1 B= 8 T=   4096     154.9 ms/step      211534 tok/s  peak  31.15 GB/GPU
#   1 GPU long               ep=1 sp=1 B= 1 T=  65536     356.8 ms/step      183687 tok/s  peak  51.19 GB/GPU
#   longest context that trains: 180224 tokens on 1 GPU(s) (peak 121.2 GB)
#   check ep=2 sp=1 T=4096: loss 10.43788 vs one GPU 10.43788 (rel 0.0e+00), gradients rel. L2 error 4.2e-04 -> OK
#   check ep=1 sp=2 T=4096: loss 10.43789 vs one GPU 10.43788 (rel 1.5e-06), gradients rel. L2 error 3.0e-03 -> OK
#   DDP (torch DDP)          ep=1 sp=1 B= 8 T=   4096     162.0 ms/step      404458 tok/s  peak  36.44 GB/GPU
#   DP (sync_gradients)      ep=1 sp=1 B= 8 T=   4096     170.3 ms/step      384862 tok/s  peak  31.15 GB/GPU
#   EP=2                     ep=2 sp=1 B= 8 T=   4096     177.5 ms/step      369177 tok/s  peak  27.39 GB/GPU
#   SP=2 long                ep=1 sp=2 B= 1 T=  65536     256.4 ms/step      255575 tok/s  peak  31.85 GB/GPU
#   longest context that trains: 360448 tokens on 2 GPU(s) (peak 124.9 GB)
