"""Paged KV cache: a pool of fixed-size blocks per layer, and the plan of one forward over it.

Notation: N new tokens in the forward (all sequences, flattened), S sequences, B blocks in the
pool, s block size, g KV heads, d head_dim, h query heads, W blocks of the longest table.

A sequence's keys and values live in the blocks of its block table: position p is slot
`table[p // s] * s + p % s` of the flattened pool `[B * s, g, d]`. `PagedBatch` is the plan of one
forward, built once per step from the scheduler's choice (per sequence: first new position,
number of new tokens, block table) and shared by every layer: where each new token is written,
the block tables `[S, W]`, the rotary tables of the step's positions, and what its attention
backend (`model/attn_backends/`) planned for the step. Attention is exact: a query sees the
positions of its own sequence up to itself, nothing of another sequence. The pool's layout
`[B, s, g, d]` is the contract every backend reads in place (FlashInfer calls it NHD).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from expertmesh.model.attention import KeysValues, rope_tables
from expertmesh.model.attn_backends.torch_paged import TorchBackend


class KVPool(KeysValues):
    """Blocks of one layer: `k, v: [num_blocks, block_size, g, d]`, allocated once; `keys_only`:
    `v is k` (latent attention's pool holds its latent once)."""

    def __init__(self, num_blocks: int, block_size: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, keys_only: bool = False):
        super().__init__((num_blocks, block_size, n_kv_heads, head_dim), dtype, device, keys_only)


def tables_from_lists(chunks: list[tuple[int, int, list[int]]], block_size: int) -> torch.Tensor:
    """The block tables of `chunks` (start, n, table) as `[S, W]` int64, each cut to the blocks its
    `start + n` positions need and padded with block 0 (never read: past every length)."""
    need = [-(-(start + n) // block_size) for start, n, _ in chunks]
    tables = torch.zeros(len(chunks), max(need, default=0), dtype=torch.long)
    for row, (k, (_, _, table)) in enumerate(zip(need, chunks)):
        tables[row, :k] = torch.tensor(table[:k], dtype=torch.long)
    return tables


@dataclass
class Layout:
    """A decode step's layout, for the next step to advance from (`PagedBatch.layout`): kv_lens
    `[S]` on the host, and the step's named device arrays (starts, seq_lens, last, the backend's)."""

    PER_STEP = ("ids", "tables", "table_rows", "table_writes", "positions", "slots", "kv_lens")  # not kept

    kv_lens: list[int]
    up: dict[str, torch.Tensor]


class StepShared:
    """What every layer of a step shares, computed once a step: the rotary tables of the step's
    `positions` (kept in `_rope`) and the attention backend's plan. Mixed into the batches
    (`PagedBatch`, and the decode graphs' persistent `DecodeBuffers`)."""

    def rope(self, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin `[N, d]` of the step's positions, computed once a step, reused by every layer."""
        key = (head_dim, theta)
        if key not in self._rope:
            self._rope[key] = rope_tables(self.positions, head_dim, theta)
        return self._rope[key]

    def plan(self, head_dim: int | None, theta: float | None) -> None:
        """The step's work that every layer shares (`plan_step`)."""
        plan_step(self, head_dim, theta)


class PagedBatch(StepShared):
    """One forward's plan. `chunks[i] = (start, n, table)`: sequence i brings n new tokens at
    positions start .. start+n-1 and its blocks are `table` (enough for start + n positions).
    `tables`: the block tables, then `chunks`' tables are not read: the engine passes its
    persistent ones (`engine/block_tables.py`'s `StepTables`: rows of a table kept on the device,
    so that only the rows `[S]` and the step's new block ids go up); a host tensor `[S, W]` goes up
    whole; None: `tables_from_lists(chunks)`. `ids`: the step's token ids `[N]` on the host, to go
    up in the plan's copy (then `self.ids` on the device; else None). `previous`: the last decode
    step's `layout` (of the same micro-batch), which a decode step that continues it (every
    sequence one position further: its starts are the last kv_lens) advances on the device.

    On the host: starts, seq_lens (n per sequence), kv_lens (start + n), and `tables_host` `[S, W]`
    on demand (a backend that plans on the host). Uploaded in one copy: starts and seq_lens `[S]`,
    the tables' rows and writes (or the tables), and the backend's own arrays; then on the device:
    positions `[N]`, slots `[N]` (where each new token's k, v go), last `[S]` (each sequence's last
    new token in the flattened batch), tables `[S, W]`, kv_lens `[S]`. The host's work is O(S + N),
    whatever the context. A continuing decode step uploads only its ids and what the tables lack
    (often nothing), and takes positions and kv_lens as the last step's + 1, its slots from them,
    seq_lens, last and the backend's arrays (which depend on seq_lens alone) as they were.
    `rope(d, theta)`: cos, sin `[N, d]`, once a step.
    """

    static = False  # `engine/graphs.py`'s padded decode plan is static: shapes by bucket only

    def __init__(self, chunks: list[tuple[int, int, list[int]]], block_size: int, device: torch.device,
                 backend=None, tables=None, ids: torch.Tensor | None = None, previous: Layout | None = None):
        self.block_size, self.device = block_size, device
        self.backend = backend or TorchBackend()
        self.starts = [start for start, _, _ in chunks]
        self.seq_lens = [n for _, n, _ in chunks]
        self.kv_lens = [start + n for start, n in zip(self.starts, self.seq_lens)]
        self.n_tokens = sum(self.seq_lens)
        self.decode_only = self.seq_lens.count(1) == len(self.seq_lens)  # then token i is sequence i's
        self._tables = tables_from_lists(chunks, block_size) if tables is None else tables
        persistent = not isinstance(self._tables, torch.Tensor)
        continues = (previous is not None and self.decode_only and self.n_tokens > 0
                     and self.starts == previous.kv_lens)
        host = {}
        if not continues:
            host = {"starts": torch.tensor(self.starts, dtype=torch.long),
                    "seq_lens": torch.tensor(self.seq_lens, dtype=torch.long)}
        host.update(self._tables.host_arrays() if persistent else {"tables": self._tables.long()})
        if not continues:
            host.update(self.backend.host_arrays(self))
        if ids is not None:
            host["ids"] = ids
        names = list(host)
        up = dict(zip(names, upload([host[n] for n in names], device))) if names else {}
        self.tables = self._tables.on_device(up, device) if persistent else up["tables"]
        if continues:  # the last step's arrays, then what moved: one position further
            up = {**previous.up, **up}
            up["starts"] = previous.up["starts"] + 1
            up.update(positions=up["starts"], kv_lens=up["starts"] + 1,
                      slots=slots_at(self.tables, up["starts"], block_size))
        else:
            up.update(token_layout(up["starts"], up["seq_lens"], self.tables, block_size, self.n_tokens,
                                   one_each=self.decode_only))
        up["tables"] = self.tables
        self.up = up
        self.positions, self.slots, self.last = up["positions"], up["slots"], up["last"]
        self.ids = up.get("ids")
        self.kv_lens_device = up["kv_lens"]
        self._rope: dict = {}
        self.meta = self.backend.prepare(self, up)

    @property
    def layout(self) -> Layout | None:
        """What the next decode step advances from (a decode-only step's), else None."""
        if not self.decode_only:
            return None
        return Layout(self.kv_lens, {k: v for k, v in self.up.items() if k not in Layout.PER_STEP})

    @property
    def tables_host(self) -> torch.Tensor:
        """The block tables `[S, W]` on the host (never read back from the device)."""
        return self._tables if isinstance(self._tables, torch.Tensor) else self._tables.host()


def token_layout(start: torch.Tensor, lens: torch.Tensor, tables: torch.Tensor, block_size: int,
                 n_tokens: int, one_each: bool = False) -> dict[str, torch.Tensor]:
    """Where a step's new tokens go, computed where `start`, `lens` `[S]` and `tables` `[S, W]`
    are (on the device, no read): sequence i brings lens[i] tokens from position start[i] ->
    positions `[N]`, slots `[N]` (block * block_size + offset, where each token's k, v go), last
    `[S]` (each sequence's last token in the flattened batch), kv_lens `[S]`. `n_tokens` (N, known
    on the host) sizes the repeat without reading `lens`; `one_each`: every lens[i] is 1 (a decode
    step, known on the host), then token i is sequence i's and four ops fewer run."""
    S, device = start.shape[0], start.device
    ends = lens.cumsum(0)
    if one_each:
        return {"positions": start, "slots": slots_at(tables, start, block_size), "last": ends - 1,
                "kv_lens": start + lens}
    seq_of = torch.repeat_interleave(torch.arange(S, device=device), lens, output_size=n_tokens)  # [N]
    positions = start[seq_of] + torch.arange(n_tokens, device=device) - (ends - lens)[seq_of]
    slots = tables[seq_of, positions // block_size].long() * block_size + positions % block_size
    return {"positions": positions, "slots": slots, "last": ends - 1, "kv_lens": start + lens}


def slots_at(tables: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """The slot of position `positions[i]` of sequence i (tables `[S, W]`, positions `[S]`) -> `[S]`
    int64, on the device."""
    blocks = tables.gather(1, (positions // block_size)[:, None])[:, 0].long()
    return blocks * block_size + positions % block_size


def plan_step(batch, head_dim: int | None, theta: float | None) -> None:
    """Before the first layer: the rotary tables of `batch` (when `head_dim`, `theta`: the layers'
    `Attention`) and its backend's device plan, so that no layer pays for the step's."""
    if head_dim is not None:
        batch.rope(head_dim, theta)
    plan = getattr(batch.backend, "plan", None)
    if plan is not None:
        plan(batch)


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

    def rope(self, length: int, head_dim: int, theta: float, device: torch.device):
        return self.batch.rope(head_dim, theta)

    @property
    def fresh(self) -> bool:
        """Every sequence starts at position 0 (read on the host; a static decode plan never is)."""
        return not self.batch.static and not any(self.batch.starts)

    def store(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v `[1, N, g, d]` -> the pool, at the batch's slots (a keys-only pool: k alone, which
        v must equal)."""
        pool, slots = self.pool, self.batch.slots
        nb, s, g, d = pool.k.shape
        pool.k.view(nb * s, g, d).index_copy_(0, slots, k[0])
        if not pool.keys_only:
            pool.v.view(nb * s, g, d).index_copy_(0, slots, v[0])

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q `[1, N, h, d]`, k, v `[1, N, g, d]`: store k, v at the batch's slots, then the
        backend's attention over the pool -> `[1, N, h, d]`."""
        self.store(k, v)
        return self.batch.backend.attend(q[0], self.pool, self.batch).unsqueeze(0)
