"""Each speed path of model.py against its plain twin (CPU; the CUDA-graph replay itself is checked on the GPU by
bench/decode_bench.py, which compares its greedy tokens with the eager loop's).

    static decode step (StaticDecoder, position as a device tensor)  ==  the eager cached step
    chunked lm_head + cross-entropy (forward(logits=False))           ==  F.cross_entropy on full logits
    activation checkpointing (model.checkpoint_layers)                ==  no checkpointing (loss and grads)
    check_ids=False                                                   ==  check_ids=True on valid ids

Run: python -m pytest -q tests/test_speed_paths.py      (CPU, ~15 s on 2 cores)
"""
import copy

import pytest
import torch
import torch.nn.functional as F

from model import MiniMax, MiniMaxConfig, StaticDecoder, chunked_cross_entropy


def tiny(dtype=torch.float32, seed=0, **kw):
    torch.manual_seed(seed)
    return MiniMax(MiniMaxConfig.from_preset("tiny", **kw)).to(dtype)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# -----------------------------------------------------------------------------
# decoding


@pytest.mark.parametrize("pattern,T0", [("softmax", 29), ("hybrid", 250)])
def test_static_decode_step_matches_eager_step(pattern, T0):
    """Logits of every static step == the eager cached step's, in fp64 (same math, other kernels: the static
    softmax layer attends over all cache slots in KV_CHUNK chunks with a mask instead of slicing; T0 = 250
    makes the steps cross from the first 256-slot chunk into the second)."""
    model = tiny(torch.float64, seed=1, layer_pattern=pattern).eval()
    B, steps = 3, 12
    idx = torch.randint(0, model.config.vocab_size, (B, T0))
    eager, static = model.new_cache(B, T0 + steps + 7), model.new_cache(B, T0 + steps + 7)  # spare masked slots
    logits_e, logits_s = model.prefill(idx, eager), model.prefill(idx, static)
    decoder = StaticDecoder(model, static)
    for _ in range(steps):
        next_id = torch.randint(0, model.config.vocab_size, (B, 1))  # fresh tokens: not only the argmax path
        x, _ = model._hidden(next_id, cache=eager)
        logits_e = model.lm_head(x[:, -1])
        logits_s = decoder(next_id)
        assert rel(logits_s, logits_e) < 1e-12  # fp64 rounding only
    assert static.pos == eager.pos == T0 + steps
    for le, ls in zip(eager.layers, static.layers):  # the caches hold the same state afterwards
        for name in le:
            assert rel(ls[name], le[name]) < 1e-12


def test_generate_cuda_graph_flag_gives_same_tokens():
    """generate(cuda_graph=True) runs StaticDecoder (graph-free on CPU): greedy tokens identical (fp32)."""
    model = tiny(seed=2).eval()
    idx = torch.randint(0, model.config.vocab_size, (2, 21))
    a = model.generate(idx, 16, temperature=0)
    b = model.generate(idx, 16, temperature=0, cuda_graph=True)
    assert torch.equal(a, b)


def test_static_decoder_refuses_a_full_cache():
    model = tiny().eval()
    cache = model.new_cache(1, 5)
    logits = model.prefill(torch.zeros(1, 5, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="full"):
        StaticDecoder(model, cache)(logits.argmax(-1, keepdim=True))


# -----------------------------------------------------------------------------
# training


def test_chunked_cross_entropy_matches_plain_fp64():
    """Loss and both gradients == F.cross_entropy on the full logits, with ignored rows and a ragged last chunk;
    also scaled by a non-unit incoming gradient. fp64: agreement to rounding (1e-12)."""
    torch.manual_seed(3)
    N, D, V = 53, 24, 41
    x = torch.randn(N, D, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, D, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, V, (N,))
    t[torch.rand(N) < 0.2] = -1
    ref = F.cross_entropy(x @ w.t(), t, ignore_index=-1)
    gx, gw = torch.autograd.grad(2.5 * ref, (x, w))
    for chunk in (7, 16, 1000):
        out = chunked_cross_entropy(x, w, t, chunk=chunk)
        cx, cw = torch.autograd.grad(2.5 * out, (x, w))
        assert abs(out.item() - ref.item()) < 1e-12
        assert rel(cx, gx) < 1e-12 and rel(cw, gw) < 1e-12
    with torch.no_grad():  # no gradient work without grad mode
        assert abs(chunked_cross_entropy(x, w, t).item() - ref.item()) < 1e-12


def _loss_and_grads(model, idx, targets, **kw):
    model.zero_grad(set_to_none=True)
    _, loss = model(idx, targets, **kw)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("n_ckpt", [2, 4])
def test_checkpointing_and_chunked_loss_match_plain_step(n_ckpt):
    """Same loss and every parameter's gradient with checkpointed blocks and the chunked loss (fp64; the MoE
    routing is recomputed in the backward, so it must be deterministic, which this also checks)."""
    model = tiny(torch.float64, seed=4)
    idx = torch.randint(0, model.config.vocab_size, (2, 37))
    targets = torch.randint(0, model.config.vocab_size, (2, 37))
    targets[0, :5] = -1
    loss_ref, grads_ref = _loss_and_grads(model, idx, targets)
    fast = copy.deepcopy(model)
    fast.checkpoint_layers, fast.check_ids = n_ckpt, False
    loss, grads = _loss_and_grads(fast, idx, targets, logits=False)
    assert abs(loss.item() - loss_ref.item()) < 1e-12
    for name, g in grads_ref.items():
        assert rel(grads[name], g) < 1e-10, name
    assert fast.last_stats["ce"].item() == pytest.approx(model.last_stats["ce"].item(), abs=1e-12)


def test_logits_false_returns_no_logits_and_needs_targets_for_it():
    model = tiny()
    idx = torch.randint(0, model.config.vocab_size, (1, 9))
    logits, loss = model(idx, idx, logits=False)
    assert logits is None and loss.ndim == 0
    logits, loss = model(idx, logits=False)  # no targets: logits are what the caller wants, return them
    assert logits.shape == (1, 9, model.config.vocab_size) and loss is None


# -----------------------------------------------------------------------------
# RMSNorm


def test_rmsnorm_matches_reference():
    """RMSNorm (torch's F.rms_norm) == the spelled-out formula: fp64 to rounding, gradients too; bf16 to bf16
    rounding (the fused kernel may round once more before the weight multiply: <= 2 bf16 ulps, 2^-7)."""
    from model import RMSNorm, rms_norm_reference

    torch.manual_seed(5)
    norm = RMSNorm(48, eps=1e-5).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = (3 * torch.randn(7, 5, 48, dtype=torch.float64)).requires_grad_()
    y, y_ref = norm(x), rms_norm_reference(x, norm.weight, 1e-5)
    assert rel(y, y_ref) < 1e-14
    g = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x, norm.weight), g)
    gx_ref, gw_ref = torch.autograd.grad(y_ref, (x, norm.weight), g)
    assert rel(gx, gx_ref) < 1e-12 and rel(gw, gw_ref) < 1e-12
    xb = x.detach().bfloat16()
    for weight_dtype in (torch.bfloat16, torch.float32):  # same dtype (fused path) and mixed (fp32 path)
        norm.to(weight_dtype)
        out, ref = norm(xb), rms_norm_reference(xb, norm.weight, 1e-5)
        assert out.dtype == torch.bfloat16
        assert ((out.float() - ref.float()).abs() <= 2 ** -7 * ref.float().abs() + 1e-6).all()
