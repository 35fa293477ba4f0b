"""The MoE block: router -> dispatch to experts -> grouped expert compute -> weighted combine.

Notation: T tokens, D d_model, H expert hidden, E experts held by this module (all of them on a
single device, the local ones under expert parallelism), k experts per token, N = T * k
(token, expert) assignments.

The block owns a `dispatcher`, the one step that parallelism replaces: `LocalDispatcher` runs
every expert here; the expert-parallel dispatcher (`parallel/dispatch.py`) sends assignments to
the rank that holds their expert and back.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from expertmesh.model import expert_kernels
from expertmesh.model.capacity import Capacity, Overflow, apply_capacity
from expertmesh.model.expert_kernels import grouped_mm_applies as _grouped_mm_applies
from expertmesh.model.layers import Linear, meta_weight
from expertmesh.model.steps import Steps, run_steps
from expertmesh.trace import span


class Router(nn.Module):
    """Top-k gating: x `[T, D]` -> expert ids `[T, k]` (int64), weights `[T, k]` (x's dtype).

    Softmax over all experts in fp32, keep the k largest; with `renormalize` divide by their sum,
    computed as a softmax over the top-k logits (the same values, two ops fewer). `skew` > 0 biases the logits of expert e by
    -skew * log(e + 1), multiplying its probability by (e + 1)^-skew (a Zipf-like popularity,
    for producing load imbalance on purpose with synthetic weights). `skew_shift` N > 0 makes
    the hot experts move: from engine step s on (`rotate_skew`), expert e is biased as expert
    e - (s // N) * E / 4 (mod E) was, so every N steps a quarter of the experts' popularity
    passes on to the next quarter.
    """

    def __init__(self, d_model: int, n_experts: int, top_k: int, renormalize: bool, skew: float = 0.0):
        super().__init__()
        self.top_k, self.renormalize, self.skew = top_k, renormalize, skew
        self.skew_shift, self.skew_offset = 0, 0
        self.weight = meta_weight(n_experts, d_model)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x `[T, D]` -> router logits `[T, E]` (x's dtype; fp32 once skewed)."""
        logits = F.linear(x, self.weight)
        if self.skew:
            E = logits.shape[-1]
            ranks = (torch.arange(E, device=x.device) - self.skew_offset) % E + 1
            ranks = ranks.to(torch.float32)
            logits = logits.float() - self.skew * ranks.log()
        return logits

    def probs(self, x: torch.Tensor) -> torch.Tensor:
        """x `[T, D]` -> router probabilities `[T, E]` (fp32)."""
        return self.logits(x).softmax(dim=-1, dtype=torch.float32)

    def select(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """logits `[T, E]` -> ids `[T, k]`, weights `[T, k]` (fp32). Softmax is monotone, so the
        top-k of the logits are those of the probabilities."""
        if self.renormalize:
            top, ids = logits.topk(self.top_k, dim=-1)
            return ids, top.softmax(dim=-1, dtype=torch.float32)
        weights, ids = logits.softmax(dim=-1, dtype=torch.float32).topk(self.top_k, dim=-1)
        return ids, weights

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ids, weights = self.select(self.logits(x))
        return ids, weights.to(x.dtype)


def rotate_skew(model: nn.Module, step: int) -> None:
    """Before engine step `step`: move the hot experts of every skewed router with a
    `skew_shift` (see `Router`). Host state only: the next forward's bias uses it."""
    for router in model.modules():
        if isinstance(router, Router) and router.skew and router.skew_shift:
            E = router.weight.shape[0]
            router.skew_offset = (step // router.skew_shift) * max(1, E // 4) % E


class GroupedExperts(nn.Module):
    """E experts with stacked weights, computed over tokens already grouped by expert.

    Weights: `w_up [E, H, D]`, `w_down [E, D, H]` and, for SwiGLU, `w_gate [E, H, D]` (the
    `[out, in]` layout of `nn.Linear`, stacked). Forward: x `[N, D]` sorted by expert,
    counts `[E]` -> `[N, D]`, each weight's matmul by the kernel `kernels` picks for the call's
    rows per expert (`expert_kernels.py`: one grouped matmul, or one matmul per expert over its
    tokens; the grouped one where the per-expert loop would need a host read the caller has not
    made, the loop where the grouped kernel does not apply). Rows past sum(counts) are padding
    (fixed-size buffers): their outputs are undefined.
    """

    def __init__(self, n_experts: int, d_model: int, hidden: int, kind: str):
        super().__init__()
        self.kind = kind
        self.n_experts = n_experts
        self.kernels = expert_kernels.DEFAULT
        self.w_up = meta_weight(n_experts, hidden, d_model)
        self.w_down = meta_weight(n_experts, d_model, hidden)
        if kind == "swiglu":
            self.w_gate = meta_weight(n_experts, hidden, d_model)

    def forward(self, x: torch.Tensor, counts: torch.Tensor | None, splits: list[int] | None = None,
                ends: torch.Tensor | None = None) -> torch.Tensor:
        """`splits`: `counts` as Python ints, when the caller has them (spares the per-expert loop
        a host sync). `ends`: the cumulative sums of `counts` `[E]` int32, when the caller has them
        instead of `counts` (spares the grouped kernel a cumsum)."""
        if x.shape[0] == 0:
            return x.new_zeros(0, self.w_down.shape[1])
        if self._kernel(x, splits) == "grouped":
            offs = ends if ends is not None else counts.cumsum(0, dtype=torch.int32)

            def mm(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
                return expert_kernels.grouped(a, w, offs)
        else:
            if splits is None:  # the loop needs ints: a host read (on a CPU device, no wait)
                splits = counts.cpu().tolist() if counts is not None else _differences(ends.cpu().tolist())

            def mm(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
                return expert_kernels.loop(a, w, splits)

        if self.kind == "swiglu":
            h = F.silu(mm(x, self.w_gate)) * mm(x, self.w_up)
        else:
            h = F.gelu(mm(x, self.w_up))
        out = mm(h, self.w_down)
        if out.shape[0] < x.shape[0]:  # the loop computed no padding rows
            out = torch.cat([out, out.new_zeros(x.shape[0] - out.shape[0], out.shape[1])])
        return out

    def _kernel(self, x: torch.Tensor, splits: list[int] | None) -> str:
        """The plan's kernel for x `[N, D]`, where it applies: the grouped one needs
        `_grouped_mm_applies`; the loop, off the CPU, needs `splits` or the grouped kernel's
        absence (it never adds a host read to a forward the grouped kernel could run)."""
        grouped_ok = _grouped_mm_applies(x, self.w_up.shape[1])
        kernel = self.kernels.pick(x.shape[0], self.n_experts)
        if kernel == "loop" and splits is None and x.device.type != "cpu" and grouped_ok:
            return "grouped"
        return kernel if kernel == "loop" or grouped_ok else "loop"


def _differences(ends: list[int]) -> list[int]:
    return [b - a for a, b in zip([0, *ends], ends)]


def sort_assignments(slots: torch.Tensor, n_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Group assignments by slot: slots `[T, k]` -> order `[N]` (stable), counts `[n_slots]`.

    `order` lists flat assignment indices (token = index // k) so that those of slot 0 come first.
    """
    flat = slots.reshape(-1)
    order = torch.argsort(flat, stable=True)
    # index_add, not bincount: bincount reads the largest value on the host (a sync on CUDA)
    counts = torch.zeros(n_slots, dtype=torch.long, device=flat.device).index_add_(0, flat, torch.ones_like(flat))
    return order, counts


def rank_in_group(order: torch.Tensor, group: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Each element's index among the elements of its group, counted in `order` `[N]`: group ids
    `[N]`, elements per group `counts [G]`, and `order`, a permutation listing each group's
    elements together, groups in index order (`sort_assignments`'s) -> `[N]`, on the device."""
    start = counts.cumsum(0) - counts
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device) - start[group[order]]
    return rank


def combine(sorted_out: torch.Tensor, order: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Undo `sort_assignments` and sum each token's k expert outputs with its router weights.

    sorted_out `[N, D]` in `order`, weights `[T, k]` -> `[T, D]`; the k terms are summed in a
    fixed order, so the result does not depend on how assignments were grouped.
    """
    T, k = weights.shape
    unsorted = torch.empty_like(sorted_out)
    unsorted[order] = sorted_out
    return weighted_sum(unsorted.view(T, k, sorted_out.shape[-1]), weights)


def weighted_sum(rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """rows `[T, k, D]`, weights `[T, k]` (the rows' dtype) -> sum over k of weight x row `[T, D]`,
    one batched matmul (every path that combines expert outputs uses it, so they agree bitwise)."""
    return torch.bmm(weights.unsqueeze(1), rows).squeeze(1)


class LocalDispatcher:
    """Every expert is on this device: sort by expert, compute grouped, combine.

    `may_drop`: ids can be -1 (dropped by capacity): those assignments sort last, past every
    expert's rows, where the grouped kernel leaves padding; their outputs are set to exact zeros
    on the device (no host read of how many were dropped).
    """

    def __init__(self, may_drop: bool = False):
        self.may_drop = may_drop
        self._ends = torch.arange(0)

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                 experts: GroupedExperts) -> torch.Tensor:
        E = experts.n_experts
        if not self.may_drop:
            ordered, order = torch.sort(ids.reshape(-1), stable=True)
            if self._ends.device != ids.device or self._ends.numel() != E:  # once
                self._ends = torch.arange(1, E + 1, device=ids.device)
            # where each expert's rows end: how many assignments chose an expert below e + 1
            ends = torch.searchsorted(ordered, self._ends, out_int32=True)
            with span("expert compute"):
                out = experts(x[order // ids.shape[1]], None, ends=ends)
            return combine(out, order, weights)
        order, counts = sort_assignments(torch.where(ids >= 0, ids, E), E + 1)  # -1 (dropped) last
        with span("expert compute"):
            out = experts(x[order // ids.shape[1]], counts[:E])
        computed = torch.arange(order.numel(), device=order.device) < order.numel() - counts[E]
        return combine(torch.where(computed[:, None], out, 0), order, weights)

    def steps(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
              experts: GroupedExperts) -> Steps[torch.Tensor]:
        """Nothing crosses the network: a generator that never yields (`model/steps.py`)."""
        yield from ()
        return self(x, ids, weights, experts)


class SharedExpert(nn.Module):
    """A dense SwiGLU MLP every token passes through, gated per token (Qwen2-MoE):
    x `[T, D]` -> sigmoid(gate(x)) * down(silu(w_gate(x)) * w_up(x)) `[T, D]`, hidden Hs;
    without `gated`, no gate (DeepSeek-V3's shared experts).

    The output is linear in `w_down`'s partial sums, so tensor parallelism may split Hs and
    all-reduce the block's output once, with the routed experts' partial output.
    """

    def __init__(self, d_model: int, hidden: int, gated: bool = True):
        super().__init__()
        self.w_gate = Linear(d_model, hidden)
        self.w_up = Linear(d_model, hidden)
        self.w_down = Linear(hidden, d_model)
        self.gate = Linear(d_model, 1) if gated else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))
        return out if self.gate is None else torch.sigmoid(self.gate(x)) * out


class MoEBlock(nn.Module):
    """x `[b, L, D]` -> `[b, L, D]`: route each token to its top-k experts and mix their outputs,
    plus the shared expert's output when `shared_hidden > 0`.

    Each row of x is one sequence's tokens, the unit of capacity (`model/capacity.py`); a ragged
    batch comes as x `[T, D]` with `seq_lens`, the lengths of its consecutive sequences.
    The exchange's path under expert parallelism follows the forward's context
    (`model/forward_context.py`). `reduce_output`: set by tensor parallelism, whose ranks each compute a partial
    sum of the output: sums it in place over the group (an all-reduce).
    """

    def __init__(self, d_model: int, n_experts: int, top_k: int, hidden: int, kind: str,
                 renormalize: bool, shared_hidden: int = 0, router_skew: float = 0.0,
                 capacity: Capacity | None = None):
        super().__init__()
        self.router = Router(d_model, n_experts, top_k, renormalize, router_skew)
        self.capacity = capacity
        self.overflow = Overflow()  # of this rank's tokens
        self.experts = GroupedExperts(n_experts, d_model, hidden, kind)
        self.dispatcher = LocalDispatcher(may_drop=capacity is not None)
        self.shared = SharedExpert(d_model, shared_hidden) if shared_hidden else None
        self.reduce_output: Callable[[torch.Tensor], object] | None = None

    def forward(self, x: torch.Tensor, seq_lens: list[int] | None = None) -> torch.Tensor:
        return run_steps(self.steps(x, seq_lens))

    def steps(self, x: torch.Tensor, seq_lens: list[int] | None = None) -> Steps[torch.Tensor]:
        """`forward` as a generator that yields while a token exchange is in flight."""
        flat = x.reshape(-1, x.shape[-1])
        if x.dim() == 3:
            seq_lens = [x.shape[1]] * x.shape[0]
        with span("route"):
            ids, weights = self._route(flat, seq_lens)
        out = yield from self.dispatcher.steps(flat, ids, weights.to(flat.dtype), self.experts)
        if self.shared is not None:
            out = out + self.shared(flat)
        if self.reduce_output is not None:
            self.reduce_output(out)
        return out.view_as(x)

    def _route(self, x: torch.Tensor, seq_lens: list[int] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k routing, then capacity (if any) per sequence: local, since a sequence's tokens are
        all on this rank."""
        logits = self.router.logits(x)
        ids, weights = self.router.select(logits)
        if self.capacity is None:
            return ids, weights
        probs = logits.softmax(dim=-1, dtype=torch.float32)
        ids, weights, status = apply_capacity(probs, ids, weights, self.capacity, seq_lens)
        self.overflow.count(status)
        return ids, weights
