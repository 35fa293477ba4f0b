"""The torch paged-attention backend's step plan (model/attn_backends/torch_paged.py), as its
docstring specifies it: made once a step before the first layer and reused by every layer; decode
pieces are the longest consecutive runs whose count x longest length stays within the budget; a
piece of unequal lengths carries a mask that is -inf exactly past each length, one of equal
lengths none. `test_paged.py` checks the logits these plans give; this checks the plans."""

import torch

from expertmesh.model.attn_backends.torch_paged import TorchBackend
from expertmesh.model.paged import KVPool, PagedBatch

BLOCK = 4
CPU = torch.device("cpu")


def decode_batch(lengths: list[int], backend: TorchBackend) -> PagedBatch:
    """One new token per sequence, sequence i of `lengths[i]` positions, blocks laid out in turn."""
    chunks, next_block = [], 0
    for n in lengths:
        blocks = -(-n // BLOCK)
        chunks.append((n - 1, 1, list(range(next_block, next_block + blocks))))
        next_block += blocks
    return PagedBatch(chunks, BLOCK, CPU, backend)


def naive_pieces(lengths: list[int], budget: int) -> list[tuple[int, int]]:
    """(count, longest) of each run, in order: a sequence joins the current run while the run's
    count x longest length, with it, stays within the budget."""
    runs: list[list[int]] = []
    for n in lengths:
        if runs and (len(runs[-1]) + 1) * max(runs[-1] + [n]) <= budget:
            runs[-1].append(n)
        else:
            runs.append([n])
    return [(len(run), max(run)) for run in runs]


def test_decode_pieces_are_the_longest_runs_within_the_budget():
    lengths = [3, 5, 2, 4, 4, 6, 1, 9, 2, 2, 2, 2, 2, 2]  # 3 x 4 = 12 and 6 x 2 = 12: exactly at it
    for budget in (12, 13, 1, 100):
        batch = decode_batch(lengths, TorchBackend(budget))
        batch.plan(None, None)
        got = [(piece.tokens.numel(), piece.width) for piece in batch.meta["pieces"]]
        assert got == naive_pieces(lengths, budget), budget
        assert torch.cat([piece.tokens for piece in batch.meta["pieces"]]).tolist() == list(range(len(lengths)))


def test_a_piece_is_masked_exactly_past_each_length_and_only_when_lengths_differ():
    lengths = [5, 5, 5, 3, 7]
    batch = decode_batch(lengths, TorchBackend(15))  # pieces [5, 5, 5] and [3, 7]
    batch.plan(None, None)
    equal, unequal = batch.meta["pieces"]
    assert equal.mask is None
    want = torch.tensor([[0.0 if p < n else float("-inf") for p in range(7)] for n in (3, 7)])
    assert torch.equal(unequal.mask.view(2, 7), want)


def test_the_plan_is_made_once_a_step_before_the_first_layer(monkeypatch):
    made = []
    device_plan = TorchBackend._device_plan
    monkeypatch.setattr(TorchBackend, "_device_plan", lambda self, batch: (made.append(batch), device_plan(self, batch)))
    backend = TorchBackend()
    batch = decode_batch([3, 6], backend)
    assert made == []  # building the batch plans nothing on the device
    batch.plan(None, None)
    assert made == [batch]
    pool = KVPool(4, BLOCK, 1, 8, torch.float32, CPU)
    for _layer in range(3):
        out = backend.attend(torch.randn(2, 2, 8), pool, batch)
        assert out.shape == (2, 2, 8)
    assert made == [batch]
