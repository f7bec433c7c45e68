"""Tests for model.py: parity with transformers' MiniMaxForCausalLM, cached generation == full forward, training
sanity, parameter counts, and clear errors on bad input.

Run: python -m pytest -q tests/test_model.py      (CPU, ~1 min on 2 cores)
"""
import json
import math
from dataclasses import asdict

import pytest
import torch
from safetensors.torch import load_file, save_file

from model import MiniMax, MiniMaxConfig, PRESETS, config_from_hf, convert_hf_state_dict, layer_types_for


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # the models here are tiny: intra-op threads cost more than they save, and on a loaded 2-core machine
    # (several pytest processes) OpenMP spin-waiting made this file 5x slower. Restored afterwards.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(**kw):
    """The 'tiny' preset (4 layers: lightning, softmax, lightning, softmax; 4 experts), in fp32 eval mode."""
    torch.manual_seed(kw.pop("seed", 0))
    return MiniMax(MiniMaxConfig.from_preset("tiny", **kw)).eval()


# -----------------------------------------------------------------------------
# parity with transformers (the outside reference)

HF_LAYERS = 4


def hf_model(seed=0):
    """A small random transformers MiniMaxForCausalLM: both layer kinds, 4 experts, every alpha/beta factor set
    to a different value (a swapped factor would show), weights larger than HF's 0.02 init so attention and
    routing are far from uniform, and norm weights != 1 so a misplaced norm would show."""
    from transformers import MiniMaxConfig as HFConfig, MiniMaxForCausalLM

    torch.manual_seed(seed)
    alpha = (2 * HF_LAYERS) ** 0.25
    cfg = HFConfig(
        vocab_size=97, hidden_size=32, intermediate_size=40, num_hidden_layers=HF_LAYERS, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2, block_size=16,
        layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
        rope_parameters={"rope_type": "default", "rope_theta": 1e4}, rms_norm_eps=1e-5, max_position_embeddings=256,
        full_attn_alpha_factor=alpha, linear_attn_alpha_factor=1.1 * alpha, mlp_alpha_factor=0.9 * alpha,
        full_attn_beta_factor=0.8, linear_attn_beta_factor=1.2, mlp_beta_factor=0.7,
        eos_token_id=None, pad_token_id=0, bos_token_id=None,
    )
    hf = MiniMaxForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.15)
            else:
                p.uniform_(0.5, 1.5)
    return hf


def rel_err(a, b):
    return ((a - b).abs().max() / a.abs().max()).item()


@pytest.fixture(scope="module")
def hf_and_ours(tmp_path_factory):
    hf = hf_model()
    path = tmp_path_factory.mktemp("hf_minimax")
    hf.save_pretrained(path)
    return hf, MiniMax.from_pretrained(str(path)).eval(), path


def test_hf_checkpoint_layout_and_config(hf_and_ours):
    # the on-disk names this loader is written against (MINIMAX01.md section 14): per-expert w1/w2/w3
    _, ours, path = hf_and_ours
    keys = set(load_file(str(path / "model.safetensors")))
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in keys
    assert "model.layers.0.self_attn.slope_rate" in keys and "model.layers.1.self_attn.q_proj.weight" in keys
    cfg = ours.config
    assert cfg.layer_types == ["linear_attention", "full_attention", "linear_attention", "full_attention"]
    assert cfg.rotary_dim == cfg.head_dim == 8  # native transformers rotates the full head dim
    assert cfg.rope_theta == 1e4 and cfg.block_size == 16 and cfg.num_key_value_heads == 2
    assert cfg.linear_attn_beta_factor == 1.2 and cfg.mlp_alpha_factor == pytest.approx(0.9 * 8 ** 0.25)


def test_hf_parity_logits(hf_and_ours):
    # 75 tokens: several of transformers' 16-token blocks and our CPU path's 64-token chunk, neither a multiple.
    # Both sides are fp32; different summation orders (chunk sizes, SDPA vs eager, grouped vs per-expert) give
    # ~1e-6 relative differences, measured; 1e-4 leaves room for other BLAS builds.
    hf, ours, _ = hf_and_ours
    torch.manual_seed(1)
    idx = torch.randint(0, 97, (2, 75))
    with torch.no_grad():
        ref = hf(idx).logits
        logits, _ = ours(idx)
    assert rel_err(ref, logits) < 1e-4


