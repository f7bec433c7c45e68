"""
Tests for bench/paper_claims.py (hybrid vs softmax vs lightning): the task generators and the smallest setting
end to end on CPU.

    python -m pytest -q tests/test_paper_claims.py        (~30 s on 2 CPU cores)

What "pass" means: every MQAR answer can be read off the context (its key occurs exactly once, followed by the
answer) and the loss sits on the answers only; key, value and filler ids never overlap; the passkey probe has
the asked length and its answer positions line up with the digits; both generators are pure functions of the
seed; the three variants' configs differ in layer_pattern alone; and `--budget=ci` writes results.json, three
well-formed SVG figures and LM checkpoints that `--parts=passkey` reloads to the same answers.
"""
import json
import math
import os
import sys
import xml.etree.ElementTree as ET
from dataclasses import asdict

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import paper_claims as pc  # noqa: E402

K, V, FILL = pc.MQAR_KEYS, pc.MQAR_VALUES, pc.MQAR_FILLER


# -----------------------------------------------------------------------------
# MQAR


@pytest.mark.parametrize("T,P", [(16, 4), (64, 8), (257, 16), (1024, 64), (2048, 128)])
def test_mqar_answers_recoverable_from_context(T, P):
    idx, targets = pc.make_mqar(np.random.default_rng(0), 8, T, P)
    assert idx.shape == targets.shape == (8, T) and idx.dtype == targets.dtype == np.int64
    for x, y in zip(idx, targets):
        ctx_keys, ctx_values = x[0:2 * P:2], x[1:2 * P:2]
        assert len(set(ctx_keys.tolist())) == P  # distinct keys: every query has exactly one answer
        answers = np.flatnonzero(y >= 0)
        assert len(answers) == P  # loss on the P answers only, -1 elsewhere
        assert (answers >= 2 * P).all()  # queries come after the whole context
        assert sorted(x[answers].tolist()) == sorted(ctx_keys.tolist())  # each key asked exactly once
        lookup = dict(zip(ctx_keys.tolist(), ctx_values.tolist()))
        for p in answers:
            assert y[p] == lookup[x[p]]  # the answer is the value stored with that key in the context
            assert x[p + 1] == y[p]  # next-token convention: the value follows its query key


def test_mqar_ranges_disjoint():
    idx, targets = pc.make_mqar(np.random.default_rng(1), 16, 512, 32)
    P = 32
    keys = np.concatenate([idx[:, 0:2 * P:2].ravel(), idx[targets >= 0]])
    values = np.concatenate([idx[:, 1:2 * P:2].ravel(), targets[targets >= 0]])
    is_query_pair = np.zeros_like(idx, dtype=bool)
    is_query_pair[:, :2 * P] = True
    rows, cols = np.nonzero(targets >= 0)
    is_query_pair[rows, cols] = is_query_pair[rows, cols + 1] = True
    filler = idx[~is_query_pair]
    assert ((0 <= keys) & (keys < K)).all()
    assert ((K <= values) & (values < K + V)).all()
    assert ((K + V <= filler) & (filler < K + V + FILL)).all() and len(filler) > 0
    assert idx.max() < pc.MQAR_VOCAB


def test_mqar_deterministic_by_seed():
    a = pc.make_mqar(np.random.default_rng(7), 4, 128, 8)
    b = pc.make_mqar(np.random.default_rng(7), 4, 128, 8)
    c = pc.make_mqar(np.random.default_rng(8), 4, 128, 8)
    assert all(np.array_equal(u, w) for u, w in zip(a, b))
    assert not np.array_equal(a[0], c[0])
    # the training batches of the script: same (seed, step) -> same batch for every variant
    spec = pc.BUDGETS["ci"]["mqar"]
    x1, y1 = pc.mqar_batch(spec, 3, 6, 1337, "cpu")
    x2, y2 = pc.mqar_batch(spec, 3, 6, 1337, "cpu")
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert (x1.shape[1], int((y1[0] >= 0).sum())) in set(pc.mqar_combos(spec))


