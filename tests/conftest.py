"""Shared pytest set-up for nanoMiniMax.

Run the whole suite from the repo root with:  python -m pytest -q tests

Without a GPU, the Triton kernels run in Triton's CPU interpreter. Triton reads TRITON_INTERPRET when a kernel
is decorated (at import of lightning_attn.py), so it must be set here, before any test module imports project
code. On a CUDA machine the real kernels are compiled and tested instead.
"""
import json
import os
import runpy
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# the project is a flat set of files at the repo root (no package): make them importable from tests/
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


# ---- helpers shared by the script tests (test_train.py, test_vl_scripts.py): from conftest import ... -------------


def run_inproc(script, args, capsys):
    """Run train.py / sample.py in this process (runpy) -> (exit code, stdout, stderr)."""
    argv, cwd = sys.argv, os.getcwd()
    sys.argv = [script] + list(args)
    os.chdir(ROOT)
    code = 0
    try:
        runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = argv
        os.chdir(cwd)
    out = capsys.readouterr()
    return code, out.out, out.err


def losses(out_dir):
    """The per-step training losses and the evals from out_dir/metrics.jsonl."""
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    keys = [(r["kind"], r["step"]) for r in records]
    assert len(keys) == len(set(keys)), f"duplicate records in metrics.jsonl: {keys}"
    steps = {r["step"]: r["loss"] for r in records if r["kind"] == "step"}
    evals = {r["step"]: (r["train_loss"], r["val_loss"]) for r in records if r["kind"] == "eval"}
    return steps, evals
