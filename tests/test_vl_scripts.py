"""
MiniMax-VL through the real scripts: train.py with vision=... and sample.py --image.

    python -m pytest -q tests/test_vl_scripts.py        (CPU, ~1 minute on 2 cores)

tests/test_vision.py checks vision.py's pieces in isolation; here the scripts run as a user runs them (subprocess
for the main path, runpy in this process for the short and the failing runs, as tests/test_train.py does). Data:
a folder of 20 small synthetic-shapes PNGs with captions.jsonl (the caption-folder path; 28-56 px images, so
the 28-px-tile CPU ViT 'vit-tiny-28' sees 1-4 tiles), and one short run on dataset=shapes itself. Model: the
'tiny' text preset shrunk to 2 layers of width 32, as in tests/test_train.py.

Exactness claims checked here (CPU, one thread):
  * stop at step 2 + --resume to step 4 == 4 steps in one go: losses, evals and final weights bitwise equal (the
    images of a batch are chosen by an RNG seeded with (seed, step, micro-batch), as text windows are);
  * torchrun with 2 processes x 1 micro-batch == 1 process x 2 micro-batches (same global batch);
  * sample.py --image --temperature=0 prints the caption MiniMaxVL.generate produces (same tokens);
  * freeze_vision: the ViT of the saved checkpoint is bitwise its initial weights; init_from: the language
    model starts from the text checkpoint's weights.
"""
import json
import os
import runpy
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from conftest import losses, run_inproc  # noqa: E402
from data.tokenizers import StreamDecoder, get_tokenizer, write_dataset  # noqa: E402