def test_hf_parity_fused_expert_layout(hf_and_ours):
    # transformers' in-memory names (mlp.experts.gate_up_proj / down_proj) go through the same conversion map
    hf, ours, _ = hf_and_ours
    state = convert_hf_state_dict(hf.state_dict(), ours.config)
    model = MiniMax(ours.config).eval()
    model.load_state_dict(state, strict=True)
    idx = torch.randint(0, 97, (1, 40))
    with torch.no_grad():
        assert rel_err(hf(idx).logits, model(idx)[0]) < 1e-4  # fp32, as above


def test_hf_parity_greedy_generation(hf_and_ours):
    # transformers prefills with its block loop, then decodes through its token-by-token recurrence and a KV
    # cache; ours with lightning_attn + lightning_attn_decode. Greedy tokens must be identical.
    hf, ours, _ = hf_and_ours
    torch.manual_seed(2)
    prompt = torch.randint(0, 97, (2, 21))
    with torch.no_grad():
        ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=24, do_sample=False)
    out = ours.generate(prompt, 24, temperature=0)
    assert out.shape == ref.shape == (2, 45)
    assert torch.equal(out, ref)
    assert len(set(out[:, 21:].flatten().tolist())) > 4  # a meaningful comparison, not one repeated token


# -----------------------------------------------------------------------------
# cached generation == full forward


@pytest.mark.parametrize("pattern", ["custom", "lightning", "softmax"])
def test_cache_steps_match_full_forward(pattern):
    # fp64 end to end (lightning states included), so any mismatch is a logic error, not rounding: 1e-9 is
    # ~1e6 x fp64 epsilon after 4 layers and ~100 tokens, and far below any indexing/decay mistake (>= 1e-3).
    kw = dict(layer_pattern=pattern)
    if pattern == "custom":  # both kinds, softmax first, so layer 0's slopes are not the only ones tested
        kw["layer_types"] = ["full_attention", "linear_attention", "linear_attention", "full_attention"]
    model = tiny(**kw).double()
    B, T0, T = 3, 37, 97  # crosses the 64-token chunk of the CPU lightning path
    seq = torch.randint(0, model.config.vocab_size, (B, T))
    with torch.no_grad():
        full, _ = model(seq)  # (B, T, V)
        cache = model.new_cache(B, T)
        assert cache.layers[0]["k" if pattern != "lightning" else "state"].dtype == torch.float64
        logits, _ = model(seq[:, :T0], cache=cache)  # prefill
        steps = [logits]
        logits, _ = model(seq[:, T0:T0 + 13], cache=cache)  # a multi-token step after the prefill
        steps.append(logits)
        for t in range(T0 + 13, T):  # then one token at a time
            logits, _ = model(seq[:, t:t + 1], cache=cache)
            steps.append(logits)
    assert cache.pos == T
    assert (torch.cat(steps, dim=1) - full).abs().max().item() < 1e-9


def test_greedy_generate_is_argmax_of_full_forward():
    # batch of 3, prompt 30 + 50 new tokens (crosses the 64-token chunk); fp64 so argmax ties cannot flip
    model = tiny().double()
    prompt = torch.randint(0, 512, (3, 30))
    out = model.generate(prompt, 50, temperature=0)
    assert out.shape == (3, 80) and torch.equal(out[:, :30], prompt)
    with torch.no_grad():
        full, _ = model(out)
    assert torch.equal(out[:, 30:], full[:, 29:-1].argmax(-1))


def test_generate_ignores_seq_slice():
    # model.seq_slice (set by parallel.py's sequence parallelism) offsets the positions of plain forwards only;
    # generation with a cache runs whole sequences, so it must give the same tokens with or without it
    model = tiny().double()
    prompt = torch.randint(0, 512, (2, 10))
    out = model.generate(prompt, 6, temperature=0)
    model.seq_slice = (1, 2)
    assert torch.equal(model.generate(prompt, 6, temperature=0), out)


def test_generate_sampling():
    model = tiny()
    prompt = torch.randint(0, 512, (2, 5))
    # top_k=1 is greedy whatever the temperature
    assert torch.equal(model.generate(prompt, 8, temperature=0.7, top_k=1), model.generate(prompt, 8, temperature=0))
    torch.manual_seed(3)
    a = model.generate(prompt, 8, temperature=1.0, top_k=20)
    torch.manual_seed(3)
    b = model.generate(prompt, 8, temperature=1.0, top_k=20)
    assert torch.equal(a, b) and a.shape == (2, 13)
    assert torch.equal(model.generate(prompt, 0), prompt)


# -----------------------------------------------------------------------------
# training sanity


