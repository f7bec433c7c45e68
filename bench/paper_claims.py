"""
MiniMax-01's design claim at small scale: hybrid vs softmax vs lightning attention, on one GPU.

The claim (MiniMax-01, arXiv 2501.08313, section 2.2 and Tables 2-3): a stack of only lightning (linear) attention
layers is as good as softmax attention at language modelling but weaker at retrieval; putting one softmax layer
after every 7 lightning layers (the "hybrid", the released layout) recovers the retrieval while most layers keep
the linear cost. This script trains three variants that differ ONLY in MiniMaxConfig.layer_pattern:

    hybrid     softmax attention at layers l with (l + 1) % softmax_every == 0, lightning elsewhere
    softmax    softmax attention in every layer
    lightning  lightning attention in every layer

with the same width, depth, heads, experts, seed, initialisation RNG, data order, steps and LR schedule, and
measures three things (--parts, default all three):

    lm       language modelling on the default dataset (data/stdlib, Python stdlib source, byte tokenizer):
             validation-loss curves, final validation loss, training tokens/s
    mqar     multi-query associative recall (Zoology, arXiv 2312.04927): key-value pairs, then the keys asked
             again later in the sequence; each variant trained on the task with the same budget; accuracy per
             sequence length and per number of pairs
    passkey  the LM-trained models read real stdlib code with a line `pass_key = 58213` hidden at some depth,
             and the prompt ends with `pass_key = `: found iff greedy decoding continues with the 5 digits

Parameter counts. The two attention kinds do not have the same weights: a softmax layer has q, k, v, o
projections (4 D x inner with num_key_value_heads = num_attention_heads), a lightning layer has qkv, the output
gate, o (5 D x inner) and its output RMSNorm (inner). One field cannot remove that difference without changing
the architecture, so we make it as small as we can and report it: full multi-head K/V in the softmax layers
(GQA would halve their K/V weights and widen the gap), and enough experts that the MoE holds most of the
weights. The script prints total and active counts per variant at the start (results.json: "params");
at the 'gpu' size softmax has 1.9 % fewer total and 5.9 % fewer active parameters than lightning (27.45M vs
27.97M total, 8.41M vs 8.94M active; hybrid 27.91M / 8.87M).

Budgets (--budget; every number is in BUDGETS below, and printed at the start):
    ci     seconds on a CPU: a 2-layer toy, a handful of steps; proves the plumbing (tests/test_paper_claims.py)
    gpu    one H100, ~5 minutes for all three parts (measured: LM + passkey 157 s, MQAR 141 s). Per variant: LM
           800 steps x 16 x 1024 tokens (13.1M tokens, ~1.1 epochs of the dataset), MQAR 2500 steps x 16k tokens
           on a 2-layer cut of the model (lengths 64-2048, 128 keys/values, only <= 128 in the first 40 %; ~45 s a
           variant), passkey 5 lengths x 5 depths x 4 trials.
           Too slow on your card? --steps-scale=0.5, or run the parts as separate commands.
    full   one H100, under an hour (~25-35 min estimated): a wider model, LM on 2048-token windows, MQAR
           8000 steps x 32k tokens to 8192 tokens and 128 pairs, passkey to 16384 tokens
bf16 autocast on CUDA, fp32 on CPU. No torch.compile (its compile time would eat a 10-minute budget).

Outputs in --out (default out-claims/<budget>/, ignored by git): results.json (everything measured, plus the
budget, card, versions and command), lm_loss.svg, mqar_acc.svg, passkey.svg (drawn by bench/plot_claims.py),
lm_<variant>.pt (the LM weights, so `--parts=passkey` alone can reuse them); a summary table on stdout.

Run from the repo root:
    python bench/paper_claims.py --budget=gpu                  # all three parts (~5 min on one H100)
    python bench/paper_claims.py --budget=gpu --parts=mqar     # one part
    python bench/paper_claims.py --budget=ci --device=cpu      # the CI smoke setting, seconds
    python bench/plot_claims.py out-claims/gpu/results.json    # redraw the figures from the JSON
Test: python -m pytest -q tests/test_paper_claims.py
"""
import argparse
import json
import math
import os
import platform
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # model.py, data/ live at the repo root (no package)
sys.path.insert(0, os.path.join(ROOT, "bench"))

VARIANTS = ("hybrid", "softmax", "lightning")

