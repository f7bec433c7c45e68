"""
Train a MiniMax model (hybrid lightning/softmax attention + MoE, model.py) on a prepared token dataset.

    python train.py                                   # tiny model on the stdlib source, a few minutes on 2 CPU cores
    python train.py config/train_small.py             # 'small' preset, ~10 min on one H100
    python train.py --max_iters=2000 --batch_size=8   # any knob below, as --key=value
    python train.py --resume                          # continue out_dir/ckpt.pt exactly where it stopped
    torchrun --standalone --nproc_per_node=8 train.py config/train_small.py     # DDP, NCCL on GPUs
    torchrun --standalone --nproc_per_node=2 train.py                           # DDP, gloo on CPU
    torchrun --standalone --nproc_per_node=2 train.py --ep=2    # expert parallel: 2 of the 4 experts per rank
    torchrun --standalone --nproc_per_node=2 train.py --sp=2    # sequence parallel: half of every sequence per rank
    python train.py config/train_vl_shapes.py         # MiniMax-VL (vision.py): caption synthetic shapes images
    python train.py --help                            # the knob block below, with defaults

A straight-line script in the style of nanoGPT's train.py: knobs -> setup -> data -> model -> optimizer -> one
`while True` loop (eval + checkpoint, then one optimizer step, then logging). What it guarantees:
  * Exact resume. A batch is a pure function of (seed, step, micro-step index); the checkpoint holds the model,
    the optimizer, the step and the RNG states, so a run stopped and resumed produces the same losses as an
    uninterrupted one (bitwise on CPU; tests/test_train.py checks it).
  * DDP gives the same global batch for any number of processes: global micro-batch g = micro_step * streams +
    stream, g in [0, gradient_accumulation_steps), where streams = world / sp (the ranks of a sequence-parallel
    group share their sequences). Gradients are synced once per optimizer step (no_sync on the other
    micro-steps; with ep or sp > 1 by parallel.sync_gradients after the last one). Checkpoints are unsharded, so
    a run saved under one ep/sp layout resumes under another, and samples in one process.
  * Nothing saved is lost: checkpoints are written to a temp file and renamed over the old one (atomic on POSIX),
    a fresh run refuses to start over an existing checkpoint, and a NaN/inf loss stops the run before the bad
    update, keeping the last good checkpoint.
Checkpoint (out_dir/ckpt.pt, one torch.save'd dict, loadable with weights_only=True): model (raw, uncompiled
state_dict), optimizer, model_config (asdict of MiniMaxConfig), config (these knobs), tokenizer, step, data
state, rng, val_loss; MiniMax-VL runs add vision_config (asdict of vision.VisionConfig), from which sample.py
and vision.vl_from_checkpoint rebuild the model. Logs: stdout, and one JSON object per log step / eval in
out_dir/metrics.jsonl.
"""
import ast
import difflib
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict

import numpy as np
import torch

# -----------------------------------------------------------------------------
# knobs (defaults = the CPU quick start). Override: python train.py [config/x.py ...] [--key=value ...]
# I/O
out_dir = "out"              # checkpoint ckpt.pt and metrics.jsonl go here
eval_interval = 100          # evaluate train/val loss and save a checkpoint every this many steps (and at the end)
log_interval = 10            # print a log line every this many steps
eval_iters = 10              # batches per split in each evaluation
resume = False               # continue out_dir/ckpt.pt: its knobs, except those you set again explicitly
# data
data_dir = "data"            # prepared datasets: <data_dir>/<dataset>/<tokenizer>/{train,val}.bin (relative: to repo)
dataset = "stdlib"           # stdlib (offline default, auto-prepared) | shakespeare | a name from data/text/prepare.py
                             # with vision: shapes (synthetic images, drawn on the fly) | a folder with captions.jsonl
tokenizer = "byte"           # byte | gpt2 | cl100k_base: which prepared copy of the dataset to read
seq_len = 256                # context length in tokens (text runs; a VL row is as long as its image + caption)
batch_size = 16              # sequences per micro-batch, per process
gradient_accumulation_steps = 0   # micro-batches per optimizer step over all processes (global batch / batch_size);
                                  # 0 = one per process (per data-parallel stream: world / sp)
