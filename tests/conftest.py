"""Shared pytest set-up for nanoMiniMax.

Run the whole suite from the repo root with:  python -m pytest -q tests

Without a GPU, the Triton kernels run in Triton's CPU interpreter. Triton reads TRITON_INTERPRET when a kernel
is decorated (at import of lightning_attn.py), so it must be set here, before any test module imports project
code. On a CUDA machine the real kernels are compiled and tested instead.
"""
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# the project is a flat set of files at the repo root (no package): make them importable from tests/
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
