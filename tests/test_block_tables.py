"""The persistent block tables (engine/block_tables.py): whatever sequences come, grow, end, are
preempted and come back, a step's tables hold exactly each sequence's current blocks, and the
padding is a valid block id."""

import random

import pytest
import torch

from expertmesh.engine.block_tables import BlockTables
from expertmesh.engine.request import Request
from expertmesh.engine.scheduler import Sequence
from expertmesh.model.paged import tables_from_lists

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
        got = tables.plan(chosen, needed).host()
        assert got.shape == (len(chosen), max(needed, default=0)) and got.dtype == torch.int32
        for row, seq, n in zip(got.tolist(), chosen, needed):
            assert row[:n] == seq.blocks[:n], f"step {step}"
            assert all(0 <= b < BLOCKS for b in row)
    assert tables.table.shape[0] <= 64, "rows are given back and reused"


def _drive(seed: int):
    """A scheduler over a small pool (preemptions happen), requests arriving, ending and aborted;
    each step's plan through the persistent tables, its device copy brought up to date as a
    step's upload does. Yields (step, chosen sequences, needed, the step's device tables, the
    tables object) for the steps whose tables went to the device."""
    from expertmesh.engine.scheduler import EngineConfig, Scheduler

    rng = random.Random(seed)
    s = Scheduler(EngineConfig(block_size=4, max_batched_tokens=48, max_seqs=6, prefix_caching=seed % 2 == 0),
                  num_blocks=40)
    tables, next_id = BlockTables(), 0
    for step in range(400):
        if rng.random() < 0.4:
            s.add(Request(next_id, tuple(rng.randrange(1, 50) for _ in range(rng.randint(1, 20))),
                          rng.randint(1, 30)))
            next_id += 1
        if s.running and rng.random() < 0.05:
            s.abort(rng.choice(s.running).request.id)
        chosen = s.schedule()
        seqs = [seq for seq, _ in chosen]
        needed = [-(-(seq.computed + n) // 4) for seq, n in chosen]
        plan = tables.plan(seqs, needed)
        yield step, seqs, needed, plan.on_device(plan.host_arrays(), torch.device("cpu")), tables
        s.finish(chosen, {seq.request.id: rng.randrange(1, 50) for seq in seqs})
    assert s.preemptions > 0 and next_id > 50


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_device_tables_equal_a_rebuild_through_admits_finishes_preemptions_and_aborts(seed):
    """The device's copy follows the host's by incremental writes only; after every kind of change
    a step's tables on the device are the sequences' blocks, and the whole copy equals the host's."""
    for step, seqs, needed, on_device, tables in _drive(seed):
        rebuilt = tables_from_lists([(0, n * 4, seq.blocks) for seq, n in zip(seqs, needed)], 4)
        assert on_device.shape == rebuilt.shape, f"step {step}"
        for row, want, n in zip(on_device.tolist(), rebuilt.tolist(), needed):
            assert row[:n] == want[:n], f"step {step}"
        assert torch.equal(tables.device, tables.table), f"step {step}"


def test_a_decode_step_uploads_as_much_at_long_context_as_at_short(monkeypatch):
    """What a decode step's plan sends to the device (`PagedBatch`'s one upload) is O(sequences): the
    rows of the persistent tables and the new block ids, never the `[S, W]` tables themselves."""
    from expertmesh.model import paged

    sent = []
    real = paged.upload
    monkeypatch.setattr(paged, "upload", lambda host, device: sent.append(sum(t.numel() for t in host))
                        or real(host, device))
    per_context = {}
    for context in (36, 4004):  # two decode steps stay within the last block
        tables, block = BlockTables(), 16
        seqs = [Sequence(Request(i, (1,), 1), i, [1] * context, computed=context - 1,
                         blocks=list(range(i * 300, i * 300 + -(-context // block)))) for i in range(8)]
        for _ in range(2):  # the first step writes every row; the second only decodes
            sent.clear()
            needed = [-(-(s.computed + 1) // block) for s in seqs]
            batch = paged.PagedBatch([(s.computed, 1, None) for s in seqs], block, torch.device("cpu"),
                                     tables=tables.plan(seqs, needed))
            for seq, row in zip(seqs, batch.tables.tolist()):
                assert row[:len(seq.blocks)] == seq.blocks
            for s in seqs:
                s.computed += 1
        per_context[context] = sent[-1]
    assert per_context[36] == per_context[4004]


def test_a_step_whose_rows_width_and_blocks_are_the_last_ones_uploads_no_table():
    """Decode steps within the sequences' last blocks: the second sends nothing of the tables and
    its device tables are the first's; a new block, another width or other sequences send again,
    and the tables are then the sequences' current blocks."""
    tables, block, device = BlockTables(), 4, torch.device("cpu")
    seqs = [Sequence(Request(i, (1,), 1), i, [1] * 9, computed=8, blocks=[3 * i, 3 * i + 1, 3 * i + 2])
            for i in range(3)]

    def step(chosen, needed):
        plan = tables.plan(chosen, needed)
        arrays = plan.host_arrays()
        return arrays, plan.on_device(arrays, device)

    first_arrays, first = step(seqs, [3, 3, 3])
    assert set(first_arrays) == {"table_rows", "table_writes"}
    arrays, again = step(seqs, [3, 3, 3])
    assert arrays == {} and again is first
    seqs[1].blocks.append(40)  # the scheduler gives sequence 1 a block
    arrays, grown = step(seqs, [3, 4, 3])
    assert arrays["table_writes"].tolist() == [[tables.rows[seqs[1]][0] * tables.table.shape[1] + 3], [40]]
    assert grown[1].tolist() == [3, 4, 5, 40]
    assert step(seqs, [3, 4, 3])[0] == {}
    for chosen, needed in ((seqs[:2], [3, 4]), (seqs, [3, 3, 3])):  # other sequences, another width
        arrays, got = step(chosen, needed)
        assert list(arrays) == ["table_rows", "table_writes"] and arrays["table_writes"].numel() == 0
        assert [row[:n] for row, n in zip(got.tolist(), needed)] == [s.blocks[:n] for s, n in zip(chosen, needed)]
