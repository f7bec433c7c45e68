"""
Parallel training for nanoMiniMax: data parallel (DP), expert parallel (EP) and LASP+ sequence parallel (SP).

The model files have no collectives. This file takes an already-built MiniMax and replaces methods on
existing module instances, the seams left for it: MoE.run_experts and MoE.global_counts (moe.py), and the
attention core `attend` of LightningAttention and SoftmaxAttention (model.py, which also takes the RoPE offset
of a slice in model.seq_slice). No layer math is restated here; tests/test_parallel.py compares every layout
against the single-process model. Everything distributed is read here, top to bottom:

    init_distributed(ep, sp)          torchrun env -> Layout (rank grid + process groups), fails fast on bad sizes
    apply_expert_parallel(model, L)   keep E/ep experts per rank; all-to-all tokens to the rank owning the expert
    apply_sequence_parallel(model, L) each rank holds a contiguous slice of every sequence (LASP+ / gathered KV)
    sync_gradients(model, L)          after backward: all-reduce grads over the ranks holding each replica
    full_state_dict / load_full_state_dict (+ optimizer twins): checkpoints in the unsharded layout

Rank grid. W = world size, ranks are laid out in consecutive blocks (both EP and SP groups stay inside a node
on a multi-node run, where their traffic is the heaviest):

    W = 4, ep = 2, sp = 2     rank      0  1  2  3
                              SP group [0  1][2  3]   sp_rank = rank % sp   (which slice of the sequence)
                              dp_rank   0  0  1  1    dp_rank = rank // sp  (which sequences: data parallel)
                              EP group [0  1][2  3]   ep_rank = rank % ep   (which E/ep experts this rank owns)
                              EDP group {0, 2} {1, 3}  ranks holding the same expert shard

EP and SP are independent: the MoE is per token, so an EP group may mix ranks of different SP groups.

Gradients. The training objective is the mean over ranks of each rank's local loss (mean CE over its tokens;
with SP the slices have equal length, so this is the full-sequence mean). Each parameter copy receives, through
the backward of the collectives, d(sum of losses of the ranks that used it)/d(copy). Summing these over all the
copies of a parameter gives d(sum over ranks of losses), so: grad = all_reduce(SUM over replicas) / W, with
  * dense params: replicas on all W ranks (with SP a rank's dense copy also collects gradient from later ranks'
    tokens through the gathered states / keys, so plain averaging over the world is right);
  * expert shards: replicas on the W/ep ranks of the EDP group (each already summed its EP group's tokens).

Expert parallelism (../shared/MOE.md section 1): route locally -> sort slots by expert (moe.py) -> exchange
per-expert counts (all_to_all_single) -> ONE host sync for the split sizes -> all-to-all of token rows (an
autograd Function whose backward is the reverse all-to-all) -> re-sort rank-major rows expert-major -> grouped
matmul over the local experts -> reverse all-to-all -> combine (moe.py).

Global router (MiniMax-01 section 2.1, capacity mode only): the per-expert counts of all ranks in the EP group
are all-gathered, and the capacity is decided on the group's tokens. "Global" here means exactly: the keep/drop
decision of every slot is the one a single process would make if it held the EP group's tokens concatenated in
rank order (capacity ceil(cf*K*T_group/E) per expert, earliest tokens win). Without it each rank gives each
expert ceil(cf*K*T_rank/E) slots. An expert then drops only when the whole group overflows it, so the global
router never drops more than the local one (up to the ceil rounding: equal when cf*K*T/E is an integer).

LASP+ (MiniMax-01 section 3.2.2; ../shared/MINIMAX01.md sections 7 and 9). A lightning layer is linear in its
initial state: o_t = o_t(state 0) + lambda^{t+1} q_t^T S_in. So each rank (1) runs its slice with a zero state
and asks for the final state KV_L, (2) all-gathers every rank's KV_L, (3) builds its prefix state
S_in(r) = sum_{q<r} lambda^{len_{q+1} + ... + len_{r-1}} KV_L(q)   (= the loop KV_G <- lambda^{len_q} KV_G + KV_L(q))
and adds the inter-rank term. The intra part stays local, the only communication is one all-gather of B*H*D*E
fp32 per layer, and the backward of the all-gather sums each state's gradient back to its owner.
Softmax layers all-gather K and V over the SP group and attend with the queries offset by sp_rank * T_local
(lower-right aligned causal mask); RoPE positions are offset the same way (model.seq_slice).

Refs: MiniMax-01 (arXiv 2501.08313) sections 2.1, 3.1, 3.2.2; LASP (arXiv 2404.02882); Megatron-LM
`mappings.py` _AllToAll; torchtitan `expert_parallel.py`. Letters: T tokens, D hidden, E experts, K top-k,
R group size, L = E/ep local experts, B batch, H heads.

Run the tests (CPU, gloo, spawns 2 and 4 processes): python -m pytest -q tests/test_parallel.py
Benchmark (GPUs): torchrun --nproc_per_node=2 bench/parallel_bench.py
"""