MODEL_KW = "hidden_size=32,num_hidden_layers=2,intermediate_size=32,num_attention_heads=2,head_dim=16"
SMALL = [f"--model_kw={MODEL_KW}", "--batch_size=4", "--gradient_accumulation_steps=2", "--eval_iters=2",
         "--eval_interval=2", "--log_interval=1", "--lr_decay_iters=4", "--weight_decay=0"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")  # the same thread count in every run: CPU kernels are then bitwise


@pytest.fixture(autouse=True)
def one_thread():
    """In-process runs on one thread too, so they are bitwise comparable with the OMP_NUM_THREADS=1 subprocesses."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run(args):
    p = subprocess.run(args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"exit {p.returncode}\n--- stdout\n{p.stdout[-3000:]}\n--- stderr\n{p.stderr[-3000:]}"
    return p


def load(out_dir):
    return torch.load(os.path.join(out_dir, "ckpt.pt"), weights_only=True)


@pytest.fixture(scope="module")
def captions(tmp_path_factory):
    """A caption folder: 20 synthetic shapes images (28-56 px) as PNGs + captions.jsonl (18 train, 2 val)."""
    from PIL import Image
    from data.shapes.shapes import ShapesDataset
    d = tmp_path_factory.mktemp("captions")
    ds = ShapesDataset("train", min_side=28, max_side=56)
    lines = []
    for i in range(20):
        img, caption, _, _ = ds.example(i)
        Image.fromarray(img).save(d / f"{i:02d}.png")
        lines.append(json.dumps({"image": f"{i:02d}.png", "caption": caption}))
    (d / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return str(d)


def vl_args(captions):
    return ["--vision=vit-tiny-28", f"--dataset={captions}", *SMALL]


@pytest.fixture(scope="module")
def baseline(captions, tmp_path_factory):
    """4 uninterrupted VL steps (2 micro-batches of 4 images each; eval + checkpoint at steps 2 and 4)."""
    out = str(tmp_path_factory.mktemp("vl_baseline"))
    p = run([sys.executable, "train.py", *vl_args(captions), f"--out_dir={out}", "--max_iters=4"])
    assert "vision vit-tiny-28" in p.stdout and "18 train / 2 val image-caption pairs" in p.stdout
    return out


@pytest.fixture(scope="module")
def text_ckpt(tmp_path_factory):
    """A real text checkpoint to start a VL run from: 2 steps of train.py on a tiny byte dataset, seed 7 (so its
    weights differ from the seed-1337 initialisation the VL runs draw)."""
    d = tmp_path_factory.mktemp("text")
    docs = [f"def f{i}(x):\n    return x * {i}\n" for i in range(200)]
    write_dataset(str(d / "tiny" / "byte"), "byte", docs[:180], docs[180:])
    args = [f"--data_dir={d}", "--dataset=tiny", f"--model_kw={MODEL_KW}", "--seq_len=32", "--batch_size=2",
            "--max_iters=2", "--eval_iters=1", "--seed=7", f"--out_dir={d / 'out'}"]
    argv, cwd = sys.argv, os.getcwd()
    sys.argv = ["train.py"] + args
    os.chdir(ROOT)
    try:
        runpy.run_path(os.path.join(ROOT, "train.py"), run_name="__main__")  # in this process: no start-up cost
    finally:
        sys.argv = argv
        os.chdir(cwd)
    return str(d / "out" / "ckpt.pt")


# ---- end to end ------------------------------------------------------------------------------------------------


def test_train_resume_exact_then_sample(captions, baseline, tmp_path, capsys):
    import vision
    ckpt = load(baseline)
    assert ckpt["vision_config"] == asdict(vision.VisionConfig.from_preset("vit-tiny-28"))
    assert ckpt["model_config"]["vocab_size"] == 320 and ckpt["tokenizer"]["name"] == "byte"  # 257 + 1 -> 320
    assert any(k.startswith("vision_tower.") for k in ckpt["model"])
    steps, evals = losses(baseline)
    assert sorted(steps) == [0, 1, 2, 3] and sorted(evals) == [0, 2, 4]
    # stop after 2 steps, resume to 4: the same losses and weights, bitwise
    out = str(tmp_path / "split")
    code, _, err = run_inproc("train.py", [*vl_args(captions), f"--out_dir={out}", "--max_iters=2"], capsys)
    assert code == 0, err
    code, stdout, err = run_inproc("train.py", [f"--out_dir={out}", "--resume", "--max_iters=4"], capsys)
    assert code == 0 and "resuming" in stdout, err
    assert losses(out) == losses(baseline)
    resumed = load(out)
    assert resumed["vision_config"] == ckpt["vision_config"]
    for k, v in ckpt["model"].items():
        assert torch.equal(v, resumed["model"][k]), k
    # sample.py --image: greedy caption == MiniMaxVL.generate's tokens, decoded the way sample.py prints them
    image = os.path.join(captions, "00.png")
    p = run([sys.executable, "sample.py", f"--out_dir={baseline}", f"--image={image}", "--temperature=0",
             "--num_samples=1", "--max_new_tokens=16"])
    assert "sample 1/1" in p.stdout and "tokens/s" in p.stdout and "image tokens" in p.stderr
    model = vision.vl_from_checkpoint(ckpt).eval()
    enc = get_tokenizer("byte")
    idx, images = vision.caption_prompt_ids(enc, model, vision.load_image(image))
    tokens = model.generate(idx, images, 16, temperature=0, stop_token=enc.eot_token)[0].tolist()
    tokens = tokens[:tokens.index(enc.eot_token)] if enc.eot_token in tokens else tokens
    dec = StreamDecoder(enc)
    caption = "".join(dec([t]) for t in tokens) + dec.flush()
    assert f"{vision.CAPTION_PROMPT}{caption}\n" in p.stdout, (caption, p.stdout)


def test_ddp_two_processes_match_one(captions, baseline, tmp_path):
    """torchrun, 2 CPU processes (gloo) x 1 micro-batch == 1 process x 2 micro-batches: each rank draws global
    micro-batch g = micro_step * world + rank, so the global batch is the same images. Tolerance as in
    tests/test_train.py: the gradient halves are added in another place (DDP's all-reduce), exact in practice."""
    out = str(tmp_path / "ddp")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    run(torchrun + ["train.py", *vl_args(captions), f"--out_dir={out}", "--max_iters=4"])
    (steps, evals), (steps_ref, evals_ref) = losses(out), losses(baseline)
    assert sorted(steps) == sorted(steps_ref) and sorted(evals) == sorted(evals_ref)
    for s in steps:
        assert steps[s] == pytest.approx(steps_ref[s], rel=1e-6, abs=0)
    for s in evals:
        assert evals[s] == pytest.approx(evals_ref[s], rel=1e-6, abs=0)


def test_data_workers_change_nothing_but_time(captions, baseline, tmp_path):
    """--data_workers=2: the images are decoded in 2 forked processes, the next micro-batch while this one trains.
    The batches are a function of (seed, split, step, g), so the losses are bitwise those of the baseline."""
    out = str(tmp_path / "workers")
    run([sys.executable, "train.py", *vl_args(captions), f"--out_dir={out}", "--max_iters=4", "--data_workers=2"])
    assert losses(out) == losses(baseline)


def test_init_from_text_checkpoint_and_freeze_vision(captions, text_ckpt, tmp_path, capsys):
    """init_from loads the text run's weights into the language model; freeze_vision keeps the ViT at its initial
    weights (bitwise) while the projector trains."""
    import vision
    from model import MiniMax, MiniMaxConfig
    lr = 1e-3
    out = str(tmp_path / "init")
    code, stdout, err = run_inproc("train.py", [*vl_args(captions), f"--out_dir={out}", "--max_iters=2",
                                                f"--init_from={text_ckpt}", "--freeze_vision",
                                                f"--learning_rate={lr}", "--warmup_iters=0"], capsys)
    assert code == 0 and "language model initialised from" in stdout and "ViT frozen" in stdout, err
    vl = load(out)
    text = torch.load(text_ckpt, weights_only=True)["model"]
    # the initial weights: train.py seeds 1337 and builds text model, then vision side
    torch.manual_seed(1337)
    fresh = vision.MiniMaxVL(MiniMax(MiniMaxConfig(**vl["model_config"])),
                             vision.VisionConfig(**vl["vision_config"])).state_dict()
    for k, v in vl["model"].items():
        if k.startswith("vision_tower."):
            assert torch.equal(v, fresh[k]), k  # frozen: not one bit moved
        elif k.startswith("language_model."):
            # 2 AdamW steps (no weight decay) move a weight by at most ~lr each (Adam's step is ~lr * sign(grad)
            # at the start); the seed-7 text weights and the seed-1337 init differ by ~0.1-1 (init scale)
            w = text[k.removeprefix("language_model.")]
            assert (v - w).abs().max() <= 2.5 * lr, k
    proj = "multi_modal_projector.linear_2.weight"
    assert not torch.equal(vl["model"][proj], fresh[proj])  # the projector did train
    assert (fresh["language_model.embed_tokens.weight"] - text["embed_tokens.weight"]).abs().max() > 0.1
    # a text checkpoint of another shape: a clear error naming the difference
    code, _, err = run_inproc("train.py", ["--vision=vit-tiny-28", f"--dataset={captions}", f"--out_dir={tmp_path / 'x'}",
                                           f"--model_kw={MODEL_KW.replace('hidden_size=32', 'hidden_size=48')}",
                                           f"--init_from={text_ckpt}"], capsys)
    assert code != 0 and "its model config differs" in err and "hidden_size" in err and "model_kw=" in err


def test_shapes_dataset_run(tmp_path, capsys):
    """dataset=shapes: images drawn on the fly (56-168 px; 56-px tiles -> 36-172 image tokens)."""
    out = str(tmp_path / "shapes")
    code, stdout, err = run_inproc("train.py", ["--vision=vit-tiny-28", "--vision_kw=image_size=56,patch_size=14",
                                                "--dataset=shapes", f"--model_kw={MODEL_KW}", "--batch_size=2",
                                                "--max_iters=1", "--eval_iters=1", f"--out_dir={out}"], capsys)
    assert code == 0 and "500 val image-caption pairs" in stdout, err
    assert load(out)["vision_config"]["image_size"] == 56
    # bench/vl_eval.py on that checkpoint: captions, scores and the breakdown of the first 4 held-out images
    code, stdout, err = run_inproc("bench/vl_eval.py", [f"--ckpt={out}/ckpt.pt", "--n=4", "--show=4",
                                                        "--device=cpu"], capsys)
    assert code == 0, err
    assert stdout.count("true: ") == 4 and "held-out shapes, 4 images: shape+colour" in stdout
    assert "shape+colour by group (56-px tiles): " in stdout and "cut" in stdout


def test_vl_eval_scoring_and_tile_cuts():
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import vl_eval
    # score: (shape+colour set, + counts, exact); group order in the caption does not matter for the first two
    assert vl_eval.score("two blue squares and a red circle", "a red circle and two blue squares") == \
        (True, True, False)
    assert vl_eval.score("a red circle and a blue square", "a red circle and two blue squares") == (True, False, False)
    assert vl_eval.score("a red square", "a red circle") == (False, False, False)
    assert vl_eval.score("a red circle", "a red circle") == (True, True, True)
    # objects_cut, by hand. A 56 x 84 (h x w) image at 56-px tiles: grid 1x2 (112 px wide), no resize, centred
    # with 14 px of padding on the left; so a 10-px object centred at x = 42 spans canvas x 51..61 and crosses
    # the edge at 56, while one at x = 30 (canvas 39..49) does not
    assert vl_eval.objects_cut([(28, 42, 5)], 56, 84, 56) == 1
    assert vl_eval.objects_cut([(28, 30, 5)], 56, 84, 56) == 0
    # 112 x 112: grid 2x2, no resize or padding; edges at 56 in both directions; touching an edge is not crossing
    assert vl_eval.objects_cut([(56, 30, 5), (28, 28, 5), (80, 80, 20), (28, 46, 10)], 112, 112, 56) == 1
    # 40 x 40: grid 1x1, upscaled to 56: nothing can be cut
    assert vl_eval.objects_cut([(20, 20, 19)], 40, 40, 56) == 0


# ---- bad input: a clear message and a non-zero exit ------------------------------------------------------------


def test_sample_errors(captions, baseline, text_ckpt, tmp_path, capsys):
    code, _, err = run_inproc("sample.py", [f"--out_dir={baseline}", f"--image={tmp_path / 'nope.png'}"], capsys)
    assert code != 0 and "--image: image file" in err and "does not exist" in err
    (tmp_path / "notes.png").write_text("not an image")
    code, _, err = run_inproc("sample.py", [f"--out_dir={baseline}", f"--image={tmp_path / 'notes.png'}"], capsys)
    assert code != 0 and "cannot read image file" in err
    image = os.path.join(captions, "00.png")
    code, _, err = run_inproc("sample.py", [f"--ckpt={text_ckpt}", f"--image={image}"], capsys)
    assert code != 0 and "needs a MiniMax-VL checkpoint" in err and "text-only" in err
    code, _, err = run_inproc("sample.py", [f"--out_dir={baseline}"], capsys)
    assert code != 0 and "is a MiniMax-VL checkpoint: pass --image=" in err
    code, _, err = run_inproc("sample.py", [f"--out_dir={baseline}", f"--image={image}", "--prompt=<image> twice"],
                              capsys)
    assert code != 0 and "--prompt:" in err and "placeholder" in err
    assert "Traceback" not in err


def test_train_errors(captions, baseline, tmp_path, capsys):
    out = f"--out_dir={tmp_path / 'o'}"
    for args, msg in [
        (["--vision=vit-tiny-28", "--ep=2"], "not ep/sp > 1"),
        (["--vision=vit-tiny-28", "--compile"], "compile=false"),
        (["--vision=vit-huge", f"--dataset={captions}"], "unknown vision preset 'vit-huge'"),
        (["--vision=vit-tiny-28"], "should be 'shapes' (synthetic) or a folder with captions.jsonl"),
        (["--vision=vit-tiny-28", f"--dataset={captions}", "--vision_kw=image_token_id=5"], "real token"),
        (["--vision=vit-tiny-28", f"--dataset={captions}", "--init_from=/no/such/ckpt.pt"], "cannot read it"),
        ([f"--dataset={captions}", "--freeze_vision"], "set vision=... too"),
        # the shipped config parses (names and types) and gets as far as the data check
        (["config/train_vl_shapes.py", "--dataset=/no/such/folder"], "should be 'shapes'"),
    ]:
        code, _, err = run_inproc("train.py", args + [out], capsys)
        assert code != 0 and msg in err, (args, err)
    code, _, err = run_inproc("train.py", [f"--out_dir={baseline}", "--resume", "--vision_kw=num_hidden_layers=3"],
                              capsys)
    assert code != 0 and "was trained with vision_kw=" in err
    code, _, err = run_inproc("train.py", ["--vision=vit-tiny-28", f"--dataset={captions}",
                                           f"--init_from={os.path.join(baseline, 'ckpt.pt')}", out], capsys)
    assert code != 0 and "is a MiniMax-VL checkpoint" in err
    assert "Traceback" not in err
