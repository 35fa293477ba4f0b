"""One rank's shard of the model: built on the meta device, the deployment's parallelism applied
(pipeline stage, tensor shards, expert placement and token exchange), then only this rank's
weights materialized, synthetic or read from a checkpoint, and the experts' kernel chosen
(`model/expert_kernels.py`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from expertmesh.checkpoint.loader import load_checkpoint
from expertmesh.engine.spec import RunSpec
from expertmesh.model.expert_kernels import KernelPlan, Timer, resolve, time_call
from expertmesh.model.moe import GroupedExperts
from expertmesh.model.synthetic import materialize
from expertmesh.model.transformer import MoETransformer, build_model
from expertmesh.parallel.expert import Overlap, apply_expert_parallel
from expertmesh.parallel.mesh import stage_group
from expertmesh.parallel.pipeline import PipelineLinks, apply_pipeline
from expertmesh.parallel.placement import default_placement
from expertmesh.parallel.tensor import apply_tensor_parallel


def shard_model(spec: RunSpec, rank: int, group: dist.ProcessGroup | None) -> MoETransformer:
    """This rank's shard of the model, still on the meta device."""
    dep = spec.deployment
    model = build_model(spec.cfg)
    stage, inner = dep.coords(rank)
    if dep.pp > 1:
        apply_pipeline(model, dep, stage)
    if dep.tp > 1:
        apply_tensor_parallel(model, group, dep.tp, inner)
    if dep.ep > 1:
        topology = spec.topology
        placements = spec.placement or default_placement(spec.cfg.n_layers, spec.cfg.n_experts, dep.ep)
        peer_nodes = [topology.node_of(stage * dep.inner + i) for i in range(dep.ep)]
        apply_expert_parallel(model, group, inner, placements, chunks=spec.a2a_chunks,
                              overlap_chunks=spec.overlap != Overlap.NONE, peer_nodes=peer_nodes,
                              hierarchical=spec.a2a == "hierarchical",
                              low_latency_threshold=spec.low_latency_tokens,
                              replica_routing=spec.replica_routing)
    return model


def load_rank(spec: RunSpec, device: torch.device) -> tuple[MoETransformer, PipelineLinks | None, int]:
    """This rank's shard of the model with its weights, its pipeline links, and the checkpoint
    bytes it read."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    dep = spec.deployment
    group = stage_group(dep, rank) if dist.is_initialized() else None
    model = shard_model(spec, rank, group)
    if spec.checkpoint:
        checkpoint_bytes = load_checkpoint(model, spec.checkpoint, spec.cfg.torch_dtype, device)
    else:
        model, checkpoint_bytes = materialize(model, spec.seed, spec.cfg.torch_dtype, device), 0
    install_expert_kernels(model, spec.expert_kernel, device)
    links = PipelineLinks(dep, rank, device) if dep.pp > 1 else None
    return model, links, checkpoint_bytes


def install_expert_kernels(model: MoETransformer, setting: str, device: torch.device,
                           timer: Timer = time_call) -> dict[tuple, KernelPlan]:
    """Give every `GroupedExperts` of `model` its plan under `setting` (`model/expert_kernels.py`);
    returns the plans by (d_model, hidden, dtype). Collective when torch.distributed is
    initialized: every rank of the default group calls it; the ranks' expert shapes are
    all-gathered (pickled tuples) and rank 0 resolves a plan for each and broadcasts them, so
    timing noise never makes two ranks choose differently."""
    experts = [m for m in model.modules() if isinstance(m, GroupedExperts)]
    shapes = {(m.w_up.shape[2], m.w_up.shape[1], m.w_up.dtype) for m in experts}
    if dist.is_initialized():
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, sorted(shapes, key=str))
        shapes = {shape for rank_shapes in everyone for shape in rank_shapes}
        box = [None]
        if dist.get_rank() == 0:
            box = [{shape: resolve(setting, *shape, device, timer) for shape in shapes}]
        dist.broadcast_object_list(box, src=0)
        plans = box[0]
    else:
        plans = {shape: resolve(setting, *shape, device, timer) for shape in shapes}
    for m in experts:
        m.kernels = plans[(m.w_up.shape[2], m.w_up.shape[1], m.w_up.dtype)]
    return plans
