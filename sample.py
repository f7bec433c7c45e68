"""
Sample text from a trained MiniMax: a train.py checkpoint, or a transformers MiniMax directory; or describe an
image with a MiniMax-VL checkpoint (train.py with vision=..., see vision.py).

    python sample.py                                    # out/ckpt.pt, 2 samples from the start of a document
    python sample.py --prompt="def fibonacci(n):" --num_samples=1 --max_new_tokens=500
    python sample.py --prompt=FILE:prompt.txt --temperature=0.6 --top_k=40 --seed=7
    python sample.py --out_dir=out-small                # another run's folder (or --ckpt=path/to/ckpt.pt)
    python sample.py --hf_dir=path/to/minimax --tokenizer=cl100k_base   # MiniMax.from_pretrained directory
    python sample.py --out_dir=out-vl-shapes --image=data/shapes/val/00000.png --temperature=0   # MiniMax-VL
    python sample.py --help                             # the knob block below, with defaults

The text streams out token by token. Tokens can end in the middle of a UTF-8 character (always possible with
the byte tokenizer), so decoding goes through data.tokenizers.StreamDecoder, which holds back the bytes of an
unfinished character. A checkpoint is always sampled with the tokenizer it was trained with (recorded in it);
only a transformers directory, which carries no tiktoken tokenizer, needs --tokenizer.

Generation: one forward over the prompt fills the model's cache (KV for softmax layers, the d x d state for
lightning layers), then one token per forward. This is model.generate's loop, written out here so each token
can be printed the moment it is sampled (tests/test_train.py checks both give the same tokens).

MiniMax-VL: the prompt is <image> + --prompt (default vision.CAPTION_PROMPT, "Describe the image:"), the layout
train.py trains on. The image (decoded with Pillow by vision.load_image) is cut into tiles, read by the ViT and
projected; its features replace the placeholder tokens in the prompt's embeddings (MiniMaxVL.embed), and that
one prefill fills the text model's cache. Decoding is then the text model's, token by token, exactly as above
(the placeholder id is never sampled), and stops at <|endoftext|>, where a caption ends. A VL checkpoint
without --image is an error (its language model only ever saw text after an image), and so is --image with a
text-only model.
"""
import os
import sys
import time
from contextlib import nullcontext

import torch

# -----------------------------------------------------------------------------
# knobs: python sample.py [--key=value ...]
out_dir = "out"              # sample the checkpoint out_dir/ckpt.pt (written by train.py) ...
ckpt = ""                    # ... or this checkpoint file ...
hf_dir = ""                  # ... or this transformers MiniMax directory (config.json + *.safetensors)
tokenizer = ""               # only with hf_dir: byte | gpt2 | cl100k_base (a checkpoint brings its own)
prompt = ""                  # text to continue, or FILE:path; "" = start a new document (with --image: see image)
image = ""                   # MiniMax-VL checkpoints only: an image file (PNG, JPEG, ...) to describe; the prompt
                             # is then <image> + prompt, "" = vision.CAPTION_PROMPT ("Describe the image:")
num_samples = 2
max_new_tokens = 300
temperature = 0.8            # 0 = greedy; < 1 sharper, > 1 more random
top_k = 200                  # sample among the top_k most likely tokens; 0 = all
seed = 1337
device = "auto"              # auto (cuda if available, else cpu) | cpu | cuda | cuda:1
dtype = "auto"               # auto (bfloat16 autocast on CUDA, float32 elsewhere) | float32 | bfloat16
cuda_graph = True            # on CUDA, replay each decode step as one CUDA graph (model.StaticDecoder)
# -----------------------------------------------------------------------------
defaults = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (bool, int, float, str))}


def die(msg):
    print(f"error: {msg}", file=sys.stderr, flush=True)
    sys.exit(1)


# ---- configuration: --key=value over the block (the same rules as train.py, without config files) --------------
if any(a in ("-h", "--help") for a in sys.argv[1:]):
    lines = open(os.path.abspath(__file__)).read().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# knobs"))
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("# ----"))
    print("\n\n".join(__doc__.strip().split("\n\n")[:2]) + "\n")
    print("\n".join(lines[start:end]))
    sys.exit(0)
for arg in sys.argv[1:]:
    key, eq, value = arg[2:].partition("=") if arg.startswith("--") else (arg, "", "")
    if key not in defaults or not eq:
        die(f"don't understand '{arg}': use --key=value with a knob of python sample.py --help")
    kind = type(defaults[key])
    try:
        if kind is bool and value.lower() not in ("true", "false", "1", "0"):
            raise ValueError
        globals()[key] = value.lower() in ("true", "1") if kind is bool else kind(value)  # int("3"), float(..)
    except ValueError:
        expected = {int: "an int", float: "a float", bool: "true or false", str: "a str"}[kind]
        die(f"{arg}: expected {expected} (default {defaults[key]!r})")