# model
preset = "tiny"              # model size, one of model.PRESETS: tiny | small | bench | minimax-text-01
model_kw = ""                # MiniMaxConfig fields over the preset, e.g. "hidden_size=128,num_hidden_layers=2"
# vision (MiniMax-VL, vision.py): a ViT + projector in front of the language model, trained to caption images
vision = ""                  # "" = a text run; else a ViT preset of vision.VISION_PRESETS, e.g. vit-small-56
vision_kw = ""               # VisionConfig fields over the preset, e.g. "num_hidden_layers=6,max_grid_tiles=9"
freeze_vision = False        # keep the ViT at its initial weights; the projector, newline and language model train
init_from = ""               # a text run's ckpt.pt: start the language model from its weights (fresh runs only)
data_workers = 0             # vision: processes that draw/decode the next batch's images while the GPU trains
# optimizer: AdamW, linear warmup then cosine decay to min_lr_frac * learning_rate
learning_rate = 3e-3
max_iters = 600              # optimizer steps in total
warmup_iters = 30
lr_decay_iters = 0           # length of the cosine; 0 = max_iters
min_lr_frac = 0.1
weight_decay = 0.1           # on matrices only (embeddings, projections, experts); not on norms
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0              # clip the global gradient norm; 0 = off
# system
device = "auto"              # auto (cuda if available, else cpu) | cpu | cuda | cuda:1 | mps (untested)
dtype = "auto"               # auto (bfloat16 autocast on CUDA, float32 elsewhere) | float32 | bfloat16
compile = False              # torch.compile the model (faster on GPU; off if it fails on your platform)
seed = 1337
# parallelism beyond DDP (parallel.py), under torchrun: world size = a multiple of ep and of sp
ep = 1                       # expert parallel: each rank of a group of ep holds num_local_experts / ep experts
sp = 1                       # sequence parallel (LASP+): each rank of a group of sp holds seq_len / sp tokens
global_router = False        # with ep > 1 and a capacity_factor: decide token drop on the EP group's counts
# -----------------------------------------------------------------------------
defaults = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (bool, int, float, str))}


def die(msg, code=1):
    """Expected failures (bad input, missing data, NaN loss): one clear line on stderr and a non-zero exit."""
    if os.environ.get("RANK", "0") == "0":  # under torchrun every rank fails the same way: print it once
        print(f"error: {msg}", file=sys.stderr, flush=True)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    sys.exit(code)


# ---- configuration: defaults <- checkpoint's knobs (when resuming) <- config files / --key=value -----------------

def parse_knobs(argv):
    """Explicit settings, in command-line order: `x.py` files (plain Python assignments, as nanoGPT's
    configurator) and `--key=value` (`--flag` alone sets a bool knob). Names and types are checked."""
    def type_name(kind):
        return {int: "an int", float: "a float", bool: "a bool (true/false)", str: "a str"}[kind]

    def check_key(key, where):
        if key not in defaults:
            near = difflib.get_close_matches(key, defaults, n=1)
            die(f"unknown knob '{key}' ({where})" + (f"; did you mean '{near[0]}'?" if near else "")
                + "  (python train.py --help lists them)")

    def from_string(key, s):
        kind = type(defaults[key])
        if kind is bool:
            if s.lower() in ("1", "true", "yes", "on"):
                return True
            if s.lower() in ("0", "false", "no", "off"):
                return False
        else:
            try:
                return kind(s)  # int("3"), float("3e-4"), str(...)
            except ValueError:
                pass
        die(f"--{key}={s}: expected {type_name(kind)} (default {defaults[key]!r})")

    explicit = {}
    for arg in argv:
        if arg.startswith("--"):
            key, eq, value = arg[2:].partition("=")
            check_key(key, arg)
            if not eq and not isinstance(defaults[key], bool):
                die(f"{arg} needs a value: --{key}=...")
            explicit[key] = from_string(key, value) if eq else True
        elif arg.endswith(".py"):
            if not os.path.isfile(arg):
                die(f"config file {arg} not found")
            ns = {}
            try:
                exec(open(arg).read(), ns)  # a config file is plain Python: `max_iters = 2000`
            except Exception as e:
                die(f"config file {arg} does not run: {type(e).__name__}: {e}")
            for key, value in ns.items():
                if key.startswith("_") or type(value).__name__ == "module":
                    continue
                check_key(key, arg)
                kind = type(defaults[key])
                if kind is float and type(value) is int:
                    value = float(value)  # `learning_rate = 1` means 1.0
                if type(value) is not kind:
                    die(f"{arg}: {key} = {value!r} should be {type_name(kind)} (default {defaults[key]!r})")
                explicit[key] = value
        else:
            die(f"don't understand argument '{arg}': use --key=value or a config/*.py file (see --help)")
    return explicit


if any(a in ("-h", "--help") for a in sys.argv[1:]):
    lines = open(os.path.abspath(__file__)).read().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# knobs"))
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("# ----"))
    print("\n\n".join(__doc__.strip().split("\n\n")[:2]) + "\n")  # what it is + the usage lines
    print("\n".join(lines[start:end]))  # the knob block itself: defaults and comments exactly as written
    sys.exit(0)
explicit = parse_knobs(sys.argv[1:])
config = dict(defaults)
ckpt_path = os.path.join(explicit.get("out_dir", out_dir), "ckpt.pt")
checkpoint = None
if explicit.get("resume", resume):
    if not os.path.exists(ckpt_path):
        die(f"--resume: no checkpoint at {ckpt_path} (set --out_dir to the run's folder)")
    try:  # weights_only: a checkpoint is plain tensors/dicts/numbers, nothing executable
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        saved = checkpoint["config"]
    except Exception as e:  # truncated zip, wrong file, unpickling error
        die(f"cannot read checkpoint {ckpt_path}: {type(e).__name__}: {str(e)[:200]}. The file is truncated or "
            f"not a nanoMiniMax checkpoint; nothing was changed (start a new run with another --out_dir).")
    config.update({k: v for k, v in saved.items() if k in defaults})
    model_keys = ("preset", "model_kw", "tokenizer", "vision", "vision_kw")  # these define the weights' shapes
    for k in model_keys:
        if k in explicit and explicit[k] != saved.get(k):
            die(f"--resume: {ckpt_path} was trained with {k}={saved.get(k)!r}, not {explicit[k]!r}; the weights "
                f"do not fit. Drop --{k}, or start a new run in another --out_dir.")
    # knobs that change the loss sequence (I/O knobs don't; max_iters does only through a default lr_decay_iters)
    io_keys = ("resume", "out_dir", "data_dir", "eval_interval", "log_interval", "eval_iters", "device")
    changed = [k for k in explicit if k not in io_keys and explicit[k] != saved.get(k)
               and not (k == "max_iters" and config["lr_decay_iters"])]
    if changed and os.environ.get("RANK", "0") == "0":
        print(f"note: resuming with changed knobs {changed}: the continuation is not the exact one any more")
