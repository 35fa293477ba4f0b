"""The torch paged-attention backend's step plan (model/attn_backends/torch_paged.py), as its
docstring specifies it: made once a step before the first layer and reused by every layer; decode
pieces are the longest consecutive runs whose count x longest length stays within the budget; a
piece of unequal lengths carries a mask that is -inf exactly past each length, one of equal
lengths none. `test_paged.py` checks the logits these plans give; this checks the plans."""

import pytest
import torch
import torch.nn.functional as F

from expertmesh.model import paged
from expertmesh.model.attn_backends.torch_paged import TorchBackend
from expertmesh.model.paged import KVPool, PagedBatch, PagedView

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
    # 3 x 4 = 12 and 6 x 2 = 12: exactly at the budget; two of 1: over a budget of 1
    lengths = [3, 5, 2, 4, 4, 6, 1, 1, 9, 2, 2, 2, 2, 2, 2]
    for budget in (12, 13, 1, 100):
        batch = decode_batch(lengths, TorchBackend(budget))
        batch.plan(None, None)
        got = [(piece.tokens.numel(), piece.width) for piece in batch.meta["pieces"]]
        assert got == naive_pieces(lengths, budget), budget
        assert torch.cat([piece.tokens for piece in batch.meta["pieces"]]).tolist() == list(range(len(lengths)))


def test_prefill_chunks_are_padded_to_the_longest_chunk_and_gather_the_longest_prefill_context():
    """Chunks of 3 and 2 new tokens at contexts 3 and 10, and a decode at 12: queries `[P, Lmax]` =
    2 x 3, keys over Cmax = 10 positions (the decode's 12 are its own piece's), causal by position."""
    batch = PagedBatch([(0, 3, [0]), (8, 2, [1, 2, 3]), (11, 1, [4, 5, 6])], BLOCK, CPU, TorchBackend())
    batch.plan(None, None)
    pre = batch.meta["prefill"]
    assert pre.shape == (2, 3, 10)
    assert pre.tokens.tolist() == [0, 1, 2, 3, 4]
    assert [(piece.tokens.tolist(), piece.width) for piece in batch.meta["pieces"]] == [([5], 12)]
    visible = pre.mask[:, 0].sum(-1).tolist()  # positions each padded query row sees
    assert visible == [[1, 2, 3], [9, 10, 10]]


def test_a_piece_is_masked_exactly_past_each_length_and_only_when_lengths_differ():
    lengths = [5, 5, 5, 3, 7]
    batch = decode_batch(lengths, TorchBackend(15))  # pieces [5, 5, 5] and [3, 7]
    batch.plan(None, None)
    equal, unequal = batch.meta["pieces"]
    assert equal.mask is None
    want = torch.tensor([[0.0 if p < n else float("-inf") for p in range(7)] for n in (3, 7)])
    assert torch.equal(unequal.mask.view(2, 7), want)


def test_the_plan_and_the_rotary_tables_are_made_once_a_step_before_the_first_layer(monkeypatch):
    made, tables = [], []
    device_plan, rope_tables = TorchBackend._device_plan, paged.rope_tables
    monkeypatch.setattr(TorchBackend, "_device_plan",
                        lambda self, batch: (made.append(batch), device_plan(self, batch)))
    monkeypatch.setattr(paged, "rope_tables", lambda *args: (tables.append(args[1:]), rope_tables(*args))[1])
    backend = TorchBackend()
    batch = decode_batch([3, 6], backend)
    assert made == [] and tables == []  # building the batch plans nothing on the device
    batch.plan(8, 10000.0)
    assert made == [batch] and tables == [(8, 10000.0)]
    pool = KVPool(4, BLOCK, 1, 8, torch.float32, CPU)
    view = PagedView(pool, batch)
    for _layer in range(3):
        cos, sin = view.rope(2, 8, 10000.0, CPU)
        assert cos.shape == sin.shape == (2, 8)
        out = backend.attend(torch.randn(2, 2, 8), pool, batch)
        assert out.shape == (2, 2, 8)
    assert made == [batch] and tables == [(8, 10000.0)]


@pytest.mark.parametrize("keys_only", [False, True])
def test_a_layer_stores_its_keys_and_values_at_the_slots_and_attends_in_any_float_dtype(keys_only):
    """q `[1, N, h, d]`, k, v `[1, N, g, d]` -> `[1, N, h, d]`, within float rounding (bf16's
    too, with a masked piece) of a plain SDPA over each sequence's positions. A keys-only pool
    (latent attention's) is one tensor, its values its keys."""
    lengths, h, g, d = [3, 7, 1], 4, 2, 8
    gen = torch.Generator().manual_seed(0)
    keys, values = (torch.randn(sum(lengths), g, d, generator=gen) for _ in range(2))
    values = keys if keys_only else values
    q = torch.randn(1, len(lengths), h, d, generator=gen)
    for dtype in (torch.float32, torch.bfloat16):
        batch = decode_batch(lengths, TorchBackend(8))  # pieces [3] and [7, 1]: the second masked
        batch.plan(None, None)
        pool = KVPool(8, BLOCK, g, d, dtype, CPU, keys_only)
        assert (pool.v is pool.k) == keys_only and pool.nbytes == (1 if keys_only else 2) * pool.k.nbytes
        flat_k, flat_v = pool.k.view(-1, g, d), pool.v.view(-1, g, d)
        ends = torch.tensor(lengths).cumsum(0).tolist()
        for i, n in enumerate(lengths):  # the earlier positions, already in the cache
            slots = torch.tensor([batch.tables_host[i, t // BLOCK] * BLOCK + t % BLOCK
                                  for t in range(n - 1)], dtype=torch.long)
            earlier = slice(ends[i] - n, ends[i] - 1)
            flat_k[slots], flat_v[slots] = keys[earlier].to(dtype), values[earlier].to(dtype)
        new = [e - 1 for e in ends]
        out = PagedView(pool, batch).attend(q.to(dtype), keys[new][None].to(dtype), values[new][None].to(dtype))
        assert out.shape == (1, len(lengths), h, d) and out.dtype == dtype
        assert torch.equal(flat_k[batch.slots], keys[new].to(dtype))
        for i, n in enumerate(lengths):
            k_i, v_i = (t[ends[i] - n:ends[i]].repeat_interleave(h // g, dim=1).transpose(0, 1) for t in (keys, values))
            want = F.scaled_dot_product_attention(q[0, i][:, None], k_i, v_i)[:, 0]
            assert torch.allclose(out[0, i].float(), want, atol=3e-2 if dtype == torch.bfloat16 else 1e-5), (dtype, i)
