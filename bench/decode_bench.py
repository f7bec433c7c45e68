"""
Decoding speed at batch 1 (greedy), 'bench' preset: prefill time and milliseconds per new token after prompts of
1k, 16k and 64k tokens, for this model (eager and CUDA-graph decode) and transformers' MiniMax and Llama.

    python bench/decode_bench.py                     # the issue-8 table (GPU, ~1-2 min)
    python bench/decode_bench.py --compile           # + a row with decode_step torch.compile'd inside the graph
    python bench/decode_bench.py --quick             # CPU smoke test of this script

Rows:
  ours eager        model(next_id, cache=cache) per token: ~70 kernel launches per layer from Python
  ours graph        StaticDecoder: the same step captured once in a CUDA graph, one replay per token
                    (softmax layers attend over the whole preallocated cache under a mask: fixed shapes)
  ours graph+compile  decode_step compiled by torch.compile (fused elementwise kernels), then captured
                    (--compile; at the shortest and longest prompt only: each cache size compiles anew)
  hf Llama / hf MiniMax  model.generate(do_sample=False), their default DynamicCache; ms/token =
                    (time(n tokens) - time(1 token)) / (n - 1), prefill = time(1 token)
ms/token of ours is the median-free mean over n - 2 timed steps (CUDA events), after the first step (warm-up /
capture, reported as 'first ms'). 'same tokens' compares the graph path's greedy tokens with the eager path's
(bf16: a near-tie can flip an argmax; the CPU test tests/test_speed_paths.py checks exact agreement in fp64).
Why constant time: a lightning layer's decode reads and writes one (H, Dh, Dh) fp32 state whatever the context;
only the one softmax layer reads its KV cache, 4 KV heads x 64 x 2 x bf16 = 1 KB per cached token.
"""
import argparse
import gc
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import StaticDecoder  # noqa: E402
from train_bench import bench_config, build_hf_minimax, build_llama, build_ours  # noqa: E402

START = time.perf_counter()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def ours_decode(model, prompt, n, graph, device):
    """-> (prefill s, first-step s, s per token after it, generated ids (n,))."""
    T0 = prompt.shape[1]
    cache = model.new_cache(1, T0 + n)
    sync(device)
    t0 = time.perf_counter()
    logits = model.prefill(prompt, cache)
    sync(device)
    prefill = time.perf_counter() - t0
    if graph:
        decoder = StaticDecoder(model, cache)
        step = decoder
    else:
        step = lambda nid: model(nid, cache=cache)[0][:, -1].float()  # noqa: E731 - the eager twin
    ids = [logits.argmax(-1, keepdim=True)]
    t0 = time.perf_counter()
    logits = step(ids[-1])  # warm-up (and capture, for the graph)
    ids.append(logits.argmax(-1, keepdim=True))
    sync(device)
    first = time.perf_counter() - t0
    if device.type == "cuda":
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
    t0 = time.perf_counter()
    for _ in range(n - 2):
        logits = step(ids[-1])
        ids.append(logits.argmax(-1, keepdim=True))
    if device.type == "cuda":
        b.record()
        b.synchronize()
        per_token = a.elapsed_time(b) / 1e3 / (n - 2)
    else:
        per_token = (time.perf_counter() - t0) / (n - 2)
    return prefill, first, per_token, torch.cat(ids, dim=1)[0]


def hf_decode(model, prompt, n, device, max_prefill_s=90):
    """-> (prefill s, None, s per token, None) from two generate calls (1 token and n tokens)."""
    def generate(k):
        sync(device)
        t0 = time.perf_counter()
        model.generate(prompt, max_new_tokens=k, min_new_tokens=k, do_sample=False, use_cache=True,
                       pad_token_id=0)
        sync(device)
        return time.perf_counter() - t0

    t1 = generate(1)
    if t1 > max_prefill_s:
        return t1, None, None, None
    tn = generate(n)
    return t1, None, (tn - t1) / (n - 1), None


def launch_cost_us(device, n=2000):
    """Host time per launch of a tiny kernel, queued without syncs (what the CPU side of eager decoding costs)."""
    x = torch.zeros(1, device=device)
    for _ in range(100):
        x.add_(1)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        x.add_(1)
    t = time.perf_counter() - t0
    sync(device)
    return t / n * 1e6