elif os.path.exists(ckpt_path):  # a fresh run would overwrite it at its first save
    die(f"{ckpt_path} already exists: continue it with --resume, or start a new run with --out_dir=another_dir "
        f"(or delete {os.path.dirname(ckpt_path)}/ yourself)")
config.update(explicit)
config["resume"] = checkpoint is not None
globals().update(config)  # from here on the knobs are plain globals again, as in the block above
for k in ("seq_len", "batch_size", "eval_interval", "eval_iters", "log_interval"):
    if config[k] < 1:
        die(f"{k}={config[k]}: must be at least 1")
if max_iters < 0 or learning_rate <= 0 or warmup_iters < 0:
    die(f"need max_iters >= 0, learning_rate > 0 and warmup_iters >= 0 (got {max_iters}, {learning_rate}, "
        f"{warmup_iters})")
if vision and (ep != 1 or sp != 1 or compile):
    die(f"vision={vision!r}: MiniMax-VL runs support DDP but not ep/sp > 1 or compile (got ep={ep}, sp={sp}, "
        f"compile={compile}): use ep=1 sp=1 compile=false")
if (freeze_vision or vision_kw or data_workers) and not vision:
    die("freeze_vision, vision_kw and data_workers are for MiniMax-VL runs: set vision=... too (python train.py "
        "--help)")
if data_workers < 0:
    die(f"data_workers={data_workers}: must be >= 0 (0 = draw the images in the training loop)")
if not os.path.isabs(data_dir):  # relative to the repo (where data/*/prepare.py write), not to the current dir
    data_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), data_dir)

# ---- distributed, device, precision ------------------------------------------------------------------------------

if device == "auto":
    device = "cuda" if torch.cuda.is_available() else "cpu"
device_type = device.split(":")[0]
if device_type == "cuda" and not torch.cuda.is_available():
    die(f"device={device} but torch sees no CUDA GPU; use --device=cpu")
# torchrun sets RANK/WORLD_SIZE; parallel.py reads them, starts NCCL (GPU) or gloo (CPU) and builds the groups of
# the rank grid: expert-parallel groups of ep ranks, sequence-parallel groups of sp ranks (parallel.py docstring)
import parallel  # noqa: E402

try:
    layout = parallel.init_distributed(ep=ep, sp=sp, device=device)
except ValueError as e:
    die(str(e))  # raised on every rank before any collective: a mis-sized launch fails fast, never hangs
ddp = layout.world > 1
ddp_rank, ddp_local_rank, ddp_world_size = layout.rank, layout.local_rank, layout.world
device = str(layout.device)
# plain data parallel (ep = sp = 1) keeps torch DDP, which overlaps the gradient all-reduce with the backward;
# with ep or sp > 1 the expert shards and sequence slices need parallel.sync_gradients after the backward instead
use_ddp = ddp and ep == 1 and sp == 1
master_process = ddp_rank == 0  # only rank 0 prints, logs and saves


def print0(*a, **kw):
    if master_process:
        print(*a, **kw, flush=True)


# data-parallel streams: the ranks of one SP group read the same sequences (each keeps its slice of them), so
# there are dp_size = world / sp independent streams of micro-batches (= world without SP)
dp_rank, dp_size = layout.dp_rank, layout.dp_size
if gradient_accumulation_steps == 0:  # the default: one micro-batch per stream; saved resolved, so that a resume
    gradient_accumulation_steps = config["gradient_accumulation_steps"] = dp_size  # keeps the global batch
if gradient_accumulation_steps < 0 or gradient_accumulation_steps % dp_size:
    die(f"gradient_accumulation_steps={gradient_accumulation_steps} must be a multiple of the number of data-parallel "
        f"streams ({dp_size} = {ddp_world_size} processes / sp={sp}): it counts micro-batches over all processes")
if seq_len % sp:
    die(f"seq_len={seq_len} must be divisible by sp={sp}: each rank of a sequence-parallel group holds an equal slice")
accum_local = gradient_accumulation_steps // dp_size  # micro-steps per process per optimizer step
tokens_per_step = gradient_accumulation_steps * batch_size * seq_len
if dtype == "auto":
    dtype = "bfloat16" if device_type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
if dtype not in ("float32", "bfloat16"):
    die(f"dtype={dtype}: choose auto, float32 or bfloat16")
