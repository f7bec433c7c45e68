"""
Training speed on one GPU: this repo's MiniMax vs what a user would otherwise pick, side by side in one run.

    python bench/train_bench.py                      # the issue-8 table (GPU, ~3 min)
    python bench/train_bench.py --profile            # + per-kernel-class time of one step of ours at (4, 4096)
    python bench/train_bench.py --quick              # CPU smoke test of this script (tiny shapes, any machine)

Rows, all on the 'bench' preset (vocab 32768, d 1024, 8 layers with softmax attention at layer 7 only, 16 heads
x 64, 4 KV heads, 16 experts top-2 of hidden 1536), random tokens, weights in bf16:
  ours                 model.py, eager; loss by the chunked lm_head + cross-entropy (forward(logits=False))
  ours, plain CE       the same with full (B, T, V) logits and F.cross_entropy (the simple twin)
  ours, ckpt n         + activation checkpointing of the first n blocks (model.checkpoint_layers = n)
  ours, F.rms_norm     eager with every RMSNorm swapped for torch's F.rms_norm (a probe for a fused norm)
  ours, compiled       each block torch.compile'd (Block.compile()), loss as 'ours'
  hf MiniMax           transformers' MiniMaxForCausalLM, same config, attn_implementation='sdpa'
  hf Llama             transformers' LlamaForCausalLM: same width, depth, heads (16 x 64, 4 KV), MLP hidden 3072
                       (= 2 experts x 1536, the same active MLP matmul FLOPs), vocab 32768, SDPA
  ... full step        forward + backward + fused AdamW step (bf16 weights; and fp32 weights + bf16 autocast,
                       train.py's recipe)
Each row: one forward + backward per step (no optimizer unless 'full step'), tokens/s (median over timed steps,
CUDA events), peak memory (torch.cuda.max_memory_allocated, weights + grads + activations), MFU.

FLOP count (MFU = FLOPs per token x tokens/s / 989e12, the H100/H200 SXM dense bf16 peak):
  matmuls:   6 x N_matmul per token (2 forward, 4 backward per multiply-add weight), N_matmul = the weights a
             token multiplies: attention projections, router, K=2 of the 16 experts, lm_head (not the embedding
             lookup). ours/hf MiniMax: 89.8M per token; Llama: 109.0M (its attention is smaller, its MLP equal)
  attention: softmax layer 6 * H * Dh * T per token (QK^T and AV over T/2 causal keys on average, x3 fwd+bwd);
             lightning layer 6 * H * Dh * (C + 2 Dh) with C = 256 (intra-chunk causal half + state read/update)
  = model.estimate_flops_per_token(T) for ours; the same formula over Llama's shapes for Llama.
MFU counts model FLOPs: recomputation (checkpointing) is not credited.

Memory: on a card with more than 80 GB (H200) the process is capped at --mem-cap-gib (default 79) so that "OOM"
means what it means on an H100 80GB; timings still come from the card named in the header.
"""
import argparse
import gc
import math
import os
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import MiniMax, MiniMaxConfig  # noqa: E402

PEAK_FLOPS = 989e12  # H100 / H200 SXM, dense bf16 tensor cores

# -----------------------------------------------------------------------------
# the three models


def bench_config(quick=False, **kw):
    """Our config for the benches. quick: a tiny stand-in so the script can be smoke-tested on a CPU."""
    if quick:
        kw = {**dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, softmax_every=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16, rotary_dim=8, intermediate_size=96, num_local_experts=4,
                     max_position_embeddings=4096), **kw}
    return MiniMaxConfig.from_preset("bench", **kw)


def build_ours(cfg, device, dtype):
    with torch.device(device):
        model = MiniMax(cfg)
    model.check_ids = False  # no host sync for the id range check (random ids are in range)
    return model.to(dtype)


