"""Which rank serves which pipeline stage, and which pipeline, in an elastic deployment.

A `Layout` lists, per pipeline stage, the original ranks serving it, in order: they form that
stage's EP group (its experts' exchange); and its pipelines, data-parallel rank i being the i-th.
As started, pipeline i is the i-th rank of every stage. After a loss (`without`), a pipeline that
lost no rank stays as it was; the survivors of broken pipelines pair up, the i-th left of each
stage, while every stage has one left; a rank left over serves experts only (its forwards carry
no tokens). Pipelines are ordered by their first stage's rank (rank 0's is first). A stage left
with no rank cannot be survived (`StageLost`).

    ep2pp2:            stages ((0, 1), (2, 3))   pipelines (0, 2), (1, 3)
    without rank 1:    stages ((0,), (2, 3))     pipelines (0, 2); rank 3 serves experts only
    ep4pp2 without 5:  stages ((0, 1, 2, 3), (4, 6, 7))  pipelines (0, 4), (2, 6), (3, 7);
                       rank 1 serves experts only
    ep2pp2 without 2, 3: StageLost "ranks 2, 3 of pipeline stage 1 died and no rank of that
                       stage is left"
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from expertmesh.deployment import Deployment


class StageLost(RuntimeError):
    """Every rank of a pipeline stage is gone: its layers are served nowhere."""

    def __init__(self, ranks: list[int], stage: int):
        who = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {', '.join(map(str, ranks))}"
        super().__init__(f"{who} of pipeline stage {stage} died and no rank of that stage is left")


@dataclass(frozen=True)
class Layout:
    """`stages[s]`: the original ranks serving pipeline stage s, in group order; `pipelines[i]`:
    data-parallel rank i's ranks, one per stage, first stage first (default: the i-th rank of
    each stage)."""

    stages: tuple[tuple[int, ...], ...]
    pipelines: tuple[tuple[int, ...], ...] = ()

    def __post_init__(self) -> None:
        if not self.pipelines:
            object.__setattr__(self, "pipelines", _pair(self.stages))

    @classmethod
    def of(cls, deployment: Deployment) -> Layout:
        """A deployment's layout as started: rank = stage * inner + i (`Deployment.coords`)."""
        inner = deployment.inner
        return cls(tuple(tuple(range(s * inner, (s + 1) * inner)) for s in range(deployment.pp)))

    @property
    def members(self) -> list[int]:
        """Every rank, stage by stage: the order of the default group's ranks."""
        return [r for stage in self.stages for r in stage]

    def stage_of(self, rank: int) -> int:
        return next(s for s, ranks in enumerate(self.stages) if rank in ranks)

    def without(self, dead: Iterable[int]) -> Layout:
        """The layout without the ranks `dead` (others than these are ignored); `StageLost` when
        a stage would have none left."""
        dead = set(dead)
        for s, ranks in enumerate(self.stages):
            if all(r in dead for r in ranks):
                raise StageLost(list(ranks), s)
        stages = tuple(tuple(r for r in ranks if r not in dead) for ranks in self.stages)
        intact = [p for p in self.pipelines if not dead & set(p)]
        paired = {r for p in intact for r in p}
        new = _pair(tuple(tuple(r for r in ranks if r not in paired) for ranks in stages))
        return Layout(stages, tuple(sorted(intact + list(new), key=lambda p: stages[0].index(p[0]))))

    def with_rank(self, rank: int) -> Layout:
        """A rank joined (`serve --join`, one stage only): last of the stage."""
        if len(self.stages) > 1:
            raise ValueError("a rank joins plain expert parallelism only, not pipeline stages")
        return Layout((self.stages[0] + (rank,),), self.pipelines + ((rank,),))

    def describe(self) -> str:
        """"ep3" for one stage; "ep1 + ep2 (2 stages), 1 pipeline" for several."""
        if len(self.stages) == 1:
            return f"ep{len(self.stages[0])}"
        n = len(self.pipelines)
        return (f"{' + '.join(f'ep{len(s)}' for s in self.stages)} ({len(self.stages)} stages), "
                f"{n} pipeline{'s' if n > 1 else ''}")


def _pair(stages: tuple[tuple[int, ...], ...]) -> tuple[tuple[int, ...], ...]:
    """Pipelines of the i-th rank of each stage, as long as every stage has an i-th."""
    return tuple(zip(*stages))
