"""Tests for vision.py (MiniMax-VL) and the synthetic shapes data.

    python -m pytest -q tests/test_vision.py

What is checked, and against what:
  * grid choice and token counts: a table computed by hand (MINIMAX01.md section 11 worked examples and more), and
    transformers' LLaVA-NeXT functions (select_best_resolution + the processor's unpadded-feature count) as an
    outside reference on thousands of random sizes;
  * tiles + thumbnail: re-assembled pixels equal the input exactly (sizes chosen so no resampling happens), the
    resize agrees with Pillow's bicubic on downscaling;
  * packing: newline after every row, thumbnail first, row-major order (expected sequence built by explicit
    loops), packed length == image_token_count (the closed form's slow twin), batched == per-image encoding;
  * the ViT against transformers' CLIPVisionModel with the same weights (fp64);
  * MiniMaxVL: features land on the placeholders in order, count mismatches raise, gradients reach the ViT,
    projector and newline, text-only rows are unaffected, cached generation == uncached, a tiny model overfits;
  * bad inputs: missing / unreadable / zero-size / huge images, bad caption files: clear ValueErrors.
"""
import json
import os
import random
import struct
import zlib

import numpy as np
import pytest
import torch

import vision
from data.shapes.shapes import COLOURS, MAX_ASPECT, SHAPES, ShapesDataset, parse_caption
from data.tokenizers import get_tokenizer
from model import MiniMax, MiniMaxConfig
from vision import (GRID_PINPOINTS, MiniMaxVL, VisionConfig, expand_image_tokens, from_tiles, image_token_count,
                    load_image, pack_image_features, preprocess_image, select_best_grid, vl_batch)


