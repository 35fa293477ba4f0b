"""What a run is (`RunSpec`: a ModelConfig + Deployment + Workload + seed, and how to exchange
tokens), and every check that can fail before any rank starts.
"""

from __future__ import annotations

from dataclasses import dataclass

from expertmesh.checkpoint.loader import check_checkpoint
from expertmesh.config import ModelConfig, Workload
from expertmesh.deployment import Deployment
from expertmesh.model.expert_kernels import SETTINGS
from expertmesh.parallel.dispatch import LOW_LATENCY_TOKENS, REPLICA_ROUTINGS
from expertmesh.parallel.eplb import EplbConfig
from expertmesh.parallel.expert import OVERLAPS, Overlap
from expertmesh.parallel.placement import validate_placement
from expertmesh.topology import Topology


@dataclass(frozen=True)
class RunSpec:
    """Everything a rank needs to run its part of a plan.

    n_micro: pipeline micro-batches (None: one per stage). low_latency_tokens: a forward whose
    every EP rank has at most this many tokens uses the low-latency exchange (0: never).
    a2a: "flat" or "hierarchical" token exchange; a2a_chunks: None picks per layer call.
    overlap: an `Overlap` (`parallel/expert.py`: auto, tbo, chunks, none; none waits on every exchange).
    gpus_per_node: node size of the topology (None: LOCAL_WORLD_SIZE, or one node).
    placement: experts per EP rank per layer (None: contiguous). replica_routing: "local" or
    "balanced" (`parallel/replicas.py`: each call splits replicated experts' tokens over their
    holders to even out the ranks' rows; needs a placement with replicas). record_routing: count which
    experts each rank's tokens choose. trace: record spans for a Perfetto trace.
    checkpoint: a Hugging Face model directory whose weights each rank reads its shard of
    (`cfg` from `expertmesh.checkpoint.config_from_hf`), instead of synthetic weights.
    enforce_eager: no decode graphs (`engine/graphs.py`; they are captured on CUDA only).
    eplb: online expert load balancing (`parallel/eplb.py`; None: off); needs a placement of
    E / ep primary experts then as many spare slots on every rank (`eplb_plan.start_placement`).
    expert_kernel: the experts' matmul kernel, one of `expert_kernels.SETTINGS` (auto: the
    faster measured on this machine for the model's shapes and dtype; `model/expert_kernels.py`).
    """

    cfg: ModelConfig
    deployment: Deployment
    workload: Workload
    seed: int = 0
    n_micro: int | None = None
    record_logits: bool = False
    warmup: bool = True
    a2a: str = "flat"
    a2a_chunks: int | None = None
    overlap: Overlap = Overlap.AUTO
    low_latency_tokens: int = LOW_LATENCY_TOKENS
    gpus_per_node: int | None = None
    placement: list | None = None
    replica_routing: str = "local"
    record_routing: bool = False
    trace: bool = False
    checkpoint: str | None = None
    enforce_eager: bool = False
    eplb: EplbConfig | None = None
    expert_kernel: str = "auto"

    @property
    def graphs(self) -> str:
        """The engine's decode graph mode (`engine/graphs.py`)."""
        return "off" if self.enforce_eager else "auto"

    def validate(self, world_size: int | None = None) -> None:
        """All checks that can fail, before any rank starts."""
        self.deployment.validate(self.cfg, world_size)
        self.workload.validate_for(self.cfg)
        if self.n_micro is not None and self.n_micro < 1:
            raise ValueError(f"micro-batches {self.n_micro} must be at least 1")
        if self.overlap not in OVERLAPS:
            raise ValueError(f"unknown overlap {self.overlap!r}; use one of {', '.join(OVERLAPS)}")
        if self.expert_kernel not in SETTINGS:
            raise ValueError(f"--expert-kernel {self.expert_kernel!r} is not a kernel; use one of "
                             f"{', '.join(SETTINGS)}")
        if self.a2a not in ("flat", "hierarchical"):
            raise ValueError(f"unknown exchange {self.a2a!r}; use flat or hierarchical")
        if self.low_latency_tokens < 0:
            raise ValueError(f"--low-latency-tokens {self.low_latency_tokens} must be >= 0 (0: never)")
        if self.a2a_chunks is not None and self.a2a_chunks < 1:
            raise ValueError(f"--a2a-chunks {self.a2a_chunks} must be at least 1 (or auto)")
        topology = self.topology
        if self.a2a == "hierarchical" and self.deployment.ep % topology.gpus_per_node and topology.nodes > 1:
            raise ValueError(f"hierarchical exchange needs --gpus-per-node {topology.gpus_per_node} "
                             f"to divide ep={self.deployment.ep}")
        for flag, given in (("--a2a hierarchical", self.a2a == "hierarchical"),
                            ("--placement", self.placement is not None),
                            ("--record-routing", self.record_routing)):
            refuse_off_ep(flag, given, self.deployment)
        if self.placement is not None:
            validate_placement(self.placement, self.cfg.n_layers, self.cfg.n_experts, self.deployment.ep)
        if self.replica_routing not in REPLICA_ROUTINGS:
            raise ValueError(f"unknown replica routing {self.replica_routing!r}; use one of "
                             f"{', '.join(REPLICA_ROUTINGS)}")
        if self.replica_routing == "balanced":
            refuse_off_ep("--replica-routing balanced", True, self.deployment)
            if not any(sum(map(len, layer)) > self.cfg.n_experts for layer in self.placement or []):
                raise ValueError("--replica-routing balanced splits replicated experts' tokens, and this "
                                 "placement has no replica; add --redundant-experts N --routing FILE "
                                 "or a --placement with replicas")
            if self.a2a == "hierarchical":
                raise ValueError("--replica-routing balanced ignores nodes, which --a2a hierarchical "
                                 "relies on; use --a2a flat with it")
        if self.eplb is not None:
            self._validate_eplb()
        if self.checkpoint:  # else each rank finds a bad tensor only when it loads it
            check_checkpoint(self.cfg, self.checkpoint)

    def _validate_eplb(self) -> None:
        refuse_off_ep("--eplb-interval", True, self.deployment)
        self.eplb.validate()
        per, ep = self.cfg.n_experts // self.deployment.ep, self.deployment.ep
        plain = [list(range(r * per, (r + 1) * per)) for r in range(ep)]
        if not self.placement or any(len({len(row) for row in layer}) != 1 or len(layer[0]) == per
                                     or [row[:per] for row in layer] != plain for layer in self.placement):
            raise ValueError("--eplb-interval refills spare expert slots: add --redundant-experts R "
                             "(R spare slots per rank), without --placement")
        if self.a2a == "hierarchical":
            raise ValueError("--eplb-interval plans ranks' loads, not nodes' traffic; use --a2a flat with it")

    @property
    def topology(self) -> Topology:
        return Topology.detect(self.deployment.world_size, self.gpus_per_node)

    @property
    def micro_batches(self) -> int:
        return self.n_micro or self.deployment.pp


def refuse_off_ep(flag: str, given: bool, deployment: Deployment) -> None:
    """An option that acts on the token exchange, given for a deployment without one, would be
    silently ignored: an error instead."""
    if given and deployment.ep == 1:
        raise ValueError(f"{flag} acts on expert-parallel deployments only and {deployment.name} "
                         f"has no EP axis; drop it or use epN")
