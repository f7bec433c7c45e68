"""
Mixture of experts: the feed-forward block of every MiniMax-01 layer (32 SwiGLU experts, top-2).

A token goes to K of E experts. forward() runs four stages, read top to bottom:

    1 route     route(): router logits -> fp32 softmax -> top-K -> renormalise    x (T, D) -> weights, ids (T, K)
    2 permute   sort_slots(): stable sort of the N = T*K slots by expert;
                _Permute: gather token rows into that order                      x_sorted (N, D), counts (E,)
    3 experts   run_experts(): 3 grouped matmuls (w1, w3, w2) over all experts   y_sorted (N, D)
    4 combine   _Combine: un-sort, weight by the gates, add the K slots of a token   y (T, D)

Slot s = t*K + k is "the k-th choice of token t". Sorting the slots by expert id makes each expert's rows one
contiguous block, so a single grouped matmul (torch._grouped_mm, CUTLASS on Hopper) serves all experts.

Seam for expert parallelism (parallel.py patches an existing instance, no subclassing):
  * run_experts(x_sorted (N, D), counts (E,) int64) -> y_sorted (N, D)
      Rows are expert-major: rows [sum(counts[:e]), sum(counts[:e+1])) belong to expert e; rows past
      sum(counts) are dropped slots (capacity mode) and their outputs are ignored (the layer masks them).
      Replace it on an instance (`moe.run_experts = my_fn`) to put an all-to-all around the local experts;
      `experts_grouped` / `experts_loop` remain available to call on the local expert weights.
  * global_counts(counts (E,), num_tokens: int) -> (counts_before (E,), num_tokens_global: int)
      Capacity mode only (the "global router" of MiniMax-01). Default: (zeros, num_tokens), i.e. local capacity.
      An EP version all-gathers the counts of every rank, returns the slots routed to each expert by ranks
      before this one, and the token count of the whole group. Capacity is then ceil(cf * K * T_global / E)
      per expert, and the slots are kept in global (rank, token) order.

Load balancing (MOE.md section 5): Switch loss E * sum_i f_i * P_i, f_i = fraction of the T*K slots routed to
expert i (before any drop), P_i = mean router probability of expert i; it equals 1.0 for a perfectly balanced
routing. Optional router z-loss mean_t logsumexp(z_t)^2 (ST-MoE). aux['aux_loss'] = aux_coef * balance +
z_coef * z is what training adds to its loss.

Token drop (capacity_factor=cf, default None = dropless): each expert keeps at most C = ceil(cf * K * T / E)
slots. Policy: *earliest tokens win*. Slots of one expert are kept in token order (t = 0, 1, ...), the rest
are dropped; a dropped slot contributes zero and the token keeps its residual. The gate weight of a dropped
slot is not given to the other expert (no renormalisation). Deterministic and free of host syncs; the price is
that the tokens late in a batch are the ones dropped when an expert overflows. Drops happen only in training
mode (module.train()); in eval mode the layer is dropless.

Determinism: no atomics on floats. The combine views the slots as (T, K, D) and adds them in a fixed order; the
backward of the permute sums the K slot gradients of a token the same way instead of scattering (index_add).

Host-device syncs: none in the grouped path, dropless or not. experts_loop calls counts.tolist() (one sync).

Grouped matmul: torch._grouped_mm, fast (CUTLASS, no sync) for bf16 on sm90/sm100; on CPU (fp32/bf16, torch
>= 2.9) it loops over the groups; fp64 or unsupported sizes use experts_loop. Under torch.compile only bf16 with
16-byte aligned rows traces (the op's meta function checks that on every device); anything else takes
experts_loop, which compile runs eagerly. Its backward rejects stride-0 output gradients (y.sum().backward()),
so the expert output passes through _ContiguousGrad.

Speed (bench/moe_bench.py, H200, bf16, T=16384, E=32, K=2, D=1024, F=1536, fwd+bwd): layer 2.78 ms = 1.38x its
expert stage (2.02 ms, 87 % of a dense SwiGLU's TFLOP/s); torch.compile(layer) 2.19 ms. At D=512 the eager layer
is bound by host-side dispatch (~2.6 ms to issue ~120 ops), not by the GPU: compile it.

Refs: Switch Transformer (arXiv 2101.03961), ST-MoE z-loss (arXiv 2202.08906), MegaBlocks dropless MoE
(arXiv 2211.15841), MiniMax-01 (arXiv 2501.08313) section 2.1; ../shared/MOE.md for measurements.
Letters: T tokens, D hidden, F expert hidden, E experts, K top-k, N = T*K slots.

Run: python moe.py (CPU smoke test); tests: python -m pytest -q tests/test_moe.py;
benchmark (GPU): python bench/moe_bench.py
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# grouped matmul


def grouped_mm_available(x, *weights):
    """True when torch._grouped_mm can run these operands.

    Eager: CPU fp32/bf16/fp16 (torch loops over the groups); CUDA with 16-byte aligned rows. Under
    torch.compile the op is traced with its meta function, which accepts only bf16 with 16-byte aligned rows on
    ANY device (it restates the CUDA kernel's checks): e.g. train.py --compile on CPU in fp32 failed there.
    """
    if not hasattr(torch, "_grouped_mm") or x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return False  # e.g. fp64 in the reference tests, or torch < 2.9 on CPU
    compiling = torch.compiler.is_compiling()
    if compiling and x.dtype != torch.bfloat16:
        return False
    if x.is_cuda or compiling:
        # every leading stride must be a multiple of 16 bytes: D and F multiples of 8 in bf16
        return all(t.shape[-1] * t.element_size() % 16 == 0 for t in (x, *weights))
    return True


_capability = {}  # device index -> (major, minor), cached: the query costs host time on every call


def grouped_mm_is_fast(x):
    """The CUTLASS kernel needs bf16 on sm90/sm100. Elsewhere torch loops over groups after a host sync."""
    if not x.is_cuda or x.dtype != torch.bfloat16:
        return False
    if x.device.index not in _capability:
        _capability[x.device.index] = torch.cuda.get_device_capability(x.device)
    return _capability[x.device.index][0] in (9, 10)


def grouped_mm(x_NI, w_GOI, offs_G):
    """(N, I) rows in G consecutive groups times (G, O, I) weights -> (N, O); group g uses w[g].

    offs_G holds the int32 *end* row of each group. Rows past offs_G[-1] are left uninitialised.
    """
    return torch._grouped_mm(x_NI, w_GOI.transpose(-2, -1), offs=offs_G)  # B = (G, I, O), column-major view


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous.

    _grouped_mm's backward rejects stride-0 gradients (e.g. from y.sum().backward(), MOE.md section 3);
    .contiguous() is free when the gradient already is contiguous (always, inside the layer).
    """

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g.contiguous()


_warned = set()


def _warn_once(msg):
    if msg not in _warned:
        _warned.add(msg)
        print("-" * 80 + "\nmoe.py: " + msg + "\n" + "-" * 80)


# -----------------------------------------------------------------------------
# permute and unpermute+combine, with gather-only backwards (no scatter, no atomics)


class _Permute(torch.autograd.Function):
    """x_sorted[i] = x[order[i] // K]: row i holds the token of the slot at sorted position i.

    Autograd's own backward of index_select is an index_add (atomics on CUDA, a zero-filled buffer). Here:
    gather the slot gradients back into slot order with dest = inverse(order), then add the K slots of each
    token in a fixed order. Deterministic.
    """

    @staticmethod
    def forward(ctx, x_TD, order_N, dest_N, K):
        ctx.save_for_backward(dest_N)
        ctx.K = K
        return x_TD.index_select(0, order_N // K)  # (N, D)

    @staticmethod
    def backward(ctx, g_ND):
        (dest_N,) = ctx.saved_tensors
        g_TKD = g_ND.index_select(0, dest_N).view(-1, ctx.K, g_ND.shape[-1])  # (T, K, D) slot order
        g_TD = g_TKD[:, 0]
        for k in range(1, ctx.K):  # an add per k: faster than a reduction over a middle dim of size K
            g_TD = g_TD + g_TKD[:, k]
        return g_TD, None, None, None


class _Combine(torch.autograd.Function):
    """y[t] = sum_k w[t, k] * y_sorted[dest[t*K + k]]: un-sort the expert outputs and mix them by the gates.

    Backward: dy_sorted[dest[s]] = w[s] * g[t] (computed in slot order, then gathered with order),
    dw[t, k] = <g[t], y_sorted[dest[t*K + k]]>. A reshape (T, K, D) and fixed-order sums: no atomics.
    (Autograd through torch.bmm of (T, 1, K) x (T, K, D) does the same math but measured 2-5x slower fwd+bwd
    on an H200: its backward is an outer-product bmm that cuBLAS runs badly.)
    """

    @staticmethod
    def forward(ctx, y_sorted_ND, weights_TK, dest_N, order_N):
        T, K = weights_TK.shape
        y_TKD = y_sorted_ND.index_select(0, dest_N).view(T, K, y_sorted_ND.shape[-1])  # (T, K, D) slot order
        w_TK1 = weights_TK.to(y_TKD.dtype).unsqueeze(-1)  # (T, K, 1) gates in the activation dtype
        out_TD = y_TKD[:, 0] * w_TK1[:, 0]  # (T, D)
        for k in range(1, K):
            out_TD.addcmul_(y_TKD[:, k], w_TK1[:, k])  # out += y_k * w_k, one rounding per k
        ctx.save_for_backward(y_TKD, w_TK1, order_N)
        ctx.weights_dtype = weights_TK.dtype
        return out_TD

    @staticmethod
    def backward(ctx, g_TD):
        y_TKD, w_TK1, order_N = ctx.saved_tensors
        T, K, D = y_TKD.shape
        g_TD1 = g_TD.unsqueeze(-1)  # (T, D, 1)
        grad_w_TK = torch.bmm(y_TKD, g_TD1).view(T, K).to(ctx.weights_dtype)  # (T, K) dot products
        grad_y_ND = (w_TK1 * g_TD.unsqueeze(1)).view(T * K, D).index_select(0, order_N)  # (N, D) sorted
        return grad_y_ND, grad_w_TK, None, None


# -----------------------------------------------------------------------------
# the layer


class MoE(nn.Module):
    def __init__(self, hidden_size, intermediate_size, num_experts, top_k=2, capacity_factor=None,
                 aux_loss_coef=0.01, z_loss_coef=0.0, expert_impl="grouped"):
        super().__init__()
        # validate here, so a bad config fails at build time with a message, not deep inside forward
        for name, v in [("hidden_size", hidden_size), ("intermediate_size", intermediate_size),
                        ("num_experts", num_experts), ("top_k", top_k)]:
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"MoE: {name} must be a positive int, got {v!r}")
        if top_k > num_experts:
            raise ValueError(f"MoE: top_k={top_k} > num_experts={num_experts}; choose top_k <= num_experts")
        if capacity_factor is not None and not capacity_factor > 0:  # also catches NaN
            raise ValueError(f"MoE: capacity_factor must be > 0 or None (dropless), got {capacity_factor!r}")
        if aux_loss_coef < 0 or z_loss_coef < 0:
            raise ValueError(f"MoE: loss coefficients must be >= 0, got aux={aux_loss_coef}, z={z_loss_coef}")
        if expert_impl not in ("grouped", "loop"):
            raise ValueError(f"MoE: expert_impl must be 'grouped' or 'loop', got {expert_impl!r}")
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.num_experts, self.top_k = num_experts, top_k
        self.capacity_factor = capacity_factor
        self.aux_loss_coef, self.z_loss_coef = aux_loss_coef, z_loss_coef
        self.expert_impl = expert_impl  # "grouped" (fast) or "loop" (the slow, obviously correct twin)
        D, F_, E = hidden_size, intermediate_size, num_experts
        self.gate = nn.Linear(D, E, bias=False)  # router
        # stacked expert weights, nn.Linear layout (out, in) per expert: w2(silu(w1 x) * w3 x)
        self.w1 = nn.Parameter(torch.empty(E, F_, D))
        self.w3 = nn.Parameter(torch.empty(E, F_, D))
        self.w2 = nn.Parameter(torch.empty(E, D, F_))
        self.reset_parameters()

    def reset_parameters(self):
        """Like nn.Linear per expert: U(-1/sqrt(fan_in), 1/sqrt(fan_in)). model.py may re-initialise."""
        self.gate.reset_parameters()
        for w in (self.w1, self.w3, self.w2):
            bound = 1.0 / math.sqrt(w.shape[-1])
            nn.init.uniform_(w, -bound, bound)

    # ---- stage 1: route --------------------------------------------------------------------------------

    def route(self, x_TD):
        """-> weights_TK, ids_TK (int64), logits_TE, probs_TE. Gate math in fp32 (fp64 for fp64 input).

        weights_TK are the top-K probabilities renormalised to sum to 1 per token, largest first.
        """
        logits_TE = self.gate(x_TD)  # (T, E) matmul in x's dtype, like MiniMax-01
        if logits_TE.dtype != torch.float64:
            logits_TE = logits_TE.float()  # softmax, top-k and the losses in fp32
        probs_TE = logits_TE.softmax(dim=-1)  # (T, E)
        weights_TK, ids_TK = probs_TE.topk(self.top_k, dim=-1)  # (T, K)
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)  # renormalise the K chosen weights
        return weights_TK, ids_TK, logits_TE, probs_TE

    # ---- stage 2: permute ------------------------------------------------------------------------------

    def sort_slots(self, ids_TK):
        """Order the N = T*K slots by expert. -> order_N, counts_E, kept_E, keep_sorted_N (None if dropless).

        order[i] = the slot at sorted position i. The sort is stable, so inside one expert the slots stay in
        token order; that order is also the drop priority (earliest tokens win). counts_E = slots routed to
        each expert, kept_E = slots each expert runs (= counts_E when dropless).
        """
        E = self.num_experts
        ids_N = ids_TK.view(-1)  # (N,) slot s = t*K + k
        ids_sorted_N, order_N = torch.sort(ids_N, stable=True)  # (N,) expert-major, token order inside
        # counts per expert: integer scatter_add (order-independent, so deterministic); bincount would sync
        counts_E = ids_N.new_zeros(E).scatter_add_(0, ids_N, torch.ones_like(ids_N))  # (E,)
        # token drop is a training-time device (MiniMax-01 drops only while training): in eval mode, and so in
        # generation, where T = 1 per step, the layer is dropless and a cached decode equals the full forward
        if self.capacity_factor is None or not self.training:
            return order_N, counts_E, counts_E, None
        # capacity: keep a slot iff fewer than C slots of its expert come before it (earlier ranks, tokens)
        N = ids_N.numel()
        before_E, num_tokens = self.global_counts(counts_E, N // self.top_k)
        capacity = math.ceil(self.capacity_factor * self.top_k * num_tokens / E)
        starts_E = counts_E.cumsum(0) - counts_E  # (E,) first sorted position of each expert
        positions_N = torch.arange(N, device=ids_N.device)
        rank_N = positions_N - starts_E[ids_sorted_N]  # (N,) 0, 1, 2, .. inside each expert's block
        keep_sorted_N = before_E[ids_sorted_N] + rank_N < capacity  # (N,) bool
        kept_E = (capacity - before_E).clamp(min=0).minimum(counts_E)  # (E,) slots each expert runs
        # move dropped slots behind all kept ones (stable, so kept slots stay expert-major in token order)
        order_N = order_N[torch.argsort((~keep_sorted_N).to(torch.uint8), stable=True)]
        keep_sorted_N = positions_N < kept_E.sum()  # now the first sum(kept) rows are the kept slots
        return order_N, counts_E, kept_E, keep_sorted_N

    def global_counts(self, counts_E, num_tokens):
        """Seam for the global router (parallel.py overrides it): -> (counts_before_E, num_tokens_global).

        counts_before_E[e] = slots routed to expert e that precede this rank's tokens in the global order;
        num_tokens_global = tokens over the whole group (a host int, it sets the capacity).
        """
        return torch.zeros_like(counts_E), num_tokens

    # ---- stage 3: experts ------------------------------------------------------------------------------

    def run_experts(self, x_sorted_ND, counts_E):
        """Seam for expert parallelism (parallel.py may replace it): expert-major rows -> SwiGLU outputs."""
        if self.expert_impl == "loop":
            return self.experts_loop(x_sorted_ND, counts_E)
        return self.experts_grouped(x_sorted_ND, counts_E)

    def _expert_weights(self, dtype):
        # under autocast the parameters may be fp32 while activations are bf16: cast them (once per forward)
        return tuple(w if w.dtype == dtype else w.to(dtype) for w in (self.w1, self.w3, self.w2))

    def experts_grouped(self, x_sorted_ND, counts_E, w1=None, w3=None, w2=None):
        """Three grouped matmuls over all experts; no host sync. Weights default to this layer's experts."""
        if w1 is None:
            w1, w3, w2 = self._expert_weights(x_sorted_ND.dtype)
        if not grouped_mm_available(x_sorted_ND, w1, w2):
            if x_sorted_ND.is_cuda:
                _warn_once(f"torch._grouped_mm unavailable for {x_sorted_ND.dtype} / these sizes: per-expert "
                           "loop instead (slow, one host sync)")
            return self.experts_loop(x_sorted_ND, counts_E, w1, w3, w2)  # under compile: runs eagerly
        if x_sorted_ND.is_cuda and not grouped_mm_is_fast(x_sorted_ND):
            _warn_once("torch._grouped_mm runs its looping fallback here (needs bf16 on sm90/sm100): slow")
        offs_E = counts_E.cumsum(0, dtype=torch.int32)  # (E,) end row of each expert's block
        h_NF = F.silu(grouped_mm(x_sorted_ND, w1, offs_E)) * grouped_mm(x_sorted_ND, w3, offs_E)  # (N, F)
        y_ND = grouped_mm(h_NF, w2, offs_E)  # (N, D)
        return _ContiguousGrad.apply(y_ND)

    # torch.compile runs this eagerly (a graph break around it): traced, its .tolist() would specialise the
    # graph on the per-expert counts and recompile for every new routing
    @torch.compiler.disable
    def experts_loop(self, x_sorted_ND, counts_E, w1=None, w3=None, w2=None):
        """Slow twin: one expert at a time with plain matmuls. Rows past sum(counts) get zeros."""
        if w1 is None:
            w1, w3, w2 = self._expert_weights(x_sorted_ND.dtype)
        ys, start = [], 0
        for e, n in enumerate(counts_E.tolist()):  # host sync: .tolist() reads the counts
            xe = x_sorted_ND[start:start + n]  # (n, D) rows of expert e
            ys.append(F.linear(F.silu(F.linear(xe, w1[e])) * F.linear(xe, w3[e]), w2[e]))  # (n, D)
            start += n
        ys.append(x_sorted_ND.new_zeros(x_sorted_ND.shape[0] - start, w2.shape[1]))  # dropped slots
        return torch.cat(ys)  # (N, D)

    # ---- the whole layer -------------------------------------------------------------------------------

    def forward(self, x, stats=True):
        """x (..., D) -> (y (..., D) in x's dtype, aux dict of losses and statistics).

        stats=False: aux = {}, for callers that discard it (model.py's generation): the losses and statistics
        are ~10 small kernels per layer, a noticeable share of a decoded token.
        """
        D, E, K = self.hidden_size, self.num_experts, self.top_k
        if x.shape[-1] != D:
            raise ValueError(f"MoE: expected last dim hidden_size={D}, got input of shape {tuple(x.shape)}")
        x_TD = x.reshape(-1, D)  # (T, D)
        T = x_TD.shape[0]

        # 1. route
        weights_TK, ids_TK, logits_TE, probs_TE = self.route(x_TD)

        # 2. permute: sort slots by expert, dest = inverse permutation (slot -> sorted position)
        order_N, counts_E, kept_E, keep_N = self.sort_slots(ids_TK)
        dest_N = torch.empty_like(order_N).scatter_(0, order_N, torch.arange(T * K, device=x.device))
        if torch.is_autocast_enabled(x.device.type):  # experts compute in autocast's dtype (params stay fp32)
            x_TD = x_TD.to(torch.get_autocast_dtype(x.device.type))
        x_sorted_ND = _Permute.apply(x_TD, order_N, dest_N, K)  # (N, D) expert-major rows
        if keep_N is not None:  # dropped rows: zero input, so no stray gradient flows back through them
            x_sorted_ND = torch.where(keep_N[:, None], x_sorted_ND, 0)

        # 3. experts
        y_sorted_ND = self.run_experts(x_sorted_ND, kept_E)  # (N, D)
        if keep_N is not None:  # rows past sum(kept) are uninitialised in _grouped_mm: mask, don't multiply
            y_sorted_ND = torch.where(keep_N[:, None], y_sorted_ND, 0)

        # 4. unpermute + combine: y[t] = sum_k weights[t, k] * y_sorted[dest[t*K + k]]
        y_TD = _Combine.apply(y_sorted_ND, weights_TK, dest_N, order_N)
        if y_TD.dtype != x.dtype:
            y_TD = y_TD.to(x.dtype)
        if not stats:
            return y_TD.view(x.shape), {}

        # load-balancing losses (fp32) and detached statistics
        load_E = counts_E / (T * K)  # (E,) fp32, f_i: fraction of the T*K slots routed to expert i
        balance_loss = E * torch.dot(load_E.to(probs_TE.dtype), probs_TE.mean(0))  # Switch: 1.0 if balanced
        with torch.set_grad_enabled(self.z_loss_coef > 0 and torch.is_grad_enabled()):  # else: report only
            z_loss = torch.logsumexp(logits_TE, dim=-1).square().mean()
        aux_loss = self.aux_loss_coef * balance_loss
        if self.z_loss_coef > 0:
            aux_loss = aux_loss + self.z_loss_coef * z_loss
        if keep_N is None:
            dropped_E = torch.zeros_like(load_E)
        else:
            dropped_E = (counts_E - kept_E) / counts_E.clamp(min=1)  # (E,) fraction of each expert's slots
        aux = {"aux_loss": aux_loss, "balance_loss": balance_loss, "z_loss": z_loss,
               "load": load_E.detach(), "dropped": dropped_E}
        return y_TD.view(x.shape), aux


# -----------------------------------------------------------------------------

if __name__ == "__main__":
    # CPU smoke test: grouped vs loop experts on a random batch, and the routing statistics
    torch.manual_seed(0)
    moe = MoE(64, 96, num_experts=8, top_k=2)
    x = torch.randn(4, 32, 64)
    y, aux = moe(x)
    moe.expert_impl = "loop"
    y_loop, _ = moe(x)
    print(f"y {tuple(y.shape)}  max |grouped - loop| = {(y - y_loop).abs().max():.2e}")
    print(f"balance loss {aux['balance_loss']:.4f}  z loss {aux['z_loss']:.3f}  load {aux['load'].tolist()}")
