"""Your own text: one file, or a folder of files (read recursively), becomes a dataset.

    python data/text/prepare.py --input=notes.txt                       # -> dataset 'notes' (byte tokenizer)
    python data/text/prepare.py --input=~/src/myproject --name=myproj --tokenizer=cl100k_base
    python train.py --dataset=myproj --tokenizer=cl100k_base

Every readable UTF-8 file under a folder is one document (hidden files/folders and files that are not UTF-8
text, e.g. images, are skipped), in sorted path order. The split: with 20 or more documents every 10th one goes
to val; otherwise all text is joined and the last 10 % of the characters (cut at a line break) is val.

Expected output (`--input=data --data_dir=/tmp/d`: this repo's own data/ folder as a toy input):
    data/text: 6 documents, 0.0 MB from data
    wrote /tmp/d/data/byte: train 17,229 tokens, val 1,934 tokens (byte, vocab 257, uint16)
"""
import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", ".."))  # repo root
from data.tokenizers import TOKENIZERS, dataset_path, write_dataset  # noqa: E402

VAL_EVERY = 10


def read_documents(path):
    """[(path, text)] for a file, or for every UTF-8 text file below a folder (sorted, hidden entries skipped)."""
    if os.path.isfile(path):
        paths = [path]
    elif os.path.isdir(path):
        paths = []
        for folder, dirs, names in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            paths += [os.path.join(folder, n) for n in sorted(names) if not n.startswith(".")]
    else:
        raise ValueError(f"--input {path} does not exist")
    docs = []
    for p in paths:
        try:
            with open(p, encoding="utf-8") as f:
                text = f.read()
        except (UnicodeDecodeError, OSError):
            continue  # binary or unreadable: not text
        if text and "\x00" not in text:
            docs.append((p, text))
    if not docs:
        raise ValueError(f"no UTF-8 text found in {path}")
    return docs


def prepare(data_dir, input_path, name=None, tokenizer="byte"):
    input_path = os.path.expanduser(input_path)
    name = name or os.path.splitext(os.path.basename(os.path.normpath(input_path)))[0]
    docs = [text for _, text in read_documents(input_path)]
    print(f"data/text: {len(docs)} documents, {sum(map(len, docs)) / 1e6:.1f} MB from {input_path}")
    if len(docs) >= 2 * VAL_EVERY:
        train = [d for i, d in enumerate(docs) if i % VAL_EVERY != VAL_EVERY - 1]
        val = [d for i, d in enumerate(docs) if i % VAL_EVERY == VAL_EVERY - 1]
    else:
        text = "\n".join(docs)
        cut = text.rfind("\n", 0, int(0.9 * len(text))) + 1 or int(0.9 * len(text))  # no line break: cut anywhere
        train, val = [text[:cut]], [text[cut:]]
    return write_dataset(dataset_path(data_dir, name, tokenizer), tokenizer, train, val, source=input_path)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", required=True, help="a text file or a folder of text files")
    ap.add_argument("--name", default=None, help="dataset name for train.py --dataset (default: the input's name)")
    ap.add_argument("--tokenizer", default="byte", choices=TOKENIZERS)
    ap.add_argument("--data_dir", default=os.path.join(HERE, ".."), help="root of the prepared datasets")
    args = ap.parse_args()
    try:
        prepare(os.path.normpath(args.data_dir), args.input, args.name, args.tokenizer)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
