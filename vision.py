"""MiniMax-VL: a ViT reads an image at dynamic resolution, an MLP projects its patch features into the text model's
width, and the projected tokens replace image placeholders in the text ("ViT-MLP-LLM").

References
    MiniMax-01 technical report, arXiv 2501.08313, §6 (MiniMax-VL-01), and ../shared/MINIMAX01.md §11.
    LLaVA-NeXT "anyres" (grid choice, unpadding, image_newline), whose processing MiniMax-VL-01 reuses.
    CLIP ViT-L/14 (Radford et al. 2021) for the encoder layout; module names follow Hugging Face's
    CLIPVisionModel / LLaVA-NeXT so weights map one to one (see tests/test_vision.py, which checks the ViT
    against transformers' CLIPVisionModel).

The pipeline for one image of h x w pixels (t = tile size, 336 for the real model; p = t / patch = 24):
    1. choose the grid (rows x cols of t-pixel tiles) from GRID_PINPOINTS that keeps the most resolution
    2. resize keeping the aspect ratio to fit rows*t x cols*t, pad (black, centred) and cut into rows*cols tiles
    3. thumbnail: the whole image squashed to t x t
    4. ViT over thumbnail + tiles in one batch, CLS dropped -> p*p features each, projector -> text width
    5. pack: thumbnail features first, then the tiles glued back into a (p*rows) x (p*cols) map, the rows or
       columns that came from padding cut away ("unpad"), a learned newline vector after every row, flattened
    image_token_count(h, w) gives the length of that sequence without running anything.

How to run
    python -m pytest -q tests/test_vision.py            # CPU, under a minute
    python train.py config/train_vl_shapes.py           # train on the synthetic shapes data (data/shapes/)
    python sample.py --image some.png --prompt "Describe the image:"
    python bench/vl_eval.py --ckpt out-vl-shapes/ckpt.pt  # held-out shape+colour accuracy

Letters: B batch, T tokens, D text width (hidden_size), V ViT width, P patches per tile (p*p), N image tokens.
Images are torch uint8 tensors (3, H, W) (RGB); files are decoded with Pillow (load_image).
"""
import json
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# config

# MiniMax-VL-01's 28 allowed tile layouts (rows, cols): every side <= 6 tiles (2016 px) and <= 18 tiles in all,
# so 4x5, 5x4 and up are missing and 6x6 (2016 x 2016) is not a candidate. Order matters only for exact ties.
GRID_PINPOINTS = tuple((r, c) for r in range(1, 7) for c in range(1, 7) if r * c <= 18)
assert len(GRID_PINPOINTS) == 28

# OpenAI-CLIP pixel statistics, used by MiniMax-VL-01's processor
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# A decoded image above this many pixels is refused (an 8192 x 8192 photo is 67 M pixels; the largest grid only
# keeps 2016 x 2016 of it anyway). Pillow's own "decompression bomb" guard trips later, at ~179 M.
MAX_IMAGE_PIXELS = 2**26


@dataclass
class VisionConfig:
    image_size: int = 28            # tile side in pixels (336 for MiniMax-VL-01)
    patch_size: int = 7             # ViT patch side; image_size must be a multiple
    num_channels: int = 3
    hidden_size: int = 32           # V, ViT width
    intermediate_size: int = 64     # ViT MLP hidden
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    layer_norm_eps: float = 1e-5
    projector_hidden_size: int = 0  # 0 -> the text width D (MiniMax-VL-01: 6144 = D)
    image_token_id: int = -1        # placeholder id in the text; -1 -> the text model's last vocab id
    max_grid_tiles: int = 18        # drop pinpoints with more tiles (18 keeps MiniMax's full list)

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} must be a multiple of patch_size {self.patch_size}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} must be divisible by num_attention_heads "
                             f"{self.num_attention_heads}")

    @property
    def grids(self):
        return tuple(g for g in GRID_PINPOINTS if g[0] * g[1] <= self.max_grid_tiles)

    @classmethod
    def from_preset(cls, name, **kw):
        if name not in VISION_PRESETS:
            raise ValueError(f"unknown vision preset '{name}'; choose one of {', '.join(VISION_PRESETS)}")
        return cls(**{**VISION_PRESETS[name], **kw})