def test_overfit_one_batch():
    model = tiny().train()
    torch.manual_seed(4)
    x = torch.randint(0, 512, (4, 32))
    y = torch.roll(x, -1, dims=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    # starts at ~ln(512) = 6.2; a model that learns reaches < 0.1 in 60 steps here, 0.5 is a safe bar
    assert model.last_stats["ce"].item() < 0.5
    s = model.last_stats
    assert s["load"].shape == s["dropped"].shape == (4, 4)
    assert torch.allclose(s["load"].sum(-1), torch.ones(4))  # each layer's slot fractions sum to 1
    assert (loss - s["ce"] - s["aux_loss"]).abs().item() < 1e-6  # loss = CE + mean aux loss


def test_every_parameter_gets_a_gradient():
    model = tiny(router_z_loss_coef=1e-3).train()
    x = torch.randint(0, 512, (4, 80))  # 320 tokens: every one of the 4 experts gets some
    _, loss = model(x, torch.randint(0, 512, (4, 80)))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} has no gradient"
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, f"{name}: zero or non-finite gradient"


def test_torch_compile_train_step_matches_eager():
    # train.py --compile on CPU (fp32): the whole model under torch.compile, one forward + backward, against
    # eager. Two layers (one of each attention kind), 16 tokens. Backend aot_eager: Dynamo + AOTAutograd on
    # fake tensors (where moe.py's grouped matmul used to fail in fp32), without inductor's C++ build (minutes
    # on 2 cores). Tolerance: the same fp32 ops, except that the compiled MoE runs the loop twin where eager
    # runs torch._grouped_mm: fp32 rounding of reordered sums (~1e-7 relative); 1e-5 still catches a wrong layer.
    model = tiny(num_hidden_layers=2, vocab_size=64).train()
    idx, targets = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    _, loss = model(idx, targets)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    graphs = []

    def backend(gm, example_inputs):  # aot_eager, counting the graphs: proof that something was compiled
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    torch._dynamo.reset()
    _, loss_c = torch.compile(model, backend=backend)(idx, targets)
    loss_c.backward()
    assert graphs, "nothing was compiled"
    assert torch.allclose(loss_c, loss, rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, grads[n], rtol=1e-5, atol=1e-6), n


def test_inputs_embeds_replaces_lookup():
    model = tiny()
    idx = torch.randint(0, 512, (2, 20))
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(None, inputs_embeds=model.embed_tokens(idx))
    assert torch.equal(a, b)


# -----------------------------------------------------------------------------
# config, presets, init, parameter counts


def test_layer_patterns_and_presets():
    assert layer_types_for("hybrid", 16).count("full_attention") == 2
    assert [l for l, t in enumerate(layer_types_for("hybrid", 80)) if t == "full_attention"] == list(range(7, 80, 8))
    bench = MiniMaxConfig.from_preset("bench")
    assert bench.layer_types == ["linear_attention"] * 7 + ["full_attention"]
    assert (bench.vocab_size, bench.hidden_size, bench.num_attention_heads, bench.head_dim,
            bench.num_key_value_heads, bench.num_local_experts, bench.num_experts_per_tok, bench.intermediate_size,
            bench.block_size) == (32768, 1024, 16, 64, 4, 16, 2, 1536, 256)
    assert MiniMaxConfig(layer_pattern="softmax").layer_types == ["full_attention"] * 8
    assert MiniMaxConfig(layer_pattern="lightning").layer_types == ["linear_attention"] * 8
    for name in PRESETS:  # a saved config dict rebuilds the same config
        cfg = MiniMaxConfig.from_preset(name)
        assert MiniMaxConfig(**asdict(cfg)) == cfg
    cfg = MiniMaxConfig.from_preset("minimax-text-01")
    assert cfg.mlp_alpha_factor == pytest.approx(3.5565588200778455) and cfg.rotary_dim == 64


def test_param_counts():
    # MINIMAX01.md section 1: 456.09B total, 45.94B active (no embeddings, 2 of 32 experts)
    with torch.device("meta"):
        big = MiniMax(MiniMaxConfig.from_preset("minimax-text-01"))
    assert round(big.num_params() / 1e9, 2) == 456.09
    assert abs(big.num_active_params() / 1e9 - 45.94) < 0.01
    # tiny by hand: per layer 2 norms + router + 4 experts, attention per kind; active counts 2 of 4 experts
    c = MiniMaxConfig.from_preset("tiny")
    D, H, Dh, Hkv, F_, E, V = 64, 4, 16, 2, 96, 4, 512
    light = 3 * H * Dh * D + H * Dh * D + H * Dh + D * H * Dh
    soft = 2 * H * Dh * D + 2 * Hkv * Dh * D
    per_layer = 2 * D + E * D
    n_light, n_soft = c.layer_types.count("linear_attention"), c.layer_types.count("full_attention")
    shared = n_light * light + n_soft * soft + c.num_hidden_layers * per_layer + D  # + the final norm
    model = tiny()
    assert model.num_active_params() == shared + c.num_hidden_layers * 2 * 3 * D * F_
    assert model.num_params() == shared + c.num_hidden_layers * E * 3 * D * F_ + 2 * V * D
    with torch.device("meta"):
        small = MiniMax(MiniMaxConfig.from_preset("small"))
    assert 80e6 < small.num_active_params() < 120e6  # "~100M active"