@pytest.fixture(autouse=True)
def one_thread():
    """Run each test on one CPU thread, then restore the setting. The tensors here are tiny (a 64-wide model):
    a second intra-op thread only adds synchronisation, and on a busy 2-core CI machine that spin-waiting made
    the overfit test 10x slower (70 s vs 5 s measured)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_vl(seed=0, dtype=torch.float32, **vision_kw):
    """A tiny text MiniMax (byte vocabulary padded to 320, image token 319) + the 28-px CPU ViT."""
    torch.manual_seed(seed)
    text = MiniMax(MiniMaxConfig.from_preset("tiny", vocab_size=320))
    return MiniMaxVL(text, VisionConfig.from_preset("vit-tiny-28", **vision_kw)).to(dtype)


def rand_image(h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)


def unnormalize(x):
    mean = torch.tensor(vision.CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(vision.CLIP_STD).view(3, 1, 1)
    return (x * std + mean) * 255


# -----------------------------------------------------------------------------
# grid choice and token counts

def test_grid_pinpoints_are_minimax_list():
    assert len(GRID_PINPOINTS) == 28
    assert all(r <= 6 and c <= 6 and r * c <= 18 for r, c in GRID_PINPOINTS)
    assert (6, 6) not in GRID_PINPOINTS and (4, 5) not in GRID_PINPOINTS and (6, 3) in GRID_PINPOINTS


# (h, w, grid, tokens) at 336-px tiles / 14-px patches (p = 24), computed by hand:
#   N = 576 + H'(W'+1), H = 24 rows, W = 24 cols; wide image (w/h > W/H): H' = H - 2*floor((H - floor(h W / w)) / 2)
TOKEN_TABLE = [
    (672, 672, (2, 2), 2928),     # MINIMAX01.md: exact 2x2 fit, 576 + 48*49
    (500, 1000, (2, 3), 3204),    # MINIMAX01.md: w=1000,h=500 -> 672x1008 canvas; H' = 48 - 2*6 = 36; 576 + 36*73
    (1000, 500, (3, 2), 3240),    # the transpose: W' = 48 - 2*floor((48 - 36)/2) = 36; 576 + 72*37
    (336, 336, (1, 1), 1176),     # one tile: 576 + 24*25
    (50, 100, (1, 1), 876),       # tiny image: every grid keeps all 5000 px, 1x1 wastes least; H' = 24 - 2*6 = 12
    (336, 2016, (1, 6), 4056),    # exact 1x6: 576 + 24*145
    (2000, 2000, (4, 4), 9888),   # 4x4 keeps 1344^2 px, more than any other grid; 576 + 96*97
    (2016, 1008, (6, 3), 11088),  # MINIMAX01.md upper bound, 6x3
    (1008, 2016, (3, 6), 11016),  # MINIMAX01.md upper bound, 3x6
    (600, 800, (2, 3), 3696),     # 2x3 keeps all; tall for the box: W' = 72 - 2*floor((72 - 64)/2) = 64; 576 + 48*65
    (700, 1000, (3, 3), 4226),    # 2x3 keeps only 960x672; 3x3 keeps all; H' = 72 - 2*11 = 50; 576 + 50*73
    (520, 1000, (2, 3), 3350),    # floor(520*72/1000) = 37, pad 5 each side -> H' = 38 (one padded row kept)
]


@pytest.mark.parametrize("h,w,grid,n", TOKEN_TABLE)
def test_token_count_table(h, w, grid, n):
    assert select_best_grid(h, w, 336) == grid
    assert image_token_count(h, w, 336, 14) == n


def test_token_count_matches_llava_next_reference():
    # transformers' LLaVA-NeXT functions are the outside reference (MiniMax-VL-01 reuses them); pinpoints in px
    from transformers.image_processing_utils import select_best_resolution
    from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor
    rng = random.Random(0)
    for tile, patch in ((336, 14), (28, 7)):
        p = tile // patch
        pins = [[r * tile, c * tile] for r, c in GRID_PINPOINTS]
        for _ in range(1000):
            h, w = rng.randint(1, 7 * tile), rng.randint(1, 7 * tile)
            H, W = select_best_resolution((h, w), pins)
            assert select_best_grid(h, w, tile) == (H // tile, W // tile), (h, w)
            # _get_unpadded_features does not use self
            feats, newlines = LlavaNextProcessor._get_unpadded_features(None, h, w, p, p, H // tile, W // tile)
            assert image_token_count(h, w, tile, patch) == p * p + feats + newlines, (h, w)


# -----------------------------------------------------------------------------
# tiles and thumbnail before encoding

def test_tiles_reassemble_exactly():
    t = 28
    # 56 x 84 fills a 2x3 grid exactly: no resize, no padding; tile k = rows r*t.., cols c*t.. with k = r*3 + c
    img = rand_image(56, 84)
    pim = preprocess_image(img, t, 7)
    assert pim.grid == (2, 3) and pim.pixel_values.shape == (7, 3, t, t)
    px = unnormalize(pim.pixel_values.double()).round()  # back to 0..255 (normalisation is invertible)
    for r in range(2):
        for c in range(3):
            assert torch.equal(px[1 + r * 3 + c], img[:, r * t:(r + 1) * t, c * t:(c + 1) * t].double())
    assert torch.equal(from_tiles(px[1:], 2, 3), img.double())
    # 40 x 56 goes into a 2x2 grid at scale 1 (the width fits exactly): black bands of 8 rows above and below
    img = rand_image(40, 56, seed=1)
    pim = preprocess_image(img, t, 7)
    assert pim.grid == (2, 2)
    canvas = from_tiles(unnormalize(pim.pixel_values[1:].double()).round(), 2, 2)  # (3, 56, 56)
    assert torch.equal(canvas[:, 8:48], img.double())
    assert canvas[:, :8].abs().max() == 0 and canvas[:, 48:].abs().max() == 0
    # the thumbnail of a t x t image is the image itself, and tile 1 of a 1x1 grid too
    img = rand_image(t, t, seed=2)
    pim = preprocess_image(img, t, 7)
    assert pim.grid == (1, 1)
    assert torch.equal(unnormalize(pim.pixel_values.double()).round(), img.double().expand(2, 3, t, t))


def test_resize_matches_pillow():
    from PIL import Image
    for (h, w, nh, nw) in ((100, 80, 37, 29), (97, 203, 56, 112), (60, 90, 120, 180), (30, 40, 336, 448)):
        # a smooth image (6x6 random colours, bilinearly enlarged), as photos are at this scale
        g = torch.Generator().manual_seed(h)
        img = torch.nn.functional.interpolate(torch.rand(1, 3, 6, 6, generator=g) * 255, size=(h, w),
                                              mode="bilinear")[0].round().to(torch.uint8)
        ours = vision.resize(img, nh, nw)
        pil = Image.fromarray(img.permute(1, 2, 0).numpy()).resize((nw, nh), Image.BICUBIC)
        ref = torch.from_numpy(np.asarray(pil).transpose(2, 0, 1).copy()).float()
        # torch's antialiased bicubic uses Pillow's filter (a = -0.5, support scaled when shrinking); both round
        # to 8 bits, Pillow also between its two passes -> at most 1 level apart. (On pixel noise, where bicubic
        # overshoots past 0..255, Pillow's clamp between passes makes differences of several levels.)
        assert (ours - ref).abs().max() <= 1, (h, w, nh, nw)


# -----------------------------------------------------------------------------
# packing the features

@pytest.mark.parametrize("h,w", [(40, 56), (56, 40), (30, 100), (84, 84), (20, 150)])
def test_newline_placement_and_order(h, w):
    tile, p = 28, 4
    rows, cols = select_best_grid(h, w, tile)
    P, D = p * p, 1
    n = 1 + rows * cols
    feats = torch.arange(n * P, dtype=torch.float64).view(n, P, D)  # every feature = its own index
    newline = torch.tensor([-1.0], dtype=torch.float64)
    out = pack_image_features(feats, (rows, cols), (h, w), newline)[:, 0].tolist()
    # expected, by explicit loops over the global patch map: position (R, C) lives in tile (R//p, C//p) at patch
    # (R%p, C%p); unpadding removes `pad` rows (wide image) or columns (tall image) on both sides
    H, W = p * rows, p * cols
    top = left = 0
    if w * H > h * W:
        top = (H - h * W // w) // 2
    else:
        left = (W - w * H // h) // 2
    expect = list(range(P))  # thumbnail first
    for R in range(top, H - top):
        for C in range(left, W - left):
            k = 1 + (R // p) * cols + C // p
            expect.append(k * P + (R % p) * p + C % p)
        expect.append(-1)  # newline after every row
    assert out == expect
    assert len(out) == image_token_count(h, w, tile, 7)


def test_packed_length_equals_token_count_and_batching():
    # image_token_count is a closed form; the slow twin is running the pipeline and counting what comes out
    m = tiny_vl(dtype=torch.float64)
    rng = random.Random(1)
    sizes = [(rng.randint(1, 200), rng.randint(1, 200)) for _ in range(12)] + [(1, 1), (28, 28), (1, 200)]
    ims = [m.process(rand_image(h, w, seed=i)) for i, (h, w) in enumerate(sizes)]
    with torch.no_grad():
        together = m.encode_images(ims)  # all tiles of all images in one ViT batch
        alone = [m.encode_images([im]) for im in ims]
    assert [a.shape[0] for a in alone] == [image_token_count(h, w, 28, 7) for h, w in sizes]
    # same math, different batch composition: fp64 agrees to rounding
    torch.testing.assert_close(together, torch.cat(alone), rtol=0, atol=1e-12)


def test_vit_matches_transformers_clip():
    from transformers import CLIPVisionConfig, CLIPVisionModel
    cfg = VisionConfig.from_preset("vit-tiny-28")
    torch.manual_seed(0)
    ours = vision.VisionTransformer(cfg).double()
    for p in ours.parameters():  # random everything (biases and norms too), not just the init
        torch.nn.init.normal_(p, std=0.3)
    hf = CLIPVisionModel(CLIPVisionConfig(
        hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, image_size=cfg.image_size, patch_size=cfg.patch_size,
        hidden_act="gelu", layer_norm_eps=cfg.layer_norm_eps)).double().eval()
    # the weight map: our names are CLIP's without its embeddings./encoder. (and, before transformers 5,
    # vision_model.) prefixes, so each of ours is the end of exactly one HF name
    theirs = list(hf.state_dict())
    sd = {}
    for k, v in ours.state_dict().items():
        (name,) = [t for t in theirs if t == k or t.endswith("." + k)]
        sd[name] = v
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and all("post_layernorm" in k or "position_ids" in k for k in missing), missing
    x = torch.randn(3, 3, 28, 28, dtype=torch.float64)
    ref = hf(pixel_values=x, output_hidden_states=True).hidden_states[-1][:, 1:]  # last layer, no post-LN, no CLS
    # fp64, same operations in a different order: agreement to ~1e-13 (tolerance leaves room for 2 layers)
    torch.testing.assert_close(ours(x), ref, rtol=0, atol=1e-10)


# -----------------------------------------------------------------------------
# MiniMaxVL: placeholders, gradients, text-only rows, generation, overfitting

def test_features_replace_placeholders_in_order():
    m = tiny_vl(dtype=torch.float64)
    ims = [m.process(rand_image(40, 56, seed=1)), m.process(rand_image(30, 20, seed=2))]
    tok = m.image_token_id
    ids = expand_image_tokens([5, tok, 6, 7, tok, 8], ims, tok)  # two images in one sample
    idx = torch.tensor([ids])
    with torch.no_grad():
        x = m.embed(idx, [ims])[0]
        feats = m.encode_images(ims)
        text = m.language_model.embed_tokens(idx)[0]
    is_img = idx[0] == tok
    assert int(is_img.sum()) == feats.shape[0] == ims[0].n_tokens + ims[1].n_tokens
    assert torch.equal(x[is_img], feats)  # image 1's tokens first, then image 2's
    assert torch.equal(x[~is_img], text[~is_img])


def test_placeholder_count_mismatch_is_a_clear_error():
    m = tiny_vl()
    im = m.process(rand_image(40, 56))
    tok = m.image_token_id
    good = expand_image_tokens([1, tok, 2], [im], tok)
    with pytest.raises(ValueError, match="has 1 image placeholder"):
        expand_image_tokens([1, tok, 2], [im, im], tok)  # fewer placeholders than images
    with pytest.raises(ValueError, match="has 2 image placeholder"):
        expand_image_tokens([tok, 1, tok], [im], tok)  # more placeholders than images
    with pytest.raises(ValueError, match="image placeholder tokens"):
        m(torch.tensor([good[:-3]]), images=[[im]])  # a truncated run
    with pytest.raises(ValueError, match="image placeholder tokens"):
        m(torch.tensor([good]), images=[[]])  # placeholders but no image
    with pytest.raises(ValueError, match="one list per batch row"):
        m(torch.tensor([good]), images=[[im], [im]])


def test_gradients_reach_vit_projector_and_newline():
    m = tiny_vl()
    enc = get_tokenizer("byte")
    ds = ShapesDataset("train", min_side=28, max_side=60)
    idx, targets, images = vl_batch([ds[0], ds[1]], enc, m)
    _, loss = m(idx, targets, images)
    loss.backward()
    for name, p in m.named_parameters():
        if not name.startswith("language_model."):
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_text_only_rows_work_and_are_unaffected_by_images():
    m = tiny_vl(dtype=torch.float64).eval()
    torch.manual_seed(1)
    idx = torch.randint(0, 256, (2, 12))
    targets = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        ref_logits, ref_loss = m.language_model(idx, targets)
        for images in (None, [[], []]):  # a text-only batch, both spellings
            logits, loss = m(idx, targets, images)
            torch.testing.assert_close(logits, ref_logits, rtol=0, atol=0)
            torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
        # a mixed batch: row 0 reads an image, row 1 is text only and must get the same logits as alone
        im = m.process(rand_image(40, 56))
        row0 = expand_image_tokens([3, m.image_token_id, 4], [im], m.image_token_id)
        row1 = idx[1].tolist() + [0] * (len(row0) - 12)
        logits, _ = m(torch.tensor([row0, row1]), images=[[im], []])
        # rows are independent (dropless MoE, per-row attention); fp64 summation order may differ slightly
        torch.testing.assert_close(logits[1, :12], ref_logits[1], rtol=0, atol=1e-10)


def test_generate_cached_equals_uncached():
    m = tiny_vl(dtype=torch.float64).eval()
    enc = get_tokenizer("byte")
    ims = [rand_image(40, 56, seed=3), rand_image(56, 30, seed=4)]
    idx, images = vision.caption_prompt_ids(enc, m, ims[0])
    fast = m.generate(idx, images, 12, temperature=0)
    slow = m.generate(idx, images, 12, temperature=0, use_cache=False)
    assert fast.shape == (1, 12) and torch.equal(fast, slow)
    assert not (fast == m.image_token_id).any()


def test_tiny_vl_overfits_a_few_synthetic_images():
    m = tiny_vl()
    enc = get_tokenizer("byte")
    ds = ShapesDataset("train", min_side=28, max_side=56)
    examples = [ds[i] for i in range(4)]
    idx, targets, images = vl_batch(examples, enc, m)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        _, loss = m(idx, targets, images)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # measured (seeds 0, 1, 2): 5.9 -> 0.35-0.37 after 40 steps
    assert losses[-1] < 0.1 * losses[0], losses
    # the captions must come from the images: give each caption another row's image and the text loss rises
    # (measured 0.32 -> 0.75 for seed 0, 0.33 -> 0.57 for seed 1). All 4 rows share the prompt, so without
    # looking at the image the model could not tell the captions apart.
    swapped = [(examples[(i + 1) % 4][0], examples[i][1]) for i in range(4)]
    with torch.no_grad():
        m(idx, targets, images)
        ce_right = m.last_stats["ce"].item()
        m(*vl_batch(swapped, enc, m))
        ce_swapped = m.last_stats["ce"].item()
    assert ce_swapped > 1.3 * ce_right, (ce_right, ce_swapped)


def test_vl_batch_targets_cover_text_only():
    m = tiny_vl()
    enc = get_tokenizer("byte")
    ds = ShapesDataset("val", min_side=28, max_side=56)
    examples = [ds[0], ds[1], ds[2]]
    idx, targets, images = vl_batch(examples, enc, m)
    for b, (img, caption) in enumerate(examples):
        n_img = images[b][0].n_tokens
        assert (idx[b, :n_img] == m.image_token_id).all() and idx[b, n_img] != m.image_token_id
        assert (targets[b, :n_img - 1] == -1).all()  # the next token is a placeholder: nothing to predict
        text = targets[b, n_img - 1:]
        text = text[text != -1].tolist()
        assert enc.decode(text[:-1]) == vision.CAPTION_PROMPT + " " + caption and text[-1] == enc.eot_token


# -----------------------------------------------------------------------------
# bad inputs

def _png_with_size(path, w, h):
    """A PNG whose header claims w x h (the pixel data is a real 1x1 image's): enough for a header check."""
    from PIL import Image
    Image.new("RGB", (1, 1)).save(path)
    data = bytearray(open(path, "rb").read())
    ihdr = data[12:16] + struct.pack(">II", w, h) + data[24:29]  # chunk type + new size + depth/colour/...
    data[16:24] = struct.pack(">II", w, h)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    open(path, "wb").write(bytes(data))


def test_bad_images_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_image(str(tmp_path / "nope.png"))
    bad = tmp_path / "notes.png"
    bad.write_text("this is not an image")
    with pytest.raises(ValueError, match="cannot read image file"):
        load_image(str(bad))
    huge = tmp_path / "huge.png"
    for side in (9000, 100_000):  # above our limit; above Pillow's decompression-bomb limit too
        _png_with_size(str(huge), side, side)
        with pytest.raises(ValueError, match="MAX_IMAGE_PIXELS"):
            load_image(str(huge))
    truncated = tmp_path / "truncated.png"
    from PIL import Image
    Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 90).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:60])
    with pytest.raises(ValueError, match="cannot (read|decode) image file"):
        load_image(str(truncated))
    with pytest.raises(ValueError, match="zero size"):
        preprocess_image(torch.zeros(3, 0, 10, dtype=torch.uint8), 28, 7)
    with pytest.raises(ValueError, match="zero size"):
        image_token_count(10, 0)
    with pytest.raises(ValueError, match="RGB image tensor"):
        preprocess_image(torch.zeros(10, 10, 3, dtype=torch.uint8), 28, 7)
    with pytest.raises(ValueError, match="MAX_IMAGE_PIXELS"):
        image_token_count(20_000, 20_000)


