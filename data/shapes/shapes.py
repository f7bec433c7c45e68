"""Synthetic shapes: an image-caption dataset drawn with numpy, so the vision-language model has something to
learn offline and a held-out score that means something (bench/vl_eval.py).

Each image has a light, slightly noisy background and one or two groups of identical objects (same shape, same
colour), 1-4 objects in all, placed without overlap. Sizes and aspect ratios vary (sides 56-168 px, up to 3:1),
so with 56-px tiles the dynamic-resolution grid ranges from 1x1 to 3x3 and 1x3 / 3x1. Captions:
    "a red circle on the left"           (one object: its horizontal third is named)
    "three yellow triangles"
    "two blue squares and a green diamond"
Groups are listed in a fixed order (shape, then colour, as in SHAPES and COLOURS), so the caption is a function
of the image.

Everything is a function of (seed, split, index): example(i) gives the same image on every machine, and the
'train' and 'val' splits draw from different random streams, so held-out images are never trained on.

    from data.shapes.shapes import ShapesDataset
    ds = ShapesDataset("val")           # 500 held-out items
    img, caption = ds[0]                # (3, h, w) uint8 tensor, str
    python data/shapes/prepare.py       # writes the held-out split as PNGs + captions.jsonl
"""
import re

import numpy as np
import torch

SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30),
           "purple": (150, 60, 190), "orange": (245, 140, 30)}
NUMBERS = ("a", "two", "three", "four")  # "a" becomes "an" before a vowel
SPLITS = {"train": 0, "val": 1}
MIN_SIDE, MAX_SIDE, MAX_ASPECT = 56, 168, 3.0


def draw_shape(img, shape, cy, cx, r, colour):
    """Paint one filled shape of 'radius' r (half its width) centred at (cy, cx) onto img (H, W, 3) uint8."""
    H, W, _ = img.shape
    y0, y1 = max(0, int(cy - r) - 1), min(H, int(cy + r) + 2)  # only the shape's bounding box is touched
    x0, x1 = max(0, int(cx - r) - 1), min(W, int(cx + r) + 2)
    y, x = np.mgrid[y0:y1, x0:x1]
    dy, dx = (y - cy) / r, (x - cx) / r  # unit coordinates: the shape lives in [-1, 1]^2
    if shape == "circle":
        mask = dx**2 + dy**2 <= 1
    elif shape == "square":
        mask = (np.abs(dx) <= 0.85) & (np.abs(dy) <= 0.85)  # 0.85: about the area of the circle
    elif shape == "triangle":  # pointing up: apex at dy=-1, base at dy=+0.8
        mask = (dy <= 0.8) & (np.abs(dx) <= (dy + 1) / 1.8)
    elif shape == "diamond":
        mask = np.abs(dx) + np.abs(dy) <= 1.1
    else:
        raise ValueError(f"unknown shape {shape}")
    img[y0:y1, x0:x1][mask] = colour


def number(n, word):
    """'a', 'an', 'two', ... for n objects whose next word is `word`."""
    return "an" if n == 1 and word[0] in "aeiou" else NUMBERS[n - 1]


def make_example(rng, min_side=MIN_SIDE, max_side=MAX_SIDE):
    """One (image (H, W, 3) uint8 numpy, caption, groups, objects) from a numpy Generator.
    groups: [(n, colour, shape)] in caption order; objects: [(cy, cx, r)] the pixel centre and 'radius' (half the
    width) of every object drawn, in drawing order (bench/vl_eval.py uses them to tell which ones a tile cuts)."""
    aspect = np.exp(rng.uniform(-np.log(MAX_ASPECT), np.log(MAX_ASPECT)))  # w / h, log-uniform
    long_side = int(rng.integers(min_side, max_side + 1))
    h, w = (long_side, long_side * aspect) if aspect < 1 else (long_side / aspect, long_side)
    h, w = max(min_side, int(h)), max(min_side, int(w))
    bg = rng.integers(190, 245, size=3).astype(np.int16)  # a light background colour, then +-10 pixel noise
    img = (bg + rng.integers(-10, 11, size=(h, w, 3), dtype=np.int16)).astype(np.uint8)  # stays in 180..254
    # groups: one or two distinct (colour, shape) pairs, 1-4 objects in all
    n_groups = 1 if rng.random() < 0.5 else 2
    pairs = set()
    while len(pairs) < n_groups:
        pairs.add((int(rng.integers(len(SHAPES))), int(rng.integers(len(COLOURS)))))
    pairs = sorted(pairs)  # caption order: shape, then colour
    counts = [int(rng.integers(1, 3 if n_groups == 2 else 4)) for _ in pairs]
    # place objects without overlap (rejection sampling on bounding circles); shrink if the image is crowded
    # radius: objects at least ~1.2 ViT patches across at 56-px tiles / 14-px patches, so shapes are visible
    r = rng.uniform(0.2, 0.3) * min(h, w) * (0.75 if sum(counts) > 2 else 1.0)
    placed = []  # (cy, cx, r)
    for (s, c), n in zip(pairs, counts):
        colour = np.clip(np.array(list(COLOURS.values())[c]) + rng.integers(-15, 16, size=3), 0, 255)
        for _ in range(n):
            while True:
                cy, cx = rng.uniform(r + 1, h - r - 1), rng.uniform(r + 1, w - r - 1)
                if all((cy - py) ** 2 + (cx - px) ** 2 > (1.1 * (r + pr)) ** 2 for py, px, pr in placed):
                    break
                r *= 0.98  # crowded: shrink a little and try again (terminates: r -> 0 always fits)
            placed.append((cy, cx, r))
            draw_shape(img, SHAPES[s], cy, cx, r, colour)
    groups = [(n, list(COLOURS)[c], SHAPES[s]) for (s, c), n in zip(pairs, counts)]
    caption = " and ".join(f"{number(n, col)} {col} {shp}{'s' if n > 1 else ''}" for n, col, shp in groups)
    if sum(counts) == 1:
        third = int(3 * placed[0][1] / w)
        caption += (" on the left", " in the middle", " on the right")[min(third, 2)]
    return img, caption, groups, placed


def parse_caption(text):
    """The (count, colour, shape) groups named in a caption, in order; words outside the grammar are ignored."""
    pattern = rf"\b(an|{'|'.join(NUMBERS)}) ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})s?\b"
    return [(1 if n == "an" else NUMBERS.index(n) + 1, c, s) for n, c, s in re.findall(pattern, text)]


class ShapesDataset:
    """Items (image (3, h, w) uint8 tensor, caption). 'train' is as long as you like; 'val' is the held-out set."""

    def __init__(self, split="train", size=None, seed=1337, min_side=MIN_SIDE, max_side=MAX_SIDE):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
        if not 0 < min_side <= max_side:
            raise ValueError(f"need 0 < min_side <= max_side, got {min_side}, {max_side}")
        self.split, self.seed, self.min_side, self.max_side = split, seed, min_side, max_side
        self.size = size if size is not None else (10**9 if split == "train" else 500)

    def __len__(self):
        return self.size

    def example(self, i):
        """(image (h, w, 3) uint8 numpy, caption, groups, objects) for item i (make_example): the same on every
        machine."""
        if not 0 <= i < self.size:
            raise IndexError(f"item {i} out of range for the {self.size}-item '{self.split}' split")
        return make_example(np.random.default_rng([self.seed, SPLITS[self.split], i]), self.min_side, self.max_side)

    def __getitem__(self, i):
        img, caption, _, _ = self.example(i)
        return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))), caption  # (3, h, w)