# -----------------------------------------------------------------------------
# budgets: the model shared by all variants (MiniMaxConfig fields) and the size of each part
#   lm:      steps of batch_size x seq_len tokens, eval every eval_every steps on eval_batches fixed val batches
#   mqar:    its own depth (model: MiniMaxConfig fields over the shared model, the same for every variant);
#            steps of ~tokens_per_step tokens; each step one (length, pairs) drawn from lengths x pairs
#            (pairs <= length / 4), only lengths <= short_len during the first short_frac of the steps (a
#            curriculum: short rows hold more answers per token, so the recall circuit forms sooner);
#            evaluated on eval_seqs sequences per (length, pairs)
#   passkey: context lengths x needle depths, trials random passkeys/fillers per cell
BUDGETS = {
    "ci": dict(
        model=dict(hidden_size=32, num_hidden_layers=2, softmax_every=2, num_attention_heads=2,
                   num_key_value_heads=2, head_dim=16, rotary_dim=8, intermediate_size=32, num_local_experts=4,
                   num_experts_per_tok=2, block_size=16),
        lm=dict(steps=6, batch_size=2, seq_len=64, lr=3e-3, eval_every=3, eval_batches=2),
        mqar=dict(model=dict(num_hidden_layers=2, softmax_every=2), steps=6, tokens_per_step=512, lengths=[32, 64],
                  pairs=[2, 4], short_len=32, short_frac=0.5, lr=3e-3, eval_seqs=4),
        passkey=dict(lengths=[48, 96], depths=[0.1, 0.9], trials=2),
    ),
    "gpu": dict(  # ~5 min on one H100 (measured; README)
        model=dict(hidden_size=256, num_hidden_layers=8, softmax_every=8, num_attention_heads=4,
                   num_key_value_heads=4, head_dim=64, rotary_dim=32, intermediate_size=512, num_local_experts=8,
                   num_experts_per_tok=2, block_size=64),
        lm=dict(steps=800, batch_size=16, seq_len=1024, lr=2e-3, eval_every=100, eval_batches=8),
        # MQAR on 2 layers (hybrid = lightning then softmax), as in Zoology. The 8-layer model above, after
        # 800 steps of 64-token rows on an H100: hybrid and lightning stuck at ~52 % (4 pairs) / ~22 % (16 pairs),
        # softmax at ~2 %, lr 3e-4..3e-3, DeepNorm alpha or plain post-norm alike; 2 layers: 97 % / 89 %
        # (bench/results/claims/mqar_probe_h100.txt). Earlier runs without the curriculum, 512 keys or long rows
        # from the start, stayed on the guessing plateau for every variant.
        mqar=dict(model=dict(num_hidden_layers=2, softmax_every=2), steps=2500, tokens_per_step=16384,
                  lengths=[64, 128, 256, 512, 1024, 2048], pairs=[4, 16, 64], short_len=128, short_frac=0.4,
                  lr=1e-3, eval_seqs=64),
        passkey=dict(lengths=[256, 512, 1024, 2048, 4096], depths=[0.1, 0.3, 0.5, 0.7, 0.9], trials=4),
    ),
    "full": dict(  # ~20-30 min on one H100; the LM stays at ~2 epochs of the 12M-token dataset
        model=dict(hidden_size=384, num_hidden_layers=8, softmax_every=8, num_attention_heads=6,
                   num_key_value_heads=6, head_dim=64, rotary_dim=32, intermediate_size=768, num_local_experts=8,
                   num_experts_per_tok=2, block_size=64),
        lm=dict(steps=1500, batch_size=8, seq_len=2048, lr=1.5e-3, eval_every=100, eval_batches=16),
        mqar=dict(model=dict(num_hidden_layers=2, softmax_every=2), steps=8000, tokens_per_step=32768,
                  lengths=[64, 128, 256, 512, 1024, 2048, 4096, 8192], pairs=[4, 16, 64, 128], short_len=128,
                  short_frac=0.3, lr=1e-3, eval_seqs=128),
        passkey=dict(lengths=[512, 1024, 2048, 4096, 8192, 16384], depths=[0.1, 0.3, 0.5, 0.7, 0.9], trials=4),
    ),
}

# MQAR vocabulary: three disjoint id ranges, so an answer can only come from the context
# (128 each, not Zoology's thousands: with 512 the short budgets never left the ln(512) guessing plateau;
# a budget's pairs must stay <= MQAR_KEYS, the keys of a row being distinct)
MQAR_KEYS = 128      # key ids [0, 128)
MQAR_VALUES = 128    # value ids [128, 256)
MQAR_FILLER = 64     # filler ids [256, 320) between the queries
MQAR_VOCAB = MQAR_KEYS + MQAR_VALUES + MQAR_FILLER

# -----------------------------------------------------------------------------
# task generators (numpy, seeded by the caller's np.random.Generator; nothing is downloaded)