import os
from dataclasses import dataclass
from datetime import timedelta
from functools import partial

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from lightning_attn import lightning_attn
from model import LightningAttention, SoftmaxAttention
from moe import MoE

# -----------------------------------------------------------------------------
# layout: who is who, and the process groups


@dataclass
class Layout:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    master_process: bool = True  # rank 0 prints, logs and writes checkpoints
    ep: int = 1  # expert-parallel group size
    sp: int = 1  # sequence-parallel group size
    ep_rank: int = 0  # index of this rank's expert shard
    sp_rank: int = 0  # index of this rank's slice of the sequence
    dp_rank: int = 0  # which sequences this rank reads (ranks of one SP group read the same ones)
    dp_size: int = 1  # number of independent sequence streams = world // sp
    ep_group: object = None  # ProcessGroup handles; None in a single process
    edp_group: object = None
    sp_group: object = None


def check_layout(world, ep, sp, num_experts=None):
    """Raise ValueError (on every rank, before any collective) if world, ep, sp and E do not fit together."""
    for name, v in (("ep", ep), ("sp", sp)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"parallel: {name} must be a positive int, got {v!r}")
    if world % ep != 0:
        raise ValueError(f"parallel: world size {world} is not divisible by ep={ep}; launch a multiple of {ep} "
                         f"processes (torchrun --nproc_per_node=N) or change --ep")
    if world % sp != 0:
        raise ValueError(f"parallel: world size {world} is not divisible by sp={sp}; launch a multiple of {sp} "
                         f"processes (torchrun --nproc_per_node=N) or change --sp")
    if num_experts is not None and num_experts % ep != 0:
        raise ValueError(f"parallel: num_experts={num_experts} is not divisible by ep={ep}; every rank must own "
                         f"the same number of experts, pick ep among the divisors of {num_experts}")


def init_distributed(ep=1, sp=1, num_experts=None, device=None, backend=None, init_method="env://",
                     timeout_s=None):
    """Read torchrun's RANK / LOCAL_RANK / WORLD_SIZE, start the process group, build the groups. -> Layout

    Without RANK in the environment this is a single process (ep = sp = 1 required) and no group is created.
    device: 'cuda' / 'cpu' / None = cuda if available (a rank uses cuda:LOCAL_RANK). Backend: NCCL on CUDA, gloo
    on CPU. The layout is checked before any collective, so a mis-sized launch raises the same ValueError on
    every rank instead of hanging. Called again in the same process, it only builds the groups of a new layout.
    """
    distributed = "RANK" in os.environ
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    check_layout(world, ep, sp, num_experts)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank if device.index is None else device.index)
        torch.cuda.set_device(device)
    layout = Layout(rank=rank, world=world, local_rank=local_rank, device=device, master_process=rank == 0,
                    ep=ep, sp=sp, ep_rank=rank % ep, sp_rank=rank % sp, dp_rank=rank // sp, dp_size=world // sp)
    if not distributed:
        return layout
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    kw = {"timeout": timedelta(seconds=timeout_s)} if timeout_s else {}
    if not dist.is_initialized():  # (already initialised: just build the groups of another layout)
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world, **kw)
    # every rank must create every group, in the same order (new_group is itself a collective)
    blocks = lambda n: [list(range(s, s + n)) for s in range(0, world, n)]  # consecutive blocks of n ranks
    layout.ep_group, _ = dist.new_subgroups_by_enumeration(blocks(ep))
    layout.edp_group, _ = dist.new_subgroups_by_enumeration([list(range(s, world, ep)) for s in range(ep)])
    layout.sp_group, _ = dist.new_subgroups_by_enumeration(blocks(sp))
    return layout


