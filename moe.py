"""
Mixture of experts: the feed-forward block of every MiniMax-01 layer (32 SwiGLU experts, top-2).

A token goes to K of E experts. The layer runs in four stages, each a method, read top to bottom:

    route     router logits -> fp32 softmax -> top-K -> renormalise     x (T, D) -> weights, ids (T, K)
    permute   sort the N = T*K token-slots by expert (stable), gather    x_sorted (N, D), counts (E,)
    experts   one grouped matmul per weight over all experts             y_sorted (N, D)
    combine   un-sort, weight by the gates, sum the K slots per token    y (T, D)

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
that the tokens late in a batch are the ones dropped when an expert overflows.

Determinism: no atomics on floats. The combine is a reshape (T, K, D) + weighted sum (a bmm), and the backward
of the gather sums the K slot gradients of a token the same way instead of scattering.

Host-device syncs: none in the grouped path, dropless or not. experts_loop calls counts.tolist() (one sync).

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
    """True when torch._grouped_mm can run these operands (CPU: fp32/bf16; CUDA: 16-byte aligned rows)."""
    if not hasattr(torch, "_grouped_mm") or x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return False  # e.g. fp64 in the reference tests, or torch < 2.9 on CPU
    if x.is_cuda:
        # every leading stride must be a multiple of 16 bytes: D and F multiples of 8 in bf16
        row_bytes = [t.shape[-1] * t.element_size() for t in (x, *weights)]
        return all(b % 16 == 0 for b in row_bytes)
    return True


def grouped_mm_is_fast(x):
    """The CUTLASS kernel needs bf16 on sm90/sm100. Elsewhere torch loops over groups after a host sync."""
    return x.is_cuda and x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] in (9, 10)


def grouped_mm(x_NI, w_GOI, offs_G):
    """(N, I) rows in G consecutive groups times (G, O, I) weights -> (N, O); group g uses w[g].

    offs_G holds the int32 *end* row of each group. Rows past offs_G[-1] are left uninitialised.
    """
    return torch._grouped_mm(x_NI, w_GOI.transpose(-2, -1), offs=offs_G)  # B = (G, I, O), column-major view


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous.

    _grouped_mm's backward rejects stride-0 gradients (e.g. from y.sum().backward(), MOE.md section 3);
    .contiguous() is free when the gradient already is contiguous.
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
# gather rows by a slot permutation, with a scatter-free backward


class _GatherSlots(torch.autograd.Function):
    """out[i] = src[rows[i]], where rows[i] = perm[i] // K and perm is a permutation of the N slots.

    Used twice:  permute  src = x (T, D), perm = order (sorted position -> slot), K = top-k: each token row is
                          read K times, and its gradient is the sum of its K slot gradients.
                 unpermute src = y_sorted (N, D), perm = dest (slot -> sorted position), K = 1.
    The backward gathers with the inverse permutation and sums K consecutive rows (a reshape + sum), so it
    uses no scatter/index_add and no atomics: deterministic, and no zero-filled buffer.
    """

    @staticmethod
    def forward(ctx, src, rows_N, inv_perm_N, K):
        ctx.save_for_backward(inv_perm_N)
        ctx.K = K
        return src.index_select(0, rows_N)  # (N, D)

    @staticmethod
    def backward(ctx, g_ND):
        (inv_perm_N,) = ctx.saved_tensors
        g_ND = g_ND.index_select(0, inv_perm_N)  # back to the source order (slot order if K > 1)
        if ctx.K > 1:
            g_ND = g_ND.view(-1, ctx.K, g_ND.shape[-1]).sum(1)  # (T, K, D) -> (T, D): sum a token's slots
        return g_ND, None, None, None


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
        """-> weights_TK (fp32, or fp64 for fp64 input; sum 1 per token), ids_TK (int64), logits_TE (fp32), probs_TE (fp32)."""
        logits_TE = self.gate(x_TD)  # (T, E) matmul in x's dtype
        logits_TE = logits_TE.to(torch.promote_types(logits_TE.dtype, torch.float32))  # softmax in >= fp32
        probs_TE = logits_TE.softmax(dim=-1)  # (T, E)
        weights_TK, ids_TK = probs_TE.topk(self.top_k, dim=-1)  # (T, K), largest first
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)  # renormalise the K chosen weights
        return weights_TK, ids_TK, logits_TE, probs_TE

    # ---- stage 2: permute ------------------------------------------------------------------------------

    def sort_slots(self, ids_TK):
        """Order the N = T*K slots by expert. -> order_N, counts_E, kept_E, keep_sorted_N (None if dropless).

        order[i] = slot at sorted position i. The sort is stable, so inside one expert the slots stay in
        token order; that order is also the drop priority (earliest tokens win).
        """
        E = self.num_experts
        ids_N = ids_TK.flatten()  # (N,) slot s = t*K + k
        order_N = torch.argsort(ids_N, stable=True)  # (N,) expert-major, token order inside an expert
        # counts per expert: integer scatter_add (order-independent, so deterministic); bincount would sync
        counts_E = torch.zeros(E, dtype=torch.int64, device=ids_N.device).scatter_add_(0, ids_N, torch.ones_like(ids_N))
        if self.capacity_factor is None:
            return order_N, counts_E, counts_E, None
        # capacity: keep a slot iff (slots of its expert before it, on earlier ranks and earlier tokens) < C
        N = ids_N.numel()
        before_E, num_tokens = self.global_counts(counts_E, N // self.top_k)
        capacity = math.ceil(self.capacity_factor * self.top_k * num_tokens / E)
        starts_E = counts_E.cumsum(0) - counts_E  # (E,) first sorted position of each expert
        expert_sorted_N = ids_N[order_N]  # (N,) expert of each sorted position
        rank_N = torch.arange(N, device=ids_N.device) - starts_E[expert_sorted_N]  # (N,) 0, 1, .. per expert
        keep_sorted_N = before_E[expert_sorted_N] + rank_N < capacity  # (N,) bool
        kept_E = (capacity - before_E).clamp(min=0).minimum(counts_E)  # (E,) slots each expert runs
        # move dropped slots behind all kept ones (stable, so kept slots stay expert-major in token order)
        order_N = order_N[torch.argsort((~keep_sorted_N).to(torch.uint8), stable=True)]
        keep_sorted_N = torch.arange(N, device=ids_N.device) < kept_E.sum()  # first sum(kept) rows are real
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
        # under autocast the parameters may be fp32 while activations are bf16; cast is a no-op otherwise
        return self.w1.to(dtype), self.w3.to(dtype), self.w2.to(dtype)

    def experts_grouped(self, x_sorted_ND, counts_E, w1=None, w3=None, w2=None):
        """Three grouped matmuls over all experts; no host sync. Weights default to this layer's experts."""
        if w1 is None:
            w1, w3, w2 = self._expert_weights(x_sorted_ND.dtype)
        if not grouped_mm_available(x_sorted_ND, w1, w2):
            if x_sorted_ND.is_cuda:
                _warn_once(f"torch._grouped_mm unavailable for {x_sorted_ND.dtype} / these sizes: per-expert "
                           "loop instead (slow, one host sync)")
            return self.experts_loop(x_sorted_ND, counts_E, w1, w3, w2)
        if x_sorted_ND.is_cuda and not grouped_mm_is_fast(x_sorted_ND):
            _warn_once("torch._grouped_mm runs its looping fallback here (needs bf16 on sm90/sm100): slow")
        offs_E = counts_E.cumsum(0).to(torch.int32)  # (E,) end row of each expert's block
        h_NF = F.silu(grouped_mm(x_sorted_ND, w1, offs_E)) * grouped_mm(x_sorted_ND, w3, offs_E)  # (N, F)
        y_ND = grouped_mm(h_NF, w2, offs_E)  # (N, D)
        return _ContiguousGrad.apply(y_ND)

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

    # ---- stage 4: unpermute + combine ------------------------------------------------------------------

    def combine(self, y_sorted_ND, weights_TK, dest_N, order_N):
        """y[t] = sum_k weights[t, k] * y_sorted[dest[t*K + k]], as a (T, 1, K) x (T, K, D) bmm."""
        T, K = weights_TK.shape
        y_NKD = _GatherSlots.apply(y_sorted_ND, dest_N, order_N, 1).view(T, K, -1)  # (T, K, D) slot order
        w_T1K = weights_TK.to(y_sorted_ND.dtype).unsqueeze(1)  # (T, 1, K)
        return torch.bmm(w_T1K, y_NKD).squeeze(1)  # (T, D); a fixed-order sum, no atomics

    # ---- the whole layer -------------------------------------------------------------------------------

    def forward(self, x):
        """x (..., D) -> (y (..., D) in x's dtype, aux dict of losses and statistics)."""
        D, E, K = self.hidden_size, self.num_experts, self.top_k
        if x.shape[-1] != D:
            raise ValueError(f"MoE: expected last dim hidden_size={D}, got input of shape {tuple(x.shape)}")
        x_TD = x.reshape(-1, D)  # (T, D)
        T = x_TD.shape[0]
        # compute dtype: autocast's if it is on (params stay fp32), else x's own
        dt = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype

        weights_TK, ids_TK, logits_TE, probs_TE = self.route(x_TD)  # 1. route
        order_N, counts_E, kept_E, keep_N = self.sort_slots(ids_TK)  # 2. permute
        dest_N = torch.empty_like(order_N).scatter_(0, order_N, torch.arange(T * K, device=x.device))  # inverse
        x_sorted_ND = _GatherSlots.apply(x_TD.to(dt), order_N // K, dest_N, K)  # (N, D) expert-major rows
        if keep_N is not None:  # dropped rows: zero input, so no stray gradient flows back through them
            x_sorted_ND = torch.where(keep_N[:, None], x_sorted_ND, 0)
        y_sorted_ND = self.run_experts(x_sorted_ND, kept_E)  # 3. experts
        if keep_N is not None:  # rows past sum(kept) are uninitialised in _grouped_mm: mask, don't multiply
            y_sorted_ND = torch.where(keep_N[:, None], y_sorted_ND, 0)
        y_TD = self.combine(y_sorted_ND, weights_TK, dest_N, order_N)  # 4. unpermute + combine

        # load-balancing losses (fp32) and detached statistics
        load_E = counts_E.float() / (T * K)  # f_i: fraction of the T*K slots routed to expert i
        balance_loss = E * (load_E * probs_TE.mean(0)).sum()  # Switch: 1.0 when perfectly balanced
        z_loss = torch.logsumexp(logits_TE, dim=-1).square().mean()
        if self.z_loss_coef == 0:
            z_loss = z_loss.detach()  # reported only; keeps it out of the backward graph
        aux = {
            "aux_loss": self.aux_loss_coef * balance_loss + self.z_loss_coef * z_loss,
            "balance_loss": balance_loss,
            "z_loss": z_loss,
            "load": load_E.detach(),
            "dropped": ((counts_E - kept_E).float() / counts_E.clamp(min=1)).detach(),
        }
        return y_TD.to(x.dtype).view(x.shape), aux


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
