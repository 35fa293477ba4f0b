"""Paged KV cache: a pool of fixed-size blocks per layer, and the ragged batch that reads it.

Notation: N new tokens in the forward (all sequences, flattened), S sequences, B blocks in the
pool, s block size, g KV heads, d head_dim, h query heads.

A sequence's keys and values live in the blocks of its block table: position p is slot
`table[p // s] * s + p % s` of the flattened pool `[B * s, g, d]`. `PagedBatch` turns the
scheduler's choice for one step (per sequence: first new position, number of new tokens, block
table) into tensors every layer shares: where each new token is written, and which slots each
sequence reads. Attention is exact: a query sees the positions of its own sequence up to itself,
nothing of another sequence.

Sequences with one new token (decodes) attend together in one padded call over their gathered
blocks `[Sd, C, g, d]` (C = most blocks of any of them x s, positions past a sequence's length
masked); a sequence with several new tokens (a prefill chunk) attends alone, causally.
"""

from __future__ import annotations

from itertools import accumulate

import torch
import torch.nn.functional as F


class KVPool:
    """Blocks of one layer: `k, v: [num_blocks, block_size, g, d]`, allocated once."""

    def __init__(self, num_blocks: int, block_size: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        self.k = torch.zeros(num_blocks, block_size, n_kv_heads, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


class Workspace:
    """Gather buffers reused from step to step and layer to layer: a fresh buffer of the gathered
    keys (megabytes at 1k context) costs its page faults on every call, more than the copy."""

    def __init__(self):
        self.buffers: dict[str, torch.Tensor] = {}

    def take(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        n = 1
        for size in shape:
            n *= size
        buf = self.buffers.get(name)
        if buf is None or buf.numel() < n or buf.dtype != like.dtype or buf.device != like.device:
            buf = self.buffers[name] = torch.empty(n, dtype=like.dtype, device=like.device)
        return buf[:n].view(shape)


class PagedBatch:
    """One forward's sequences: `chunks[i] = (start, n, table)`: sequence i brings n new tokens at
    positions start .. start+n-1 and its blocks are `table` (enough for start + n positions).

    positions `[N]`, slots `[N]` (where each new token's k, v go), seq_lens (n per sequence),
    last `[S]` (index of each sequence's last new token in the flattened batch).
    """

    def __init__(self, chunks: list[tuple[int, int, list[int]]], block_size: int,
                 device: torch.device, workspace: Workspace | None = None):
        self.workspace = workspace or Workspace()
        self.seq_lens = [n for _, n, _ in chunks]
        s = block_size
        positions, slots, decode_tokens, decode_tables, decode_lens, prefills = [], [], [], [], [], []
        offset = 0
        for start, n, table in chunks:
            end = start + n
            table_t = torch.tensor(table[:-(-end // s)], dtype=torch.long)
            pos = torch.arange(start, end)
            positions.append(pos)
            slots.append(table_t[pos // s] * s + pos % s)
            if n == 1:
                decode_tokens.append(offset)
                decode_tables.append(table_t)
                decode_lens.append(end)
            else:
                prefills.append((offset, n, start, table_t))
            offset += n
        self.n_tokens = offset
        none = torch.zeros(0, dtype=torch.long)
        host = [torch.cat(positions) if chunks else none, torch.cat(slots) if chunks else none,
                torch.tensor([o - 1 for o in accumulate(self.seq_lens)], dtype=torch.long),
                torch.tensor(decode_tokens, dtype=torch.long)]
        width = max((len(t) for t in decode_tables), default=0)
        lens = torch.tensor(decode_lens, dtype=torch.long)
        if decode_tables:
            host += [torch.stack([F.pad(t, (0, width - len(t))) for t in decode_tables]), lens]
        host += [table_t for _, _, _, table_t in prefills]
        up = upload(host, device)
        self.positions, self.slots, self.last, self.decode_tokens = up[:4]
        self.decode_tables = self.decode_mask = None
        if decode_tables:
            self.decode_tables = up[4]
            if not bool((lens == width * s).all()):  # lens on the host: no device read
                past = torch.arange(width * s, device=device)[None, :] >= up[5][:, None]  # [Sd, C]
                # additive, not boolean: the CPU kernel is faster with it (measured 1.2x at 1k)
                mask = torch.zeros(past.shape, device=device).masked_fill_(past, float("-inf"))
                self.decode_mask = mask[:, None, None, :]
        self.prefills: list[tuple[int, int, torch.Tensor, torch.Tensor | None]] = []
        for (first, n, start, _), table in zip(prefills, up[len(up) - len(prefills):]):
            mask = None if start == 0 else (
                torch.arange(start + n, device=device)[None, :] <= self.positions[first:first + n, None])
            self.prefills.append((first, first + n, table, mask))


def upload(host: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """int64 host tensors -> the same on `device`, in one copy that waits for nothing: the
    layout of a forward goes up while the device still runs the previous one (from pinned
    memory on CUDA; a copy from pageable memory, or one per tensor, waits for the stream)."""
    flat = torch.cat([t.reshape(-1) for t in host])
    if device.type == "cuda":
        flat = flat.pin_memory()
    flat = flat.to(device, non_blocking=True)
    return [part.view(t.shape) for part, t in zip(flat.split([t.numel() for t in host]), host)]


class PagedView:
    """The KV view (`model/attention.py`) of one layer's pool for a `PagedBatch`."""

    def __init__(self, pool: KVPool, batch: PagedBatch):
        self.pool, self.batch = pool, batch
        self.seq_lens = batch.seq_lens

    def positions(self, length: int, device: torch.device) -> torch.Tensor:
        return self.batch.positions

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q `[1, N, h, d]`, k, v `[1, N, g, d]` -> `[1, N, h, d]`."""
        batch, pool = self.batch, self.pool
        nb, s, g, d = pool.k.shape
        pool.k.view(nb * s, g, d)[batch.slots] = k[0]
        pool.v.view(nb * s, g, d)[batch.slots] = v[0]
        gqa = q.shape[2] != g
        out = torch.empty_like(q[0])  # [N, h, d]
        if batch.decode_tables is not None:
            Sd, width = batch.decode_tables.shape
            qd = q[0, batch.decode_tokens].unsqueeze(2)  # [Sd, h, 1, d]
            blocks = batch.decode_tables.view(-1)
            kd, vd = (torch.index_select(t.view(nb, s * g * d), 0, blocks,
                                         out=batch.workspace.take(name, (Sd * width, s * g * d), t))
                      .view(Sd, width * s, g, d).transpose(1, 2)
                      for name, t in (("k", pool.k), ("v", pool.v)))  # [Sd, g, C, d]
            mask = batch.decode_mask
            if mask is not None and mask.dtype != q.dtype:
                mask = batch.decode_mask = mask.to(q.dtype)  # once per forward, then every layer
            o = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, enable_gqa=gqa)
            out[batch.decode_tokens] = o.squeeze(2)
        for first, end, table, mask in batch.prefills:
            qs = q[0, first:end].transpose(0, 1).unsqueeze(0)  # [1, h, n, d]
            if mask is None:  # a chunk from position 0 sees only itself: no gather
                ks, vs = (t[0, first:end].transpose(0, 1).unsqueeze(0) for t in (k, v))
            else:
                ks, vs = (t[table].view(-1, g, d)[:mask.shape[1]].transpose(0, 1).unsqueeze(0)
                          for t in (pool.k, pool.v))  # [1, g, context, d]
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, is_causal=mask is None,
                                               enable_gqa=gqa)
            out[first:end] = o[0].transpose(0, 1)
        return out.unsqueeze(0)
