"""The data-parallel slots after a loss: which pipeline serves which data-parallel rank, and
whether it keeps a scheduler (its requests and KV cache) or starts empty.

A data-parallel rank's scheduler is replicated on every rank of its pipeline (`engine/engine.py`).
After a loss, a pipeline that lost no rank stays, the survivors of broken ones pair up
(`Layout.without`). A pipeline keeps a scheduler when all its ranks held the same one, in the
same state: they served the same data-parallel rank before and what they hold agrees. A step
cut short after the last stage sampled (seen by hand in about half of the ep4pp2 losses
watched; not counted by a benchmark) has advanced that stage's copy and not the others, which
the step's all-gather never reached: those are one
step behind, and catch up (`Slot.behind`: they finish that step from the last stage's outputs;
every stage's forward of it ran, or the last stage could not have sampled, so its KV is
written). Any other disagreement, or a new pairing, starts empty, and rank 0 re-queues the
requests it held (`ledger.py`). Under one stage every survivor keeps its own. A rank left over
(no partner in some stage) serves experts only.

Every rank computes the same slots from the same all-gathered `before`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from expertmesh.elastic.layout import Layout
from expertmesh.parallel.pipeline import PipelineLinks

if TYPE_CHECKING:
    from expertmesh.engine.scheduler import SchedulerStats


@dataclass(frozen=True)
class Copy:
    """A rank's copy of a scheduler, as a recovery compares them: its data-parallel index (None:
    experts only), what it holds ({request id: tokens generated so far}) and its stats, the
    steps it finished since the last regrouping, the step it scheduled and did not finish
    (`open`: (request id, tokens computed) in order, or None), and on the last stage the last
    step it finished (`last`: the same pairs, then its `TokenOutput`s), which a copy behind
    finishes from."""

    dp: int | None
    held: dict
    stats: SchedulerStats | None = None
    finished: int = 0
    open: tuple | None = None
    last: tuple | None = None

    @property
    def state(self) -> tuple:
        return self.dp, self.held, self.stats, self.finished


@dataclass(frozen=True)
class Slot:
    """A data-parallel rank: its `pipeline` (original ranks, first stage first), the old
    data-parallel index whose scheduler it keeps (`kept`), or None: it starts empty, and the
    ranks whose copy is one step behind the last stage's (`behind`), which catch up."""

    pipeline: tuple[int, ...]
    kept: int | None
    behind: tuple[int, ...] = ()


def plan_slots(layout: Layout, before: dict[int, Copy]) -> list[Slot]:
    """`before`: original rank -> its copy. Slot i is `layout`'s pipeline i."""
    slots = []
    for pipeline in layout.pipelines:
        last = before[pipeline[-1]]
        behind = tuple(r for r in pipeline if one_step_behind(before[r], last))
        agree = last.dp is not None and all(r in behind or before[r].state == last.state for r in pipeline)
        slots.append(Slot(pipeline, last.dp, behind) if agree else Slot(pipeline, None))
    return slots


def one_step_behind(copy: Copy, last: Copy) -> bool:
    """`copy` scheduled the step `last` (its pipeline's last stage) finished last and did not
    finish it: finishing it with `last`'s outputs gives what `last` holds."""
    if last.last is None or copy.open is None or copy.dp != last.dp or copy.finished + 1 != last.finished:
        return False
    chosen, outputs = last.last
    return copy.open == chosen and advance(copy.held, outputs) == last.held


def advance(held: dict, outputs) -> dict | None:
    """`held` ({request id: tokens generated}) after a step's `outputs`: a token more for each,
    the finished ones gone; None where an output's request is not in `held`."""
    after = {i: list(tokens) for i, tokens in held.items()}
    for out in outputs:
        if out.request_id not in after:
            return None
        after[out.request_id].append(out.token)
        if out.finished:
            del after[out.request_id]
    return after


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
