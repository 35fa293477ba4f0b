"""A simulated run: the engine's plan (ModelConfig + Deployment + Workload) on a cluster.

When the cluster has more GPUs than the deployment needs, it runs data-parallel replicas of the
deployment: `replicas = gpus // deployment.world_size`, each serving its share of the batch (the
largest share sets the step times). Replica 0 occupies ranks 0 .. world_size - 1 of the topology.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from expertmesh.config import ModelConfig, Workload
from expertmesh.deployment import Deployment
from expertmesh.sim.hardware import HardwareProfile
from expertmesh.sim.routing import Routing
from expertmesh.topology import Topology


@dataclass(frozen=True)
class Scenario:
    """`gpus` None: exactly the deployment's ranks. `gpus_per_node` None: the hardware's.
    `a2a_chunks`: chunks an EP exchange is split into, the exchange of one overlapping the expert
    compute of the previous (1: no overlap, what the engine's dispatcher does today).
    `n_micro` None: one micro-batch per pipeline stage, as the engine."""

    cfg: ModelConfig
    deployment: Deployment
    workload: Workload
    hardware: HardwareProfile
    gpus: int | None = None
    gpus_per_node: int | None = None
    a2a_chunks: int = 1
    hierarchical_a2a: bool = False
    routing: Routing = field(default_factory=Routing)
    n_micro: int | None = None

    def __post_init__(self) -> None:
        self.deployment.validate(self.cfg)
        self.workload.validate_for(self.cfg)
        ws = self.deployment.world_size
        if self.gpus is None:
            object.__setattr__(self, "gpus", ws)
        if self.gpus_per_node is None:
            object.__setattr__(self, "gpus_per_node", self.hardware.gpus_per_node)
        if self.gpus % ws:
            raise ValueError(f"{self.gpus} GPUs do not hold whole replicas of {self.deployment.name} "
                             f"({ws} ranks); use a multiple of {ws} GPUs")
        if self.workload.batch_size < self.replicas:
            raise ValueError(f"batch {self.workload.batch_size} is smaller than the {self.replicas} "
                             f"replicas of {self.deployment.name} on {self.gpus} GPUs; use at most "
                             f"{self.workload.batch_size * ws} GPUs or a larger batch")
        if self.a2a_chunks < 1:
            raise ValueError(f"a2a_chunks={self.a2a_chunks} must be at least 1")
        if self.n_micro is not None and self.n_micro < 1:
            raise ValueError(f"n_micro={self.n_micro} must be at least 1")

    @property
    def replicas(self) -> int:
        return self.gpus // self.deployment.world_size

    @property
    def micro_batches(self) -> int:
        return self.n_micro or self.deployment.pp

    @property
    def topology(self) -> Topology:
        return Topology.for_gpus(self.gpus, self.gpus_per_node)

    @property
    def replica_workload(self) -> Workload:
        """What the busiest replica serves: ceil(batch / replicas) sequences."""
        batch = -(-self.workload.batch_size // self.replicas)
        return dataclasses.replace(self.workload, batch_size=batch, prompt_ids=None)

    @property
    def itemsize(self) -> int:
        return 2 if self.cfg.dtype == "bf16" else 4

    def assumptions(self) -> dict[str, str]:
        """Every assumption behind a prediction, for printing beside it."""
        cfg, w, t = self.cfg, self.workload, self.topology
        return {
            "model": f"{cfg.name}: {cfg.n_layers} layers, {cfg.n_experts} experts, top-{cfg.top_k}, "
                     f"d_model {cfg.d_model}, {cfg.n_heads}x{cfg.head_dim} heads "
                     f"({cfg.n_kv_heads} KV), expert hidden {cfg.expert_hidden}, {cfg.dtype}",
            "workload": f"batch {w.batch_size}, prompt {w.prompt_len} + generate {w.gen_len} tokens "
                        f"(context up to {w.total_len})",
            "hardware": f"{self.hardware.name} ({self.hardware.source}), {t.gpus_per_node} per node",
            "gpus": f"{self.gpus} = {self.replicas} replica(s) x {self.deployment.world_size} ranks "
                    f"of {self.deployment.name}; each replica serves <= {self.replica_workload.batch_size} "
                    f"sequences",
            "schedule": f"{self.micro_batches} micro-batch(es); EP exchange in {self.a2a_chunks} chunk(s)"
                        f"{' overlapped with expert compute' if self.a2a_chunks > 1 else ' (no overlap)'}"
                        f"{', hierarchical' if self.hierarchical_a2a else ''}; routing {self.routing.name}",
            "memory": "weights + KV cache for the whole context; activations not counted",
        }