def profile_decode_step(model, prompt, device):
    """Kernels of one static decode step (run eagerly, no graph): count and GPU time by kernel class."""
    from torch.profiler import ProfilerActivity, profile

    from train_bench import kernel_class

    cache = model.new_cache(1, prompt.shape[1] + 8)
    decoder = StaticDecoder(model, cache)
    decoder.use_graph = False  # the same step, launched from Python, so each kernel shows
    nid = model.prefill(prompt, cache).argmax(-1, keepdim=True)
    for _ in range(3):
        nid = decoder(nid).argmax(-1, keepdim=True)
    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        decoder(nid)
        sync(device)
    per_class, count = {}, 0
    for e in prof.events():
        if e.device_type.name == "CUDA":
            count += 1
            cls = kernel_class(e.name)
            per_class[cls] = per_class.get(cls, 0.0) + e.time_range.elapsed_us()
    total = sum(per_class.values())
    print(f"decode step profile (prompt {prompt.shape[1]}): {count} kernels, {total:.0f} us of kernel time")
    for cls, us in sorted(per_class.items(), key=lambda kv: -kv[1]):
        print(f"  {cls:<28} {us:8.1f} us")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", default="1024,16384,65536")
    parser.add_argument("--new", type=int, default=64, help="new tokens for ours (transformers: --hf-new)")
    parser.add_argument("--hf-new", type=int, default=24)
    parser.add_argument("--compile", action="store_true", help="add the graph+compile row (first, last prompt)")
    parser.add_argument("--profile", action="store_true", help="GPU time by kernel class of one decode step")
    parser.add_argument("--skip", default="", help="comma-separated row-name substrings to leave out")
    parser.add_argument("--mem-cap-gib", type=float, default=79.0)
    parser.add_argument("--budget", type=float, default=300, help="seconds; rows after this are skipped")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    prompts = [int(p) for p in args.prompts.split(",")] if not args.quick else [64, 256]
    cfg = bench_config(args.quick, max_position_embeddings=max(prompts) + max(args.new, args.hf_new) + 64)
    try:
        import transformers
        hf_version = transformers.__version__
    except ImportError:
        hf_version = None
    print(f"torch {torch.__version__}, transformers {hf_version}")
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        total_gib = props.total_memory / 2**30
        print(f"card: {props.name}, {total_gib:.0f} GiB")
        if total_gib > args.mem_cap_gib + 1:
            torch.cuda.set_per_process_memory_fraction(args.mem_cap_gib / total_gib)
            print(f"memory capped at {args.mem_cap_gib} GiB")
        print(f"CUDA_LAUNCH_BLOCKING={os.environ.get('CUDA_LAUNCH_BLOCKING')}, host launch cost "
              f"{launch_cost_us(device):.1f} us per tiny kernel (eager decoding pays this ~600 times a token)")

    def ours():  # the same weights every time, so the compiled row's tokens compare with the eager row's
        torch.manual_seed(1)
        return build_ours(cfg, device, dtype)

    builders = [("ours eager", ours, "eager"),
                ("ours graph", None, "graph")]  # None: the same model as the row above
    if hf_version is not None:
        builders += [("hf Llama (SDPA)", lambda: build_llama(cfg, device, dtype), "hf"),
                     ("hf MiniMax (SDPA)", lambda: build_hf_minimax(cfg, device, dtype), "hf")]
    if args.compile and device.type == "cuda":  # last: compiling costs a minute or two
        builders.append(("ours graph+compile", ours, "compile"))
    builders = [b for b in builders if not any(s and s in b[0] for s in args.skip.split(","))]

    print("| row                  | prompt | prefill ms | first ms | ms/token | same tokens |")
    print("| --- | --- | --- | --- | --- | --- |")
    results = {}
    model, eager_ids = None, {}
    torch.manual_seed(0)
    prompt_ids = {T0: torch.randint(0, cfg.vocab_size, (1, T0), device=device) for T0 in prompts}
    for name, build, kind in builders:
        if build is not None:  # a new model (the graph rows reuse ours)
            model = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            model = build().eval()
            if kind == "hf":  # warm-up: kernels, allocator
                hf_decode(model, prompt_ids[prompts[0]][:, :64], 4, device)
            else:
                ours_decode(model, prompt_ids[prompts[0]][:, :256], 8, False, device)
        if kind == "compile":
            model.decode_step = torch.compile(model.decode_step, dynamic=False)
        for T0 in prompts:
            if kind == "compile" and T0 not in (prompts[0], prompts[-1]):
                continue
            if time.perf_counter() - START > args.budget:
                print(f"| {name:<20} | {T0:>6} | skipped (time budget) |", flush=True)
                continue
            try:
                prompt = prompt_ids[T0]
                if kind == "hf":
                    prefill, first, per, ids = hf_decode(model, prompt, args.hf_new, device)
                else:
                    prefill, first, per, ids = ours_decode(model, prompt, args.new, kind != "eager", device)
                same = "-"
                if kind == "eager":
                    eager_ids[T0] = ids
                elif ids is not None and T0 in eager_ids:
                    match = (ids == eager_ids[T0]).long()
                    same = f"{int(match.cumprod(0).sum())}/{len(ids)} prefix"
                results[(name, T0)] = per
                per_s = "too slow" if per is None else f"{per * 1e3:8.3f}"
                first_s = "-" if first is None else f"{first * 1e3:8.1f}"
                print(f"| {name:<20} | {T0:>6} | {prefill * 1e3:10.1f} | {first_s:>8} | {per_s:>8} | {same} |",
                      flush=True)
            except torch.OutOfMemoryError:
                print(f"| {name:<20} | {T0:>6} | OOM |", flush=True)
            except Exception as e:  # noqa: BLE001 - record and go on
                msg = str(e).splitlines()[0][:150] if str(e) else ""
                print(f"| {name:<20} | {T0:>6} | error: {type(e).__name__}: {msg} |", flush=True)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()

    if args.profile and device.type == "cuda":
        profile_decode_step(build_ours(cfg, device, dtype).eval(), prompt_ids[prompts[0]], device)

    print("\nconstant time? ms/token at the longest prompt / at the shortest:")
    for name, _, _ in builders:
        a, b = results.get((name, prompts[0])), results.get((name, prompts[-1]))
        if a and b:
            print(f"  {name:<20} {a * 1e3:.3f} -> {b * 1e3:.3f} ms: {b / a:.2f}x")
    print(f"total decode bench time {time.perf_counter() - START:.0f} s")


if __name__ == "__main__":
    main()