# weights and optimizer state stay fp32; bf16 means autocast of the matmuls (no grad scaler needed, unlike fp16)
autocast = nullcontext() if dtype == "float32" else torch.autocast(device_type, dtype=torch.bfloat16)
torch.manual_seed(seed)  # same seed on every rank: identical init (DDP also broadcasts rank 0's weights)
if device_type == "cuda":
    torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls (outside autocast) on tensor cores
    torch.backends.cudnn.allow_tf32 = True

# ---- data --------------------------------------------------------------------------------------------------------

SPLITS = {"train": 0, "val": 1}
if not vision:  # text: token files written by data/<dataset>/prepare.py
    from data.tokenizers import dataset_path, load_meta  # noqa: E402  (imported here, where it is first needed)

    if dataset == "stdlib" and not os.path.exists(os.path.join(dataset_path(data_dir, dataset, tokenizer),
                                                             "meta.json")):
        if ddp_local_rank == 0:  # offline: prepare it on the spot (a few seconds); other ranks wait at the barrier
            print(f"dataset stdlib/{tokenizer} not prepared yet: preparing it now (python data/stdlib/prepare.py)")
            from data.stdlib.prepare import prepare
            try:
                prepare(data_dir, tokenizer)
            except ValueError as e:
                die(str(e))
        if ddp:
            torch.distributed.barrier()
    try:
        meta = load_meta(data_dir, dataset, tokenizer)
    except ValueError as e:
        die(str(e))
    token_dtype = np.dtype(meta["dtype"])
    for split in ("train", "val"):
        if meta[f"{split}_tokens"] < seq_len + 1:
            die(f"the {split} split of {dataset}/{tokenizer} has {meta[f'{split}_tokens']:,} tokens, fewer than "
                f"seq_len + 1 = {seq_len + 1}: use a smaller --seq_len or more data")

    def get_batch(split, step, g, purpose=0):
        """Global micro-batch g of optimizer step `step`: x, y (B, T) int64 on the device. The window offsets come
        from an RNG seeded with (seed, purpose, split, step, g), so every batch is reproducible from the step alone:
        that is the whole data-loader state. purpose 0 = training batches, 1 = the fixed evaluation batches.
        With sequence parallelism this rank keeps only its contiguous slice, (B, T / sp)."""
        # a fresh memmap per batch: nanoGPT's fix for memory growth when one memmap is kept open
        data = np.memmap(os.path.join(dataset_path(data_dir, dataset, tokenizer), f"{split}.bin"),
                         dtype=token_dtype, mode="r")
        rng = np.random.default_rng([seed, purpose, SPLITS[split], step, g])
        ix = rng.integers(0, len(data) - seq_len, size=batch_size)  # start of each window, window = seq_len + 1
        xy = torch.from_numpy(np.stack([data[i:i + seq_len + 1] for i in ix]).astype(np.int64))  # (B, T+1)
        x, y = xy[:, :-1], xy[:, 1:]  # (B, T) inputs and next-token targets
        x, y = parallel.split_sequence(x, layout), parallel.split_sequence(y, layout)  # (B, T / sp); as is if sp = 1
        if device_type == "cuda":  # pinned memory lets the copy overlap with the GPU work already queued
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.to(device), y.to(device)

