"""The ragged forward over a paged KV cache (model/paged.py, MoETransformer.forward_paged): every
sequence's logits equal those of the model run on that sequence alone with no cache, whatever
else shares the forward, however its prompt is chunked and wherever its blocks lie."""

import random

import pytest
import torch

from expertmesh.model.attn_backends.torch_paged import TorchBackend
from expertmesh.model.paged import PagedBatch

BLOCK = 4
# The torch backend's decode pieces: the whole batch in one SDPA call (as on CUDA), one call per
# sequence, and runs of several sequences of unequal lengths (each with its padding mask).
PIECES = {"one-piece": lambda: TorchBackend(), "per-sequence": lambda: TorchBackend(1),
          "runs-of-unequal": lambda: TorchBackend(24)}


def reference_logits(model, ids: list[int]) -> torch.Tensor:
    """Logits `[len(ids), V]` of every position of one sequence, no cache."""
    with torch.inference_mode():
        return model(torch.tensor([ids]), all_logits=True)[0]


def run_schedule(model, seqs: list[list[int]], steps: list[list[tuple[int, int]]], tables, backend=None):
    """Feed `steps[t] = [(sequence, n new tokens), ...]`; return {sequence: [(position, logits)]}
    for the last new token of each chunk."""
    pools = model.make_pools(num_blocks=64, block_size=BLOCK)
    done = [0] * len(seqs)
    seen: dict[int, list] = {i: [] for i in range(len(seqs))}
    with torch.inference_mode():
        for step in steps:
            chunks, ids = [], []
            for i, n in step:
                chunks.append((done[i], n, tables[i]))
                ids += seqs[i][done[i]:done[i] + n]
            batch = PagedBatch(chunks, BLOCK, torch.device("cpu"), backend)
            logits = model.forward_paged(torch.tensor(ids, dtype=torch.long), pools, batch)
            assert logits.shape == (len(step), model.cfg.vocab_size)
            for row, (i, n) in enumerate(step):
                done[i] += n
                seen[i].append((done[i] - 1, logits[row]))
    return seen


def scattered_tables(n_seqs: int, blocks_each: int, seed: int) -> list[list[int]]:
    """Disjoint block tables in a shuffled order of a 64-block pool."""
    ids = list(range(64))
    random.Random(seed).shuffle(ids)
    return [ids[i * blocks_each:(i + 1) * blocks_each] for i in range(n_seqs)]


@pytest.mark.parametrize("pieces", list(PIECES))
@pytest.mark.parametrize("n_kv_heads", [None, 2], ids=["mha", "gqa"])
def test_prefill_chunks_and_decodes_of_many_sequences_in_one_forward_are_exact(n_kv_heads, pieces, small_model):
    model = small_model(seed=1, n_kv_heads=n_kv_heads)
    gen = torch.Generator().manual_seed(0)
    lengths = [9, 1, 14, 6]
    seqs = [torch.randint(0, model.cfg.vocab_size, (n,), generator=gen).tolist() for n in lengths]
    # sequence 0: prefill 5 then 4 decodes; 1: a single token; 2: chunks 3, 7, 4 beside the
    # others' decodes; 3: whole prompt at step 2, then one decode
    steps = [[(0, 5), (2, 3)], [(0, 1), (1, 1), (2, 7)], [(0, 1), (2, 4), (3, 5)],
             [(0, 1), (3, 1)], [(0, 1)], [(1, 1), (0, 1), (3, 1)]]
    seqs[1] += [3]  # sequence 1 decodes again at the end, beside 0 and 3 (lengths 2, 10, 7)
    seqs[0] += [5]
    seqs[3] += [9]
    seen = run_schedule(model, seqs, steps, scattered_tables(4, 4, seed=2), PIECES[pieces]())
    for i, ids in enumerate(seqs):
        ref = reference_logits(model, ids)
        assert seen[i], f"sequence {i} never ran"
        for pos, logits in seen[i]:
            torch.testing.assert_close(logits, ref[pos], rtol=1e-4, atol=1e-4)


def test_a_sequence_does_not_see_the_others_in_its_batch(small_model):
    model = small_model()
    a = list(range(1, 8))
    tables = scattered_tables(2, 2, seed=3)
    steps = [[(0, 6), (1, 6)], [(0, 1), (1, 1)]]
    alone = run_schedule(model, [a, a], steps, tables)
    other = run_schedule(model, [a, [(t * 7) % 128 for t in a]], steps, tables)
    for (_, x), (_, y) in zip(alone[0], other[0]):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(alone[1][-1][1], other[1][-1][1])


def test_batch_metadata_places_each_token_in_its_block():
    batch = PagedBatch([(0, 3, [5, 2]), (6, 1, [7, 1]), (2, 3, [3, 0])], BLOCK, torch.device("cpu"))
    assert batch.seq_lens == [3, 1, 3]
    assert batch.positions.tolist() == [0, 1, 2, 6, 2, 3, 4]
    assert batch.slots.tolist() == [20, 21, 22, 6, 14, 15, 0]
    assert batch.last.tolist() == [2, 3, 6]


