"""Expert parallelism applied to a plain model: each rank keeps its experts and exchanges tokens.

`apply_expert_parallel` changes two things per MoE block: the stacked expert weights shrink to
the rank's experts `[El, ...]` (marked as slices of the global `[E, ...]` weights, in the order
the layer's placement gives), and the block's dispatcher becomes the all-to-all one. Attention is
untouched: under EP it is data-parallel, each rank running it for its own sequences.

`rebalance` moves a running model to another placement (more or fewer replicas, experts on other
ranks) between batches: each expert a rank newly holds is sent by the lowest rank that held it,
point to point; nothing is reloaded and no process restarts.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import torch
import torch.distributed as dist
from torch import nn

from expertmesh.model.moe import GroupedExperts
from expertmesh.model.synthetic import mark_shard
from expertmesh.model.transformer import MoETransformer
from expertmesh.parallel.dispatch import AllToAllDispatcher
from expertmesh.parallel.expert_moves import copy_plan
from expertmesh.parallel.mesh import host_group
from expertmesh.trace import span


def apply_expert_parallel(model: MoETransformer, group: dist.ProcessGroup, ep_rank: int,
                          placements: list[list[list[int]]], **exchange) -> MoETransformer:
    """Keep `placements[layer][ep_rank]`'s experts in every layer held here; route tokens over
    `group`. `exchange` goes to `AllToAllDispatcher` (chunks, overlap, peer_nodes, hierarchical)."""
    cfg = model.cfg
    for name, layer in model.layers.items():
        if layer.moe is None:  # a dense layer: data-parallel, like attention
            continue
        placement = placements[int(name)]
        mine = placement[ep_rank]
        experts = GroupedExperts(len(mine), cfg.d_model, cfg.expert_hidden, cfg.expert_kind)
        for pname, param in experts.named_parameters():
            mark_shard(experts, pname, (cfg.n_experts, *param.shape[1:]), (mine, slice(None), slice(None)))
        layer.moe.experts = experts
        layer.moe.dispatcher = AllToAllDispatcher(group, placement, cfg.n_experts, ep_rank,
                                                  may_drop=cfg.capacity is not None, **exchange)
    return model


class Overlap(StrEnum):
    """How a forward's EP exchanges overlap with compute (`--overlap`): TBO always splits a forward
    into two micro-batches that take turns, AUTO when some rank has at least `TWO_BATCH_TOKENS`
    tokens; CHUNKS and NONE never split (the dispatchers' own chunking and waiting decide the
    rest: `AllToAllDispatcher(overlap_chunks=...)`)."""

    AUTO = "auto"
    TBO = "tbo"
    CHUNKS = "chunks"
    NONE = "none"


OVERLAPS = tuple(mode.value for mode in Overlap)  # the flag's choices
# auto: two-batch overlap when some rank of the group has at least this many tokens in a forward.
# Measured on 2 CPU ranks (benchmarks/two_batch.py, small preset, fp32, one engine forward, two
# runs): a decode forward's exchange is 2-7% of it, less than two half-size forwards add (none /
# tbo 0.75-0.84x at 32 tokens, 0.88-0.95x at 128); a prefill of 256 tokens 0.93x, of 512
# 1.05-1.19x, 1024 1.04-1.17x, 4096 1.10-1.12x.
TWO_BATCH_TOKENS = 512


@dataclass(frozen=True)
class ForwardPlan:
    """How one forward of the layers held here runs, the same on every rank of the EP group.

    low_latency_tokens: a bound on every rank's tokens per micro-batch under which every EP layer
    uses the low-latency exchange (None: the standard one). two_batch: the forward's sequences
    run as two micro-batches that take turns, one's exchange in flight while the other computes.
    """

    low_latency_tokens: int | None = None
    two_batch: bool = False


class ExchangeChoice:
    """Plans each forward of the EP layers held here, identically on every rank of the group: from
    the bound the engine's step message carries when the step only decodes, else from one
    all-reduce (MAX) of this rank's token count and its larger half's, two int64 over the group's
    gloo twin (no device sync; counted in `all_reduces`). Every rank of a stage runs every forward
    (with zero tokens if idle) and gets the same message, so the all-reduces match.

    overlap: an `Overlap` (or its name). threshold: the dispatchers' `low_latency_threshold`
    (`--low-latency-tokens`): the low-latency exchange runs when every rank's (half) batch is at
    most this. Without EP layers every forward is planned as one batch, standard exchange.
    """

    def __init__(self, model: MoETransformer, overlap: Overlap | str = Overlap.AUTO):
        if overlap not in OVERLAPS:
            raise ValueError(f"unknown overlap {overlap!r}; use one of {', '.join(OVERLAPS)}")
        held = list(dispatchers(model).values())
        self.overlap = Overlap(overlap) if held else Overlap.NONE
        self.threshold = held[0].low_latency_threshold if held else 0
        agree = self.threshold > 0 or self.overlap is Overlap.AUTO
        self.group = host_group(held[0].group) if held and agree else None
        self.all_reduces = 0

    def __call__(self, tokens: int, larger_half: int, bound: int | None = None) -> ForwardPlan:
        """tokens: this rank's in the forward; larger_half: those of its larger micro-batch if it
        were split in two. bound: when the forward only decodes (a token per sequence), the most
        tokens any rank of the group has in it, known alike to all of them (the engine's step
        message): the plan is made from it without the all-reduce."""
        most, most_half = tokens, larger_half
        if bound is not None:  # one token per sequence: a half holds at most ceil(bound / 2)
            most, most_half = bound, -(-bound // 2)
        elif self.group is not None:
            self.all_reduces += 1
            agreed = torch.tensor([tokens, larger_half])
            with span("exchange choice"):
                dist.all_reduce(agreed, op=dist.ReduceOp.MAX, group=self.group)
            most, most_half = agreed.tolist()
        two_batch = self.overlap is Overlap.TBO or (self.overlap is Overlap.AUTO and most >= TWO_BATCH_TOKENS)
        per_batch = most_half if two_batch else most
        return ForwardPlan(per_batch if 0 < self.threshold and per_batch <= self.threshold else None, two_batch)


def dispatchers(model: MoETransformer) -> dict[int, AllToAllDispatcher]:
    """The all-to-all dispatchers of the layers held here, by global layer index."""
    return {int(name): layer.moe.dispatcher for name, layer in model.layers.items()
            if layer.moe is not None and isinstance(layer.moe.dispatcher, AllToAllDispatcher)}


def rebalance(model: MoETransformer, placements: list[list[list[int]]]) -> int:
    """Move every EP layer held here to `placements[layer]`; returns the bytes this rank received.

    Per layer, each rank sends the weights `[H, D]`, `[D, H]` (and `[H, D]`) of every expert that
    another rank newly holds and this rank is the lowest old holder of, and receives those it
    newly holds; all ranks of the EP group must call it with the same placements.
    """
    received = 0
    for layer_index, old in dispatchers(model).items():
        layer = model.layers[str(layer_index)]
        new = placements[layer_index]
        me, group = old.rank, old.group
        _, recvs, sends = copy_plan(old.placement, new, me)
        old_local = {e: i for i, e in enumerate(old.placement[me])}
        names = [n for n, _ in layer.moe.experts.named_parameters()]
        current = dict(layer.moe.experts.named_parameters())
        fresh = {n: torch.empty(len(new[me]), *p.shape[1:], dtype=p.dtype, device=p.device)
                 for n, p in current.items()}
        ops = []
        for slot, peer in recvs:
            for n in names:
                ops.append(dist.P2POp(dist.irecv, fresh[n][slot], dist.get_global_rank(group, peer), group))
            received += sum(fresh[n][slot].nbytes for n in names)
        for peer, old_slot in sends:
            for n in names:
                ops.append(dist.P2POp(dist.isend, current[n][old_slot].contiguous(),
                                      dist.get_global_rank(group, peer), group))
        for slot, e in enumerate(new[me]):
            if e in old_local:  # kept, or moved between this rank's slots
                for n in names:
                    fresh[n][slot] = current[n][old_local[e]]
        if ops:
            for work in dist.batch_isend_irecv(ops):
                work.wait()
        experts = GroupedExperts(len(new[me]), model.cfg.d_model, model.cfg.expert_hidden, model.cfg.expert_kind)
        experts.kernels = layer.moe.experts.kernels  # the run's plan (`engine/shard.py: install_expert_kernels`)
        for n in names:
            setattr(experts, n, nn.Parameter(fresh[n], requires_grad=False))
            mark_shard(experts, n, (model.cfg.n_experts, *fresh[n].shape[1:]), (new[me], slice(None), slice(None)))
        layer.moe.experts = experts
        layer.moe.dispatcher = AllToAllDispatcher(group, new, model.cfg.n_experts, me, **old.options)
    return received