def build_hf_minimax(cfg, device, dtype):
    """transformers' native MiniMax with our config (same layer layout, DeepNorm factors, experts)."""
    from transformers import MiniMaxConfig as HFConfig, MiniMaxForCausalLM

    hf_cfg = HFConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
        num_local_experts=cfg.num_local_experts, num_experts_per_tok=cfg.num_experts_per_tok,
        block_size=cfg.block_size, layer_types=cfg.layer_types, max_position_embeddings=cfg.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta}, rms_norm_eps=cfg.rms_norm_eps,
        full_attn_alpha_factor=cfg.full_attn_alpha_factor, linear_attn_alpha_factor=cfg.linear_attn_alpha_factor,
        mlp_alpha_factor=cfg.mlp_alpha_factor, router_aux_loss_coef=cfg.router_aux_loss_coef,
        tie_word_embeddings=False, use_cache=False, pad_token_id=0, bos_token_id=None, eos_token_id=None,
        attn_implementation="sdpa")
    with torch.device(device):
        model = MiniMaxForCausalLM(hf_cfg)
    return model.to(dtype)


def build_llama(cfg, device, dtype):
    """A dense Llama with our width, depth and heads and MLP hidden = K * expert hidden (same active MLP FLOPs)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.num_experts_per_tok * cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=False, use_cache=False, pad_token_id=0, bos_token_id=None, eos_token_id=None,
        attn_implementation="sdpa")
    with torch.device(device):
        model = LlamaForCausalLM(hf_cfg)
    return model.to(dtype)


def hf_flops_per_token(model, cfg, T, dense_llama):
    """The FLOP convention of model.estimate_flops_per_token, for a transformers model."""
    H, Dh, L = cfg.num_attention_heads, cfg.head_dim, cfg.num_hidden_layers
    if not dense_llama:  # hf MiniMax computes the same function as ours: same count
        with torch.device("meta"):
            return MiniMax(cfg).estimate_flops_per_token(T)
    n = sum(p.numel() for name, p in model.named_parameters() if p.dim() == 2 and "embed_tokens" not in name)
    return 6 * n + L * 6 * H * Dh * T  # every layer is softmax attention


# -----------------------------------------------------------------------------
# one measured row


def compile_blocks(model):
    """torch.compile each block (the model's loop, loss and embedding stay eager). Blocks of one kind share
    the compiled code (parameters are graph inputs), so 8 blocks compile twice: lightning and softmax."""
    for block in model.layers:
        block.compile()


def fused_rms_norm(model):
    """Swap every RMSNorm's forward for F.rms_norm on the input dtype (fp32 math inside the kernel)."""
    from model import RMSNorm

    for m in model.modules():
        if isinstance(m, RMSNorm):
            m.forward = lambda x, m=m: torch.nn.functional.rms_norm(x, (x.shape[-1],), m.weight.to(x.dtype), m.eps)


def free_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def time_steps(step, device, warmup=2, min_time=1.5, max_iters=20):
    """Run step() warmup times, then enough times for ~min_time s; -> (median s/step, first step s)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    step()
    sync()
    first = time.perf_counter() - t0  # includes compilation / autotuning
    for _ in range(warmup - 1):
        step()
    sync()
    t0 = time.perf_counter()
    step()
    sync()
    iters = max(3, min(max_iters, math.ceil(min_time / max(time.perf_counter() - t0, 1e-6))))
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            step()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    return statistics.median(times), first


def make_step(model, kind, B, T, vocab, device, optimizer=None, autocast=False):
    """A closure doing one training step on fresh-looking random tokens (a few pre-drawn batches, rotated)."""
    batches = [torch.randint(0, vocab, (B, T + 1), device=device) for _ in range(3)]
    it = [0]

    def step():
        data = batches[it[0] % len(batches)]
        it[0] += 1
        ctx = torch.autocast(device.type, dtype=torch.bfloat16) if autocast else torch.autocast(device.type,
                                                                                              enabled=False)
        with ctx:
            if kind == "ours":
                _, loss = model(data[:, :-1], data[:, 1:], logits=False)
            elif kind == "ours_plain":
                _, loss = model(data[:, :-1], data[:, 1:])
            else:  # transformers: labels are shifted inside the model
                loss = model(input_ids=data[:, :-1], labels=data[:, :-1]).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
        model.zero_grad(set_to_none=True)  # a fresh gradient each step, like a real loop

    return step


def count_host_syncs(step, device):
    """Host-device synchronisations in one step (torch's sync debug mode warns on each)."""
    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    found = [w for w in caught if "synchroniz" in str(w.message) and "prototype" not in str(w.message)]
    for w in found:
        print(f"  host sync at {w.filename}:{w.lineno}: {str(w.message)[:100]}")
    return len(found)


def run_row(rows, name, B, T, build, kind, flops_fn, device, args, setup=None, optimizer=None, autocast=False,
            syncs=False):
    """Measure one row; OOM or another error is recorded in the table and the run goes on."""
    row = dict(name=name, B=B, T=T)
    rows.append(row)
    if time.perf_counter() - START > args.budget:
        row["status"] = "skipped (time budget)"
        print(f"{name} ({B}, {T}): skipped, over the --budget of {args.budget} s", flush=True)
        return
    model = None
    try:
        free_memory()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        model = build()
        if setup is not None:
            setup(model)
        opt = optimizer(model) if optimizer is not None else None
        step = make_step(model, kind, B, T, args.vocab, device, opt, autocast)
        dt, first = time_steps(step, device)
        row.update(tok_s=B * T / dt, ms=dt * 1e3, first_s=first, mfu=flops_fn(model, T) * B * T / dt / PEAK_FLOPS)
        if device.type == "cuda":
            row["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
        if syncs:
            row["syncs"] = count_host_syncs(step, device)
        row["status"] = "ok"
    except torch.OutOfMemoryError:
        row["status"] = "OOM"
    except Exception as e:  # noqa: BLE001 - a failing variant is a result, not the end of the run
        row["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:150] if str(e) else ''}"
    del model
    free_memory()
    print(fmt_row(row), flush=True)


def fmt_row(r):
    shape = f"({r['B']}, {r['T']})"
    head = f"| {r['name']:<36} | {shape:<11}"
    if r.get("status") != "ok":
        return f"{head} | {r.get('status', '?')} |"
    syncs = "" if r.get("syncs") is None else f" | {r['syncs']}"
    peak = f"{r['peak_gb']:.1f}" if "peak_gb" in r else "-"
    return (f"{head} | {r['tok_s'] / 1e3:8.1f}k | {r['ms']:8.1f} | {100 * r['mfu']:5.1f}% | {peak:>6} | "
            f"{r['first_s']:6.1f}{syncs} |")


# -----------------------------------------------------------------------------
# profile: where the time of one step goes


def kernel_class(name):
    n = name.lower()
    for cls, keys in [("lightning (Triton)", ("_fwd_kernel", "_bwd_dq", "_bwd_dkdv", "_seg_state", "_seg_scan")),
                      ("grouped GEMM (experts)", ("grouped", "groupproblemshape")),  # CUTLASS 3 grouped
                      ("flash attention", ("flash", "fmha", "attention")),
                      ("GEMM (dense)", ("gemm", "nvjet", "xmma", "cutlass", "sm90_", "ampere_")),
                      ("sort / scan / index", ("sort", "radix", "scan", "index", "gather", "scatter", "cub")),
                      ("softmax / CE / reductions", ("softmax", "reduce", "logsumexp", "nll", "cross")),
                      ("elementwise / copies", ("elementwise", "vectorized", "copy", "fill", "cat", "triton_"))]:
        if any(k in n for k in keys):
            return cls
    return "other"


def profile_step(step, device, out_dir, tag):
    """Top kernels and per-class totals of one step (after warm-up), printed and saved under out_dir."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    per_kernel, per_class = {}, {}
    for e in prof.events():
        if e.device_type.name != "CUDA":
            continue
        us = e.time_range.elapsed_us()  # a kernel's own duration on the GPU
        per_kernel[e.name] = per_kernel.get(e.name, 0.0) + us
        per_class[kernel_class(e.name)] = per_class.get(kernel_class(e.name), 0.0) + us
    total = sum(per_class.values())
    lines = [f"profile {tag}: GPU busy {total / 1e3:.1f} ms in one step"]
    for cls, us in sorted(per_class.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {cls:<28} {us / 1e3:8.2f} ms  {100 * us / total:5.1f}%")
    lines.append("  top kernels:")
    for name, us in sorted(per_kernel.items(), key=lambda kv: -kv[1])[:25]:
        lines.append(f"    {us / 1e3:8.2f} ms  {name[:110]}")
    text = "\n".join(lines)
    print(text, flush=True)
    if out_dir:
        with open(os.path.join(out_dir, f"profile_{tag}.txt"), "w") as f:
            f.write(text + "\n")


# -----------------------------------------------------------------------------
# main

START = time.perf_counter()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="4x4096,1x16384,1x65536", help="comma-separated BxT")
    parser.add_argument("--skip", default="", help="comma-separated row-name substrings to leave out")
    parser.add_argument("--profile", action="store_true", help="kernel-time profile of ours at the first shape")
    parser.add_argument("--mem-cap-gib", type=float, default=79.0, help="cap on cards with more memory (H200)")
    parser.add_argument("--budget", type=float, default=420, help="seconds; rows after this are skipped")
    parser.add_argument("--out", default=os.environ.get("OUT", ""), help="folder for the log and profiles")
    parser.add_argument("--quick", action="store_true", help="tiny model and shapes: a smoke test of the script")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = bench_config(args.quick)
    args.vocab = cfg.vocab_size
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    if args.quick:
        shapes = [(2, 64), (1, 128)]
    try:
        import transformers
        hf_version = transformers.__version__
    except ImportError:
        hf_version = None
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None

    print(f"torch {torch.__version__}, triton {triton_version}, transformers {hf_version}")
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        total_gib = props.total_memory / 2**30
        print(f"card: {props.name}, {total_gib:.0f} GiB, {props.multi_processor_count} SMs")
        if total_gib > args.mem_cap_gib + 1:
            torch.cuda.set_per_process_memory_fraction(args.mem_cap_gib / total_gib)
            print(f"memory capped at {args.mem_cap_gib} GiB (an H100 80GB's usable memory) so OOM rows compare")
        torch.backends.cuda.matmul.allow_tf32 = True
    torch._dynamo.config.cache_size_limit = 64  # many variants compile the same Block.forward
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = 64
    with torch.device("meta"):
        meta = MiniMax(cfg)
    print(f"config: {cfg.num_hidden_layers} layers {cfg.layer_types.count('full_attention')} softmax, "
          f"d {cfg.hidden_size}, {cfg.num_attention_heads}x{cfg.head_dim} heads, {cfg.num_key_value_heads} KV, "
          f"{cfg.num_local_experts} experts top-{cfg.num_experts_per_tok} F {cfg.intermediate_size}, vocab "
          f"{cfg.vocab_size}; params {meta.num_params() / 1e6:.0f}M total, {meta.num_active_params() / 1e6:.1f}M "
          f"active (+ lm_head {cfg.vocab_size * cfg.hidden_size / 1e6:.1f}M)")
    print(f"FLOPs/token (fwd+bwd) ours at T=4096: {meta.estimate_flops_per_token(4096) / 1e9:.3f} G, at 65536: "
          f"{meta.estimate_flops_per_token(65536) / 1e9:.3f} G; MFU against {PEAK_FLOPS / 1e12:.0f} TFLOP/s")
    del meta

    ours = lambda: build_ours(cfg, device, dtype)  # noqa: E731
    ours_flops = lambda m, T: m.estimate_flops_per_token(T)  # noqa: E731
    rows = []
    print("| row                                  | (B, T)      | tok/s     | ms/step  | MFU    | peak GB | "
          "first s | syncs |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")

    def want(name):
        return not any(s and s in name for s in args.skip.split(","))

    for i, (B, T) in enumerate(shapes):
        long_ctx = T >= 32768
        if want("ours"):
            run_row(rows, "ours", B, T, ours, "ours", ours_flops, device, args, syncs=(i == 0))
        if i == 0 and want("plain CE"):
            run_row(rows, "ours, plain CE", B, T, ours, "ours_plain", ours_flops, device, args)
        if i == 0 and want("rms_norm"):
            run_row(rows, "ours, F.rms_norm", B, T, ours, "ours", ours_flops, device, args, setup=fused_rms_norm)
        for n in ((cfg.num_hidden_layers // 2, cfg.num_hidden_layers) if long_ctx else ()):
            if want("ckpt"):
                run_row(rows, f"ours, ckpt {n}", B, T, ours, "ours", ours_flops, device, args,
                        setup=lambda m, n=n: setattr(m, "checkpoint_layers", n))
        if device.type == "cuda" and want("compiled"):
            run_row(rows, "ours, compiled", B, T, ours, "ours", ours_flops, device, args, setup=compile_blocks)
            if long_ctx:
                def compiled_ckpt(m, n=cfg.num_hidden_layers // 2):
                    compile_blocks(m)
                    m.checkpoint_layers = n
                run_row(rows, f"ours, compiled, ckpt {cfg.num_hidden_layers // 2}", B, T, ours, "ours",
                        ours_flops, device, args, setup=compiled_ckpt)
        if hf_version is not None:
            if want("Llama"):
                run_row(rows, "hf Llama (dense, SDPA)", B, T, lambda: build_llama(cfg, device, dtype), "hf",
                        lambda m, T: hf_flops_per_token(m, cfg, T, True), device, args)
            if want("hf MiniMax"):
                run_row(rows, "hf MiniMax (SDPA)", B, T, lambda: build_hf_minimax(cfg, device, dtype), "hf",
                        lambda m, T: hf_flops_per_token(m, cfg, T, False), device, args)
        if i == 0 and want("full step"):
            adamw = lambda m: torch.optim.AdamW(m.parameters(), lr=1e-4, fused=device.type == "cuda")  # noqa
            run_row(rows, "ours, full step AdamW bf16 weights", B, T, ours, "ours", ours_flops, device, args,
                    optimizer=adamw)
            run_row(rows, "ours, full step AdamW fp32+autocast", B, T, lambda: build_ours(cfg, device,
                    torch.float32), "ours", ours_flops, device, args, optimizer=adamw,
                    autocast=device.type == "cuda")
            if device.type == "cuda" and want("compiled"):
                run_row(rows, "ours, compiled, full step bf16", B, T, ours, "ours", ours_flops, device, args,
                        setup=compile_blocks, optimizer=adamw)
                run_row(rows, "ours, compiled, full step fp32+autocast", B, T, lambda: build_ours(
                        cfg, device, torch.float32), "ours", ours_flops, device, args, setup=compile_blocks,
                        optimizer=adamw, autocast=True)
        if i == 0 and args.profile and device.type == "cuda":
            try:
                m = ours()
                profile_step(make_step(m, "ours", B, T, args.vocab, device), device, args.out, f"ours_{B}x{T}")
                del m
            except Exception as e:  # noqa: BLE001
                print(f"profile failed: {type(e).__name__}: {e}")
            free_memory()
            for tag, build, kind, setup in [("ours_compiled", ours, "ours", compile_blocks),
                                            ("llama", lambda: build_llama(cfg, device, dtype), "hf", None)]:
                if not want(tag) or (kind == "hf" and hf_version is None):
                    continue
                try:
                    m = build()
                    if setup is not None:
                        setup(m)
                    profile_step(make_step(m, kind, B, T, args.vocab, device), device, args.out, f"{tag}_{B}x{T}")
                    del m
                except Exception as e:  # noqa: BLE001
                    print(f"profile failed: {type(e).__name__}: {e}")
                free_memory()

    # summary against the targets
    def get(name, B, T):
        for r in rows:
            if r["name"] == name and (r["B"], r["T"]) == (B, T) and r.get("status") == "ok":
                return r
        return None

    print("\nratios (ours / reference tokens/s; best 'ours' variant per shape):")
    for B, T in shapes:
        mine = [r for r in rows if r["name"].startswith("ours") and "full step" not in r["name"]
                and (r["B"], r["T"]) == (B, T) and r.get("status") == "ok"]
        if not mine:
            continue
        best = max(mine, key=lambda r: r["tok_s"])
        ref = {k: get(k, B, T) for k in ("hf Llama (dense, SDPA)", "hf MiniMax (SDPA)")}
        parts = [f"{k.split(' (')[0]} {best['tok_s'] / r['tok_s']:.2f}x" for k, r in ref.items() if r]
        print(f"  ({B}, {T}): best '{best['name']}' {best['tok_s'] / 1e3:.1f}k tok/s, "
              f"{best.get('peak_gb', 0):.1f} GB; " + ", ".join(parts))
    print(f"total bench time {time.perf_counter() - START:.0f} s")


if __name__ == "__main__":
    main()