def test_caption_folder(tmp_path):
    from PIL import Image
    Image.fromarray(np.full((30, 50, 3), 200, np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.full((20, 20), 7, np.uint8)).save(tmp_path / "b.jpg")  # greyscale -> RGB
    (tmp_path / "captions.jsonl").write_text(json.dumps({"image": "a.png", "caption": "grey"}) + "\n\n" +
                                             json.dumps({"image": "b.jpg", "caption": "dark"}) + "\n")
    folder = vision.CaptionFolder(str(tmp_path))
    (img_a, cap_a), (img_b, cap_b) = folder[0], folder[1]
    assert len(folder) == 2 and cap_a == "grey" and cap_b == "dark"
    assert img_a.shape == (3, 30, 50) and img_a.dtype == torch.uint8 and int(img_a[0, 0, 0]) == 200
    assert img_b.shape == (3, 20, 20)
    # train.py's splits: every 10th line is 'val' (lines 10 and 20 of 25), the rest 'train'
    (tmp_path / "captions.jsonl").write_text("".join(json.dumps({"image": "a.png", "caption": f"c{k}"}) + "\n"
                                                     for k in range(1, 26)))
    assert [c for _, c in vision.CaptionFolder(str(tmp_path), "val").items] == ["c10", "c20"]
    assert len(vision.CaptionFolder(str(tmp_path), "train")) == 23
    (tmp_path / "captions.jsonl").write_text(json.dumps({"image": "a.png", "caption": "only"}) + "\n")
    with pytest.raises(ValueError, match="for the 'val' split"):
        vision.CaptionFolder(str(tmp_path), "val")
    (tmp_path / "captions.jsonl").write_text('{"image": "a.png"}\n')
    with pytest.raises(ValueError, match="line 1"):
        vision.CaptionFolder(str(tmp_path))
    with pytest.raises(ValueError, match="no captions.jsonl"):
        vision.CaptionFolder(str(tmp_path / "missing"))


# -----------------------------------------------------------------------------
# the synthetic data

def test_shapes_dataset_is_deterministic_and_captions_parse():
    a, b = ShapesDataset("train"), ShapesDataset("train")
    val = ShapesDataset("val")
    for i in range(30):
        img, caption, groups, objects = a.example(i)
        img2, caption2, _, _ = b.example(i)
        assert np.array_equal(img, img2) and caption == caption2
        assert parse_caption(caption) == groups
        assert all(c in COLOURS and s in SHAPES and 1 <= n <= 3 for n, c, s in groups)
        h, w, _ = img.shape
        assert 56 <= min(h, w) and max(h, w) <= 168 and max(h, w) / min(h, w) <= MAX_ASPECT + 0.1
        # objects: one per counted item, inside the image, and the pixel at each centre is painted in the colour
        # of its group (objects are drawn group by group, in caption order; colours are jittered by <= 15)
        colours = [COLOURS[c] for n, c, _ in groups for _ in range(n)]
        assert len(objects) == len(colours)
        for (cy, cx, r), rgb in zip(objects, colours):
            assert r <= cy <= h - r and r <= cx <= w - r
            assert np.abs(img[int(cy), int(cx)].astype(int) - rgb).max() <= 15
    assert not np.array_equal(a.example(0)[0], val.example(0)[0])  # the held-out split is another stream
    assert len(val) == 500
    with pytest.raises(IndexError):
        val.example(500)
    assert parse_caption("an orange circle and three blue diamonds") == [(1, "orange", "circle"),
                                                                         (3, "blue", "diamond")]