VISION_PRESETS = {
    # MiniMax-VL-01's ViT-L/14 at 336 px: 303.5M parameters, 576 patches per tile
    "vit-l-14-336": dict(image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096,
                         num_hidden_layers=24, num_attention_heads=16),
    # CPU tests: 28-px tiles of 7-px patches (16 patches per tile), 22k parameters
    "vit-tiny-28": dict(image_size=28, patch_size=7, hidden_size=32, intermediate_size=64,
                        num_hidden_layers=2, num_attention_heads=2),
    # the synthetic-shapes run: 56-px tiles of 14-px patches (16 per tile), 3.3M parameters
    "vit-small-56": dict(image_size=56, patch_size=14, hidden_size=256, intermediate_size=1024,
                         num_hidden_layers=4, num_attention_heads=4),
}


# -----------------------------------------------------------------------------
# dynamic resolution: pure functions on pixel tensors and sizes

def check_image_size(h, w):
    """Raise a ValueError for an image nothing sensible can be done with."""
    if h <= 0 or w <= 0:
        raise ValueError(f"image has zero size ({w} x {h} pixels, w x h); pass a non-empty image")
    if h * w > MAX_IMAGE_PIXELS:
        raise ValueError(f"image is {w} x {h} = {h * w:,} pixels, above MAX_IMAGE_PIXELS = {MAX_IMAGE_PIXELS:,}; "
                         f"downscale it first (the largest grid keeps at most 2016 x 2016 pixels anyway)")


def select_best_grid(h, w, tile, grids=GRID_PINPOINTS):
    """LLaVA-NeXT's choice: the (rows, cols) whose rows*tile x cols*tile canvas keeps the most pixels of the image
    after an aspect-preserving fit (never counting more than the image has: upscaling gains nothing), and among
    those the one that wastes the least canvas area. Ties go to the earlier entry of `grids`."""
    check_image_size(h, w)
    best, best_eff, best_waste = None, -1, None
    for rows, cols in grids:
        H, W = rows * tile, cols * tile
        scale = min(W / w, H / h)
        eff = min(int(w * scale) * int(h * scale), w * h)
        waste = H * W - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (rows, cols), eff, waste
    return best