else:  # MiniMax-VL: image-caption pairs (vision.py), rows "<image>Describe the image: caption<|endoftext|>"
    from data.shapes.shapes import ShapesDataset  # noqa: E402
    from data.tokenizers import get_tokenizer  # noqa: E402
    from vision import CaptionFolder, MiniMaxVL, VisionConfig, vl_batch  # noqa: E402

    if dataset != "shapes" and not os.path.isdir(dataset):
        die(f"vision={vision!r}: dataset={dataset!r} should be 'shapes' (synthetic) or a folder with captions.jsonl")
    try:
        enc = get_tokenizer(tokenizer)
        # 'shapes': item i of a split is drawn from (data seed 1337, split, i), the held-out 'val' images are the
        # ones bench/vl_eval.py scores; a folder: every 10th line of captions.jsonl is 'val' (vision.CaptionFolder)
        vl_data = {s: ShapesDataset(s) if dataset == "shapes" else CaptionFolder(dataset, s) for s in SPLITS}
    except ValueError as e:
        die(str(e))
    meta = {"vocab_size": enc.n_vocab, "eot_token": enc.eot_token}  # what the checkpoint records of the tokenizer
    # Drawing (shapes) or decoding (files) 64 images is ~0.1 s of single-core CPU work per step: with data_workers
    # > 0 a process pool prepares the items of the next training micro-batch while this one trains. The items are
    # a function of (seed, split, step, g), so prefetching changes nothing but the time (tests check it).
    # The workers only run numpy/Pillow on the CPU (forked, they never touch CUDA) and return numpy arrays.
    pool = None
    if data_workers > 0:
        import concurrent.futures
        import multiprocessing
        pool = concurrent.futures.ProcessPoolExecutor(data_workers, mp_context=multiprocessing.get_context("fork"))
    prefetched = {}  # (split, step, g, purpose) -> futures of its items

    def load_items(split, ix):
        """Items ix of a split as [(image (3, h, w) uint8 numpy, caption)] (runs in a worker, or here)."""
        return [(img.numpy(), caption) for img, caption in (vl_data[split][int(i)] for i in ix)]

    def item_indices(split, step, g, purpose):
        """Which items micro-batch g of step `step` holds: an RNG seeded like the text windows' (with replacement)."""
        return np.random.default_rng([seed, purpose, SPLITS[split], step, g]).integers(0, len(vl_data[split]),
                                                                                      size=batch_size)

    def submit_items(key):
        """Start loading the items of batch key = (split, step, g, purpose) in the pool: data_workers chunks."""
        ix = item_indices(*key)
        return [pool.submit(load_items, key[0], chunk) for chunk in np.array_split(ix, data_workers)]

    def get_batch(split, step, g, purpose=0):
        """The VL twin of the text get_batch: global micro-batch g of step `step` -> (idx (B, T), targets (B, T),
        images), batch_size image-caption rows right-padded to the longest (vision.vl_batch: targets -1 on image
        placeholders and padding). Which items: an RNG seeded with (seed, purpose, split, step, g), as for text,
        so a batch is again a function of the step alone (exact resume, same global batch under DDP)."""
        key = (split, step, g, purpose)
        try:  # images are decoded / drawn on the CPU (here or in the pool), then resized and tiled on the device
            if pool is None:
                items = load_items(split, item_indices(*key))
            else:
                futures = prefetched.pop(key, None) or submit_items(key)
                if purpose == 0:  # the next training micro-batch of this process: start loading it now
                    nxt = (split, step, g + dp_size, 0) if g + dp_size < gradient_accumulation_steps else \
                        (split, step + 1, dp_rank, 0)
                    prefetched[nxt] = submit_items(nxt)
                items = [item for f in futures for item in f.result()]
            idx, targets, images = vl_batch([(torch.from_numpy(img), c) for img, c in items], enc, raw_model,
                                            device=device)
        except ValueError as e:  # an unreadable image file in a caption folder
            die(str(e))
        if idx.shape[1] > model_config.max_position_embeddings:
            die(f"a {split} row is {idx.shape[1]} tokens (image + caption), more than the model's "
                f"max_position_embeddings={model_config.max_position_embeddings}: add max_position_embeddings=... "
                f"to --model_kw, or allow fewer tiles per image with --vision_kw=max_grid_tiles=...")
        return idx, targets, images


# ---- model ---------------------------------------------------------------------------------------------------------

from model import MiniMax, MiniMaxConfig  # noqa: E402


def config_diff(now, saved):
    """{field: (this run's value, the saved value)} for the fields of two asdict'ed configs that differ."""
    return {k: (v, saved.get(k)) for k, v in now.items() if saved.get(k) != v}


def parse_kw(s):
    """The --model_kw / --vision_kw format: "a=1,b=x" -> {"a": 1, "b": "x"}."""
    kw = {}
    for item in filter(None, s.replace(" ", "").split(",")):
        k, _, v = item.partition("=")
        try:
            kw[k] = ast.literal_eval(v)  # numbers, True/False/None
        except (ValueError, SyntaxError):
            kw[k] = v  # a bare word: a string, e.g. layer_pattern=softmax
    return kw


try:
    # the vocabulary is padded to a multiple of 64 (tensor-core friendly); the padded ids never occur in the data.
    # MiniMax-VL needs one id beyond the tokenizer's: the model's last id is the image placeholder (vision.py)
    vocab_size = (meta["vocab_size"] + bool(vision) + 63) // 64 * 64
    model_config = MiniMaxConfig.from_preset(preset, vocab_size=vocab_size, **parse_kw(model_kw))
    vision_config = VisionConfig.from_preset(vision, **parse_kw(vision_kw)) if vision else None
except (ValueError, TypeError, KeyError) as e:
    die(f"preset={preset!r} model_kw={model_kw!r}{f' vision={vision!r} vision_kw={vision_kw!r}' if vision else ''}"
        f": {e}")
if not vision and seq_len > model_config.max_position_embeddings:
    die(f"seq_len={seq_len} is longer than the model's max_position_embeddings={model_config.max_position_embeddings}"
        f": lower --seq_len or add max_position_embeddings=... to --model_kw")
with torch.device(device):
    raw_model = MiniMax(model_config)  # the uncompiled, unwrapped module: saved, evaluated, sampled
    if vision:  # MiniMax-VL: the text model becomes raw_model.language_model, behind the ViT and the projector
        raw_model = MiniMaxVL(raw_model, vision_config)
text_model = raw_model.language_model if vision else raw_model
if vision and raw_model.image_token_id < enc.n_vocab:
    die(f"vision_kw={vision_kw!r}: image_token_id {raw_model.image_token_id} is a real token of the '{tokenizer}' "
        f"tokenizer (ids < {enc.n_vocab}); leave it at -1 (the last id, {vocab_size - 1})")
if checkpoint is not None:
    if checkpoint["model_config"] != asdict(model_config):
        die(f"checkpoint {ckpt_path} has another model config than this run (now, saved): "
            f"{config_diff(asdict(model_config), checkpoint['model_config'])}")
    if vision and checkpoint.get("vision_config") != asdict(vision_config):
        die(f"checkpoint {ckpt_path} has another vision config than this run (now, saved): "
            f"{config_diff(asdict(vision_config), checkpoint.get('vision_config') or {})}")
    try:
        raw_model.load_state_dict(checkpoint["model"])
    except RuntimeError as e:
        die(f"checkpoint {ckpt_path} does not fit the model: {str(e)[:300]}")