# -----------------------------------------------------------------------------
# differentiable collectives (gloo and NCCL alike: only all_to_all_single and the list form of all_gather)


def _all_to_all_rows(x, out_splits, in_splits, group):
    """Send rows x[sum(in_splits[:q]) : sum(in_splits[:q+1])] to rank q; receive out_splits[q] rows from q."""
    y = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
    dist.all_to_all_single(y, x.contiguous(), out_splits, in_splits, group=group)
    return y


class _AllToAll(torch.autograd.Function):
    """Token all-to-all. The gradient of a received row belongs to the row that was sent, so the backward is
    the same exchange with the split lists swapped (MOE.md section 2)."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        return _all_to_all_rows(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, g):
        return _all_to_all_rows(g, ctx.in_splits, ctx.out_splits, ctx.group), None, None, None


def all_to_all(x, out_splits, in_splits, group):
    """Differentiable all_to_all_single over rows of x (N, ...); splits are host lists of ints."""
    return _AllToAll.apply(x, out_splits, in_splits, group)


class _AllGather(torch.autograd.Function):
    """x (...) on each of R ranks -> (R, ...) on every rank, stacked in rank order.

    Backward: rank q's copy was used on all R ranks, so its gradient is the sum of the R gradients of slice q:
    a reduce-scatter. gloo has none, so: all_to_all_single of the R slices (rank q receives every rank's
    gradient for its slice) + a sum in fixed rank order (deterministic). Same traffic as a reduce-scatter.
    Every rank must use the gathered tensor in its graph, or its backward never runs and the others hang.
    """

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        out = x.new_empty((dist.get_world_size(group),) + tuple(x.shape))  # (R, ...)
        dist.all_gather(list(out.unbind(0)), x.contiguous(), group=group)  # writes into the R views of out
        return out

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous()  # (R, ...); before empty_like, which would copy a permuted layout's strides
        recv = torch.empty_like(g)  # recv[q] = rank q's gradient for my slice
        dist.all_to_all_single(recv, g, group=ctx.group)
        return recv.sum(0), None


def all_gather(x, group):
    """Differentiable all-gather: x (...) -> (R, ...); the backward sums each slice's gradients to its owner."""
    return _AllGather.apply(x, group)


# -----------------------------------------------------------------------------
# expert parallelism


def expert_major_order(recv_RL, M):
    """Permutation that makes received rows expert-major. -> perm (M,), M = recv.sum() (a host int).

    recv[q, j] = rows rank q sent for my local expert j. They arrive RANK-major:
        (q0: j0 j1 .. ), (q1: j0 j1 ..), ...
    and x_recv[perm] is EXPERT-major, the order the grouped matmul needs:
        (j0: q0 q1 .. ), (j1: q0 q1 ..), ...
    A stable sort of each row's local expert id keeps the rank order (then token order) inside an expert.
    """
    R, L = recv_RL.shape
    block_expert = torch.arange(L, device=recv_RL.device).repeat(R)  # (R*L,) expert of block (q, j)
    # output_size: the total is known on the host already, so repeat_interleave needs no sync of its own
    expert_M = torch.repeat_interleave(block_expert, recv_RL.flatten(), output_size=M)  # (M,) expert of each row
    return torch.argsort(expert_M, stable=True)


def _inverse(perm):
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return inv


