"""
Tests for parallel.py: expert parallelism, LASP+ sequence parallelism, gradient sync and checkpoints, each
compared against the single-process model holding the same weights.

Run: python -m pytest -q tests/test_parallel.py      (CPU; spawns 2- and 4-process gloo groups)

Layout of this file: process-free unit tests first (permutation math, LASP+ prefix, layout checks), then a
small harness (`spawn(world, fn)`: torch.multiprocessing + a file rendezvous + torchrun-like env vars), then
one spawn per test, each running several checks. Sizes are tiny and most checks run in fp64, where the
parallel and single-process results differ only by summation order (tolerances ~1e-12).
"""
import math
import os
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import parallel
from moe import MoE

# -----------------------------------------------------------------------------
# process-free unit tests


def _expert_major_order_loop(recv):
    """Slow twin of parallel.expert_major_order: walk the rank-major blocks and list rows expert by expert."""
    R, L = recv.shape
    start, block_rows = 0, {}
    for q in range(R):  # arrival order: rank q's rows for expert 0, then 1, ...
        for j in range(L):
            n = int(recv[q, j])
            block_rows[q, j] = list(range(start, start + n))
            start += n
    return torch.tensor([i for j in range(L) for q in range(R) for i in block_rows[q, j]], dtype=torch.long)


@pytest.mark.parametrize("recv", [
    [[2, 0, 1], [1, 3, 0]],  # uneven, some empty blocks
    [[0, 0, 0], [0, 0, 0]],  # nothing received
    [[0, 0, 5], [0, 0, 0], [0, 0, 2]],  # everything to one local expert
    [[4]],  # one rank, one expert: identity
])
def test_expert_major_order(recv):
    recv = torch.tensor(recv)
    perm = parallel.expert_major_order(recv, int(recv.sum()))
    assert torch.equal(perm, _expert_major_order_loop(recv))
    # the rows land expert-major: their expert ids are sorted, each block of expert j has recv[:, j].sum() rows
    R, L = recv.shape
    expert_of_row = torch.repeat_interleave(torch.arange(L).repeat(R), recv.flatten())
    assert torch.equal(expert_of_row[perm], torch.repeat_interleave(torch.arange(L), recv.sum(0)))


def test_check_layout_messages():
    parallel.check_layout(8, 2, 4, num_experts=8)  # fits
    with pytest.raises(ValueError, match="not divisible by ep=3"):
        parallel.check_layout(4, 3, 1)
    with pytest.raises(ValueError, match="not divisible by sp=3"):
        parallel.check_layout(4, 1, 3)
    with pytest.raises(ValueError, match="num_experts=6 is not divisible by ep=4"):
        parallel.check_layout(4, 4, 1, num_experts=6)
    with pytest.raises(ValueError, match="positive int"):
        parallel.check_layout(4, 0, 1)



@pytest.mark.parametrize("R,T", [(2, 20), (4, 10), (3, 70)])  # slices shorter / longer than the 64-row chunk
def test_lasp_prefix_single_process(R, T):
    """LASP+ on R simulated ranks in one process == lightning attention over the whole sequence (fp64 oracle),
    for the closed-form prefix (parallel.lasp_prefix) and its loop twin KV_G <- lambda^T KV_G + KV_L(q)."""
    from lightning_attn import build_slopes, lightning_attn, ref_parallel
    torch.manual_seed(0)
    B, H, D = 2, 4, 8
    q, k, v = (torch.randn(B, H, R * T, D, dtype=torch.float64) * 0.5 for _ in range(3))
    slope = build_slopes(H, 0, 2) / 4  # slow enough decays that the prefix matters across slices
    o_ref, _ = ref_parallel(q, k, v, slope)
    sl = lambda t, r: t[:, :, r * T:(r + 1) * T]
    outs, states = zip(*[lightning_attn(sl(q, r), sl(k, r), sl(v, r), slope, output_final_state=True)
                         for r in range(R)])
    states = torch.stack(states)  # (R, B, H, D, D)
    kv_g = torch.zeros_like(states[0])  # loop twin: the state entering slice r
    lam_T = torch.exp(-slope.double() * T)[None, :, None, None]  # (1, H, 1, 1) decay over one slice
    for r in range(R):
        prefix = parallel.lasp_prefix(states, slope, T, r)
        assert_close(prefix, kv_g, 1e-13, f"prefix of slice {r}")
        o = outs[r] + parallel.lasp_inter(sl(q, r), slope, prefix)
        # fp64 throughout: differences are summation order only
        assert_close(o, sl(o_ref, r), 1e-12, f"LASP+ output of slice {r}")
        o_rerun, _ = lightning_attn(sl(q, r), sl(k, r), sl(v, r), slope, initial_state=kv_g)  # the paper's form
        assert_close(o_rerun, sl(o_ref, r), 1e-12, f"rerun with initial state, slice {r}")
        kv_g = lam_T * kv_g + states[r]

