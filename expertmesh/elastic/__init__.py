"""Elastic expert parallelism (`expertmesh serve --elastic`): a rank other than 0 that dies is
survived, with or without pipeline stages. `elastic_spec` checks the flags before any rank
starts; on each rank `recovery.Elastic` notices the loss and regroups stage by stage
(`layout.py`), `experts.py` moves the dead rank's experts, `slots.py` pairs the survivors into
pipelines, `sockets.py` breaks the old connections; rank 0's `ledger.Ledger` re-queues the
requests in flight."""

from __future__ import annotations

from dataclasses import replace

from expertmesh.elastic.experts import spare_placement
from expertmesh.engine.spec import RunSpec
from expertmesh.launch import cuda_devices, local_plan, under_torchrun


def elastic_spec(spec: RunSpec, redundant: int, backend: str | None) -> RunSpec:
    """`spec` for `serve --elastic`, with `redundant` spare replicas (`spare_placement`); raises
    ValueError (one line) for what elastic serving does not support."""
    dep = spec.deployment
    if dep.ep < 2 or dep.tp > 1:
        raise ValueError(f"--elastic serves expert parallelism (ep2, ep4, ep2pp2, ...), not "
                         f"{dep.name}: tensor parallelism is not supported")
    if under_torchrun():
        raise ValueError("--elastic runs local ranks only; under torchrun it is not supported")
    if local_plan(dep.world_size, backend, cuda_devices())[1] != "gloo":
        raise ValueError("--elastic runs the ranks on the CPU over gloo; NCCL is not supported "
                         "(add --backend gloo)")
    if spec.a2a == "hierarchical":
        raise ValueError("--elastic regroups the ranks as one node; drop --a2a hierarchical")
    if not redundant:
        return spec
    layer = spare_placement(spec.cfg.n_experts, dep.ep, redundant)
    spec = replace(spec, placement=[layer] * spec.cfg.n_layers)
    spec.validate(dep.world_size)
    return spec
