"""Tiny Shakespeare (40,000 lines, 1.1 MB; from karpathy/char-rnn), downloaded when you run this script.

    python data/shakespeare/prepare.py                        # byte tokenizer -> data/shakespeare/byte/
    python data/shakespeare/prepare.py --tokenizer=gpt2       # gpt2 BPE (tiktoken downloads it once)
    python data/shakespeare/prepare.py --input=/path/to/input.txt   # offline, from a copy you already have
    python train.py --dataset=shakespeare

The download is cached as data/shakespeare/input.txt. The first 90 % of the characters are train, the last 10 %
val (as nanoGPT does), cut at a line break.

Expected output (byte tokenizer; the text is 1,115,394 ASCII characters, so one token per character):
    wrote .../data/shakespeare/byte: train ~1.00M tokens, val ~0.11M tokens (byte, vocab 257, uint16)
(not re-measured here: the machine this was written on has no network)
"""
import argparse
import os
import sys
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", ".."))  # repo root
from data.tokenizers import TOKENIZERS, dataset_path, write_dataset  # noqa: E402

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


def download(path):
    print(f"downloading {URL}")
    try:
        with urllib.request.urlopen(URL, timeout=30) as r:
            text = r.read().decode("utf-8")
    except (OSError, ValueError) as e:  # URLError, timeouts and DNS failures are all OSErrors
        raise ValueError(f"could not download Tiny Shakespeare ({e}). Without a network: fetch {URL} elsewhere and "
                         f"pass it with --input=path/to/input.txt (or copy it to {path}), or use the offline "
                         f"default dataset (python train.py) or your own text (data/text/prepare.py).") from None
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(path + ".tmp", path)  # a half-finished download never looks like a cached one
    return text


def prepare(data_dir, tokenizer="byte", input_path=None):
    cached = os.path.join(HERE, "input.txt")
    if input_path:
        with open(input_path, encoding="utf-8") as f:
            text = f.read()
    elif os.path.exists(cached):
        with open(cached, encoding="utf-8") as f:
            text = f.read()
    else:
        text = download(cached)
    cut = text.rfind("\n", 0, int(0.9 * len(text))) + 1  # split at a line break near 90 %
    return write_dataset(dataset_path(data_dir, "shakespeare", tokenizer), tokenizer, [text[:cut]], [text[cut:]],
                         source="Tiny Shakespeare (karpathy/char-rnn)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", default="byte", choices=TOKENIZERS)
    ap.add_argument("--input", default=None, help="a local copy of input.txt (no download)")
    ap.add_argument("--data_dir", default=os.path.join(HERE, ".."), help="root of the prepared datasets")
    args = ap.parse_args()
    try:
        prepare(os.path.normpath(args.data_dir), args.tokenizer, args.input)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