elif init_from:  # a fresh run whose language model starts from a text run's weights (the vision side from scratch)
    try:
        text_ckpt = torch.load(init_from, map_location="cpu", weights_only=True)
        saved_config, saved_tokenizer = text_ckpt["model_config"], text_ckpt["tokenizer"]["name"]
    except Exception as e:  # missing, truncated, not a train.py checkpoint
        die(f"init_from={init_from}: cannot read it ({type(e).__name__}: {str(e)[:200]}); it should be the ckpt.pt "
            f"of a text run of train.py")
    if "vision_config" in text_ckpt:
        die(f"init_from={init_from} is a MiniMax-VL checkpoint, init_from takes a text run's: to continue a VL "
            f"run, use --resume with its --out_dir")
    if saved_tokenizer != tokenizer:
        die(f"init_from={init_from} was trained with tokenizer={saved_tokenizer!r}, this run uses {tokenizer!r}")
    if saved_config != asdict(model_config):
        knobs = text_ckpt.get("config", {})
        die(f"init_from={init_from}: its model config differs from this run's (this run, checkpoint): "
            f"{config_diff(asdict(model_config), saved_config)}. Use the text run's preset={knobs.get('preset')!r} "
            f"model_kw={knobs.get('model_kw')!r}")
    text_model.load_state_dict(text_ckpt["model"])
    print0(f"language model initialised from {init_from} (step {text_ckpt.get('step')}, val loss "
           f"{text_ckpt.get('val_loss', float('nan')):.4f})")
    del text_ckpt
if freeze_vision:  # no gradients and no optimizer state for the ViT; the projector, newline and text model train
    raw_model.vision_tower.requires_grad_(False)
n_params = sum(p.numel() for p in raw_model.parameters())  # counted before the experts are sharded
# expert / sequence parallelism rewire the built model in place (parallel.py): keep this rank's E/ep experts of
# every MoE layer (the weights are identical on all ranks here: same seed, or the unsharded checkpoint), and make
# every attention layer work on a slice of the sequence. Both are no-ops at ep = sp = 1.
try:
    parallel.apply_expert_parallel(raw_model, layout, global_router=global_router)
    parallel.apply_sequence_parallel(raw_model, layout)
except ValueError as e:
    die(str(e))
model = torch.compile(raw_model) if compile else raw_model
eval_model = model  # evaluation skips the DDP wrapper: each rank runs its own batches (with EP/SP: in step)
if use_ddp:
    # the buffers (RoPE frequencies, decay slopes) are constants computed on every rank: no need to broadcast them
    model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[ddp_local_rank] if device_type == "cuda"
                                                      else None, broadcast_buffers=False)

# ---- optimizer -------------------------------------------------------------------------------------------------

