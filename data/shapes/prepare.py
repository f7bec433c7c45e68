"""Write the synthetic shapes data to disk as a folder of PNGs + captions.jsonl, the same format as your own
image-caption data (vision.CaptionFolder reads it).

Training does not need this: data/shapes/shapes.py draws any item on the fly from (seed, split, index), and
train.py reads it directly. The files are for looking at the data, for `sample.py --image`, and as a worked
example of the folder format:

    data/shapes/val/00000.png ...              the first --n held-out images
    data/shapes/val/captions.jsonl             {"image": "00000.png", "caption": "two blue squares"} per line

    python data/shapes/prepare.py                  # 500 held-out images, ~5 s
    python data/shapes/prepare.py --split=train --n=1000 --out=/tmp/shapes_train

Expected output:
    wrote 500 images + captions.jsonl to data/shapes/val (sides 56-168 px, 7.6 MB)
"""
import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", ".."))  # repo root
from data.shapes.shapes import SPLITS, ShapesDataset  # noqa: E402


def prepare(out, split="val", n=500, seed=1337):
    from PIL import Image
    ds = ShapesDataset(split, size=n, seed=seed)
    os.makedirs(out, exist_ok=True)
    lines, nbytes = [], 0
    for i in range(n):
        img, caption, _, _ = ds.example(i)
        name = f"{i:05d}.png"
        Image.fromarray(img).save(os.path.join(out, name))
        nbytes += os.path.getsize(os.path.join(out, name))
        lines.append(json.dumps({"image": name, "caption": caption}))
    with open(os.path.join(out, "captions.jsonl.tmp"), "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(os.path.join(out, "captions.jsonl.tmp"), os.path.join(out, "captions.jsonl"))  # written last
    print(f"wrote {n} images + captions.jsonl to {os.path.relpath(out)} (sides {ds.min_side}-{ds.max_side} px, "
          f"{nbytes / 1e6:.1f} MB)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--split", default="val", choices=list(SPLITS))
    ap.add_argument("--n", type=int, default=500, help="how many items (the first n of the split)")
    ap.add_argument("--seed", type=int, default=1337, help="data seed (the default is the one train.py and "
                    "bench/vl_eval.py use; 'val' never overlaps 'train' whatever the seed)")
    ap.add_argument("--out", default=None, help="output folder (default: data/shapes/<split>)")
    args = ap.parse_args()
    prepare(args.out or os.path.join(HERE, args.split), args.split, args.n, args.seed)
