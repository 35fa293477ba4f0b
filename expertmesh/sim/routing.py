"""Where routed tokens go: the expected share of (token, expert) assignments per expert.

`uniform` gives every expert 1/E. `zipf` gives expert e a share proportional to 1/(e+1)^skew, the
hottest experts first, so under the contiguous placement they share a rank: the worst case for
load imbalance. A token picks k distinct experts, so no expert can get more than 1/k of the
assignments; excess above that cap is spread over the others.
"""

from __future__ import annotations

from dataclasses import dataclass

KINDS = ("uniform", "zipf")


@dataclass(frozen=True)
class Routing:
    kind: str = "uniform"
    skew: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"routing {self.kind!r}; use one of: {', '.join(KINDS)}")
        if self.skew < 0:
            raise ValueError(f"routing skew {self.skew} must be >= 0 (0 is uniform)")

    @classmethod
    def parse(cls, text: str) -> "Routing":
        """`"uniform"`, `"zipf"` or `"zipf:1.2"` (the skew)."""
        kind, _, skew = text.partition(":")
        return cls(kind, float(skew)) if skew else cls(kind)

    @property
    def name(self) -> str:
        return self.kind if self.kind == "uniform" else f"zipf:{self.skew:g}"

    def shares(self, n_experts: int, top_k: int) -> list[float]:
        """Expected fraction of all assignments that go to each expert `[E]`, summing to 1."""
        if self.kind == "uniform":
            return [1.0 / n_experts] * n_experts
        raw = [1.0 / (e + 1) ** self.skew for e in range(n_experts)]
        cap = 1.0 / top_k
        shares = [r / sum(raw) for r in raw]
        while any(s > cap + 1e-12 for s in shares):
            excess = sum(s - cap for s in shares if s > cap)
            free = [s for s in shares if s < cap]
            base = sum(free)
            shares = [cap if s >= cap else s + excess * s / base for s in shares]
        return shares