def test_an_empty_batch_runs_and_returns_nothing(small_model):
    model = small_model()
    pools = model.make_pools(num_blocks=2, block_size=BLOCK)
    with torch.inference_mode():
        empty = PagedBatch([], BLOCK, torch.device("cpu"))
        out = model.forward_paged(torch.zeros(0, dtype=torch.long), pools, empty)
    assert out.shape == (0, model.cfg.vocab_size)


def test_a_decode_step_costs_three_ops_per_extra_piece_and_the_pieces_agree():
    """On the CPU a decode step's attention runs one piece per cache-sized run of sequences (its
    ops per layer grow with batch x context for that reason alone): each piece gathers its keys
    and values and runs SDPA on a view of its rows of q, nothing more; the outputs are joined once."""
    from expertmesh.model.paged import KVPool
    from expertmesh.op_count import OpCounter

    g, d, h = 2, 8, 4
    pool = KVPool(64, BLOCK, g, d, torch.float32, torch.device("cpu"))
    pool.k.normal_(generator=torch.Generator().manual_seed(0))
    pool.v.normal_(generator=torch.Generator().manual_seed(1))
    tables = scattered_tables(8, 8, seed=3)
    ops, outs = {}, {}
    for S in (4, 8):
        for name in ("one-piece", "per-sequence"):
            batch = PagedBatch([(4 * i + 3, 1, tables[i]) for i in range(S)], BLOCK, torch.device("cpu"),
                               PIECES[name]())
            q = torch.randn(S, h, d, generator=torch.Generator().manual_seed(S))
            batch.plan(None, None)
            with OpCounter() as counter:
                outs[S, name] = batch.backend.attend(q, pool, batch)
            ops[S, name] = counter.ops
        torch.testing.assert_close(outs[S, "per-sequence"], outs[S, "one-piece"])
    assert ops[8, "per-sequence"] - ops[4, "per-sequence"] == 3 * 4
    assert ops[8, "one-piece"] == ops[4, "one-piece"]


def test_a_continuing_decode_step_advances_the_last_layout_and_equals_a_rebuild(monkeypatch):
    """Decode steps through the engine's persistent tables, each given the last one's layout: a step
    that continues it (the same sequences, one position further) sends up its ids alone, plus what
    the tables lack when a sequence takes a new block; its positions, slots, kv_lens, last and
    tables equal a batch built from scratch, across block boundaries and after the batch changes."""
    from expertmesh.engine.block_tables import BlockTables
    from expertmesh.engine.request import Request
    from expertmesh.engine.scheduler import Sequence
    from expertmesh.model import paged

    sent = []
    real = paged.upload
    monkeypatch.setattr(paged, "upload", lambda host, device: sent.append(sum(t.numel() for t in host))
                        or real(host, device))
    rng = random.Random(0)
    free = list(range(200))
    rng.shuffle(free)
    seqs = [Sequence(Request(i, (1,), 1), i, [1] * 99, computed=n, blocks=[free.pop() for _ in range(n // BLOCK + 1)])
            for i, n in enumerate((3, 4, 9, 14, 30))]
    tables, layout = BlockTables(), None
    for step in range(12):
        if step == 6:
            seqs.pop(1)  # one ends: the next step rebuilds, the ones after continue again
        new_blocks = 0
        for seq in seqs:
            if seq.computed // BLOCK == len(seq.blocks):  # position `computed` starts a block
                seq.blocks.append(free.pop())
                new_blocks += 1
        ids = torch.tensor([7 * seq.computed % 50 for seq in seqs])
        sent.clear()
        batch = PagedBatch([(seq.computed, 1, None) for seq in seqs], BLOCK, torch.device("cpu"), TorchBackend(),
                           tables.plan(seqs, [len(seq.blocks) for seq in seqs]), ids, layout)
        mine = list(sent)  # the batch's own copies (not the rebuild's)
        rebuilt = PagedBatch([(seq.computed, 1, seq.blocks) for seq in seqs], BLOCK, torch.device("cpu"))
        S = len(seqs)
        if step in (0, 6):  # the first step, and the one after the batch changed: built in full
            assert mine[0] >= 5 * S, (step, mine)  # starts, seq_lens, rows, the backend's two, ids
        else:
            assert mine == [S + (S + 2 * new_blocks if new_blocks else 0)], (step, mine, new_blocks)
        assert batch.ids.tolist() == ids.tolist()
        for name in ("positions", "slots", "kv_lens_device", "last"):
            assert getattr(batch, name).tolist() == getattr(rebuilt, name).tolist(), (step, name)
        assert batch.tables.tolist() == rebuilt.tables.int().tolist(), step
        assert batch.meta["up"]["decode_tokens"].tolist() == list(range(S))
        layout = batch.layout
        for seq in seqs:
            seq.computed += 1
    assert PagedBatch([(0, 2, [1])], BLOCK, torch.device("cpu")).layout is None  # only a decode step's is kept