# weight decay on matrices (embeddings, projections, expert weights: ndim >= 2), not on norms/scales (ndim 1)
params = [p for p in raw_model.parameters() if p.requires_grad]
optimizer = torch.optim.AdamW(
    [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
     {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
    lr=learning_rate, betas=(beta1, beta2), fused=device_type == "cuda")
min_lr = learning_rate * min_lr_frac


def get_lr(step):
    """Linear warmup for warmup_iters steps, then cosine from learning_rate to min_lr over lr_decay_iters."""
    decay_iters = lr_decay_iters or max_iters
    if step < warmup_iters:
        return learning_rate * (step + 1) / warmup_iters
    if step >= decay_iters:
        return min_lr
    ratio = (step - warmup_iters) / max(1, decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


@torch.no_grad()
def estimate_loss():
    """Mean loss over eval_iters fixed batches per split (the same batches at every eval, so evals compare).
    Batch k is evaluated by data-parallel stream k % dp_size (with SP, each rank of the stream's group adds the
    mean over its slice); the sum is all-reduced, so any layout gives the same mean."""
    eval_model.eval()
    out = {}
    # with EP every forward holds all-to-alls, so all ranks must run the same number of them: streams that run
    # out of batches evaluate a spare one and leave it out of the sum
    rounds = math.ceil(eval_iters / dp_size) if ep > 1 else None
    for split in SPLITS:
        total = torch.zeros((), device=device)
        for k in range(dp_rank, rounds * dp_size if rounds else eval_iters, dp_size):
            batch = get_batch(split, k % eval_iters, 0, purpose=1)  # eval batch k: a function of k only
            with autocast:
                eval_model(*batch)
            if k < eval_iters:
                total += raw_model.last_stats["ce"].float()  # evaluate the language-model loss, without the aux
        if ddp:
            torch.distributed.all_reduce(total)
        out[split] = total.item() / (eval_iters * sp)  # host sync
    eval_model.train()
    return out


def save_checkpoint(ckpt, path):
    """Atomic save: write path.tmp, fsync, rename over path. A crash at any point leaves the old file intact."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(ckpt, f)
        f.flush()
        os.fsync(f.fileno())  # the bytes are on disk before the rename makes them "the" checkpoint
    os.replace(tmp, path)  # atomic on POSIX (and Windows): readers see the old or the new file, never a mix
    dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


# ---- start or resume -------------------------------------------------------------------------------------------

step = 0
metrics_path = os.path.join(out_dir, "metrics.jsonl")
if checkpoint is not None:
    # the checkpoint is unsharded: each rank keeps its experts' slice of the AdamW moments (= load_state_dict at ep=1)
    parallel.load_full_optimizer_state_dict(optimizer, raw_model, checkpoint["optimizer"], layout)
    step = checkpoint["step"]
    torch.set_rng_state(checkpoint["rng"]["torch"])
    if device_type == "cuda" and checkpoint["rng"].get("cuda"):
        torch.cuda.set_rng_state_all(checkpoint["rng"]["cuda"])
    if step >= max_iters:
        print0(f"{ckpt_path} is at step {step} >= max_iters={max_iters}: nothing to do (raise --max_iters)")
        sys.exit(0)
    print0(f"resuming {ckpt_path} at step {step} (val loss then {checkpoint.get('val_loss', float('nan')):.4f})")
    if master_process and os.path.exists(metrics_path):  # drop records a crashed run wrote after its checkpoint
        with open(metrics_path) as f:
            records = [json.loads(line) for line in f if line.strip()]
        with open(metrics_path, "w") as f:
            for r in records:
                if r["step"] < step or (r["kind"] == "eval" and r["step"] == step):
                    f.write(json.dumps(r) + "\n")
    checkpoint = None  # free the memory
elif master_process:
    os.makedirs(out_dir, exist_ok=True)
    open(metrics_path, "w").close()
start_step = step
print0(f"model {preset}{' ' + model_kw if model_kw else ''}: {n_params / 1e6:.2f}M parameters, {model_config.num_hidden_layers} layers "
       f"({''.join('S' if t == 'full_attention' else 'L' for t in model_config.layer_types)}), "
       f"{model_config.num_local_experts} experts top-{model_config.num_experts_per_tok}")
if vision:
    n_vision = n_params - text_model.num_params()
    print0(f"vision {vision}{' ' + vision_kw if vision_kw else ''}: {n_vision / 1e6:.2f}M of those parameters (ViT + "
           f"projector + newline){', ViT frozen' if freeze_vision else ''}; {vision_config.image_size}-px tiles of "
           f"{vision_config.patch_size}-px patches, up to {vision_config.max_grid_tiles} tiles + a thumbnail per image")
    print0(f"data {dataset}: {len(vl_data['train']):,} train / {len(vl_data['val']):,} val image-caption pairs, "
           f"tokenizer {tokenizer}; {gradient_accumulation_steps} micro-batches x {batch_size} images per step "
           f"({ddp_world_size} process{'es' if ddp else ''}); device {device}, {dtype}; mfu counts the text model only")
else:
    print0(f"data {dataset}/{tokenizer}: {meta['train_tokens']:,} train tokens; {tokens_per_step:,} tokens per step "
           f"= {gradient_accumulation_steps} micro-batches x {batch_size} x {seq_len} ({ddp_world_size} process"
           f"{'es' if ddp else ''}{f', ep={ep} sp={sp}' if ep * sp > 1 else ''}); device {device}, {dtype}, "
           f"compile={compile}")


def log_metrics(record):
    with open(metrics_path, "a") as f:
        f.write(json.dumps(record) + "\n")


# ---- training loop ---------------------------------------------------------------------------------------------

dt_avg, val_loss, t0 = None, float("nan"), time.time()
last_saved = start_step if start_step > 0 else None  # step of the checkpoint on disk, for the NaN message
while True:
    last_step = step == max_iters
    # -- periodic work first: evaluate, then save (not at the very step we resumed from: that is the checkpoint) --
    if (step % eval_interval == 0 or last_step) and not (step == start_step and step > 0):
        losses = estimate_loss()
        val_loss = losses["val"]
        print0(f"step {step}: train loss {losses['train']:.4f}, val loss {val_loss:.4f}")
        if master_process:
            log_metrics({"kind": "eval", "step": step, "train_loss": losses["train"], "val_loss": val_loss})
        if step > 0:
            # unsharded, whatever the layout: expert shards are gathered to rank 0 (a collective: every rank
            # takes part), so the checkpoint resumes under any ep/sp and samples in one process
            full_model = parallel.full_state_dict(raw_model, layout)  # raw module: no "_orig_mod."/"module."
            full_optimizer = parallel.full_optimizer_state_dict(optimizer, raw_model, layout)
        if step > 0 and master_process:
            ckpt = {
                "model": full_model,
                "optimizer": full_optimizer,
                "model_config": asdict(model_config),
                "config": config,
                "tokenizer": {"name": tokenizer, "vocab_size": meta["vocab_size"], "eot_token": meta["eot_token"]},
                "step": step,  # number of optimizer steps done = the next step to run
                # the data loader has no state of its own: batches are a function of (seed, step, micro-step)
                "data": {"dataset": dataset, "seed": seed, "next_step": step},
                "rng": {"torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state_all() if device_type == "cuda" else []},
                "val_loss": val_loss,
            }
            if vision:  # sample.py and vision.vl_from_checkpoint rebuild the MiniMax-VL model from it
                ckpt["vision_config"] = asdict(vision_config)
            save_checkpoint(ckpt, ckpt_path)
            print0(f"saved {ckpt_path}")
        last_saved = step if step > 0 else last_saved
    if last_step:
        break

    # ---------------------------------------------------------------------------------------------------------------
    # one optimizer step: accum_local micro-batches forward/backward, gradient sync on the last one only
    t_step = time.time()
    lr = get_lr(step)
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss_sum = torch.zeros((), device=device)
    n_tokens = 0  # this process's tokens in the step (VL rows vary in length: counted for the log)
    for micro_step in range(accum_local):
        # global micro-batch index: 1 process x 4 micro-steps and 2 processes x 2 see the same 4 batches
        batch = get_batch("train", step, micro_step * dp_size + dp_rank)  # (x, y), or VL (idx, targets, images)
        n_tokens += batch[0].numel()
        # DDP all-reduces gradients during backward; on the non-final micro-steps skip that (no_sync)
        sync = nullcontext() if not use_ddp or micro_step == accum_local - 1 else model.no_sync()
        with sync:
            with autocast:
                _, loss = model(*batch)  # loss = mean CE + MoE aux loss (model.py)
            loss = loss / accum_local  # the step's loss is the mean over its micro-batches
            loss.backward()
        loss_sum += loss.detach()
    # DDP averaged the gradients over the processes: each rank now holds the gradient of the global-batch loss.
    # With EP/SP nothing was synced during the backward: dense grads are averaged over all ranks, expert shards
    # over the ranks holding the same shard, and the norm counts every expert once (parallel.py)
    max_norm = grad_clip if grad_clip > 0 else float("inf")
    if use_ddp or not ddp:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:
        parallel.sync_gradients(raw_model, layout)
        grad_norm = parallel.clip_grad_norm_(raw_model, max_norm, layout)
    if ddp:  # the logged loss: mean over processes (the gradients' loss); same number on every rank
        torch.distributed.all_reduce(loss_sum, op=torch.distributed.ReduceOp.AVG)
    loss_f, norm_f = torch.stack([loss_sum, grad_norm.float()]).tolist()  # host sync, once per step
    if not (math.isfinite(loss_f) and math.isfinite(norm_f)):  # stop before the bad update reaches the weights
        kept = f"the last good checkpoint, {ckpt_path} (step {last_saved}), is untouched" if last_saved else \
            "no checkpoint had been saved yet"
        die(f"non-finite {'loss' if not math.isfinite(loss_f) else 'gradient'} at step {step} (loss {loss_f}, "
            f"gradient norm {norm_f}): stopped before applying this step; {kept}. "
            f"Try a lower learning_rate or a longer warmup_iters.", code=3)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    # ---------------------------------------------------------------------------------------------------------------

    # -- logging (CPU side) --
    dt = time.time() - t_step
    if step > start_step + 1:  # the first steps include warm-up / compilation: keep them out of the average
        dt_avg = dt if dt_avg is None else 0.9 * dt_avg + 0.1 * dt
    if step % log_interval == 0 and master_process:
        stats = raw_model.last_stats  # of the last micro-batch
        load_LE, dropped_LE = stats["load"].float(), stats["dropped"].float()  # (L, E)
        balance = (load_LE.max(-1).values / load_LE.mean(-1)).mean().item()  # 1.0 = perfectly even experts
        drop = (load_LE * dropped_LE).sum(-1).mean().item()  # fraction of routed slots dropped
        aux = float(stats["aux_loss"])  # host sync
        if vision:  # rows of padded image + caption tokens; the other processes' rows are about as long
            tokens_per_step = n_tokens * ddp_world_size
        tok_s = tokens_per_step / dt
        # MFU against one H100's bf16 peak: meaningful on GPUs only (on CPU it is logged as null)
        T = batch[0].shape[1] if vision else seq_len  # VL: the padded row length of the last micro-batch
        mfu = text_model.estimate_mfu(tokens_per_step // ddp_world_size, dt, T) if device_type == "cuda" else None
        eta = (max_iters - step - 1) * (dt_avg or dt)
        print0(f"step {step}/{max_iters} | loss {loss_f:.4f} | aux {aux:.4f} | balance {balance:.2f} drop {drop:.1%} "
               f"| lr {lr:.2e} | dt {dt * 1000:.0f}ms | tok/s {tok_s:,.0f} | mfu {'-' if mfu is None else f'{mfu:.1%}'} "
               f"| eta {int(eta // 60)}m{int(eta % 60):02d}s")
        log_metrics({"kind": "step", "step": step, "loss": loss_f, "aux_loss": aux, "balance": balance,
                     "drop": drop, "grad_norm": norm_f, "lr": lr, "dt": dt, "tok_s": tok_s, "mfu": mfu})
    step += 1

print0(f"done: {max_iters} steps in {time.time() - t0:.0f}s, val loss {val_loss:.4f}. Sample: python sample.py "
       f"--out_dir={out_dir}{' --image=picture.png' if vision else ''}")
if ddp:
    torch.distributed.destroy_process_group()
