"""Expert parallelism applied to a plain model: each rank keeps its experts and exchanges tokens.

`apply_expert_parallel` changes two things per MoE block: the stacked expert weights shrink to
the rank's experts `[El, ...]` (marked as slices of the global `[E, ...]` weights, in the order
the layer's placement gives), and the block's dispatcher becomes the all-to-all one. Attention is
untouched: under EP it is data-parallel, each rank running it for its own sequences.
"""

from __future__ import annotations

import torch.distributed as dist

from expertmesh.model.moe import GroupedExperts
from expertmesh.model.synthetic import mark_shard
from expertmesh.model.transformer import MoETransformer
from expertmesh.parallel.dispatch import AllToAllDispatcher


def apply_expert_parallel(model: MoETransformer, group: dist.ProcessGroup, ep_rank: int,
                          placements: list[list[list[int]]], **exchange) -> MoETransformer:
    """Keep `placements[layer][ep_rank]`'s experts in every layer held here; route tokens over
    `group`. `exchange` goes to `AllToAllDispatcher` (chunks, overlap, peer_nodes, hierarchical)."""
    cfg = model.cfg
    for name, layer in model.layers.items():
        placement = placements[int(name)]
        mine = placement[ep_rank]
        experts = GroupedExperts(len(mine), cfg.d_model, cfg.expert_hidden, cfg.expert_kind)
        for pname, param in experts.named_parameters():
            mark_shard(experts, pname, (cfg.n_experts, *param.shape[1:]), (mine, slice(None), slice(None)))
        layer.moe.experts = experts
        layer.moe.dispatcher = AllToAllDispatcher(group, placement, cfg.n_experts, ep_rank, **exchange)
    return model


def dispatchers(model: MoETransformer) -> dict[int, AllToAllDispatcher]:
    """The all-to-all dispatchers of the layers held here, by global layer index."""
    return {int(name): layer.moe.dispatcher for name, layer in model.layers.items()
            if isinstance(layer.moe.dispatcher, AllToAllDispatcher)}