def test_flops_and_mfu():
    model = tiny()
    cfg = model.config
    f1, f2 = model.estimate_flops_per_token(256), model.estimate_flops_per_token(512)
    assert f1 > 6 * model.num_active_params()
    # beyond one chunk only the softmax layers grow with the sequence: 2 layers x 3 x 2 H Dh x (512 - 256)
    assert f2 - f1 == 2 * 3 * 2 * cfg.num_attention_heads * cfg.head_dim * 256
    mfu = model.estimate_mfu(8 * 256, 0.5, seq_len=256, peak_flops=1e12)  # 8 sequences of 256 tokens in 0.5 s
    assert mfu == pytest.approx(f1 * 256 * 8 / 0.5 / 1e12)


def test_init_weights_deepnorm_gains():
    torch.manual_seed(0)
    cfg = MiniMaxConfig(hidden_size=256, num_hidden_layers=8, num_attention_heads=4, head_dim=64,
                        intermediate_size=512, vocab_size=1000)
    model = MiniMax(cfg)
    beta = (8 * 8) ** -0.25
    xavier = math.sqrt(2 / (256 + 256))  # every projection here is 256 x 256 (H * Dh = hidden)
    attn = model.layers[0].self_attn
    qkv = attn.qkv_proj.weight.view(4, 3 * 64, 256)
    # sample stds of 65k entries are within ~1 % of the target; 5 % tolerance
    assert qkv[:, :128].std().item() == pytest.approx(xavier, rel=0.05)  # q, k rows: gain 1
    assert qkv[:, 128:].std().item() == pytest.approx(beta * xavier, rel=0.05)  # v rows: gain beta
    assert attn.out_proj.weight.std().item() == pytest.approx(beta * xavier, rel=0.05)
    soft = model.layers[7].self_attn
    assert soft.q_proj.weight.std().item() == pytest.approx(xavier, rel=0.05)
    assert soft.o_proj.weight.std().item() == pytest.approx(beta * xavier, rel=0.05)
    moe = model.layers[0].block_sparse_moe
    assert moe.w2.std().item() == pytest.approx(beta * math.sqrt(2 / (256 + 512)), rel=0.05)
    assert model.layers[0].attn_alpha == model.layers[0].mlp_alpha == pytest.approx(16 ** 0.25)


def test_meta_build_and_dtype_keep_buffers_fp32():
    cfg = MiniMaxConfig.from_preset("tiny")
    with torch.device("meta"):
        model = MiniMax(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    torch.manual_seed(0)
    ref = MiniMax(cfg)
    assert torch.equal(model.inv_freq, ref.inv_freq)
    assert torch.equal(model.layers[0].self_attn.slope, ref.layers[0].self_attn.slope)
    model.to(torch.bfloat16)  # constants must stay fp32: a bf16 RoPE frequency is wrong at long range
    assert model.inv_freq.dtype == model.layers[0].self_attn.slope.dtype == torch.float32
    assert torch.equal(model.inv_freq, ref.inv_freq)
    logits, _ = model(torch.randint(0, 512, (1, 10)))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


# -----------------------------------------------------------------------------
# released config.json mapping


RELEASED = {  # the fields of MiniMax-Text-01's config.json that matter (MINIMAX01.md sections 1 and 14)
    "architectures": ["MiniMaxText01ForCausalLM"], "model_type": "MiniMaxText01",
    "attn_type_list": [0, 0, 0, 0, 0, 0, 0, 1] * 10, "head_dim": 128, "hidden_act": "silu", "hidden_size": 6144,
    "intermediate_size": 9216, "layernorm_full_attention_alpha": 3.5565588200778455,
    "layernorm_full_attention_beta": 1.0, "layernorm_linear_attention_alpha": 3.5565588200778455,
    "layernorm_linear_attention_beta": 1.0, "layernorm_mlp_alpha": 3.5565588200778455, "layernorm_mlp_beta": 1.0,
    "max_position_embeddings": 10240000, "num_attention_heads": 64, "num_experts_per_tok": 2,
    "num_hidden_layers": 80, "num_key_value_heads": 8, "num_local_experts": 32, "postnorm": True,
    "rms_norm_eps": 1e-05, "rope_theta": 10000000, "rotary_dim": 64, "router_aux_loss_coef": 0.001,
    "shared_intermediate_size": 0, "tie_word_embeddings": False, "vocab_size": 200064,
}


def test_released_config_maps_to_the_preset():
    cfg = config_from_hf(RELEASED)
    preset = MiniMaxConfig.from_preset("minimax-text-01")
    for f in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "head_dim", "intermediate_size", "num_local_experts", "num_experts_per_tok", "rotary_dim",
              "rope_theta", "rms_norm_eps", "block_size", "max_position_embeddings", "layer_types"):
        assert getattr(cfg, f) == getattr(preset, f), f
    for f in ("full_attn_alpha_factor", "linear_attn_alpha_factor", "mlp_alpha_factor"):
        assert getattr(cfg, f) == pytest.approx(getattr(preset, f)), f
    with pytest.raises(ValueError, match="postnorm"):
        config_from_hf({**RELEASED, "postnorm": False})
    with pytest.raises(ValueError, match="shared expert"):
        config_from_hf({**RELEASED, "shared_intermediate_size": 128})


