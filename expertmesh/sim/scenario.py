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


A2A_KERNELS = ("nccl", "low-latency")


@dataclass(frozen=True)
class Scenario:
    """`gpus` None: exactly the deployment's ranks. `gpus_per_node` None: the hardware's.
    `a2a_chunks`: chunks an EP exchange is split into, the exchange of one overlapping the expert
    compute of the previous (1: no overlap, what the engine's dispatcher does today).
    `a2a_kernel`: `nccl` (the engine's all_to_all_single, preceded by a count exchange the host
    waits for) or `low-latency` (for decode steps, a DeepEP-style kernel into fixed-size buffers:
    no count exchange, no host sync; prefill keeps the NCCL exchange, whose bandwidth suits it). `prefill_micro` / `decode_micro` None: one micro-batch per pipeline stage, as
    the engine. `cuda_graphs`: decode steps replay captured graphs, one launch per stretch between
    host syncs instead of one per op. `fp8`: FP8 weights, KV cache and EP dispatch, FP8 GEMMs
    (as TensorRT-LLM's FP8 mode); activations and the combine stay 16-bit."""

    cfg: ModelConfig
    deployment: Deployment
    workload: Workload
    hardware: HardwareProfile
    gpus: int | None = None
    gpus_per_node: int | None = None
    a2a_chunks: int = 1
    hierarchical_a2a: bool = False
    routing: Routing = field(default_factory=Routing)
    prefill_micro: int | None = None
    decode_micro: int | None = None
    a2a_kernel: str = "nccl"
    cuda_graphs: bool = False
    fp8: bool = False

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
        for name in ("prefill_micro", "decode_micro"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        if self.a2a_kernel not in A2A_KERNELS:
            raise ValueError(f"a2a kernel {self.a2a_kernel!r}; use one of: {', '.join(A2A_KERNELS)}")
        if self.a2a_kernel == "low-latency" and self.hardware.low_latency_a2a is None:
            raise ValueError(f"{self.hardware.name} has no low-latency all-to-all figures; "
                             f"use --a2a-kernel nccl")
        if self.fp8 and self.hardware.fp8_flops is None:
            raise ValueError(f"{self.hardware.name} has no FP8 matmul figure; drop --fp8")

    @property
    def replicas(self) -> int:
        return self.gpus // self.deployment.world_size

    def micro_batches(self, prefill: bool) -> int:
        """Micro-batches of a prefill step or of a decode step."""
        return (self.prefill_micro if prefill else self.decode_micro) or self.deployment.pp

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
        """Bytes per activation element."""
        return 2 if self.cfg.dtype == "bf16" or self.fp8 else 4

    @property
    def compute_dtype(self) -> str:
        """The GEMMs' dtype: `fp8`, or the model's."""
        return "fp8" if self.fp8 else self.cfg.dtype

    @property
    def weight_itemsize(self) -> int:
        return 1 if self.fp8 else self.itemsize

    @property
    def kv_itemsize(self) -> int:
        return 1 if self.fp8 else self.itemsize

    @property
    def dispatch_itemsize(self) -> int:
        """Bytes per element an EP dispatch sends (the combine sends activations)."""
        return 1 if self.fp8 else self.itemsize

    @property
    def host_syncs(self) -> str:
        """Where the host waits for the device inside a step, as the engine runs this plan."""
        if self.deployment.ep > 1 and self.a2a_kernel == "nccl":
            return "every MoE layer (the EP count exchange is read on the host to size the dispatch)"
        if self.deployment.ep > 1:
            return "every MoE layer of a prefill step only (decode uses the sync-free low-latency kernel)"
        return "none inside a step (kernels queue ahead of the device)"

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
                    f"sequences" + ("; replicas share no link (each GPU has its own NVLink ports and "
                                    "network port)" if self.replicas > 1 else ""),
            "schedule": f"{self.micro_batches(True)} prefill / {self.micro_batches(False)} decode "
                        f"micro-batch(es)"
                        + (f"; EP exchange ({self.a2a_kernel} kernel) in {self.a2a_chunks} chunk(s)"
                           f"{' overlapped with expert compute' if self.a2a_chunks > 1 else ' (no overlap)'}"
                           f"{', hierarchical' if self.hierarchical_a2a else ''}"
                           if self.deployment.ep > 1 else "")
                        + f"; routing {self.routing.name}",
            "host": f"launches {'hidden behind' if self.hardware.launch_overlaps else 'added to'} "
                    f"device work; decode {'in CUDA graphs' if self.cuda_graphs else 'launches every op'}; "
                    f"host syncs: {self.host_syncs}",
            "precision": ("FP8 weights, KV cache, dispatch and GEMMs; 16-bit activations"
                          if self.fp8 else f"{self.cfg.dtype} throughout"),
            "memory": "weights + KV cache for the whole context + peak prefill activations and "
                      "communication buffers + runtime reserve",
        }