@pytest.mark.parametrize("budget", sorted(pc.BUDGETS))
def test_mqar_curriculum_short_rows_first(budget):
    """The first short_frac of the steps draw only rows <= short_len; afterwards every length shows up."""
    c = dict(pc.BUDGETS[budget]["mqar"], tokens_per_step=256)  # small batches: only the lengths are checked
    steps = 200
    first = math.ceil(c["short_frac"] * steps)
    early = {pc.mqar_batch(c, s, steps, 0, "cpu")[0].shape[1] for s in range(first)}
    late = {pc.mqar_batch(c, s, steps, 0, "cpu")[0].shape[1] for s in range(first, steps)}
    assert max(early) <= c["short_len"] and min(c["lengths"]) in early
    assert late == {T for T, _ in pc.mqar_combos(c)}  # 120+ draws over <= 8 lengths: all seen (seeded)


def test_mqar_bad_sizes_raise():
    with pytest.raises(ValueError, match="do not fit"):
        pc.make_mqar(np.random.default_rng(0), 2, 60, 16)  # needs T >= 64
    with pytest.raises(ValueError, match="distinct"):
        pc.make_mqar(np.random.default_rng(0), 2, 4096, K + 1)


# -----------------------------------------------------------------------------
# passkey


def byte_encode(s):
    return list(s.encode())  # the byte tokenizer of data/tokenizers.py: id = byte value


@pytest.mark.parametrize("T,depth", [(64, 0.0), (300, 0.5), (1000, 0.9), (1000, 1.0)])
def test_passkey_length_and_answer(T, depth):
    filler = np.frombuffer(b"def f(x):\n    return x + 1\n" * 200, dtype=np.uint8).astype(np.uint16)
    idx, pos, ans = pc.make_passkey(np.random.default_rng(3), filler, T, depth, byte_encode)
    assert idx.shape == (T,) and idx.dtype == np.int64
    text = bytes(idx.tolist()).decode()
    digits = bytes(ans.tolist()).decode()
    assert len(digits) == 5 and digits.isdigit()
    assert text.endswith(pc.PASSKEY_PREFIX + digits)  # the prompt ends with the question, then the answer
    assert text.count(pc.PASSKEY_PREFIX + digits + "\n") == 1  # the needle, once
    assert np.array_equal(idx[pos + 1], ans)  # logits at pos predict exactly the answer tokens
    needle_at = text.index(pc.PASSKEY_PREFIX + digits + "\n")
    n_fill = T - len(pc.PASSKEY_PREFIX + digits + "\n") - len(pc.PASSKEY_PREFIX) - 5
    assert needle_at == round(depth * n_fill)  # inserted at the asked depth of the filler


def test_passkey_deterministic_and_errors():
    filler = np.arange(5000) % 200
    a = pc.make_passkey(np.random.default_rng([1, 2]), filler, 256, 0.3, byte_encode)
    b = pc.make_passkey(np.random.default_rng([1, 2]), filler, 256, 0.3, byte_encode)
    assert all(np.array_equal(u, w) for u, w in zip(a, b))
    with pytest.raises(ValueError, match="filler"):
        pc.make_passkey(np.random.default_rng(0), filler, 20, 0.5, byte_encode)  # needle + question > 20


# -----------------------------------------------------------------------------
# the three variants, and the smallest setting end to end


def test_variants_differ_only_in_layer_pattern():
    spec = pc.BUDGETS["gpu"]
    configs = {v: asdict(pc.build_model(v, 320, 4096, spec, 0, "meta").config) for v in pc.VARIANTS}
    for v, c in configs.items():
        rest = {k: x for k, x in c.items() if k not in ("layer_pattern", "layer_types")}
        ref = {k: x for k, x in configs["softmax"].items() if k not in ("layer_pattern", "layer_types")}
        assert rest == ref, v
    assert configs["hybrid"]["layer_types"].count("full_attention") == 1  # 8 layers, softmax at l = 7
    assert set(configs["lightning"]["layer_types"]) == {"linear_attention"}


