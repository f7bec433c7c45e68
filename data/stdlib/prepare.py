"""The default dataset: the source code of this Python's standard library, which every Python install ships, so
it needs no download. About 610 files / 10.7 MB on CPython 3.11 (test suites, generated codec tables,
site-packages and caches are left out), i.e. ~10.7M tokens with the byte tokenizer: enough to train a small model
that writes Python-looking code, small enough to prepare in a few seconds.

    python data/stdlib/prepare.py                          # byte tokenizer (default) -> data/stdlib/byte/
    python data/stdlib/prepare.py --tokenizer=cl100k_base  # -> data/stdlib/cl100k_base/

The file list is sorted and the split is by file (every 20th file goes to val), so a given Python version
always gives the same token files. Different Python versions ship different stdlibs: compare val losses only
between runs prepared on the same Python version (meta.json records it).

`python train.py` calls prepare() itself when the default dataset is missing.

Expected output (CPython 3.11.7, byte tokenizer):
    stdlib of Python 3.11.7 at /root/.pyenv/versions/3.11.7/lib/python3.11: 612 files (582 train, 30 val), 10.7 MB
    wrote /work/main/data/stdlib/byte: train 10,302,939 tokens, val 401,585 tokens (byte, vocab 257, uint16)
(about 3 s on one CPU core)
"""
import argparse
import os
import platform
import sys
import sysconfig
import tokenize

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))  # repo root
from data.tokenizers import TOKENIZERS, dataset_path, write_dataset  # noqa: E402

# left out: installed packages, caches, test suites, and encodings/ (mostly machine-generated codec tables: 1.4 MB
# of "0x00e9: 0x0082,  #  LATIN SMALL LETTER E WITH ACUTE" that a small model would spend its capacity on)
SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test", "encodings"}
VAL_EVERY = 20  # every 20th file (in sorted order) is a validation file: ~5 % of the data, spread over the library


def stdlib_files():
    """Sorted list of the stdlib's .py files (deterministic: os.walk order is not, so sort both levels)."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)  # prune in place: os.walk then skips them
        files += [os.path.join(folder, n) for n in sorted(names) if n.endswith(".py")]
    return root, files


def read_source(path):
    # tokenize.open honours the file's "# -*- coding: ... -*-" line (a few stdlib files are not UTF-8)
    try:
        with tokenize.open(path) as f:
            return f.read()
    except (SyntaxError, UnicodeDecodeError):
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()


def prepare(data_dir, tokenizer="byte"):
    root, files = stdlib_files()
    val = [f for i, f in enumerate(files) if i % VAL_EVERY == VAL_EVERY - 1]
    train = [f for i, f in enumerate(files) if i % VAL_EVERY != VAL_EVERY - 1]
    mb = sum(os.path.getsize(f) for f in files) / 1e6
    print(f"stdlib of Python {platform.python_version()} at {root}: {len(files)} files "
          f"({len(train)} train, {len(val)} val), {mb:.1f} MB")
    return write_dataset(dataset_path(data_dir, "stdlib", tokenizer), tokenizer,
                         (read_source(f) for f in train), (read_source(f) for f in val),
                         source=f"Python {platform.python_version()} stdlib, {len(files)} files")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", default="byte", choices=TOKENIZERS)
    ap.add_argument("--data_dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."),
                    help="root of the prepared datasets (default: this data/ folder)")
    args = ap.parse_args()
    try:
        prepare(os.path.normpath(args.data_dir), args.tokenizer)
    except ValueError as e:
        sys.exit(f"error: {e}")