# -----------------------------------------------------------------------------
# harness: run fn(rank, world, tmpdir) in `world` processes over gloo


def _entry(rank, world, tmpdir, fn, args):
    torch.set_num_threads(1)  # 2 CI cores shared by up to 4 processes
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    try:
        fn(rank, world, tmpdir, *args)
    except BaseException:  # write the traceback where the parent can show it, then fail this process
        with open(os.path.join(tmpdir, f"error{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(world, fn, *args):
    """Run fn(rank, world, tmpdir, *args) on `world` processes; re-raise the first rank's error here."""
    with tempfile.TemporaryDirectory() as tmpdir:
        try:
            mp.spawn(_entry, args=(world, tmpdir, fn, args), nprocs=world, join=True)
        except Exception as e:
            errors = [open(os.path.join(tmpdir, f)).read() for f in sorted(os.listdir(tmpdir)) if f.startswith("error")]
            raise AssertionError("worker failed:\n" + "\n".join(errors)) from e


def init(tmpdir, ep=1, sp=1):
    """init_distributed with a file rendezvous (no ports) and a timeout, so a hang fails the test instead of
    blocking CI (generous: a loaded 2-core runner starts 4 Python processes slowly)."""
    return parallel.init_distributed(ep=ep, sp=sp, init_method="file://" + os.path.join(tmpdir, "rdzv"),
                                     timeout_s=300)


def assert_close(a, b, tol, what):
    err = (a - b).abs().max().item() if a.numel() else 0.0
    scale = b.abs().max().item() if b.numel() else 0.0
    assert err <= tol * max(scale, 1.0), f"{what}: max abs err {err:.3e} (scale {scale:.3e}, tol {tol:g})"


# -----------------------------------------------------------------------------
# expert parallelism: the MoE layer on R ranks == the single-process layer with all experts


def _routed_moe(case, E, dtype, cf=None):
    """The same MoE on every rank (seeded). Routing is steered through two constant input features (_tokens):
    x[:, 0] = 4 on every rank, x[:, 1] = +-4 alternating with the rank; gate columns 0 / 1 weight them."""
    torch.manual_seed(0)
    moe = MoE(16, 24, E, top_k=2, capacity_factor=cf).to(dtype)
    pref = {"balanced": torch.zeros(E),  # random routing
            "skewed": -torch.arange(E, dtype=torch.float64),  # geometric: low experts (rank 0) get most slots
            "one_rank": (torch.arange(E) >= E - 2).double() * 8.0,  # every slot to the last 2 experts (last rank)
            "per_rank": torch.zeros(E),  # even ranks prefer even experts, odd ranks odd ones (column 1)
            }[case]
    with torch.no_grad():
        moe.gate.weight[:, 0] = pref.to(dtype)
        moe.gate.weight[:, 1] = (0.5 - (torch.arange(E) % 2)).to(dtype) if case == "per_rank" else 0.0
    return moe


def _tokens(rank, T, dtype):
    g = torch.Generator().manual_seed(100 + rank)  # different tokens on every rank, reproducible anywhere
    x = torch.randn(T, 16, generator=g, dtype=torch.float64)
    x[:, 0], x[:, 1] = 4.0, 4.0 * (-1) ** rank
    return x.to(dtype), torch.randn(T, 16, generator=g, dtype=torch.float64).to(dtype)  # input, upstream grad


def _ep_worker(rank, world, tmpdir):
    # a mis-sized layout raises on every rank, before any collective (so no rank hangs)
    with pytest.raises(ValueError, match=f"world size {world} is not divisible by ep=3"):
        init(tmpdir, ep=3)
    layout = init(tmpdir, ep=world)
    # the two differentiable collectives on their own. all_gather: the gradient of rank q's copy is the sum of
    # every rank's gradient for slice q, also when the incoming gradient is a permuted (non-contiguous) view
    W = torch.randn(world, world, 3, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    x = torch.full((2, 3), float(rank), dtype=torch.float64, requires_grad=True)
    gathered = parallel.all_gather(x, layout.ep_group)  # (R, 2, 3)
    (gathered.transpose(1, 2) * W[rank]).sum().backward()  # the gradient reaching `gathered` is a permuted view
    assert torch.equal(gathered[:, 0, 0], torch.arange(world, dtype=torch.float64)), "all_gather forward"
    assert torch.equal(x.grad, W[:, rank].sum(0).t()), "all_gather backward"
    # all_to_all with uneven and empty splits, there and back == identity, gradient too (Megatron's test idea)
    in_splits = [(rank + q) % 3 for q in range(world)]  # rows I send to rank q: 0, 1 or 2
    out_splits = [(q + rank) % 3 for q in range(world)]  # rows rank q sends me
    x = torch.randn(sum(in_splits), 4, dtype=torch.float64, requires_grad=True)
    y = parallel.all_to_all(x, out_splits, in_splits, layout.ep_group)
    back = parallel.all_to_all(y * 2, in_splits, out_splits, layout.ep_group)
    back.backward(torch.ones_like(back))
    assert torch.equal(back, 2 * x) and torch.equal(x.grad, torch.full_like(x, 2.0)), "all_to_all round trip"

    E = 2 * world  # two experts per rank
    with pytest.raises(ValueError, match=f"num_experts=3 is not divisible by ep={world}"):
        parallel.apply_expert_parallel(MoE(16, 24, 3), layout)
    T_of = lambda q: 7 + 4 * q  # uneven token counts per rank
    # fp64: parallel and reference differ only in summation order -> 1e-12; fp32 (grouped matmul path): 1e-5
    cases = [("balanced", torch.float64, None), ("skewed", torch.float64, None), ("one_rank", torch.float64, None),
             ("balanced", torch.float32, None), ("skewed", torch.float64, 1.0), ("one_rank", torch.float64, 1.5)]
    for case, dtype, cf in cases:
        tol, what = (1e-12 if dtype == torch.float64 else 1e-5), f"EP {case} {dtype} cf={cf}"
        ref = _routed_moe(case, E, dtype, cf)
        moe = parallel.apply_expert_parallel(_routed_moe(case, E, dtype, cf), layout)
        x, g = _tokens(rank, T_of(rank), dtype)
        x_ref, x_ep = x.clone().requires_grad_(), x.clone().requires_grad_()
        y_ref, aux_ref = ref(x_ref)
        y_ep, aux_ep = moe(x_ep)
        y_ref.backward(g), y_ep.backward(g)
        assert_close(y_ep, y_ref, tol, what + " output")
        assert_close(x_ep.grad, x_ref.grad, tol, what + " dx")
        assert_close(moe.gate.weight.grad, ref.gate.weight.grad, tol, what + " d gate")  # dense: local tokens
        for name in ("load", "dropped"):
            assert torch.equal(aux_ep[name], aux_ref[name]), what + " " + name
        L = E // world
        for w in ("w1", "w3", "w2"):  # an expert shard's grad = the sum over all ranks' tokens
            full = getattr(ref, w).grad.clone()
            dist.all_reduce(full)
            assert_close(getattr(moe, w).grad, full[rank * L:(rank + 1) * L], tol, f"{what} d{w}")
        if case == "one_rank":  # all but the last rank received nothing, and every rank but it sent nothing
            assert aux_ref["load"][:E - 2].sum() == 0

    # global router: EP layer == ONE process holding the group's tokens in rank order (the definition), and
    # it drops no more slots than the local capacity. T = 8 tokens: cf*K*T/E = 1.0*2*8/(2R) * R is an integer,
    # so no ceil rounding separates the two capacities.
    for case in ("per_rank", "skewed"):
        what = f"global router {case}"
        moe = parallel.apply_expert_parallel(_routed_moe(case, E, torch.float64, 1.0), layout, global_router=True)
        local = parallel.apply_expert_parallel(_routed_moe(case, E, torch.float64, 1.0), layout)
        ref = _routed_moe(case, E, torch.float64, 1.0)
        xs, gs = zip(*[_tokens(q, 8, torch.float64) for q in range(world)])
        x_ep = xs[rank].clone().requires_grad_()
        x_ref = torch.cat(xs).requires_grad_()
        y_ep, aux_ep = moe(x_ep)
        y_ref, _ = ref(x_ref)
        y_ep.backward(gs[rank]), y_ref.backward(torch.cat(gs))
        rows = slice(8 * rank, 8 * (rank + 1))
        assert_close(y_ep, y_ref[rows], 1e-12, what + " output")
        assert_close(x_ep.grad, x_ref.grad[rows], 1e-12, what + " dx")
        L = E // world
        for w in ("w1", "w3", "w2"):
            assert_close(getattr(moe, w).grad, getattr(ref, w).grad[rank * L:(rank + 1) * L], 1e-12, what + " d" + w)
        dgate = moe.gate.weight.grad.clone()
        dist.all_reduce(dgate)
        assert_close(dgate, ref.gate.weight.grad, 1e-12, what + " d gate")
        # dropped slots over the group, global vs local router
        _, aux_local = local(xs[rank])
        dropped = lambda aux: (aux["dropped"] * aux["load"] * 8 * 2).round()  # fractions -> slots per expert
        n = torch.stack([dropped(aux_ep).sum(), dropped(aux_local).sum()])
        dist.all_reduce(n)
        assert n[0] <= n[1], f"{what}: global router dropped {n[0]} slots, local {n[1]}"
        if case == "per_rank":  # each rank overflows its favourite experts, the group as a whole much less
            assert n[0] < n[1], f"{what}: global router dropped {n[0]} slots, local {n[1]}"
        if rank == 0:
            print(f"global router, {world} ranks, {case} routing: dropped {int(n[0])} slots vs {int(n[1])} local")


@pytest.mark.parametrize("world", [2, 4])
def test_expert_parallel(world):
    spawn(world, _ep_worker)


# -----------------------------------------------------------------------------
# sequence parallelism (and EP inside the model): R ranks == one process, outputs and every gradient


def _tiny_config(**kw):
    from model import MiniMaxConfig
    # 4 layers: lightning, softmax, lightning, softmax; 4 experts. Balance-loss coefficient 0: the Switch loss
    # is a product of batch means, so per-slice values do not average to the full-sequence one (docstring of
    # apply_sequence_parallel); the z-loss is a per-token mean and does, so it stays on as a router loss.
    base = dict(vocab_size=64, hidden_size=32, num_hidden_layers=4, softmax_every=2, num_attention_heads=2,
                num_key_value_heads=1, head_dim=8, rotary_dim=4, intermediate_size=16, num_local_experts=4,
                num_experts_per_tok=2, block_size=16, max_position_embeddings=256,
                router_aux_loss_coef=0.0, router_z_loss_coef=1e-2)
    return MiniMaxConfig(**{**base, **kw})


def _tiny_model(cfg, layout=None):
    from model import MiniMax
    torch.manual_seed(0)  # identical weights on every rank
    model = MiniMax(cfg).double()
    if layout is not None:
        parallel.apply_expert_parallel(model, layout)
        parallel.apply_sequence_parallel(model, layout)
    return model


def _batches(n, B, T, vocab, seed=1):
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, vocab, (n, B, T + 1), generator=g)
    return [(d[:, :-1], d[:, 1:]) for d in data]  # (idx, targets) per data-parallel stream


def _assert_grads_match(model, ref, layout, tol, what):
    """model: the parallel one after sync_gradients; ref: single process. Expert shards vs their slice."""
    experts = parallel._expert_names(model)
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        g_ref = ref_params[name].grad
        if name in experts:
            g_ref = parallel._shard_experts(g_ref, layout)
        assert_close(p.grad, g_ref, tol, f"{what}: grad of {name}")


def _sp_worker(rank, world, tmpdir, layouts):
    for ep, sp in layouts:
        what = f"world {world} ep={ep} sp={sp}"
        layout = init(tmpdir, ep=ep, sp=sp)
        cfg = _tiny_config()
        model, ref = _tiny_model(cfg, layout), _tiny_model(cfg)
        # T = 136: slices of 68 (sp 2) or 34 (sp 4) rows, not multiples of the 64-row chunk nor of block_size
        batches = _batches(layout.dp_size, 2, 136, cfg.vocab_size)
        # the model's own loss takes the cross-entropy in fp32; here it is fp64 (the training test uses the
        # model's loss) and without the MoE aux losses (per-token z-loss: checked in the training test)
        ce = lambda logits, t: F.cross_entropy(logits.flatten(0, 1), t.flatten())
        idx, tgt = batches[layout.dp_rank]
        logits, _ = model(parallel.split_sequence(idx, layout))
        loss = ce(logits, parallel.split_sequence(tgt, layout))
        loss.backward()
        parallel.sync_gradients(model, layout)
        # the reference: every data-parallel stream's full sequences, loss = mean over the streams
        ref_losses = []
        for d, (i, t) in enumerate(batches):
            ref_logits, _ = ref(i)
            ref_losses.append(ce(ref_logits, t))
            if d == layout.dp_rank:
                assert_close(logits, parallel.split_sequence(ref_logits, layout), 1e-10, what + " logits")
        ref_loss = torch.stack(ref_losses).mean()
        ref_loss.backward()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        # fp64 model: the LASP+ prefix and the gathered-KV attention only reorder sums (logits, loss: ~1e-14).
        # Grads: model.py's RMSNorm and router softmax run in fp32 even in an fp64 model, so a reordered sum
        # can flip one fp32 rounding: up to ~1e-7 relative (measured 1e-7 on a norm weight); 1e-6 allows that
        assert_close(mean_loss / world, ref_loss.detach(), 1e-10, what + " loss")
        _assert_grads_match(model, ref, layout, 1e-6, what)


@pytest.mark.parametrize("world,layouts", [(2, [(1, 2)]), (4, [(1, 4), (2, 2)])])
def test_sequence_parallel(world, layouts):
    spawn(world, _sp_worker, layouts)


# -----------------------------------------------------------------------------
# training: DP x EP and DP x SP steps == one process with gradient accumulation; checkpoints across layouts


def _train_step(model, opt, batches, layout, max_norm):
    """One optimizer step, the way train.py does it. layout=None: single process, the batches of all
    data-parallel streams as micro-batches (gradient accumulation). -> mean loss over streams (detached)."""
    if layout is None:
        loss = torch.stack([model(i, t)[1] for i, t in batches]).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    else:
        idx, tgt = batches[layout.dp_rank]
        _, loss = model(parallel.split_sequence(idx, layout), parallel.split_sequence(tgt, layout))
        loss.backward()
        parallel.sync_gradients(model, layout)
        parallel.clip_grad_norm_(model, max_norm, layout)
        loss = loss.detach().clone()
        dist.all_reduce(loss)
        loss /= layout.world
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def _train_worker(rank, world, tmpdir):
    adamw = lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)
    # max_norm small enough that clipping is active at every step (grad norms here are ~0.1 - 1)
    steps, max_norm = 3, 0.05
    ckpt = os.path.join(tmpdir, "ckpt.pt")
    for ep, sp in [(2, 1), (1, 2), (2, 2)]:
        what = f"train ep={ep} sp={sp}"
        layout = init(tmpdir, ep=ep, sp=sp)
        # with sp = 1 every rank sees whole sequences, so the Switch balance loss is per micro-batch in both runs
        cfg = _tiny_config(router_aux_loss_coef=0.01 if sp == 1 else 0.0)
        model, ref = _tiny_model(cfg, layout), _tiny_model(cfg)
        opt, ref_opt = adamw(model), adamw(ref)
        for step in range(steps + 1):
            batches = _batches(layout.dp_size, 2, 32, cfg.vocab_size, seed=10 + step)
            if step == steps and ep == 2 and sp == 1:
                # save with this layout (unsharded), resume it with ep = 4 (one expert per rank)
                full_sd = parallel.full_state_dict(model, layout)
                full_osd = parallel.full_optimizer_state_dict(opt, model, layout)
                if layout.master_process:
                    torch.save({"model": full_sd, "optimizer": full_osd}, ckpt)
                    for k, v in ref.state_dict().items():  # the unsharded weights are the reference's weights
                        assert_close(full_sd[k], v, 1e-6, what + " saved " + k)
                dist.barrier()
                saved = torch.load(ckpt, weights_only=True)
                layout4 = init(tmpdir, ep=4)
                resumed = _tiny_model(cfg, layout4)
                for p in resumed.parameters():  # prove the load fills everything
                    p.data.fill_(float("nan"))
                parallel.load_full_state_dict(resumed, saved["model"], layout4)
                resumed_opt = adamw(resumed)
                parallel.load_full_optimizer_state_dict(resumed_opt, resumed, saved["optimizer"], layout4)
                loss_resumed = _train_step(resumed, resumed_opt, batches, layout4, max_norm)
            loss = _train_step(model, opt, batches, layout, max_norm)
            ref_loss = _train_step(ref, ref_opt, batches, None, max_norm)
            # the loss takes its cross-entropy in fp32 (model.py), so fp32 rounding bounds the agreement
            assert_close(loss, ref_loss, 1e-6, f"{what} step {step} loss")
            if step == steps and ep == 2 and sp == 1:
                assert_close(loss_resumed, ref_loss, 1e-6, f"{what} resumed with ep=4, step {step} loss")
        if rank == 0:
            print(f"{what}: losses match one process over {steps + 1} AdamW steps, last {loss.item():.6f}")


def test_training_matches_single_process():
    spawn(4, _train_worker)