def _ep_run_experts(moe, layout, x_sorted_ND, counts_E):
    """Drop-in for MoE.run_experts on an EP rank: rows for all E experts in, their outputs back, same order.

    x_sorted (N, D) is expert-major over the E global experts; counts (E,) rows per expert (kept slots); rows
    past sum(counts) are dropped slots. Every rank issues the same collectives in the same order, even with
    zero rows to send or receive (MOE.md section 9: the rule against hangs).
    """
    R, group = layout.ep, layout.ep_group
    N, D = x_sorted_ND.shape
    L = moe.num_experts // R  # local experts
    # 1. exchange counts: recv[q, j] = rows rank q will send to my local expert j (integers, no gradient)
    send_RL = counts_E.view(R, L)  # (R, L) my rows for rank q's experts (expert-major = destination-major)
    recv_RL = torch.empty_like(send_RL)
    dist.all_to_all_single(recv_RL, send_RL.contiguous(), group=group)
    # 2. the ONE host sync of the layer: NCCL needs the split sizes on the host
    in_splits, out_splits = torch.stack([send_RL.sum(1), recv_RL.sum(1)]).tolist()
    # 3. dispatch: rows of rank q's experts are one contiguous block, because x_sorted is expert-major
    x_recv = all_to_all(x_sorted_ND[:sum(in_splits)], out_splits, in_splits, group)  # (M, D) rank-major
    # 4. rank-major -> expert-major, run the L local experts (moe.py's grouped matmul or loop twin)
    perm_M = expert_major_order(recv_RL, sum(out_splits))
    y_local = type(moe).run_experts(moe, x_recv[perm_M], recv_RL.sum(0))  # (M, D), weights = local shard
    # 5. back to rank-major and home; the returned rows line up with x_sorted's first sum(in_splits) rows
    y_ND = all_to_all(y_local[_inverse(perm_M)], in_splits, out_splits, group)  # (sum(in_splits), D)
    return torch.cat([y_ND, y_ND.new_zeros(N - y_ND.shape[0], D)])  # dropped slots: zeros (moe masks them)


def _ep_global_counts(moe, layout, counts_E, num_tokens):
    """Drop-in for MoE.global_counts: all-gather the counts of the EP group (the "global router").

    -> counts_before (E,) = slots routed to each expert by lower ranks, num_tokens_global = group's tokens.
    """
    mine = torch.cat([counts_E, counts_E.new_tensor([num_tokens])])  # (E+1,) counts and my token count
    every = all_gather(mine, layout.ep_group)  # (R, E+1); integers, no gradient flows
    before_E = every[:layout.ep_rank, :-1].sum(0)  # (E,) earlier ranks come first in the global order
    num_tokens_global = int(every[:, -1].sum())  # host sync: the capacity is a host int in moe.py
    return before_E, num_tokens_global


def expert_modules(model):
    return [m for m in model.modules() if isinstance(m, MoE)]


def apply_expert_parallel(model, layout, global_router=False):
    """Keep experts [ep_rank*L, (ep_rank+1)*L) of every MoE layer and route their tokens over the EP group.

    Call it after the weights are identical on all ranks (same seed, or a loaded checkpoint) and BEFORE
    building the optimizer (the expert parameters are replaced by their shards).
    """
    mods = expert_modules(model)
    for m in mods:
        check_layout(layout.world, layout.ep, layout.sp, m.num_experts)  # raises the same error on every rank
    if layout.ep == 1:
        return model  # every rank has all experts: the global router would be the local one
    for m in mods:
        L = m.num_experts // layout.ep
        shard = slice(layout.ep_rank * L, (layout.ep_rank + 1) * L)
        for name in ("w1", "w3", "w2"):
            setattr(m, name, nn.Parameter(getattr(m, name).detach()[shard].clone()))  # (L, F, D) / (L, D, F)
        m.run_experts = partial(_ep_run_experts, m, layout)  # instance attribute shadows the class method
        if global_router:
            m.global_counts = partial(_ep_global_counts, m, layout)
    return model


# -----------------------------------------------------------------------------
# LASP+ sequence parallelism