if device == "auto":
    device = "cuda" if torch.cuda.is_available() else "cpu"
device_type = device.split(":")[0]
if dtype == "auto":
    dtype = "bfloat16" if device_type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
autocast = nullcontext() if dtype == "float32" else torch.autocast(device_type, dtype=torch.bfloat16)
if max_new_tokens < 1 or num_samples < 1 or temperature < 0 or top_k < 0:
    die("need max_new_tokens >= 1, num_samples >= 1, temperature >= 0 and top_k >= 0")
if image:  # decoded first, so a bad file fails before any model is loaded
    import vision
    try:
        img = vision.load_image(image)  # (3, h, w) uint8
    except ValueError as e:
        die(f"--image: {e}")

# ---- model and tokenizer -------------------------------------------------------------------------------------

from data.tokenizers import StreamDecoder, get_tokenizer  # noqa: E402
from model import MiniMax, MiniMaxConfig, StaticDecoder  # noqa: E402

vl = None  # the MiniMax-VL wrapper when the checkpoint has a vision side; `model` is always the text model
if hf_dir:
    if not tokenizer:
        die("--hf_dir needs --tokenizer=byte|gpt2|cl100k_base: a transformers directory carries no tiktoken "
            "tokenizer, so say which one the model was trained with")
    try:
        model = MiniMax.from_pretrained(hf_dir, device=device)
    except ValueError as e:
        die(str(e))
    source = hf_dir
else:
    path = ckpt or os.path.join(out_dir, "ckpt.pt")
    if not os.path.exists(path):
        die(f"no checkpoint at {path}: train one first (python train.py), or pass --out_dir / --ckpt / --hf_dir")
    try:  # mmap: tensors are read from the file on demand, so the optimizer state is never loaded
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        state = checkpoint["model"]
        model_config = MiniMaxConfig(**checkpoint["model_config"])
        ckpt_tokenizer = checkpoint["tokenizer"]["name"]
    except Exception as e:  # truncated zip, not a checkpoint, missing keys
        die(f"cannot read checkpoint {path}: {type(e).__name__}: {str(e)[:200]} (truncated, or not a train.py "
            f"checkpoint)")
    if tokenizer and tokenizer != ckpt_tokenizer:
        die(f"{path} was trained with tokenizer '{ckpt_tokenizer}'; sampling it with '{tokenizer}' would produce "
            f"garbage. Drop --tokenizer (the checkpoint's is used).")
    tokenizer = ckpt_tokenizer
    # strip the wrappers' prefixes, in case a checkpoint was saved from a compiled / DDP module by other code
    state = {k.replace("_orig_mod.", "").removeprefix("module."): v for k, v in state.items()}
    if "vision_config" in checkpoint:  # MiniMax-VL: one state dict for the text model, ViT, projector, newline
        if not image:
            die(f"{path} is a MiniMax-VL checkpoint: pass --image=path/to/picture.png (and optionally "
                f"--prompt=...; default 'Describe the image:'). Its language model only learned text that "
                f"follows an image, so plain text sampling is not offered.")
        import vision
        try:
            vl = vision.vl_from_checkpoint({**checkpoint, "model": state}, device)  # meta build + strict load
        except (ValueError, TypeError, RuntimeError) as e:
            die(f"{path}: cannot rebuild the MiniMax-VL model from its saved configs and weights: "
                f"{type(e).__name__}: {str(e)[:300]}")
        model = vl.language_model.eval()
    else:
        with torch.device("meta"):  # no memory, no init work: every weight is overwritten just below
            model = MiniMax(model_config)
        model.to_empty(device=device)  # allocate on the device (also recomputes the constant buffers)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            die(f"{path}: the weights do not match the model config saved with them: {str(e)[:300]}")
    source = f"{path} (step {checkpoint.get('step')}, val loss {checkpoint.get('val_loss', float('nan')):.4f})"
    del checkpoint, state
if image and vl is None:
    die(f"--image needs a MiniMax-VL checkpoint, and {source.split(' (')[0]} is a text-only model (no "
        f"'vision_config'). Train one with python train.py config/train_vl_shapes.py, or drop --image.")
model.eval()
try:
    enc = get_tokenizer(tokenizer)
except ValueError as e:
    die(str(e))
if enc.n_vocab > model.config.vocab_size:
    die(f"tokenizer '{tokenizer}' has {enc.n_vocab:,} ids but the model only {model.config.vocab_size:,}: not the "
        f"tokenizer this model was trained with")

