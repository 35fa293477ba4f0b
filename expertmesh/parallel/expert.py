"""Expert parallelism applied to a plain model: each rank keeps its experts and exchanges tokens.

`apply_expert_parallel` changes two things per MoE block: the stacked expert weights shrink to
the rank's experts `[El, ...]` (marked as slices of the global `[E, ...]` weights), and the block's
dispatcher becomes the all-to-all one. Attention is untouched: under EP it is data-parallel, each
rank running it for its own sequences.
"""

from __future__ import annotations

import torch.distributed as dist

from expertmesh.model.moe import GroupedExperts
from expertmesh.model.synthetic import mark_shard
from expertmesh.model.transformer import MoETransformer
from expertmesh.parallel.dispatch import AllToAllDispatcher


def apply_expert_parallel(model: MoETransformer, group: dist.ProcessGroup, ep_rank: int,
                          placement: list[list[int]]) -> MoETransformer:
    """Keep `placement[ep_rank]`'s experts in every layer; route tokens over `group`."""
    cfg = model.cfg
    mine = placement[ep_rank]
    for layer in model.layers.values():
        experts = GroupedExperts(len(mine), cfg.d_model, cfg.expert_hidden, cfg.expert_kind)
        for name, param in experts.named_parameters():
            global_shape = (cfg.n_experts, *param.shape[1:])
            mark_shard(experts, name, global_shape, (mine, slice(None), slice(None)))
        layer.moe.experts = experts
        layer.moe.dispatcher = AllToAllDispatcher(group, placement, cfg.n_experts)
    return model
