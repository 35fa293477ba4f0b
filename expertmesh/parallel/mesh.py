"""Process groups of a deployment: one EP or TP group per pipeline stage."""

from __future__ import annotations

import torch.distributed as dist

from expertmesh.deployment import Deployment


def stage_group(deployment: Deployment, rank: int) -> dist.ProcessGroup | None:
    """The group of ranks sharing this rank's pipeline stage (its EP or TP group), or None for one.

    Every rank creates every stage's group, in the same order, as `new_group` requires.
    """
    if deployment.inner == 1:
        return None
    mine = None
    for stage in range(deployment.pp):
        ranks = list(range(stage * deployment.inner, (stage + 1) * deployment.inner))
        group = dist.new_group(ranks)
        if rank in ranks:
            mine = group
    return mine
