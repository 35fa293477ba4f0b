"""How a model is laid out over ranks: expert (`ep`), tensor (`tp`) and pipeline (`pp`) sizes.

Strings: `single`, or axes with sizes in any order: `ep16`, `tp8pp2`, `ep8pp2`, `tp2`.

Rank layout: rank = stage * inner + i, where a stage holds `inner = ep * tp` ranks and i is the
rank's place in the stage's expert- or tensor-parallel group. Pipeline peers share i.
Under expert parallelism attention is data-parallel over the EP group (`dp == ep`): EP rank i
owns the i-th contiguous share of the batch, and its KV cache. Expert and tensor parallelism in
the same stage is not supported and rejected.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from expertmesh.config import ModelConfig
from expertmesh.split import split_evenly

_AXIS = re.compile(r"(ep|tp|pp)(\d+)")


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


@dataclass(frozen=True)
class Deployment:
    ep: int = 1
    tp: int = 1
    pp: int = 1

    def __post_init__(self) -> None:
        for axis in ("ep", "tp", "pp"):
            value = getattr(self, axis)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"deployment {axis}={value!r} must be a positive integer")
        if self.ep > 1 and self.tp > 1:
            raise ValueError(f"deployment {self.name}: expert and tensor parallelism in the same "
                             f"stage is not supported; use ep{self.ep * self.tp} or "
                             f"tp{self.ep * self.tp}, each optionally with ppN")

    @classmethod
    def parse(cls, text: str) -> "Deployment":
        """`"ep16"`, `"tp8pp2"`, `"ep8pp2"`, `"single"` -> Deployment."""
        s = text.strip().lower()
        if s in ("single", "ep1", "tp1", "pp1"):
            return cls()
        parts = _AXIS.findall(s)
        if not parts or "".join(a + n for a, n in parts) != s:
            raise ValueError(f"cannot parse deployment {text!r}; write axes with sizes such as "
                             f"'ep16', 'tp8pp2', 'ep8pp2' or 'single'")
        axes = [a for a, _ in parts]
        if len(set(axes)) != len(axes):
            raise ValueError(f"deployment {text!r} names an axis twice; give each of ep, tp, pp once")
        return cls(**{a: int(n) for a, n in parts})

    @property
    def name(self) -> str:
        parts = [f"{a}{getattr(self, a)}" for a in ("ep", "tp", "pp") if getattr(self, a) > 1]
        return "".join(parts) or "single"

    @property
    def world_size(self) -> int:
        return self.ep * self.tp * self.pp

    @property
    def inner(self) -> int:
        """Ranks per pipeline stage."""
        return self.ep * self.tp

    @property
    def dp(self) -> int:
        """Data-parallel degree of attention: the EP group splits the batch."""
        return self.ep

    def validate(self, cfg: ModelConfig, world_size: int | None = None) -> None:
        """Raise a one-line ValueError naming the wrong number and what would fit."""
        if world_size is not None and self.world_size != world_size:
            raise ValueError(f"deployment {self.name} needs {self.world_size} ranks but the world "
                             f"size is {world_size}; use sizes whose product is {world_size}")
        if cfg.n_experts % self.ep:
            raise ValueError(f"ep={self.ep} must divide the {cfg.n_experts} experts of "
                             f"{cfg.name}; use one of {_divisors(cfg.n_experts)}")
        for field in ("n_heads", "n_kv_heads", "expert_hidden", "shared_expert_hidden",
                      "dense_hidden"):
            value = getattr(cfg, field)
            if value % self.tp:
                raise ValueError(f"tp={self.tp} must divide {field}={value} of {cfg.name}; "
                                 f"use one of {_divisors(value)}")
        if self.pp > cfg.n_layers:
            raise ValueError(f"pp={self.pp} exceeds the {cfg.n_layers} layers of {cfg.name}; "
                             f"use at most pp{cfg.n_layers}")

    def coords(self, rank: int) -> tuple[int, int]:
        """rank -> (pipeline stage, index inside the stage's EP or TP group)."""
        return divmod(rank, self.inner)

    def stage_layers(self, n_layers: int) -> list[range]:
        """Contiguous layers per stage; when pp does not divide n_layers the first stages get one more."""
        return [range(n_layers)[part] for part in split_evenly(n_layers, self.pp)]

    def rows_of(self, rank: int, batch: int) -> list[int]:
        """Global sequence indices whose attention (and KV cache) this rank holds."""
        if self.ep == 1:
            return list(range(batch))
        return list(range(batch)[split_evenly(batch, self.ep)[self.coords(rank)[1]]])

    def reports(self, rank: int) -> bool:
        """Whether this rank's sampled tokens are part of the result (one copy of each sequence)."""
        stage, i = self.coords(rank)
        return stage == self.pp - 1 and (self.tp == 1 or i == 0)

    def describe(self, n_experts: int) -> str:
        """What one rank holds, in few words (the seed's "per-GPU deployment" column)."""
        if self.world_size == 1:
            return "whole model"
        parts = []
        if self.ep > 1:
            parts.append(f"{n_experts // self.ep} expert/layer, 1/{self.ep} of seqs")
        if self.tp > 1:
            parts.append(f"TP 1/{self.tp} shard")
        if self.pp > 1:
            parts.append(f"1/{self.pp} of layers")
        return ", ".join(parts)