def split_sequence(x, layout):
    """(B, T, ...) -> this rank's contiguous slice (B, T/sp, ...) of every sequence (idx, targets, embeds)."""
    T = x.shape[1]
    if T % layout.sp != 0:
        raise ValueError(f"parallel: sequence length {T} is not divisible by sp={layout.sp}; every rank of an SP "
                         f"group needs a slice of the same length (pick block_size / batch length accordingly)")
    n = T // layout.sp
    return x[:, layout.sp_rank * n:(layout.sp_rank + 1) * n]


def lasp_prefix(states_R, slope_H, slice_len, r):
    """The state entering slice r from the final states KV_L(q) (zero initial state) of all R slices.

    S_in(r) = sum_{q<r} lambda^{slice_len * (r-1-q)} KV_L(q): KV_L(q) is the state at the END of slice q, it
    still decays over the r-1-q whole slices between q and r. This is the loop KV_G <- lambda^{len} KV_G + KV_L(q)
    over q = 0 .. r-1 (MINIMAX01.md section 9), unrolled into one weighted sum so that every rank, rank 0
    included (all weights 0), uses the gathered tensor and so takes part in its backward collective.
    states_R (R, B, H, D, E) -> (B, H, D, E), in the states' dtype (fp32).
    """
    R, s_H = states_R.shape[0], slope_H.to(states_R.dtype)  # decays in the state dtype (fp32; fp64 in tests)
    q = torch.arange(R, device=states_R.device)
    hops = (r - 1 - q).clamp(min=0) * slice_len  # (R,) tokens between the end of slice q and the start of r
    w_RH = torch.exp(-s_H[None, :] * hops[:, None]) * (q < r)[:, None]  # (R, H) lambda^hops, 0 for q >= r
    return torch.einsum("qh,qbhde->bhde", w_RH, states_R)


def lasp_inter(q, slope_H, prefix):
    """The inter-rank term lambda^{t+1} q_t^T S_in of each local token t: q (B, H, T, D) -> (B, H, T, E) in the
    prefix's dtype (fp32: the state precision, as the kernels keep it)."""
    t = torch.arange(q.shape[2], device=q.device)
    decay_HT = torch.exp(-slope_H.to(prefix.dtype)[:, None] * (t + 1))  # (H, T) lambda^{t+1}
    return (q.to(prefix.dtype) * decay_HT[..., None]) @ prefix  # (B, H, T, E)


def lasp_attend(attn, layout, q, k, v):
    """LightningAttention.attend for this rank's slice (LASP+): q, k, v (B, H, T, D) -> o (B, H, T, E)."""
    slope = attn.slope  # (H,) fp32, read at every call: model.to(...) replaces the buffer
    # (1) local pass from a zero state: intra + inter-chunk parts of the slice, and the slice's own final state
    o, kv_local = lightning_attn(q, k, v, slope, output_final_state=True)  # (B, H, T, E), (B, H, D, E) fp32
    # (2) every rank's state (one all-gather; its backward returns each state's gradient to its owner)
    states = all_gather(kv_local, layout.sp_group)  # (R, B, H, D, E)
    # (3) prefix of the earlier ranks, decayed, and its contribution to every local output row
    prefix = lasp_prefix(states, slope, q.shape[2], layout.sp_rank)  # (B, H, D, E)
    return o + lasp_inter(q, slope, prefix).to(o.dtype)


def gathered_kv_attend(attn, layout, q, k, v):
    """SoftmaxAttention.attend for this rank's slice: q (B, H, T, D), k, v (B, Hkv, T, D) after RoPE at the
    global positions (model.seq_slice) -> (B, H, T, D). Keys and values of the whole sequence are gathered over
    the SP group; the queries sit at offset sp_rank * T (causal mask aligned to the lower-right corner)."""
    B, H, T, Dh = q.shape
    Hkv, r = k.shape[1], layout.sp_rank
    kv = all_gather(torch.stack([k, v]), layout.sp_group)[:r + 1]  # (r+1, 2, B, Hkv, T, Dh): later slices unseen
    kv = kv.permute(1, 2, 3, 0, 4, 5).reshape(2, B, Hkv, (r + 1) * T, Dh)  # keys 0 .. (r+1)T-1 in order
    # GQA by repeating the KV heads: the lower-right causal kernels below take equal head counts
    k, v = (t.repeat_interleave(H // Hkv, dim=1) for t in kv)  # (B, H, (r+1)T, Dh)
    # query i (global r*T + i) sees keys 0 .. r*T + i: causal aligned to the bottom-right corner
    S = (r + 1) * T
    if r == 0:
        mask = None  # a square slice: plain causal
    elif q.is_cuda:  # flash / efficient kernels take a lower-right causal mask without materialising (T, S)
        from torch.nn.attention.bias import causal_lower_right  # (imports torch._dynamo: seconds, so only here)
        mask = causal_lower_right(T, S)
    else:  # CPU: SDPA would materialise that mask anyway; same mask, built here
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)  # (T, S) key j <= r*T + i
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)