def fit_size(h, w, H, W):
    """Size (new_h, new_w) of an h x w image fitted into H x W keeping the aspect ratio: the long side (relative
    to the box) fills the box, the other is floored, as MiniMax-VL-01's processor does (LLaVA-NeXT uses ceil)."""
    if w * H > h * W:  # wider than the box: full width, shorter height (integer form of w/h > W/H)
        return max(1, h * W // w), W
    return H, max(1, w * H // h)


def resize(img, h, w):
    """Bicubic, antialiased resize of a (C, H, W) image (uint8 or float in [0, 255]) to (C, h, w) float, rounded
    and clamped to [0, 255] as an 8-bit image library would store it."""
    x = img[None].float()  # (1, C, H, W)
    if tuple(x.shape[-2:]) != (h, w):
        x = F.interpolate(x, size=(h, w), mode="bicubic", antialias=True, align_corners=False)
    return x[0].round().clamp(0, 255)


def resize_and_pad(img, H, W):
    """Fit a (3, h, w) image into an H x W canvas keeping its aspect ratio, centred, black elsewhere (pad offset
    floor((H - new_h) / 2) on top / left, the rest bottom / right)."""
    new_h, new_w = fit_size(img.shape[1], img.shape[2], H, W)
    canvas = torch.zeros(img.shape[0], H, W, device=img.device)  # black = 0 before normalisation
    top, left = (H - new_h) // 2, (W - new_w) // 2
    canvas[:, top:top + new_h, left:left + new_w] = resize(img, new_h, new_w)
    return canvas


def to_tiles(canvas, tile):
    """(C, rows*t, cols*t) -> (rows*cols, C, t, t), tiles in row-major order."""
    C, H, W = canvas.shape
    rows, cols = H // tile, W // tile
    x = canvas.reshape(C, rows, tile, cols, tile).permute(1, 3, 0, 2, 4)  # (rows, cols, C, t, t)
    return x.reshape(rows * cols, C, tile, tile)


def from_tiles(tiles, rows, cols):
    """Inverse of to_tiles: (rows*cols, C, t, t) -> (C, rows*t, cols*t). Used on pixels (tests) and on ViT
    feature maps (t = patches per side), so the image and its features are glued back the same way."""
    n, C, th, tw = tiles.shape
    x = tiles.reshape(rows, cols, C, th, tw).permute(2, 0, 3, 1, 4)  # (C, rows, th, cols, tw)
    return x.reshape(C, rows * th, cols * tw)


def normalize(x):
    """[0, 255] pixels (..., 3, H, W) -> CLIP-normalised floats."""
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(3, 1, 1)
    return (x / 255.0 - mean) / std


@dataclass
class ProcessedImage:
    pixel_values: torch.Tensor  # (1 + rows*cols, 3, t, t) normalised; thumbnail first, then tiles row-major
    grid: tuple                 # (rows, cols)
    size: tuple                 # original (h, w)
    n_tokens: int               # image placeholders it fills in the text (= image_token_count(h, w, ...))


def preprocess_image(img, tile, patch, grids=GRID_PINPOINTS):
    """A (3, h, w) uint8 image -> ProcessedImage for the ViT (steps 1-3 of the module docstring)."""
    if not (isinstance(img, torch.Tensor) and img.ndim == 3 and img.shape[0] == 3):
        raise ValueError(f"expected an RGB image tensor (3, H, W), got "
                         f"{tuple(img.shape) if isinstance(img, torch.Tensor) else type(img).__name__}")
    h, w = img.shape[1], img.shape[2]
    rows, cols = select_best_grid(h, w, tile, grids)  # also checks the size
    tiles = to_tiles(resize_and_pad(img, rows * tile, cols * tile), tile)  # (rows*cols, 3, t, t)
    thumb = resize(img, tile, tile)[None]  # (1, 3, t, t): squashed, not aspect-preserving, as MiniMax-VL-01 does
    pixel_values = normalize(torch.cat([thumb, tiles]))
    return ProcessedImage(pixel_values, (rows, cols), (h, w), image_token_count(h, w, tile, patch, grids))


def unpadded_size(h, w, H, W):
    """Rows and columns (H', W') of the H x W patch map that keep image content, for an h x w original:
    LLaVA-NeXT removes floor((H - floor(h*W/w)) / 2) rows from top and bottom each (or columns, for tall
    images). Computed on the patch grid, so it can keep a patch row that is partly padding."""
    if w * H > h * W:
        pad = (H - h * W // w) // 2
        return H - 2 * pad, W
    pad = (W - w * H // h) // 2
    return H, W - 2 * pad


def image_token_count(h, w, tile=336, patch=14, grids=GRID_PINPOINTS):
    """Number of placeholder tokens an h x w image takes: p*p thumbnail features, then the unpadded
    (p*rows) x (p*cols) map with one newline per row. 672x672 at 336/14 -> 2x2 grid -> 576 + 48*49 = 2928."""
    rows, cols = select_best_grid(h, w, tile, grids)
    p = tile // patch
    Hp, Wp = unpadded_size(h, w, p * rows, p * cols)
    return p * p + Hp * (Wp + 1)


def pack_image_features(feats, grid, size, newline):
    """Step 5: feats (1 + rows*cols, P, D) projected ViT features of one image -> (N, D) in text order."""
    rows, cols = grid
    n, P, D = feats.shape
    p = math.isqrt(P)
    thumb = feats[0]  # (P, D)
    tiles = feats[1:].transpose(1, 2).reshape(rows * cols, D, p, p)  # (rows*cols, D, p, p), patches row-major
    fmap = from_tiles(tiles, rows, cols)  # (D, p*rows, p*cols)
    Hp, Wp = unpadded_size(size[0], size[1], p * rows, p * cols)
    top, left = (p * rows - Hp) // 2, (p * cols - Wp) // 2  # the cut is symmetric (unpadded_size removes 2*pad)
    fmap = fmap[:, top:top + Hp, left:left + Wp]  # (D, H', W')
    nl = newline.to(fmap.dtype).view(D, 1, 1).expand(D, Hp, 1)
    fmap = torch.cat([fmap, nl], dim=2)  # (D, H', W'+1): newline closes every row
    return torch.cat([thumb, fmap.flatten(1).t()])  # (P + H'*(W'+1), D)


# -----------------------------------------------------------------------------
# the ViT (CLIP layout, pre-norm, no post-layernorm: MiniMax-VL-01 takes the last layer's output as is)

class VisionAttention(nn.Module):
    """Multi-head self-attention over the 1 + P tokens of one tile, no mask, scale 1/sqrt(head dim)."""

    def __init__(self, cfg):
        super().__init__()
        V = cfg.hidden_size
        self.n_head = cfg.num_attention_heads
        self.q_proj = nn.Linear(V, V)
        self.k_proj = nn.Linear(V, V)
        self.v_proj = nn.Linear(V, V)
        self.out_proj = nn.Linear(V, V)

    def forward(self, x):
        B, T, V = x.shape
        q, k, v = (proj(x).view(B, T, self.n_head, V // self.n_head).transpose(1, 2)  # (B, H, T, V/H)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v)  # bidirectional: every patch sees every patch of its tile
        return self.out_proj(y.transpose(1, 2).reshape(B, T, V))


class VisionMLP(nn.Module):

    def __init__(self, cfg):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU


class VisionBlock(nn.Module):

    def __init__(self, cfg):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = VisionAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)

    def forward(self, x):
        # pre-norm: each sub-layer reads a normalised copy and adds to the untouched residual stream, so the
        # stream's scale grows with depth (CLIP has no final norm on the features MiniMax-VL uses)
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionTransformer(nn.Module):
    """(n, 3, t, t) normalised tiles -> (n, P, V) features of the last layer, CLS dropped."""

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        V, P = cfg.hidden_size, (cfg.image_size // cfg.patch_size) ** 2
        # CLIP's patch embedding has no bias (the class/position embeddings that follow would absorb it)
        self.patch_embedding = nn.Conv2d(cfg.num_channels, V, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(V))
        self.position_embedding = nn.Embedding(P + 1, V)  # learned, absolute; index 0 is the class token
        self.pre_layrnorm = nn.LayerNorm(V, eps=cfg.layer_norm_eps)  # (sic) CLIP's name, kept for weight mapping
        self.layers = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, pixel_values):
        n = pixel_values.shape[0]
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # (n, V, p, p)
        x = x.flatten(2).transpose(1, 2)  # (n, P, V), patches row-major
        cls = self.class_embedding.to(x.dtype).expand(n, 1, -1)  # (n, 1, V)
        x = torch.cat([cls, x], dim=1) + self.position_embedding.weight.to(x.dtype)  # (n, 1+P, V)
        x = self.pre_layrnorm(x)  # CLIP's extra LayerNorm on the embeddings, before the first block
        for block in self.layers:
            x = block(x)
        return x[:, 1:]  # (n, P, V): CLS dropped, no post-layernorm


class MultiModalProjector(nn.Module):
    """Two-layer MLP from the ViT width into the text width: Linear -> GELU -> Linear, with biases."""

    def __init__(self, vision_size, hidden, text_size):
        super().__init__()
        self.linear_1 = nn.Linear(vision_size, hidden)
        self.linear_2 = nn.Linear(hidden, text_size)

    def forward(self, x):
        return self.linear_2(F.gelu(self.linear_1(x)))


# -----------------------------------------------------------------------------
# the vision-language model

class MiniMaxVL(nn.Module):
    """A text MiniMax (model.py) + ViT + projector + newline. The text holds `image_token_id` repeated
    n_tokens times per image (expand_image_tokens); forward overwrites those embeddings with the packed image
    features, in order, and runs the text model on the embeddings."""

    def __init__(self, text_model, vision_config):
        super().__init__()
        D = text_model.config.hidden_size
        V = text_model.config.vocab_size
        self.vision_config = vision_config
        self.image_token_id = vision_config.image_token_id if vision_config.image_token_id >= 0 else V - 1
        if not 0 <= self.image_token_id < V:
            raise ValueError(f"image_token_id {self.image_token_id} is outside the text vocabulary (0..{V - 1})")
        self.language_model = text_model
        self.vision_tower = VisionTransformer(vision_config)
        self.multi_modal_projector = MultiModalProjector(vision_config.hidden_size,
                                                         vision_config.projector_hidden_size or D, D)
        self.image_newline = nn.Parameter(torch.zeros(D))  # learned, lives in the text embedding space
        self.init_vision_weights()

    @torch.no_grad()
    def init_vision_weights(self):
        """Initialise the vision side (the text model initialises itself):
            tensor                                    init
            patch_embedding, every nn.Linear weight    normal(0, 0.02)
            every nn.Linear bias                       zeros
            class_embedding                            normal(0, V^-0.5)
            position_embedding                         normal(0, 0.02)
            LayerNorm weight / bias                    ones / zeros
            image_newline                              normal(0, D^-0.5)  (LLaVA-NeXT's scale)
        """
        for m in list(self.vision_tower.modules()) + list(self.multi_modal_projector.modules()):
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        vt = self.vision_tower
        nn.init.normal_(vt.class_embedding, std=vt.class_embedding.numel() ** -0.5)
        nn.init.normal_(vt.position_embedding.weight, std=0.02)
        nn.init.normal_(self.image_newline, std=self.image_newline.numel() ** -0.5)

    @property
    def last_stats(self):
        """The text model's training-log numbers of the last forward with targets (see MiniMax.forward)."""
        return self.language_model.last_stats

    def process(self, img):
        """(3, h, w) uint8 image -> ProcessedImage for this model's tile and patch size."""
        c = self.vision_config
        return preprocess_image(img, c.image_size, c.patch_size, c.grids)

    def encode_images(self, images):
        """List of ProcessedImage -> (sum of n_tokens, D). Every tile and thumbnail of every image goes through
        the ViT and the projector as one batch."""
        pixels = torch.cat([im.pixel_values for im in images])  # (n_tiles, 3, t, t)
        # tiles never see each other (each is its own ViT sequence): batching them is free parallelism
        feats = self.multi_modal_projector(self.vision_tower(pixels))  # (n_tiles, P, D)
        # the projector is per token, so projecting before packing equals packing then projecting; the
        # newline vector is added after projection because it lives in the text space
        out, i = [], 0
        for im in images:
            n = 1 + im.grid[0] * im.grid[1]
            out.append(pack_image_features(feats[i:i + n], im.grid, im.size, self.image_newline))
            i += n
        return torch.cat(out)  # (N, D)

    def embed(self, idx, images=None):
        """Text embeddings (B, T, D) of idx with the image placeholders replaced by image features.
        images: one list of ProcessedImage per row of idx (an empty list for a text-only row), or None."""
        B, T = idx.shape
        x = self.language_model.embed_tokens(idx)  # (B, T, D)
        images = [[] for _ in range(B)] if images is None else images
        if len(images) != B:
            raise ValueError(f"images must hold one list per batch row: got {len(images)} lists for {B} rows")
        is_img = idx == self.image_token_id  # (B, T)
        have = is_img.sum(1).tolist()  # host sync: one small copy per batch, for the check below
        for b, row in enumerate(images):
            need = sum(im.n_tokens for im in row)
            if have[b] != need:
                raise ValueError(
                    f"batch row {b} has {have[b]} image placeholder tokens (id {self.image_token_id}) but its "
                    f"{len(row)} image(s) need {need} ({[im.n_tokens for im in row]}). Build the ids with "
                    f"expand_image_tokens, with exactly one placeholder per image, in order.")
        flat = [im for row in images for im in row]
        if not flat:
            return x  # a text-only batch: the vision side is not run (and gets no gradient)
        feats = self.encode_images(flat).to(x.dtype)  # (N, D)
        # masked_scatter fills the masked positions in (b, t) order, which is the order the images were listed
        return x.masked_scatter(is_img.unsqueeze(-1), feats)

    def forward(self, idx, targets=None, images=None):
        """(logits (B, T, vocab), loss or None), as MiniMax.forward. Targets at positions whose next token is
        an image placeholder, and at padding, must be -1 (vl_batch does this)."""
        return self.language_model(None, targets=targets, inputs_embeds=self.embed(idx, images))

    @torch.no_grad()
    def generate(self, idx, images, max_new_tokens, temperature=1.0, top_k=None, stop_token=None, use_cache=True):
        """Continue idx (B, T) (placeholders already expanded) after reading `images` (one list per row).
        Returns the new tokens (B, <= max_new_tokens); temperature 0 = greedy; stops early once every row has
        produced stop_token. Uses the model in its current mode (call model.eval() first).

        The prompt, image features included, is embedded once and prefilled into the text model's cache (KV for
        softmax layers, a fixed-size state for lightning layers); then one token per step from the cache.
        use_cache=False is the slow twin: every step re-runs the text model over the whole embedded sequence."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        lm = self.language_model
        x = self.embed(idx, images)  # (B, T, D)
        cache = lm.new_cache(idx.shape[0], idx.shape[1] + max_new_tokens) if use_cache else None
        logits, _ = lm(None, inputs_embeds=x, cache=cache)  # prefill, (B, T, vocab)
        new = []
        for step in range(max_new_tokens):
            logits = logits[:, -1, :].float()  # (B, vocab)
            logits[:, self.image_token_id] = -float("inf")  # never emit a placeholder: it has no image behind it
            if temperature == 0:
                tok = logits.argmax(-1, keepdim=True)  # (B, 1)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]  # (B, 1)
                    logits = logits.masked_fill(logits < kth, -float("inf"))
                tok = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)  # (B, 1)
            new.append(tok)
            if step == max_new_tokens - 1:
                break
            if stop_token is not None and bool((torch.cat(new, 1) == stop_token).any(1).all()):  # host sync
                break
            if use_cache:
                logits, _ = lm(tok, cache=cache)  # one token through the cache, (B, 1, vocab)
            else:
                x = torch.cat([x, lm.embed_tokens(tok)], dim=1)  # (B, T + step + 1, D)
                logits, _ = lm(None, inputs_embeds=x)
        return torch.cat(new, dim=1)


def vl_from_checkpoint(ckpt, device="cpu"):
    """Rebuild a MiniMaxVL from a checkpoint dict: 'model_config' (MiniMaxConfig fields), 'vision_config'
    (VisionConfig fields) and 'model' (MiniMaxVL.state_dict(), loaded strictly)."""
    from model import MiniMax, MiniMaxConfig
    if "vision_config" not in ckpt:
        raise ValueError("this checkpoint has no 'vision_config': it is a text-only model, not a MiniMax-VL one")
    with torch.device("meta"):  # no memory, no init work: every weight is overwritten by the load
        m = MiniMaxVL(MiniMax(MiniMaxConfig(**ckpt["model_config"])), VisionConfig(**ckpt["vision_config"]))
    m.to_empty(device=device)  # allocate (MiniMax recomputes its constant buffers here)
    m.load_state_dict(ckpt["model"], strict=True)
    return m


# -----------------------------------------------------------------------------
# processor: text + images -> ids, targets and ProcessedImages

IMAGE_MARK = "<image>"  # where an image goes in a prompt string
CAPTION_PROMPT = "Describe the image:"


def tokenize_with_images(enc, text, image_token_id):
    """Encode `text`, turning every "<image>" into ONE image_token_id (expand_image_tokens widens it)."""
    if image_token_id < enc.n_vocab:
        raise ValueError(f"image_token_id {image_token_id} is a real token of the '{enc.name}' tokenizer (ids < "
                         f"{enc.n_vocab}); build the text model with vocab_size > {enc.n_vocab} so its last id "
                         f"is free for the image placeholder")
    ids = []
    for i, piece in enumerate(text.split(IMAGE_MARK)):
        if i:
            ids.append(image_token_id)
        ids += enc.encode_ordinary(piece)
    return ids


def expand_image_tokens(ids, images, image_token_id):
    """Replace the k-th single placeholder in `ids` with images[k].n_tokens copies of it."""
    n_marks = sum(1 for t in ids if t == image_token_id)
    if n_marks != len(images):
        raise ValueError(f"the text has {n_marks} image placeholder(s) but {len(images)} image(s) were given; "
                         f"put exactly one '{IMAGE_MARK}' in the prompt per image")
    out, k = [], 0
    for t in ids:
        if t == image_token_id:
            out += [image_token_id] * images[k].n_tokens
            k += 1
        else:
            out.append(t)
    return out


def vl_batch(examples, enc, model, prompt=CAPTION_PROMPT, device="cpu"):
    """Captioning examples [(image (3, h, w) uint8, caption str), ...] -> (idx (B, T), targets (B, T), images)
    for model(idx, targets, images). Each row reads "<image>" + prompt + " " + caption + <|endoftext|>; rows are
    right-padded. Targets are the next token, or -1 where that token is an image placeholder or padding, so
    the loss covers text only. Images are resized on `device` (the GPU, when training there)."""
    rows, images = [], []
    for img, caption in examples:
        im = model.process(img.to(device))
        ids = tokenize_with_images(enc, IMAGE_MARK + prompt + " " + caption, model.image_token_id)
        rows.append(expand_image_tokens(ids, [im], model.image_token_id) + [enc.eot_token])
        images.append([im])
    T = max(len(r) for r in rows) - 1
    idx = torch.full((len(rows), T), enc.eot_token, dtype=torch.long)
    targets = torch.full((len(rows), T), -1, dtype=torch.long)
    for b, r in enumerate(rows):
        r = torch.tensor(r, dtype=torch.long)
        idx[b, :len(r) - 1] = r[:-1]
        targets[b, :len(r) - 1] = torch.where(r[1:] == model.image_token_id, -1, r[1:])
    return idx.to(device), targets.to(device), images


def caption_prompt_ids(enc, model, img, prompt=CAPTION_PROMPT, device="cpu"):
    """What sample.py feeds generate for one image: (idx (1, T), [[ProcessedImage]])."""
    im = model.process(img.to(device))
    ids = tokenize_with_images(enc, IMAGE_MARK + prompt, model.image_token_id)
    ids = expand_image_tokens(ids, [im], model.image_token_id)
    return torch.tensor([ids], dtype=torch.long, device=device), [[im]]


# -----------------------------------------------------------------------------
# image files: decoding with Pillow, and a folder of images + captions.jsonl

def load_image(path):
    """Decode an image file with Pillow -> (3, h, w) uint8 RGB tensor. Clear ValueErrors for a missing or
    unreadable file and for a zero-size or huge image (checked from the header, before decoding)."""
    from PIL import Image, ImageOps  # imported here so the model itself does not need Pillow
    if not os.path.isfile(path):
        raise ValueError(f"image file {path} does not exist")
    try:
        im = Image.open(path)  # reads the header only
    except Image.DecompressionBombError as e:  # Pillow's own guard, at ~179 M pixels
        raise ValueError(f"image file {path} is huge ({e}); images above MAX_IMAGE_PIXELS = {MAX_IMAGE_PIXELS:,} "
                         f"are refused: downscale it first") from None
    except Exception as e:  # UnidentifiedImageError, OSError ...
        raise ValueError(f"cannot read image file {path}: {type(e).__name__}: {e}") from None
    with im:
        w, h = im.size
        check_image_size(h, w)
        try:
            im = ImageOps.exif_transpose(im).convert("RGB")  # camera rotation applied; grey/RGBA/palette -> RGB
        except Exception as e:  # truncated or corrupt pixel data
            raise ValueError(f"cannot decode image file {path}: {type(e).__name__}: {e}") from None
    return torch.from_numpy(np.ascontiguousarray(np.asarray(im).transpose(2, 0, 1)))  # (h, w, 3) -> (3, h, w)


class CaptionFolder:
    """A folder of images with captions.jsonl: one JSON object per line, {"image": "relative/path.png",
    "caption": "..."}. Items are (image (3, h, w) uint8, caption), decoded on access.
    split: None = every line; 'val' = every 10th line (lines 10, 20, ... of the file, blank lines not counted)
    and 'train' = the others, the same rule as data/text/prepare.py (train.py trains and evaluates on these)."""

    def __init__(self, folder, split=None):
        path = os.path.join(folder, "captions.jsonl")
        if not os.path.isfile(path):
            raise ValueError(f"{folder} has no captions.jsonl (one line per image: "
                             f'{{"image": "a.png", "caption": "..."}})')
        self.items = []
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    d = json.loads(line)
                    self.items.append((os.path.join(folder, d["image"]), str(d["caption"])))
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ValueError(f"{path} line {n} is not a JSON object with 'image' and 'caption' ({e})")
        if split is not None:
            if split not in ("train", "val"):
                raise ValueError(f"split must be None, 'train' or 'val', got {split!r}")
            self.items = [it for k, it in enumerate(self.items) if (k % 10 == 9) == (split == "val")]
        if not self.items:
            raise ValueError(f"{path} lists no images" + (f" for the '{split}' split (every 10th line is "
                                                          f"'val')" if split else ""))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, caption = self.items[i]
        return load_image(path), caption