# ---- prompt ------------------------------------------------------------------------------------------------------

if prompt.startswith("FILE:"):
    try:
        with open(prompt[5:], encoding="utf-8") as f:
            prompt = f.read()
    except OSError as e:
        die(f"cannot read the prompt file: {e}")
images = None  # MiniMax-VL: [[ProcessedImage]], the image behind the prompt's placeholder tokens
if vl is not None:
    prompt = prompt or vision.CAPTION_PROMPT
    try:  # <image> + prompt, as train.py's rows begin; the one placeholder widened to the image's token count
        x, images = vision.caption_prompt_ids(enc, vl, img, prompt, device)  # (1, T0), [[ProcessedImage]]
    except ValueError as e:  # e.g. a second <image> in the prompt: there is only one image
        die(f"--prompt: {e}")
else:
    # training documents follow an <|endoftext|>, so it goes first: the prompt is read as the start of a document
    x = torch.tensor([[enc.eot_token] + enc.encode_ordinary(prompt)], dtype=torch.long, device=device)  # (1, T0)
T_max = model.config.max_position_embeddings
if x.shape[1] + max_new_tokens > T_max:
    die(f"prompt ({x.shape[1]} tokens{', image included' if vl else ''}) + max_new_tokens ({max_new_tokens}) > "
        f"the model's max_position_embeddings ({T_max}): shorten the prompt or lower --max_new_tokens")

# ---- generation --------------------------------------------------------------------------------------------------


@torch.no_grad()
def generate_stream(idx, max_new_tokens, temperature, top_k, images=None):
    """Yield next-token ids (B, 1) one at a time: model.generate's loop (same sampling, same RNG calls); with
    images, MiniMaxVL.generate's (the same tokens: tests/test_vl_scripts.py)."""
    cache = model.new_cache(idx.shape[0], idx.shape[1] + max_new_tokens)
    # on CUDA, each decode step is one CUDA-graph replay instead of hundreds of small kernel launches
    decoder = StaticDecoder(model, cache) if cuda_graph and device_type == "cuda" else None
    if images is None:
        logits = model.prefill(idx, cache)  # (B, V) fp32; fills the KV caches and the lightning states
    else:  # the image features replace the placeholders' embeddings; the text model prefills from those
        logits = model(None, inputs_embeds=vl.embed(idx, images), cache=cache)[0][:, -1].float()  # (B, V)
    for i in range(max_new_tokens):
        if images is not None:
            logits[:, vl.image_token_id] = float("-inf")  # a placeholder has no image behind it: never sample it
        if temperature == 0:
            next_id = logits.argmax(dim=-1, keepdim=True)  # (B, 1) greedy
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]  # (B, 1) k-th largest
                logits = logits.masked_fill(logits < kth, float("-inf"))
            next_id = torch.multinomial(torch.softmax(logits, dim=-1), num_samples=1)  # (B, 1)
        yield next_id
        if i < max_new_tokens - 1:  # one token through the cache -> (B, V) logits of the next one
            logits = decoder(next_id) if decoder else model(next_id, cache=cache)[0][:, -1].float()


print(f"sampling {source} on {device} ({dtype}), tokenizer {tokenizer}", file=sys.stderr, flush=True)
if images:
    im = images[0][0]
    print(f"image {image}: {im.size[1]} x {im.size[0]} px -> {im.grid[0]} x {im.grid[1]} tiles + thumbnail = "
          f"{im.n_tokens} image tokens", file=sys.stderr, flush=True)
torch.manual_seed(seed)
for s in range(num_samples):
    decode = StreamDecoder(enc)
    t0 = time.time()
    with autocast:
        for n, next_id in enumerate(generate_stream(x, max_new_tokens, temperature, top_k, images), start=1):
            if n == 1:  # first token out: the prefill is done (anything it printed is above the header)
                t1 = time.time()
                print(f"---------- sample {s + 1}/{num_samples} ----------\n{prompt}", end="", flush=True)
            token = next_id[0].tolist()  # host sync: the token id
            if vl is not None and token == [enc.eot_token]:
                break  # the caption is complete (training rows end with <|endoftext|>)
            print(decode(token), end="", flush=True)
    print(decode.flush())
    t2 = time.time()
    rate = (n - 1) / (t2 - t1) if n > 1 else float("nan")
    print(f"---------- {n} tokens: prefill {x.shape[1]} tokens + first token {(t1 - t0) * 1000:.0f} ms, then "
          f"{rate:.1f} tokens/s ----------", flush=True)