def apply_sequence_parallel(model, layout):
    """Make every attention layer of a MiniMax work on a contiguous slice of the sequence (split_sequence).

    model.seq_slice = (sp_rank, sp): RoPE at the global positions, and the length check of the whole sequence.
    Each attention layer's attend (model.py's seam) is swapped: lightning layers LASP+, softmax layers gathered
    K/V. Projections, norms and the MoE are per token and stay as they are. Only the plain forward changes: a
    forward with a cache (generate) never calls attend and ignores seq_slice, so it runs whole sequences on
    one rank. The loss of a rank is the mean over its slice; sync_gradients turns the ranks' gradients into the
    gradient of the mean over the whole sequence. The MoE balance loss is computed per slice (as per micro-batch).
    """
    if layout.sp == 1:
        return model
    model.seq_slice = (layout.sp_rank, layout.sp)
    for block in model.layers:
        attn = block.self_attn
        if isinstance(attn, LightningAttention):
            attn.attend = partial(lasp_attend, attn, layout)  # instance attribute shadows the method
        elif isinstance(attn, SoftmaxAttention):
            attn.attend = partial(gathered_kv_attend, attn, layout)
        else:
            raise ValueError(f"parallel: unknown attention module {type(attn).__name__} for sequence parallelism")
    return model


# -----------------------------------------------------------------------------
# gradients


def _split_params(model):
    """-> (dense params, expert params): expert = the stacked w1/w3/w2 of every MoE (sharded when ep > 1)."""
    expert_ids = {id(getattr(m, n)) for m in expert_modules(model) for n in ("w1", "w3", "w2")}
    params = [p for p in model.parameters() if p.requires_grad]
    return [p for p in params if id(p) not in expert_ids], [p for p in params if id(p) in expert_ids]


def _all_reduce_grads(params, world, group, bucket_numel=1 << 25):
    """grad <- all_reduce(SUM over group)(grad) / world, in flat buckets of ~32M elements (few, big messages).

    A missing grad (a parameter unused on this rank, e.g. experts that got no token) is sent as zeros: every
    rank must put the same tensors into the same collectives.
    """
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    i = 0
    while i < len(params):
        bucket, n = [], 0
        while i < len(params) and (not bucket or (n + params[i].numel() <= bucket_numel
                                                  and params[i].grad.dtype == bucket[0].grad.dtype)):
            bucket.append(params[i]); n += params[i].numel(); i += 1
        flat = torch.cat([p.grad.reshape(-1) for p in bucket])  # (n,)
        flat.div_(world)  # divide first: the sum of W values stays in range for bf16 grads too
        dist.all_reduce(flat, group=group)
        for p, g in zip(bucket, flat.split([p.numel() for p in bucket])):
            p.grad.copy_(g.view_as(p))


def sync_gradients(model, layout):
    """After backward (once per optimizer step, after the last micro-step): grads of the mean-over-ranks loss.

    dense: SUM over all W ranks / W (= the usual DP average); experts: SUM over the EDP group / W (module
    docstring, "Gradients"). With ep = 1 the EDP group is the world, so both rules coincide.
    """
    if layout.world == 1:
        return
    dense, experts = _split_params(model)
    _all_reduce_grads(dense, layout.world, None)
    _all_reduce_grads(experts, layout.world, layout.edp_group)