def make_mqar(rng, batch_size, seq_len, num_pairs, num_keys=MQAR_KEYS, num_values=MQAR_VALUES,
              num_filler=MQAR_FILLER):
    """A batch of multi-query associative recall: idx, targets (B, T) int64 numpy arrays.

    Layout of one row (P = num_pairs):
        k1 v1 k2 v2 ... kP vP | filler ... kq vq filler ... kq' vq' filler ...
        '---- 2P tokens -----' '---------- T - 2P tokens: every key asked once ----------'
    Keys are distinct within a row, values are drawn independently (may repeat). Each key is asked exactly once,
    in random order, at a random even offset of the second part, followed by its value (teacher forcing, as in
    Zoology). targets[t] = the value at query positions t (the model must predict the token after the key) and
    -1 elsewhere (no loss), so the loss is on the P answers only. Ranges: keys [0, K), values [K, K + V),
    filler [K + V, K + V + F). Raises ValueError when the row cannot hold the pairs and the queries.
    """
    B, T, P = batch_size, seq_len, num_pairs
    if P < 1 or P > num_keys:
        raise ValueError(f"make_mqar: num_pairs={P} must be in [1, num_keys={num_keys}] (keys are distinct)")
    if T < 4 * P:
        raise ValueError(f"make_mqar: seq_len={T} < 4 * num_pairs={4 * P}: the pairs (2P tokens) and their "
                         f"queries (2P tokens) do not fit; use fewer pairs or longer sequences")
    rows = np.arange(B)[:, None]
    keys = np.argsort(rng.random((B, num_keys)), axis=1)[:, :P]  # (B, P) distinct keys per row
    values = num_keys + rng.integers(0, num_values, size=(B, P))  # (B, P)
    idx = num_keys + num_values + rng.integers(0, num_filler, size=(B, T))  # (B, T) filler everywhere first
    idx[:, 0:2 * P:2], idx[:, 1:2 * P:2] = keys, values  # the context: k1 v1 k2 v2 ...
    n_slots = (T - 2 * P) // 2  # two-token slots after the context; P of them become queries
    slot = np.argsort(rng.random((B, n_slots)), axis=1)[:, :P]  # (B, P) distinct slots
    pos = 2 * P + 2 * slot  # (B, P) position of each query key; its value follows at pos + 1
    ask = np.argsort(rng.random((B, P)), axis=1)  # (B, P) which pair each query asks (a permutation)
    q_keys, q_values = np.take_along_axis(keys, ask, 1), np.take_along_axis(values, ask, 1)
    idx[rows, pos], idx[rows, pos + 1] = q_keys, q_values
    targets = np.full((B, T), -1, dtype=np.int64)
    targets[rows, pos] = q_values  # next-token target at the query key = its value
    return idx.astype(np.int64), targets


PASSKEY_PREFIX = "\npass_key = "  # the needle reads like a line of Python, the language the LM was trained on


def make_passkey(rng, filler, context_len, depth, encode):
    """One passkey probe: (idx (T,) int64, answer_pos (n,), answer (n,)) with T = context_len.

        filler[:a] | "\\npass_key = 58213\\n" | filler[a:] | "\\npass_key = " 5 8 2 1 3
    filler: a 1-D token array (the val split); a random window of it is used, cut at a = depth * its length.
    The answer tokens are appended (teacher forcing): the model found the passkey iff the argmax of its logits at
    answer_pos is `answer`, i.e. exactly what greedy decoding of len(answer) tokens would produce, in one forward.
    encode: str -> list of token ids. The question's tokens are the needle's prefix tokens (encoded separately),
    so the two occurrences of `pass_key = ` are the same token ids with any tokenizer.
    """
    digits = str(rng.integers(10000, 100000))
    question, answer = encode(PASSKEY_PREFIX), encode(digits)
    needle = question + answer + encode("\n")
    n_fill = context_len - len(needle) - len(question) - len(answer)
    if n_fill < 1 or n_fill >= len(filler):
        raise ValueError(f"make_passkey: context_len={context_len} leaves {n_fill} filler tokens (needle and "
                         f"question take {context_len - n_fill}; the filler source has {len(filler)})")
    start = int(rng.integers(0, len(filler) - n_fill))
    window = np.asarray(filler[start:start + n_fill], dtype=np.int64)
    a = int(round(depth * n_fill))
    idx = np.concatenate([window[:a], needle, window[a:], question, answer]).astype(np.int64)  # (T,)
    answer_pos = np.arange(context_len - len(answer) - 1, context_len - 1)  # logits at t predict token t + 1
    return idx, answer_pos, np.asarray(answer, dtype=np.int64)


# -----------------------------------------------------------------------------
# shared by the parts: device, models, one small training loop


def setup(device_arg):
    """-> (device, autocast context factory, card description). bf16 autocast on CUDA, fp32 elsewhere."""
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device_arg == "auto" else device_arg
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        card = torch.cuda.get_device_name(device)
        autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
    else:
        card = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
        autocast = nullcontext
    return device, autocast, card


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()  # host sync: timings must cover the queued GPU work


def build_model(variant, vocab_size, max_len, spec, seed, device, overrides=None):
    """The one model of every variant: the budget's MiniMaxConfig (plus a part's `overrides`, the same for every
    variant) with only layer_pattern changed.
    The init RNG is seeded the same way for each variant (the weights coincide up to the first layer whose
    attention kind differs; from there the RNG stream follows different shapes)."""
    from model import MiniMax, MiniMaxConfig
    config = MiniMaxConfig(vocab_size=vocab_size, max_position_embeddings=max_len, layer_pattern=variant,
                           **{**spec["model"], **(overrides or {})})
    torch.manual_seed(seed)
    with torch.device(device):
        model = MiniMax(config)
    return model


