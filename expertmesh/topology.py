"""Where ranks sit: `nodes` machines of `gpus_per_node` devices each, ranks filled node by node.

The engine takes it from torchrun's environment (LOCAL_WORLD_SIZE) or `--gpus-per-node`, so that
several "nodes" can be played on one CPU machine; the token exchange uses it to count (and,
hierarchically, to reduce) the bytes that cross node boundaries, and the simulator to price links.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Topology:
    nodes: int
    gpus_per_node: int

    def __post_init__(self) -> None:
        for name in ("nodes", "gpus_per_node"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Topology.{name}={value!r} must be a positive integer")

    @classmethod
    def detect(cls, world_size: int, gpus_per_node: int | None = None) -> "Topology":
        """Explicit node size, else torchrun's LOCAL_WORLD_SIZE, else one node holding every rank."""
        per_node = (gpus_per_node if gpus_per_node is not None
                    else int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))
        if per_node < 1 or world_size % per_node:
            raise ValueError(f"--gpus-per-node {per_node} must divide the world size {world_size}")
        return cls(world_size // per_node, per_node)

    @classmethod
    def for_gpus(cls, gpus: int, gpus_per_node: int) -> "Topology":
        """The fewest nodes of `gpus_per_node` that hold `gpus` devices."""
        if gpus < 1:
            raise ValueError(f"GPU count {gpus} must be at least 1")
        return cls(nodes=-(-gpus // gpus_per_node), gpus_per_node=gpus_per_node)

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    def node_of(self, rank: int) -> int:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside this topology's {self.world_size} ranks")
        return rank // self.gpus_per_node

    def spans_nodes(self, ranks: list[int] | range) -> bool:
        """Whether a group of ranks needs the network (not only the intra-node links)."""
        return len({self.node_of(r) for r in ranks}) > 1