def clip_grad_norm_(model, max_norm, layout):
    """torch.nn.utils.clip_grad_norm_ for sharded experts (call after sync_gradients). -> total norm (tensor).

    Dense grads are identical on all ranks; the expert shards of one EP group together hold every expert
    once, so their squared norms are summed over the EP group.
    """
    dense, experts = _split_params(model)
    sq = lambda ps: sum((p.grad.float().square().sum() for p in ps if p.grad is not None),
                        torch.zeros((), device=layout.device))
    expert_sq = sq(experts)
    if layout.ep > 1:
        dist.all_reduce(expert_sq, group=layout.ep_group)
    norm = (sq(dense) + expert_sq).sqrt()
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)  # no host sync: multiply by 1 when under the limit
    for p in dense + experts:
        if p.grad is not None:
            p.grad.mul_(scale.to(p.grad.dtype))
    return norm


# -----------------------------------------------------------------------------
# checkpoints in the unsharded layout (save with one layout, resume with any other)


def _expert_names(model):
    names = {m: n for n, m in model.named_modules()}
    return {f"{names[m]}.{w}" for m in expert_modules(model) for w in ("w1", "w3", "w2")}


def _gather_experts(t, layout):
    """Expert shard (L, ...) -> all E experts (E, ...), concatenated in ep_rank order. Collective."""
    if layout.ep == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(layout.ep)]
    dist.all_gather(parts, t.contiguous(), group=layout.ep_group)
    return torch.cat(parts)


def _shard_experts(t, layout):
    """All E experts (E, ...) -> this rank's shard (L, ...)."""
    L = t.shape[0] // layout.ep
    return t[layout.ep_rank * L:(layout.ep_rank + 1) * L]


def full_state_dict(model, layout):
    """The model's state_dict with every expert tensor unsharded; on the master process (None elsewhere).

    A collective: call it on every rank. The result loads into a model with any layout.
    """
    sd = model.state_dict()
    for name in sorted(_expert_names(model)):  # same order on every rank
        sd[name] = _gather_experts(sd[name], layout)
    return {k: v.cpu() for k, v in sd.items()} if layout.master_process else None


def load_full_state_dict(model, full_sd, layout):
    """Load an unsharded state_dict (every rank reads it, e.g. torch.load(..., mmap=True)) into a model that
    already had apply_expert_parallel: each rank copies its own expert shard. No communication."""
    experts = _expert_names(model)
    model.load_state_dict({k: _shard_experts(v, layout) if k in experts else v for k, v in full_sd.items()})


def _optimizer_expert_slots(optimizer, model):
    """-> {index in optimizer.state_dict()['state']: the expert param} (the state_dict numbers the params
    in param_group order)."""
    expert_ids = {id(p) for p in _split_params(model)[1]}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    return {i: p for i, p in enumerate(params) if id(p) in expert_ids}


def full_optimizer_state_dict(optimizer, model, layout):
    """optimizer.state_dict() with per-expert state (AdamW's exp_avg, exp_avg_sq) unsharded; master only."""
    osd = optimizer.state_dict()
    for i, p in sorted(_optimizer_expert_slots(optimizer, model).items()):
        state = osd["state"][i] = dict(osd["state"].get(i, {}))  # a copy: state_dict() shares the live tensors
        for k in sorted(state):
            if torch.is_tensor(state[k]) and state[k].shape == p.shape:  # per-element state, not 'step'
                state[k] = _gather_experts(state[k], layout)
    return osd if layout.master_process else None


def load_full_optimizer_state_dict(optimizer, model, full_osd, layout):
    """Inverse of full_optimizer_state_dict on a sharded model (build the optimizer after apply_*)."""
    osd = {"state": {i: dict(s) for i, s in full_osd["state"].items()}, "param_groups": full_osd["param_groups"]}
    for i, p in _optimizer_expert_slots(optimizer, model).items():
        for k, v in osd["state"].get(i, {}).items():
            if (torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == p.shape[0] * layout.ep
                    and v.shape[1:] == p.shape[1:]):
                osd["state"][i][k] = _shard_experts(v, layout)
    optimizer.load_state_dict(osd)