def param_report(model):
    """Parameter counts by kind: total, active per token (no embeddings, K of E experts), attention, MoE."""
    count = lambda key: sum(p.numel() for n, p in model.named_parameters() if key in n)  # noqa: E731
    return {"total": model.num_params(), "active": model.num_active_params(), "attention": count(".self_attn."),
            "moe": count(".block_sparse_moe."), "embeddings": count("embed_tokens.") + count("lm_head."),
            "layer_types": model.config.layer_types}


def get_lr(step, steps, lr):
    """Linear warmup over the first 5 % of the steps, then cosine to 10 % of lr at the last step."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return lr * (step + 1) / warmup
    ratio = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.45 * (1.0 + math.cos(math.pi * ratio)))


def train(model, get_batch, steps, lr, device, autocast, evaluate=None, eval_every=0, tag=""):
    """AdamW (betas 0.9/0.95, weight decay 0.1 on matrices, grad clip 1.0) with get_lr, for `steps` steps.

    get_batch(step) -> x, y (B, T) on the device; y == -1 is ignored by the model's loss. evaluate(step) runs
    every eval_every steps and after the last one (not timed). Throughput counts the optimizer steps only,
    from the 3rd step on (the first ones compile the Triton kernels and warm the allocator), data excluded.
    Returns {'train_time_s', 'tokens_per_s', 'train_loss': [(step, loss), ...]}.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.1},
                                   {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                                  lr=lr, betas=(0.9, 0.95), fused=device.startswith("cuda"))
    timed_s, timed_tokens, train_loss, t_start = 0.0, 0, [], time.time()
    log_every = max(1, steps // 20)  # ~20 log lines per run
    model.train()
    step = 0
    while True:
        last_step = step == steps
        if evaluate is not None and (step % eval_every == 0 or last_step):
            evaluate(step)
            model.train()
        if last_step:
            break
        x, y = get_batch(step)
        for group in optimizer.param_groups:
            group["lr"] = get_lr(step, steps, lr)
        # ---------------- one training step ----------------
        sync(device)
        t0 = time.time()
        with autocast():
            _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        dt = time.time() - t0
        # ---------------------------------------------------
        if step >= min(2, steps - 1):  # (tiny runs: at least the last step)
            timed_s, timed_tokens = timed_s + dt, timed_tokens + x.numel()
        if step % log_every == 0 or step == steps - 1:
            lossf = loss.item()  # host sync (the step is already synced)
            train_loss.append((step, lossf))
            print(f"  {tag} step {step:5d}/{steps} loss {lossf:.4f} lr {get_lr(step, steps, lr):.2e} "
                  f"dt {dt * 1000:6.1f} ms  tok/s {x.numel() / dt:9.0f}  elapsed {time.time() - t_start:5.0f} s",
                  flush=True)
        step += 1
    return {"train_time_s": time.time() - t_start, "tokens_per_s": timed_tokens / max(timed_s, 1e-9),
            "train_loss": train_loss}


# -----------------------------------------------------------------------------
# part 1: language modelling on the default dataset


def load_dataset(data_dir):
    """meta.json of data/stdlib/byte, preparing it on the spot (offline, a few seconds) when missing."""
    from data.tokenizers import dataset_path, load_meta
    if not os.path.exists(os.path.join(dataset_path(data_dir, "stdlib", "byte"), "meta.json")):
        print("dataset stdlib/byte not prepared yet: preparing it now (python data/stdlib/prepare.py)")
        from data.stdlib.prepare import prepare
        prepare(data_dir, "byte")
    meta = load_meta(data_dir, "stdlib", "byte")
    meta["folder"] = dataset_path(data_dir, "stdlib", "byte")
    return meta


def tokens(meta, split):
    # a fresh read-only memmap per use (nanoGPT's fix for memory growth with one long-lived memmap)
    return np.memmap(os.path.join(meta["folder"], f"{split}.bin"), dtype=np.dtype(meta["dtype"]), mode="r")


def lm_batch(meta, split, key, batch_size, seq_len, seed, device):
    """Batch `key` of a split: B random windows of T + 1 tokens -> x, y (B, T). The offsets depend only on
    (seed, split, key), so every variant sees the same tokens in the same order."""
    data = tokens(meta, split)
    rng = np.random.default_rng([seed, 1 if split == "train" else 2, key])
    ix = rng.integers(0, len(data) - seq_len - 1, size=batch_size)
    xy = torch.from_numpy(np.stack([data[i:i + seq_len + 1] for i in ix]).astype(np.int64))  # (B, T + 1)
    return xy[:, :-1].to(device), xy[:, 1:].to(device)


@torch.no_grad()
def lm_val_loss(model, batches, autocast):
    """Mean cross-entropy (nats/token, without the MoE aux loss) over fixed validation batches."""
    model.eval()
    total = 0.0
    for x, y in batches:
        with autocast():
            logits, _ = model(x)
        total += F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1)).item()  # host sync
    return total / len(batches)