# -----------------------------------------------------------------------------
# bad input -> clear errors


def test_bad_inputs():
    model = tiny()
    with pytest.raises(ValueError, match=r"token ids must be in \[0, vocab_size=512\).*512"):
        model(torch.tensor([[1, 2, 512]]))
    with pytest.raises(ValueError, match="token ids"):
        model(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match="max_position_embeddings=512"):
        model(torch.zeros(1, 513, dtype=torch.long))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.generate(torch.zeros(1, 500, dtype=torch.long), 20)
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        MiniMaxConfig.from_preset("huge")
    with pytest.raises(ValueError, match="layer_pattern='custom'"):
        MiniMaxConfig(num_hidden_layers=2, layer_types=["full_attention", "full_attention"])
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        MiniMaxConfig(num_attention_heads=8, num_key_value_heads=3)
    model.seq_slice = (1, 2)  # a slice of 300 tokens (sequence parallelism): the whole 600 must fit
    with pytest.raises(ValueError, match=r"600 tokens \(slice 1 of 2, 300 tokens each\).*max_position_embeddings"):
        model(torch.zeros(1, 300, dtype=torch.long))
    model.seq_slice = (0, 1)
    cache = model.new_cache(1, 8)
    model(torch.zeros(1, 6, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="cache holds 8 tokens"):
        model(torch.zeros(1, 3, dtype=torch.long), cache=cache)


def test_checkpoint_with_missing_or_extra_tensors(hf_and_ours, tmp_path):
    _, _, path = hf_and_ours
    tensors = load_file(str(path / "model.safetensors"))
    config = json.loads((path / "config.json").read_text())

    def write(d, name):
        out = tmp_path / name
        out.mkdir()
        (out / "config.json").write_text(json.dumps(config))
        save_file(d, str(out / "model.safetensors"))
        return str(out)

    missing = {k: v for k, v in tensors.items() if k != "model.layers.2.self_attn.out_proj.weight"}
    with pytest.raises(ValueError, match=r"missing: layers\.2\.self_attn\.out_proj\.weight"):
        MiniMax.from_pretrained(write(missing, "missing"))
    no_expert = {k: v for k, v in tensors.items() if k != "model.layers.1.block_sparse_moe.experts.2.w3.weight"}
    with pytest.raises(ValueError, match=r"missing: layers\.1\.block_sparse_moe\.w3"):
        MiniMax.from_pretrained(write(no_expert, "no_expert"))
    extra = {**tensors, "model.layers.0.self_attn.bias": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"unexpected: layers\.0\.self_attn\.bias"):
        MiniMax.from_pretrained(write(extra, "extra"))
    shape = {**tensors, "lm_head.weight": torch.zeros(97, 31)}
    with pytest.raises(ValueError, match=r"wrong shape: lm_head\.weight"):
        MiniMax.from_pretrained(write(shape, "shape"))
    slopes = {**tensors, "model.layers.0.self_attn.slope_rate": 2 * tensors["model.layers.0.self_attn.slope_rate"]}
    with pytest.raises(ValueError, match="different decay formula"):
        MiniMax.from_pretrained(write(slopes, "slopes"))
    with pytest.raises(ValueError, match="no config.json"):
        MiniMax.from_pretrained(str(tmp_path))
