"""Process groups of a deployment: one EP or TP group per pipeline stage, and under a device
backend (NCCL) a gloo twin of each, for small agreements on the host that must not wait for the
device. Every group this project makes comes from `new_group`, with the run's timeout."""

from __future__ import annotations

import torch.distributed as dist

from expertmesh.deployment import Deployment
from expertmesh.launch import group_timeout


def new_group(ranks: list[int] | None = None, backend: str | None = None) -> dist.ProcessGroup:
    """`dist.new_group` bounded by the run's `--timeout` (torch's default is 10 or 30 minutes)."""
    return dist.new_group(ranks, timeout=group_timeout(), backend=backend)


def stage_group(deployment: Deployment, rank: int) -> dist.ProcessGroup | None:
    """The group of ranks sharing this rank's pipeline stage (its EP or TP group), or None for one.

    Every rank creates every stage's group, in the same order, as `new_group` requires.
    """
    if deployment.inner == 1:
        return None
    inner = deployment.inner
    return groups_of([list(range(s * inner, (s + 1) * inner)) for s in range(deployment.pp)], rank)


def groups_of(stages: list[list[int]], rank: int) -> dist.ProcessGroup | None:
    """A group over each list of ranks of `stages` (every rank creates every one, in order; each
    with a gloo twin under a device backend); the one holding `rank`, or None where none does."""
    mine = None
    twins = dist.get_backend() != "gloo"
    for ranks in stages:
        group = new_group(ranks)
        twin = new_group(ranks, backend="gloo") if twins else group
        if rank in ranks:
            mine = group
            _HOST_TWIN[group] = twin
    return mine


_HOST_TWIN: dict = {}


def all_gather_flat(output, input, group: dist.ProcessGroup | None = None) -> None:
    """Every rank's equal-sized `input` into `output` ([size * n], group rank order).

    torch 2.13 names this `all_gather_single` and deprecates `all_gather_into_tensor`; torch 2.11
    (the H200 image) has only the second: the first NCCL run failed on it.
    """
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(output, input, group=group)


def with_host_twin(group: dist.ProcessGroup) -> dist.ProcessGroup:
    """`group`, given a gloo twin over the same ranks for `host_group` (a group made outside
    `stage_group`, e.g. one GPU's world of one in `benchmarks/gpu_check.py`). Collective."""
    _HOST_TWIN[group] = new_group(dist.get_process_group_ranks(group), backend="gloo")
    return group


def host_group(group: dist.ProcessGroup) -> dist.ProcessGroup:
    """`group` when it is a gloo group, else its gloo twin from `stage_group`."""
    return group if dist.get_backend(group) == "gloo" else _HOST_TWIN[group]
