"""The persistent block tables (engine/block_tables.py): whatever sequences come, grow, end, are
preempted and come back, a step's tables hold exactly each sequence's current blocks, and the
padding is a valid block id."""

import random

import torch

from expertmesh.engine.block_tables import BlockTables
from expertmesh.engine.request import Request
from expertmesh.engine.scheduler import Sequence

BLOCKS = 500


def test_a_steps_tables_are_its_sequences_current_blocks_through_growth_release_and_return():
    rng = random.Random(0)
    tables = BlockTables()
    live: list[Sequence] = []
    waiting = [Sequence(Request(i, (1,), 1), i, [1]) for i in range(40)]
    for step in range(300):
        if waiting and rng.random() < 0.3:
            seq = waiting.pop(0)
            seq.blocks.extend(rng.randrange(BLOCKS) for _ in range(rng.randint(1, 6)))
            live.append(seq)
        for seq in live:
            if rng.random() < 0.3:
                seq.blocks.append(rng.randrange(BLOCKS))  # grows in place, as `_reserve` does
        if live and rng.random() < 0.1:  # ended or preempted: the scheduler gives it a new list
            seq = live.pop(rng.randrange(len(live)))
            seq.blocks = []
            waiting.append(seq)
        chosen = rng.sample(live, rng.randint(0, len(live)))  # not every running sequence each step
        needed = [rng.randint(1, len(seq.blocks)) for seq in chosen]
        got = tables.step(chosen, needed)
        assert got.shape == (len(chosen), max(needed, default=0)) and got.dtype == torch.int32
        for row, seq, n in zip(got.tolist(), chosen, needed):
            assert row[:n] == seq.blocks[:n], f"step {step}"
            assert all(0 <= b < BLOCKS for b in row)
    assert tables.table.shape[0] <= 64, "rows are given back and reused"
