"""
Tests for moe.py: the MoE layer against a naive per-token loop, routing properties, losses, token drop.

Run: python -m pytest -q tests/test_moe.py        (CPU, ~20 s; ~8 s of it one torch.compile)

The reference `naive_moe` reads the layer's parameters and does everything token by token in plain Python:
softmax of the router logits, top-k, renormalise, then sum_k w_k * expert_k(x_t), with capacity checked by
walking the tokens in order (the documented "earliest tokens win" policy).
"""

import math

import pytest
import torch
import torch.nn.functional as F

from moe import MoE, grouped_mm_available


def naive_moe(m, x_TD):
    """Per-token loop over the selected experts. Returns y (T, D) and the kept/dropped flags (T, K)."""
    T, K = x_TD.shape[0], m.top_k
    used = [0] * m.num_experts  # slots each expert has accepted so far
    cap = math.inf if m.capacity_factor is None else math.ceil(m.capacity_factor * K * T / m.num_experts)
    ys, kept = [], []
    for t in range(T):
        p = torch.softmax(m.gate.weight @ x_TD[t], dim=0)  # (E,)
        w, ids = torch.topk(p, K)
        w = w / w.sum()
        y, kept_t = torch.zeros_like(x_TD[t]), []
        for k in range(K):
            e = int(ids[k])
            kept_t.append(used[e] < cap)
            if used[e] < cap:
                used[e] += 1
                h = F.silu(m.w1[e] @ x_TD[t]) * (m.w3[e] @ x_TD[t])  # (F,)
                y = y + w[k] * (m.w2[e] @ h)
        ys.append(y)
        kept.append(kept_t)
    return torch.stack(ys), torch.tensor(kept)


def grads_of(m, x, out, g):
    """Gradients of <out, g> w.r.t. the input, the router and every expert weight."""
    params = [x, m.gate.weight, m.w1, m.w3, m.w2]
    return torch.autograd.grad(out, params, g)


def force_routing(m, choices):
    """Set router weights and build inputs so that token t picks experts choices[t] in that order.

    x_t = sum_k (K - k) * 3 * e_{choices[t][k]} in the first E coordinates and the router is the identity
    there, so logit gaps of 3 make the order unambiguous (needs D >= E).
    """
    E, D = m.num_experts, m.hidden_size
    with torch.no_grad():
        m.gate.weight.zero_()
        m.gate.weight[:, :E] = torch.eye(E)
    x = torch.zeros(len(choices), D, dtype=m.w1.dtype)
    for t, c in enumerate(choices):
        for k, e in enumerate(c):
            x[t, e] = 3.0 * (len(c) - k)
    return x