def part_lm(ctx):
    spec, seed, device, autocast = ctx["spec"], ctx["seed"], ctx["device"], ctx["autocast"]
    c = spec["lm"]
    meta = load_dataset(ctx["data_dir"])
    vocab = (meta["vocab_size"] + 63) // 64 * 64  # padded as train.py does; padded ids never occur in the data
    steps, B, T = ctx["lm_steps"], c["batch_size"], c["seq_len"]
    val = [lm_batch(meta, "val", k, B, T, seed, device) for k in range(c["eval_batches"])]  # fixed for all
    out = {"dataset": "stdlib/byte", "vocab_size": vocab, "steps": steps, "batch_size": B, "seq_len": T,
           "lr": c["lr"], "tokens_per_variant": steps * B * T, "val_tokens": c["eval_batches"] * B * T,
           "variants": {}}
    print(f"\n== part lm: {steps} steps x {B} x {T} = {steps * B * T:,} tokens per variant, val on "
          f"{c['eval_batches'] * B * T:,} fixed tokens ==")
    for v in ctx["variants"]:
        model = build_model(v, vocab, ctx["max_len"], spec, seed, device)
        curve = []

        def evaluate(step):
            loss = lm_val_loss(model, val, autocast)
            curve.append({"step": step, "tokens": step * B * T, "val_loss": loss})
            print(f"  {v} step {step:5d} val loss {loss:.4f}", flush=True)

        stats = train(model, lambda s: lm_batch(meta, "train", s, B, T, seed, device), steps, c["lr"], device,
                      autocast, evaluate, c["eval_every"], tag=v)
        out["variants"][v] = {"curve": curve, "final_val_loss": curve[-1]["val_loss"], **stats,
                              "params": param_report(model)}
        path = os.path.join(ctx["out"], f"lm_{v}.pt")
        torch.save({"model": model.state_dict(), "model_config": asdict(model.config)}, path)
        ctx["lm_models"][v] = model
        print(f"  {v}: final val loss {curve[-1]['val_loss']:.4f}, {stats['tokens_per_s']:,.0f} tok/s, "
              f"{stats['train_time_s']:.0f} s; saved {path}", flush=True)
    return out


# -----------------------------------------------------------------------------
# part 2: multi-query associative recall


def mqar_combos(c):
    """(length, pairs) combinations of a budget: every pair count that fits the length (pairs <= length / 4)."""
    return [(T, P) for T in c["lengths"] for P in c["pairs"] if 4 * P <= T]


