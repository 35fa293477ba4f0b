"""The data-parallel slots after a loss: which pipeline serves which data-parallel rank, and
whether it keeps a scheduler (its requests and KV cache) or starts empty.

A data-parallel rank's scheduler is replicated on every rank of its pipeline (`engine/engine.py`).
After a loss, a pipeline that lost no rank stays, the survivors of broken ones pair up
(`Layout.without`). A pipeline keeps a scheduler when all its ranks held the same one, in the
same state: they served the same data-parallel rank before and what they hold agrees. A step cut
short after the last stage sampled has advanced that stage's copy and not the others (seen in
about one loss in two on ep4pp2): then they disagree. Otherwise it starts empty, and rank 0
re-queues the requests it held (`ledger.py`). Under one stage every survivor keeps its own. A
rank left over (no partner in some stage) serves experts only.

Every rank computes the same slots from the same all-gathered `before`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from expertmesh.elastic.layout import Layout
from expertmesh.parallel.pipeline import PipelineLinks


@dataclass(frozen=True)
class Slot:
    """A data-parallel rank: its `pipeline` (original ranks, first stage first) and the old
    data-parallel index whose scheduler it keeps (`kept`), or None: it starts empty."""

    pipeline: tuple[int, ...]
    kept: int | None


def plan_slots(layout: Layout, before: dict[int, tuple]) -> list[Slot]:
    """`before`: original rank -> (its old data-parallel index or None, then what its scheduler
    holds, compared for equality). Slot i is `layout`'s pipeline i."""
    slots = []
    for pipeline in layout.pipelines:
        first = before[pipeline[0]]
        agree = first[0] is not None and all(before[r] == first for r in pipeline)
        slots.append(Slot(pipeline, first[0] if agree else None))
    return slots


def slot_of(slots: list[Slot], rank: int) -> int | None:
    """The data-parallel index of `rank` (original), or None where it serves experts only."""
    return next((i for i, s in enumerate(slots) if rank in s.pipeline), None)


def links_of(layout: Layout, slots: list[Slot], rank: int, device: torch.device) -> PipelineLinks | None:
    """`rank`'s pipeline links over the default group of `layout.members` (None under one
    stage): its pipeline's neighbours; none for a rank that serves experts only."""
    if len(layout.stages) == 1:
        return None
    stage, last = layout.stage_of(rank), len(layout.stages) - 1
    index = slot_of(slots, rank)
    if index is None:
        return PipelineLinks.of(stage == 0, stage == last, None, None, None, device)
    new = [layout.members.index(r) for r in slots[index].pipeline]
    return PipelineLinks.of(stage == 0, stage == last, new[stage - 1] if stage > 0 else None,
                            new[stage + 1] if stage < last else None,
                            new[0] if stage == last else new[last], device)


def relabel(labels: list[int], kept: list[int | None], fresh: int) -> tuple[list[int], int]:
    """`/metrics`' dp_rank label of each new data-parallel rank, whose old index is `kept[i]`
    (None: its scheduler starts empty), and the next unused label: a kept scheduler keeps its
    label (its running totals go on), an empty one gets `fresh`, a label never used (its totals
    restart from 0, which a reused label's counters would see as going down)."""
    out = []
    for old in kept:
        if old is None:
            out.append(fresh)
            fresh += 1
        else:
            out.append(labels[old])
    return out, fresh