def test_ci_budget_end_to_end(tmp_path):
    from data.tokenizers import write_dataset
    # a tiny stand-in for data/stdlib/byte: the source of two stdlib modules (hermetic, < 1 s to write)
    src = [open(m.__file__).read() for m in (os, json.decoder)]
    write_dataset(str(tmp_path / "data" / "stdlib" / "byte"), "byte", [src[0]], [src[1]])
    out = tmp_path / "out"
    args = ["--budget=ci", "--device=cpu", f"--out={out}", f"--data-dir={tmp_path / 'data'}"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is as fast, and immune to oversubscribed CI cores
    try:
        res = pc.main(args)
        again = pc.main(args + ["--parts=passkey"])  # reloads the saved LM checkpoints
    finally:
        torch.set_num_threads(threads)
    with open(out / "results.json") as f:
        saved = json.load(f)
    res = json.loads(json.dumps(res))  # as the first run wrote it (tuples -> lists)
    assert saved["lm"] == res["lm"] and saved["mqar"] == res["mqar"]  # the passkey-only run kept the other parts
    # same probes, same (reloaded) models -> same answers
    assert saved["passkey"]["variants"] == again["passkey"]["variants"] == res["passkey"]["variants"]
    for part in ("lm", "mqar", "passkey"):
        assert set(res[part]["variants"]) == set(pc.VARIANTS)
    spec = pc.BUDGETS["ci"]
    for v in pc.VARIANTS:
        lm = res["lm"]["variants"][v]
        assert [c["step"] for c in lm["curve"]] == [0, 3, 6]
        assert all(np.isfinite(c["val_loss"]) for c in lm["curve"])
        assert lm["curve"][0]["val_loss"] == pytest.approx(np.log(320), rel=0.25)  # ~uniform at init
        assert lm["tokens_per_s"] > 0
        rows = res["mqar"]["variants"][v]["eval"]
        assert [(r["seq_len"], r["num_pairs"]) for r in rows] == pc.mqar_combos(spec["mqar"])
        assert all(0.0 <= r["acc"] <= 1.0 for r in rows)
        found = res["passkey"]["variants"][v]["found"]
        assert np.array(found).shape == (len(spec["passkey"]["lengths"]), len(spec["passkey"]["depths"]))
        assert (out / f"lm_{v}.pt").exists()
    p = {v: res["lm"]["variants"][v]["params"] for v in pc.VARIANTS}
    assert p["hybrid"]["moe"] == p["softmax"]["moe"] == p["lightning"]["moe"]  # same experts everywhere
    # the lightning layer's extra weights are its output gate (D x inner) and output norm (inner) per layer
    D, inner = spec["model"]["hidden_size"], spec["model"]["num_attention_heads"] * spec["model"]["head_dim"]
    L = spec["model"]["num_hidden_layers"]
    assert p["lightning"]["total"] - p["softmax"]["total"] == L * (D * inner + inner)
    assert res["card"] and res["wall_time_s"]["total"] > 0 and res["budget_spec"] == spec
    # 6 steps teach nobody MQAR: the summary must say so rather than read a comparison into zeros
    assert "INCONCLUSIVE: no variant learned MQAR" in pc.summary(res)
    for name in ("lm_loss.svg", "mqar_acc.svg", "passkey.svg"):
        root = ET.parse(out / name).getroot()  # well-formed XML
        assert root.tag.endswith("svg") and len(root) > 10


def test_budgets_pairs_fit_the_key_vocabulary():
    # keys are distinct within a row: a budget asking for more pairs than MQAR_KEYS would fail mid-run
    for name, spec in pc.BUDGETS.items():
        assert max(spec["mqar"]["pairs"]) <= pc.MQAR_KEYS, name
        assert pc.mqar_combos(spec["mqar"]), name