def make(E, K, D=8, F_=12, dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    return MoE(D, F_, E, K, **kw).to(dtype)


CASES = [(1, 1), (4, 1), (4, 2), (32, 1), (32, 2)]


@pytest.mark.parametrize("E,K", CASES)
@pytest.mark.parametrize("capacity_factor", [None, 1.0])
@pytest.mark.parametrize("routing", ["random", "one_expert"])
def test_layer_matches_naive_fp64(E, K, capacity_factor, routing):
    # fp64 throughout; _grouped_mm has no fp64 kernel, so this exercises routing, permute, drop, combine and
    # their custom backward with the loop experts. Tolerance 1e-10: fp64 rounding (~1e-16) times O(100) ops.
    m = make(E, K, D=max(8, E), capacity_factor=capacity_factor)
    T = 24
    if routing == "random":
        x = torch.randn(T, m.hidden_size, dtype=torch.float64)
    else:  # every token picks expert E-1 (then E-2): all other experts are empty
        x = force_routing(m, [[E - 1 - k for k in range(K)]] * T)
        x = x + 0.1 * torch.randn_like(x)  # gaps of 3 >> 0.1 keep the choice; inputs differ per token
    x.requires_grad_(True)
    y, aux = m(x)
    y_ref, kept = naive_moe(m, x)
    assert torch.allclose(y, y_ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(y)  # random, contiguous output gradient
    for a, b in zip(grads_of(m, x, y, g), grads_of(m, x, y_ref, g)):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-10)
    if capacity_factor is not None and routing == "one_expert" and E > 1:
        assert (~kept).any()  # the case really drops slots


@pytest.mark.parametrize("E,K", [(4, 2), (32, 2)])
@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_grouped_mm_path_fp32(E, K, capacity_factor):
    # The torch._grouped_mm path runs in fp32 on CPU. Against the fp64 reference: fp32 rounding through
    # D=16/F=24 dot products gives ~1e-6 relative, so rtol 1e-4/atol 1e-5. Against the fp32 loop twin: same.
    m = make(E, K, D=16, F_=24, dtype=torch.float32, capacity_factor=capacity_factor)
    x = torch.randn(40, 16, requires_grad=True)
    assert grouped_mm_available(x, m.w1, m.w2)
    y, _ = m(x)
    g = torch.randn_like(y)
    grads = grads_of(m, x, y, g)
    m64 = make(E, K, D=16, F_=24, dtype=torch.float64, capacity_factor=capacity_factor)
    m64.load_state_dict(m.state_dict())
    x64 = x.detach().double().requires_grad_(True)
    y_ref, _ = naive_moe(m64, x64)
    assert torch.allclose(y.double(), y_ref, rtol=1e-4, atol=1e-5)
    for a, b in zip(grads, grads_of(m64, x64, y_ref, g.double())):
        assert torch.allclose(a.double(), b, rtol=1e-4, atol=1e-5)
    m.expert_impl = "loop"
    y_loop, _ = m(x)
    assert torch.allclose(y, y_loop, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, grads_of(m, x, y_loop, g)):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def compiled_graphs(fn):
    """torch.compile(fn) with backend aot_eager, and the list its FX graphs are appended to (proof that
    something was compiled, not silently run eagerly). aot_eager = Dynamo + AOTAutograd on fake tensors, where
    the layer used to fail, without inductor's C++ build (about 30 s per test on 2 cores)."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    torch._dynamo.reset()
    return torch.compile(fn, backend=backend), graphs


def test_torch_compile_fp32_matches_eager():
    # Regression (train.py --compile on CPU crashed): torch.compile traces torch._grouped_mm with its meta
    # function, which accepts only bf16, so the fp32 CPU layer must take the loop twin under compile (eager
    # keeps torch._grouped_mm). Capacity mode in training, so the drop masks are traced too. Tolerance: fp32
    # loop vs grouped matmul, same as test_grouped_mm_path_fp32.
    m = make(4, 2, D=16, F_=24, dtype=torch.float32, capacity_factor=1.0)
    x = torch.randn(2, 20, 16, requires_grad=True)
    y, aux = m(x)
    g = torch.randn_like(y)
    grads = grads_of(m, x, y, g)
    compiled, graphs = compiled_graphs(m)
    y_c, aux_c = compiled(x)
    assert graphs, "nothing was compiled"
    assert torch.allclose(y_c, y, rtol=1e-5, atol=1e-6)
    for k in ("aux_loss", "balance_loss", "z_loss", "load", "dropped"):
        assert torch.allclose(aux_c[k], aux[k], rtol=1e-5, atol=1e-6), k
    assert (aux["dropped"] > 0).any()  # the case really drops slots
    for a, b in zip(grads_of(m, x, y_c, g), grads):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_expanded_output_grad():
    # y.sum().backward() hands a stride-0 gradient to the last grouped matmul (MOE.md gotcha): must work,
    # for the whole layer and for the experts stage on its own, and agree with a materialised ones-gradient.
    m = make(4, 2, D=16, F_=24, dtype=torch.float32)
    x = torch.randn(20, 16, requires_grad=True)
    y, aux = m(x)
    (y.sum() + aux["aux_loss"]).backward()
    gx = x.grad.clone()
    x.grad = None
    y, aux = m(x)
    (y * torch.ones_like(y)).sum().add(aux["aux_loss"]).backward()
    assert torch.allclose(gx, x.grad, rtol=1e-6, atol=1e-7)
    xs = torch.randn(20, 16, requires_grad=True)
    counts = torch.tensor([5, 0, 9, 6])
    m.experts_grouped(xs, counts).sum().backward()
    assert xs.grad is not None and m.w1.grad is not None


def test_route_properties():
    m = make(8, 2)
    x = torch.randn(50, 8, dtype=torch.float64)
    weights, ids, logits, probs = m.route(x)
    assert torch.allclose(weights.sum(-1), torch.ones(50, dtype=torch.float64))  # renormalised
    assert (weights > 0).all() and weights.dtype == torch.float64  # gate math in >= fp32
    assert m.to(torch.bfloat16).route(x.bfloat16())[0].dtype == torch.float32
    m.double()
    assert ids.shape == (50, 2) and (ids[:, 0] != ids[:, 1]).all()  # exactly K distinct experts
    assert torch.equal(probs.gather(1, ids[:, :1]), probs.max(-1, keepdim=True).values)  # top-1 is the argmax
    # the layer's load is the fraction of T*K slots per expert
    _, aux = m(x)
    counts = torch.stack([(ids == e).sum() for e in range(8)]).float()
    assert torch.allclose(aux["load"], counts / 100) and torch.equal(aux["dropped"], torch.zeros(8))


@pytest.mark.parametrize("K", [1, 2])
def test_balance_loss(K):
    E, T = 4, 16
    m = make(E, K)
    # perfectly balanced: token t picks experts t, t+1 (mod E) -> f_i = 1/E, so E * sum_i f_i P_i = sum P = 1
    x = force_routing(m, [[(t + k) % E for k in range(K)] for t in range(T)])
    _, aux = m(x)
    assert torch.allclose(aux["load"], torch.full((E,), 1 / E))
    assert abs(aux["balance_loss"].item() - 1.0) < 1e-6  # fp32 probabilities: ~1e-7
    assert abs(aux["aux_loss"].item() - 0.01) < 1e-8  # default coefficient 0.01, z-loss off
    # skewed: everyone picks the same experts -> loss > 1 (tends to E for top-1 at confident routing)
    x = force_routing(m, [list(range(K))] * T)
    _, aux = m(x)
    assert aux["balance_loss"].item() > 1.5
    # the balance loss matches its formula and has the right gradient w.r.t. the router
    m = make(E, K)
    x = torch.randn(T, 8, dtype=torch.float64)
    _, aux = m(x)
    p = torch.softmax(x @ m.gate.weight.T, -1)
    f = torch.zeros(E, dtype=p.dtype).index_add_(0, p.topk(K, -1).indices.flatten(), p.new_ones(T * K)) / (T * K)
    ref = E * (f * p.mean(0)).sum()
    assert torch.allclose(aux["balance_loss"], ref)
    g1, = torch.autograd.grad(aux["balance_loss"], m.gate.weight)
    g2, = torch.autograd.grad(ref, m.gate.weight)
    assert torch.allclose(g1, g2, rtol=1e-10, atol=1e-12)  # fp64 throughout


def test_z_loss():
    m = make(4, 2, z_loss_coef=1e-3)
    x = torch.randn(10, 8, dtype=torch.float64)
    _, aux = m(x)
    z = torch.logsumexp(x @ m.gate.weight.T, -1).square().mean()
    assert torch.allclose(aux["z_loss"], z)
    assert torch.allclose(aux["aux_loss"], 0.01 * aux["balance_loss"] + 1e-3 * z)
    assert aux["aux_loss"].requires_grad


def test_capacity_drops_documented_slots_top1():
    # T=6, E=2, K=1, cf=1 -> C = ceil(1 * 1 * 6 / 2) = 3. Tokens 0,1,3,4,5 pick expert 0, token 2 expert 1.
    # Earliest tokens win: expert 0 keeps tokens 0, 1, 3 and drops 4, 5 (their output is exactly zero).
    m = make(2, 1, capacity_factor=1.0)
    x = force_routing(m, [[0], [0], [1], [0], [0], [0]])
    y, aux = m(x)
    m_free = make(2, 1)
    m_free.load_state_dict(m.state_dict())
    y_free, _ = m_free(x)
    assert torch.equal(y[[0, 1, 2, 3]], y_free[[0, 1, 2, 3]])
    assert torch.equal(y[[4, 5]], torch.zeros(2, 8, dtype=y.dtype))
    assert torch.allclose(aux["dropped"], torch.tensor([2 / 5, 0.0]))
    assert torch.allclose(aux["load"], torch.tensor([5 / 6, 1 / 6]))


def test_capacity_drops_only_in_training_mode():
    # Same routing as the top-1 case above (tokens 4 and 5 overflow expert 0): in eval mode (generation) the
    # layer must be dropless, so a cached decode with T = 1 per step equals the full forward.
    m = make(2, 1, capacity_factor=1.0)
    x = force_routing(m, [[0], [0], [1], [0], [0], [0]])
    m_free = make(2, 1)
    m_free.load_state_dict(m.state_dict())
    m.eval()
    y, aux = m(x)
    assert torch.equal(y, m_free(x)[0])
    assert torch.equal(aux["dropped"], torch.zeros(2, dtype=aux["dropped"].dtype))
    assert torch.count_nonzero(y[[4, 5]]) > 0


def test_capacity_drops_documented_slots_top2():
    # T=4, E=4, K=2, cf=0.5 -> C = ceil(0.5 * 2 * 4 / 4) = 1 slot per expert. Choices (first, second):
    #   t0: (0, 1)  t1: (2, 0)  t2: (1, 3)  t3: (3, 2)
    # expert 0 keeps t0 (drops t1's 2nd), expert 1 keeps t0 (drops t2's 1st), expert 2 keeps t1 (drops t3's
    # 2nd), expert 3 keeps t2 (drops t3's 1st). A dropped slot adds nothing; the other weight is unchanged.
    m = make(4, 2, capacity_factor=0.5)
    x = force_routing(m, [[0, 1], [2, 0], [1, 3], [3, 2]])
    y, aux = m(x)
    weights, ids, _, _ = m.route(x)
    expect_kept = torch.tensor([[True, True], [True, False], [False, True], [False, False]])
    expected = torch.zeros_like(y)
    for t in range(4):
        for k in range(2):
            if expect_kept[t, k]:
                e = int(ids[t, k])
                h = F.silu(m.w1[e] @ x[t]) * (m.w3[e] @ x[t])
                expected[t] += weights[t, k].double() * (m.w2[e] @ h)
    assert torch.allclose(y, expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(y[3], torch.zeros(8, dtype=y.dtype))
    assert torch.equal(naive_moe(m, x)[1], expect_kept)  # the reference walks the same policy
    assert torch.allclose(aux["dropped"], torch.full((4,), 0.5))


def test_global_counts_seam():
    # Two "ranks" with global capacity == one rank holding both batches: rank 1 overrides global_counts with
    # rank 0's counts and the total token count, and must drop exactly the slots the joint batch drops.
    m = make(4, 2, capacity_factor=0.75)
    xa, xb = torch.randn(12, 8, dtype=torch.float64), torch.randn(9, 8, dtype=torch.float64)
    y_joint, _ = m(torch.cat([xa, xb]))
    _, ids_a, _, _ = m.route(xa)
    counts_a = torch.zeros(4, dtype=torch.int64).index_add_(0, ids_a.flatten(), torch.ones(24, dtype=torch.int64))
    m.global_counts = lambda counts, num_tokens: (counts_a, num_tokens + 12)
    y_b, _ = m(xb)
    # equal up to fp64 rounding of different matmul sizes; a wrongly dropped slot would differ by O(0.1)
    assert torch.allclose(y_b, y_joint[12:], rtol=1e-12, atol=1e-12)
    assert (y_b == 0).all(-1).any()  # and the case really drops whole tokens


def test_run_experts_seam():
    # parallel.py replaces run_experts on an instance; here with the loop twin called explicitly.
    m = make(4, 2, dtype=torch.float32, D=16, F_=24)
    x = torch.randn(10, 16)
    y, _ = m(x)
    calls = []
    m.run_experts = lambda xs, counts: calls.append(counts.sum().item()) or m.experts_loop(xs, counts)
    y2, _ = m(x)
    assert calls == [20] and torch.allclose(y, y2, rtol=1e-5, atol=1e-6)


def test_deterministic_and_shapes():
    m = make(8, 2, dtype=torch.float32, capacity_factor=1.25)
    x = torch.randn(2, 7, 8, requires_grad=True)
    outs = []
    for _ in range(2):
        y, aux = m(x)
        gx, = torch.autograd.grad(y, x, torch.ones_like(y))
        outs.append((y, gx))
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_stats_false_same_output():
    # generation skips the losses and statistics (stats=False): the output must not change, in either mode
    m = make(4, 2, dtype=torch.float32, D=16, F_=24, capacity_factor=1.0)
    x = torch.randn(30, 16)
    for training in (True, False):
        m.train(training)
        y, aux = m(x)
        y2, aux2 = m(x, stats=False)
        assert torch.equal(y, y2) and aux2 == {} and "aux_loss" in aux


def test_autocast_bf16():
    # fp32 parameters, bf16 compute under autocast: output keeps x's dtype and is close to fp32 (bf16 eps
    # 2^-8, relative error of a few bf16 roundings ~1e-2).
    m = make(4, 2, dtype=torch.float32, D=16, F_=24)
    x = torch.randn(30, 16)
    y32, _ = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16, _ = m(x)
    assert y16.dtype == torch.float32
    assert (y16 - y32).norm() / y32.norm() < 3e-2


@pytest.mark.parametrize("kw", [
    dict(num_experts=4, top_k=5), dict(num_experts=0), dict(hidden_size=0), dict(intermediate_size=-3),
    dict(top_k=0), dict(capacity_factor=0.0), dict(capacity_factor=-1.0), dict(aux_loss_coef=-0.1),
    dict(expert_impl="fast"), dict(hidden_size=8.0),
])
def test_bad_config(kw):
    args = dict(hidden_size=8, intermediate_size=12, num_experts=4, top_k=2) | kw
    with pytest.raises(ValueError):
        MoE(**args)


def test_bad_input():
    with pytest.raises(ValueError, match="hidden_size"):
        make(4, 2)(torch.randn(3, 5, dtype=torch.float64))


def test_zero_tokens():
    # A rank can receive an empty micro-batch slice (e.g. under expert parallelism): shapes must still work.
    m = make(4, 2)
    x = torch.randn(0, 8, dtype=torch.float64, requires_grad=True)
    y, aux = m(x)
    assert y.shape == (0, 8)
    y.backward(torch.randn_like(y))
    assert x.grad.shape == (0, 8)