def mqar_batch(c, step, steps, seed, device):
    """Training batch `step` of `steps`: a (length, pairs) drawn uniformly from mqar_combos, B = tokens_per_step // T;
    during the first short_frac of the steps only from the lengths <= short_len (the curriculum).
    Seeded by (seed, step): the same batches for every variant."""
    rng = np.random.default_rng([seed, 3, step])
    combos = mqar_combos(c)
    if step < c["short_frac"] * steps:
        combos = [(T, P) for T, P in combos if T <= c["short_len"]]
    T, P = combos[int(rng.integers(len(combos)))]
    x, y = make_mqar(rng, max(1, c["tokens_per_step"] // T), T, P)
    return torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)


@torch.no_grad()
def mqar_eval(model, c, seed, device, autocast):
    """Accuracy (argmax at the answer positions == value) per (length, pairs) on eval_seqs fresh sequences,
    the same sequences for every variant."""
    model.eval()
    rows = []
    for T, P in mqar_combos(c):
        rng = np.random.default_rng([seed, 4, T, P])
        x, y = make_mqar(rng, c["eval_seqs"], T, P)
        correct = 0
        per_chunk = max(1, 2 * c["tokens_per_step"] // T)  # sequences per forward: bounded memory
        for i in range(0, len(x), per_chunk):
            xb, yb = torch.from_numpy(x[i:i + per_chunk]).to(device), torch.from_numpy(y[i:i + per_chunk]).to(device)
            with autocast():
                logits, _ = model(xb)
            mask = yb >= 0
            correct += (logits.argmax(-1)[mask] == yb[mask]).sum().item()  # host sync
        rows.append({"seq_len": T, "num_pairs": P, "acc": correct / (c["eval_seqs"] * P),
                     "answers": c["eval_seqs"] * P})
    return rows


def part_mqar(ctx):
    spec, seed, device, autocast = ctx["spec"], ctx["seed"], ctx["device"], ctx["autocast"]
    c, steps = spec["mqar"], ctx["mqar_steps"]
    out = {"steps": steps, "tokens_per_step": c["tokens_per_step"], "lengths": c["lengths"], "pairs": c["pairs"],
           "model": c["model"], "short_len": c["short_len"], "short_frac": c["short_frac"], "lr": c["lr"],
           "eval_seqs": c["eval_seqs"], "vocab": {"keys": MQAR_KEYS, "values": MQAR_VALUES, "filler": MQAR_FILLER},
           "variants": {}}
    print(f"\n== part mqar: {steps} steps x ~{c['tokens_per_step']:,} tokens, lengths {c['lengths']}, "
          f"pairs {c['pairs']} (mixed per step; lengths <= {c['short_len']} only for the first "
          f"{c['short_frac']:.0%}); model {spec['model']} with {c['model']} ==")
    for v in ctx["variants"]:
        model = build_model(v, MQAR_VOCAB, max(c["lengths"]), spec, seed, device, overrides=c["model"])
        stats = train(model, lambda s: mqar_batch(c, s, steps, seed, device), steps, c["lr"], device, autocast,
                      tag=v)
        rows = mqar_eval(model, c, seed, device, autocast)
        out["variants"][v] = {"eval": rows, **stats, "params": param_report(model)}
        print(f"  {v}: " + "  ".join(f"T={r['seq_len']} P={r['num_pairs']}: {r['acc']:.3f}" for r in rows),
              flush=True)
        del model
    return out


# -----------------------------------------------------------------------------
# part 3: passkey retrieval by the LM-trained models


def load_lm_model(ctx, v, meta):
    if v in ctx["lm_models"]:
        return ctx["lm_models"][v]
    path = os.path.join(ctx["out"], f"lm_{v}.pt")
    if not os.path.exists(path):
        raise ValueError(f"passkey: no LM model for '{v}' at {path}; run the lm part first "
                         f"(--parts=lm,passkey, same --budget and --out)")
    from model import MiniMax, MiniMaxConfig
    ckpt = torch.load(path, map_location=ctx["device"], weights_only=True)
    config = MiniMaxConfig(**ckpt["model_config"])
    with torch.device(ctx["device"]):
        model = MiniMax(config)
    model.load_state_dict(ckpt["model"])
    return model


@torch.no_grad()
def part_passkey(ctx):
    from data.tokenizers import get_tokenizer
    spec, seed, device, autocast = ctx["spec"], ctx["seed"], ctx["device"], ctx["autocast"]
    c = spec["passkey"]
    meta = load_dataset(ctx["data_dir"])
    enc = get_tokenizer(meta["tokenizer"])
    filler = tokens(meta, "val")
    out = {"lengths": c["lengths"], "depths": c["depths"], "trials": c["trials"],
           "lm_seq_len": spec["lm"]["seq_len"], "variants": {}}
    print(f"\n== part passkey: lengths {c['lengths']} x depths {c['depths']} x {c['trials']} trials "
          f"(LM trained at {spec['lm']['seq_len']} tokens) ==")
    for v in ctx["variants"]:
        model = load_lm_model(ctx, v, meta)
        model.eval()
        found = []  # found[j][k] = fraction of trials found at length j, depth k
        for T in c["lengths"]:
            probes = [make_passkey(np.random.default_rng([seed, 5, T, k, t]), filler, T, d, enc.encode_ordinary)
                      for k, d in enumerate(c["depths"]) for t in range(c["trials"])]
            hits = []
            per_chunk = max(1, 65536 // T)
            for i in range(0, len(probes), per_chunk):
                chunk = probes[i:i + per_chunk]
                x = torch.from_numpy(np.stack([p[0] for p in chunk])).to(device)  # (b, T)
                with autocast():
                    logits, _ = model(x)
                pos = torch.from_numpy(np.stack([p[1] for p in chunk])).to(device)  # (b, n)
                ans = torch.from_numpy(np.stack([p[2] for p in chunk])).to(device)  # (b, n)
                pred = logits.argmax(-1).gather(1, pos)  # (b, n): greedy prediction of each answer token
                hits += (pred == ans).all(dim=1).tolist()  # host sync
            hits = np.array(hits).reshape(len(c["depths"]), c["trials"])
            found.append(hits.mean(axis=1).tolist())
        out["variants"][v] = {"found": found, "frac_per_length": [float(np.mean(f)) for f in found]}
        print(f"  {v}: " + "  ".join(f"T={T}: {np.mean(f):.0%}" for T, f in zip(c["lengths"], found)), flush=True)
    return out


# -----------------------------------------------------------------------------
# summary: markdown tables (paste-able into the README) and the claim checks


def summary(res):
    lines = [f"budget '{res['budget']}' on {res['card']} (torch {res['versions']['torch']}), wall time "
             f"{res['wall_time_s']['total']:.0f} s: " + ", ".join(f"{k} {v:.0f} s" for k, v in
                                                                   res["wall_time_s"].items() if k != "total")]
    params = {v: p for part in ("lm", "mqar") if res.get(part) for v, p in
              ((v, r["params"]) for v, r in res[part]["variants"].items())}
    if res.get("lm"):
        lm = res["lm"]
        soft = lm["variants"].get("softmax", {}).get("final_val_loss")
        lines += ["", f"Language modelling (stdlib source, bytes; {lm['steps']} steps x {lm['batch_size']} x "
                  f"{lm['seq_len']} = {lm['tokens_per_variant']:,} tokens per variant)", "",
                  "| variant | softmax layers | params total / active | final val loss | vs softmax | tokens/s |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for v, r in lm["variants"].items():
            p = r["params"]
            rel = f"{(r['final_val_loss'] / soft - 1) * 100:+.2f} %" if soft else "-"
            lines.append(f"| {v} | {p['layer_types'].count('full_attention')}/{len(p['layer_types'])} | "
                         f"{p['total'] / 1e6:.2f} M / {p['active'] / 1e6:.2f} M | {r['final_val_loss']:.4f} | "
                         f"{rel} | {r['tokens_per_s']:,.0f} |")
    elif params:
        lines += ["", "| variant | params total / active |", "| --- | --- |"]
        lines += [f"| {v} | {p['total'] / 1e6:.2f} M / {p['active'] / 1e6:.2f} M |" for v, p in params.items()]
    if res.get("mqar"):
        mq = res["mqar"]
        lengths = mq["lengths"]
        depth = mq.get("model", {}).get("num_hidden_layers")
        lines += ["", f"MQAR accuracy ({depth or res['budget_spec']['model']['num_hidden_layers']} layers; "
                  f"{mq['steps']} steps x ~{mq['tokens_per_step']:,} tokens, lengths and pair counts mixed"
                  + (f", lengths <= {mq['short_len']} only for the first {mq['short_frac']:.0%}" if "short_len" in mq
                     else "") + f"; {mq['eval_seqs']} sequences per cell; '-': pairs > length / 4)", "",
                  "| variant | pairs | " + " | ".join(f"T={T}" for T in lengths) + " | mean |",
                  "| --- | --- | " + " | ".join("---" for _ in lengths) + " | --- |"]
        for v, r in mq["variants"].items():
            for P in mq["pairs"]:
                acc = {e["seq_len"]: e["acc"] for e in r["eval"] if e["num_pairs"] == P}
                cells = [f"{acc[T]:.3f}" if T in acc else "-" for T in lengths]
                lines.append(f"| {v} | {P} | " + " | ".join(cells) + f" | {np.mean(list(acc.values())):.3f} |")
    if res.get("passkey"):
        pk = res["passkey"]
        lines += ["", f"Passkey found (fraction of {len(pk['depths'])} depths x {pk['trials']} trials; LM trained "
                  f"at {pk['lm_seq_len']} tokens)", "",
                  "| variant | " + " | ".join(f"T={T}" for T in pk["lengths"]) + " |",
                  "| --- | " + " | ".join("---" for _ in pk["lengths"]) + " |"]
        for v, r in pk["variants"].items():
            lines.append(f"| {v} | " + " | ".join(f"{f:.0%}" for f in r["frac_per_length"]) + " |")
    # the claim, in numbers (the reader judges; thresholds are the issue's: loss within ~2 %, recall clearly worse)
    checks = []
    if res.get("lm") and {"hybrid", "softmax"} <= set(res["lm"]["variants"]):
        lv = res["lm"]["variants"]
        checks.append(f"LM: hybrid/softmax final val loss = {lv['hybrid']['final_val_loss'] / lv['softmax']['final_val_loss']:.4f}"
                      + (f", lightning/softmax = {lv['lightning']['final_val_loss'] / lv['softmax']['final_val_loss']:.4f}"
                         if "lightning" in lv else "") + " (paper: hybrid within ~2 % of softmax)")
    if res.get("mqar"):
        means = {v: np.mean([e["acc"] for e in r["eval"]]) for v, r in res["mqar"]["variants"].items()}
        checks.append("MQAR mean accuracy: " + ", ".join(f"{v} {m:.3f}" for v, m in means.items())
                      + " (paper: lightning clearly below hybrid and softmax)")
        # a loss still near ln(MQAR_VALUES) = guessing among the values: that variant never found the recall circuit
        # within the budget (on CPU probes the all-softmax model sat on this plateau longest: its lightning-free
        # stack has no built-in local mixing to bootstrap the previous-token feature). Low accuracy is then
        # about optimisation speed, not about what the architecture can represent.
        stuck = [v for v, r in res["mqar"]["variants"].items()
                 if r["train_loss"][-1][1] > 0.9 * math.log(MQAR_VALUES)]
        if stuck:
            checks.append(f"  NOTE: {', '.join(stuck)} never left the guessing plateau (final train loss near "
                          f"ln {MQAR_VALUES} = {math.log(MQAR_VALUES):.2f}); read their accuracy as 'not learned "
                          "in this budget', and re-run with a larger --steps-scale before concluding")
        if max(means.values()) < 0.5:  # chance is 1/MQAR_VALUES: nobody learned the task, so nothing is compared
            checks.append("  INCONCLUSIVE: no variant learned MQAR within this budget (best mean accuracy "
                          f"{max(means.values()):.3f}); train longer (--steps-scale) before reading the comparison")
    if res.get("passkey"):
        pk = res["passkey"]
        fr = {v: np.mean(r["frac_per_length"]) for v, r in pk["variants"].items()}
        checks.append("passkey found overall: " + ", ".join(f"{v} {f:.0%}" for v, f in fr.items()))
        inside = [j for j, T in enumerate(pk["lengths"]) if T <= pk["lm_seq_len"]]
        if all(r["frac_per_length"][j] == 0 for r in pk["variants"].values() for j in inside):
            checks.append("  INCONCLUSIVE: no variant finds the passkey even within its training length; the LMs "
                          "have not learned to copy at this budget")
    if checks:
        lines += ["", "Claim check:"] + [f"  {c}" for c in checks]
    return "\n".join(lines)


# -----------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", choices=sorted(BUDGETS), default="gpu", help="size of everything (see BUDGETS)")
    ap.add_argument("--parts", default="lm,mqar,passkey", help="comma-separated subset of lm,mqar,passkey")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    ap.add_argument("--out", default=None, help="output folder (default out-claims/<budget>)")
    ap.add_argument("--data-dir", default=os.path.join(ROOT, "data"), help="root of the prepared datasets")
    ap.add_argument("--device", default="auto", help="auto | cuda | cpu")
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--steps-scale", type=float, default=1.0,
                    help="multiply the lm and mqar step counts (e.g. 0.5 on a slower card, 2 for a longer run)")
    args = ap.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    variants = [v for v in args.variants.split(",") if v]
    if not parts or set(parts) - {"lm", "mqar", "passkey"}:
        ap.error(f"--parts={args.parts}: choose from lm, mqar, passkey")
    if not variants or set(variants) - set(VARIANTS):
        ap.error(f"--variants={args.variants}: choose from {', '.join(VARIANTS)}")
    if args.steps_scale <= 0:
        ap.error("--steps-scale must be > 0")

    spec = BUDGETS[args.budget]
    device, autocast, card = setup(args.device)
    out_dir = args.out or os.path.join(ROOT, "out-claims", args.budget)
    os.makedirs(out_dir, exist_ok=True)
    ctx = {"spec": spec, "seed": args.seed, "device": device, "autocast": autocast, "data_dir": args.data_dir,
           "out": out_dir, "variants": variants, "lm_models": {},
           "lm_steps": max(1, round(spec["lm"]["steps"] * args.steps_scale)),
           "mqar_steps": max(1, round(spec["mqar"]["steps"] * args.steps_scale)),
           # the LM models must accept the passkey probes, which are longer than their training sequences
           "max_len": max([spec["lm"]["seq_len"]] + spec["passkey"]["lengths"])}
    import triton
    res = {"budget": args.budget, "budget_spec": spec, "steps_scale": args.steps_scale, "card": card,
           "device": device, "dtype": "bfloat16 autocast" if device.startswith("cuda") else "float32",
           "versions": {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
                        "python": platform.python_version(), "numpy": np.__version__},
           "command": "python bench/paper_claims.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "seed": args.seed, "variants": variants, "parts": parts, "wall_time_s": {}}
    print(f"paper_claims: budget '{args.budget}' on {card}, {res['dtype']}; variants {variants}; parts {parts}")
    print(f"  model (shared; only layer_pattern differs): {spec['model']}")
    res["params"] = {}
    for v in variants:  # counted on the 'meta' device: no memory, no init work (LM vocabulary: 257 bytes -> 320)
        p = res["params"][v] = param_report(build_model(v, 320, ctx["max_len"], spec, args.seed, "meta"))
        print(f"  {v:9s} {p['layer_types'].count('full_attention')}/{len(p['layer_types'])} softmax layers, "
              f"params total {p['total'] / 1e6:.2f} M, active {p['active'] / 1e6:.2f} M "
              f"(attention {p['attention'] / 1e6:.2f} M, experts+router {p['moe'] / 1e6:.2f} M)")
    # parts run separately (e.g. one per 10-minute job) add up in one results.json: keep the parts of an earlier
    # run of the same budget and scale that this run does not redo
    path = os.path.join(out_dir, "results.json")
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        if old.get("budget") == args.budget and old.get("steps_scale") == args.steps_scale:
            kept = [p for p in ("lm", "mqar", "passkey") if p not in parts and old.get(p)]
            for p in kept:
                res[p], res["wall_time_s"][p] = old[p], old["wall_time_s"][p]
            if kept:
                print(f"  keeping parts {kept} of the earlier run in {path}")
    t_all = time.time()
    for part, fn in (("lm", part_lm), ("mqar", part_mqar), ("passkey", part_passkey)):
        if part in parts:
            t0 = time.time()
            res[part] = fn(ctx)
            res[part]["card"], res[part]["command"] = card, res["command"]
            res["wall_time_s"][part] = time.time() - t0
            print(f"  part {part} done in {res['wall_time_s'][part]:.0f} s (total so far {time.time() - t_all:.0f} s)")
    res["wall_time_s"]["total"] = sum(res["wall_time_s"].values())  # of all the parts in the file
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    from plot_claims import plot_all
    figures = plot_all(res, out_dir)
    print("\n" + summary(res))
    print(f"\nwrote {path}" + "".join(f", {os.path.basename(p)}" for p in figures))
    return res


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:
        sys.exit(f"error: {e}")
