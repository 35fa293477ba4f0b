"""Paged attention in plain torch: the reference backend, on the CPU and on CUDA without FlashInfer.

Notation as in `model/paged.py`; Sd decoding sequences (one new token each), P prefill chunks
(several new tokens each), r = h / g query heads per KV head.

Decodes: the keys and values of each sequence's positions 0 .. kv_len-1 are gathered from the
pool by slot (`index_select`) into a reused buffer and attended by one SDPA call per *piece*, a
run of decoding sequences whose gathered keys stay under `piece_bytes`. On the CPU a piece
fits in the last-level cache, so the copy is read back from the cache rather than from memory:
on one core of an EPYC at load 0.3 (small preset, 8 x 1k context; the gathers and SDPA alone)
gathering sequence by sequence took 0.85x the time of SDPA over a contiguous cache, gathering
the whole batch at once 1.6x; other processes that share the cache erode the gain. On CUDA the
whole batch is one piece (one launch each). Within a piece the query is `[Sd, g, r, d]`: the r
query heads of a KV head are its r query rows, so SDPA needs no repeat of the keys for GQA. A
piece of unequal lengths carries an additive mask `[Sd, 1, 1, C]`; one of equal lengths none.

Prefill chunks: all of a step's in one padded SDPA call: queries `[P, h, Lmax, d]` (short chunks
padded by repeating their last token), keys gathered `[P, g, Cmax, d]`, a causal mask by position
`[P, 1, Lmax, Cmax]`; the padded rows' outputs are dropped.

A keys-only pool (latent attention's, `model/mla.py`) is gathered once: its keys are the values.

Everything per step (gather indices, masks) is built once, before the first layer; per layer
`attend` runs the gathers and the SDPA calls only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# A decode piece's gathered keys on the CPU: a quarter of the 32 MiB last-level cache of the
# EPYC this was measured on (keys and values of a piece, and the queries, stay resident).
CPU_PIECE_BYTES = 8 << 20
# cuDNN's SDPA builds a plan on the host for every new shape, and a decode step's shapes change
# every step: on the H200 (torch 2.11, bf16, small preset, 8 sequences) it chose cuDNN and spent
# 18 ms of host time per call on 17 us of device work, a 73 ms eager decode step.
NO_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass
class _Piece:
    tokens: torch.Tensor  # [Sp] rows of q, on the device
    slots: torch.Tensor  # [Sp * C] slots of the pool to gather
    width: int  # C
    mask: torch.Tensor | None  # additive [Sp, 1, 1, C] fp32, None when all lengths are C


@dataclass
class _Prefill:
    queries: torch.Tensor  # [P * Lmax] rows of q (padded by repeating each chunk's last)
    keep: torch.Tensor  # [Np] which rows of the padded output are real
    tokens: torch.Tensor  # [Np] their rows in the batch
    slots: torch.Tensor  # [P * Cmax]
    shape: tuple[int, int, int]  # P, Lmax, Cmax
    mask: torch.Tensor  # bool [P, 1, Lmax, Cmax]


class TorchBackend:
    """`piece_bytes`: the most bytes of gathered keys per decode SDPA call (None: the whole batch
    in one call). `for_device` chooses it for a device and a pool layout."""

    name = "torch"

    def __init__(self, piece_bytes: int | None = None, position_bytes: int = 1):
        self.piece_positions = None if piece_bytes is None else max(1, piece_bytes // position_bytes)
        self.buffers: dict[str, torch.Tensor] = {}

    @classmethod
    def for_device(cls, device: torch.device, position_bytes: int) -> TorchBackend:
        """Pieces of `CPU_PIECE_BYTES` on the CPU, one on CUDA, for pools of `position_bytes` per
        position (g * d * itemsize)."""
        return cls() if device.type == "cuda" else cls(CPU_PIECE_BYTES, position_bytes)

    def host_arrays(self, batch) -> dict[str, torch.Tensor]:
        """The step's index arrays that only the host can make, to go up with the batch's."""
        if batch.decode_only:
            rows = torch.arange(batch.n_tokens)  # a decode step: sequence i is token i
            return {"decode_rows": rows, "decode_tokens": rows}
        ends = torch.tensor(batch.seq_lens, dtype=torch.long).cumsum(0)
        decodes = [i for i, n in enumerate(batch.seq_lens) if n == 1]
        prefills = [i for i, n in enumerate(batch.seq_lens) if n > 1]
        out = {"decode_rows": torch.tensor(decodes, dtype=torch.long)}
        out["decode_tokens"] = ends[out["decode_rows"]] - 1
        if prefills:
            width = max(batch.seq_lens[i] for i in prefills)
            rows = torch.tensor(prefills, dtype=torch.long)
            n = torch.tensor([batch.seq_lens[i] for i in prefills], dtype=torch.long)
            first = ends[rows] - n
            offset = torch.minimum(torch.arange(width)[None, :], n[:, None] - 1)  # [P, Lmax]
            keep = (torch.arange(width)[None, :] < n[:, None]).reshape(-1)
            out.update(prefill_rows=rows, prefill_queries=(first[:, None] + offset).reshape(-1),
                       prefill_keep=keep.nonzero().squeeze(1))
        return out

    def prepare(self, batch, up: dict[str, torch.Tensor]) -> dict:
        """The step's state: its uploaded arrays; the gather slots and masks follow before the first
        layer (`plan`), device work kept off the host's step setup."""
        return {"up": up, "pieces": None, "prefill": None, "masks": {}}

    def plan(self, batch) -> None:
        """The step's device plan, before its first layer (`model/paged.py`'s `plan_step`)."""
        if batch.meta["pieces"] is None:
            self._device_plan(batch)

    def _device_plan(self, batch) -> None:
        """Once per step, on the device: each decode piece's gather slots and mask, the prefill
        call's slots and causal mask."""
        if batch.static:
            return self._static_plan(batch)
        meta, up = batch.meta, batch.meta["up"]
        s, lens = batch.block_size, batch.kv_lens
        decodes = [i for i, n in enumerate(batch.seq_lens) if n == 1]
        pieces, first = [], 0
        tables, kv_lens = up["tables"], up["kv_lens"]
        if not batch.decode_only:  # a decode step has them in order already
            tables, kv_lens = tables.index_select(0, up["decode_rows"]), kv_lens.index_select(0, up["decode_rows"])
        for count, width in self._pieces([lens[i] for i in decodes]):
            part = slice(first, first + count)
            mask = None
            if any(lens[i] != width for i in decodes[part]):
                past = torch.arange(width, device=batch.device)[None, :] >= kv_lens[part, None]
                mask = torch.zeros(past.shape, device=batch.device).masked_fill_(past, float("-inf"))
                mask = mask[:, None, None, :]
            pieces.append(_Piece(up["decode_tokens"][part], _slots(tables[part], width, s), width, mask))
            first += count
        meta["pieces"] = pieces
        if "prefill_rows" in up:
            rows = up["prefill_rows"]
            P = rows.shape[0]
            width = max(n for n in batch.seq_lens if n > 1)
            context = max(lens[i] for i, n in enumerate(batch.seq_lens) if n > 1)
            queries = up["prefill_queries"]
            position = batch.positions.index_select(0, queries).view(P, width)
            mask = torch.arange(context, device=batch.device)[None, None, :] <= position[:, :, None]
            meta["prefill"] = _Prefill(queries, up["prefill_keep"], queries.index_select(0, up["prefill_keep"]),
                                       _slots(up["tables"].index_select(0, rows), context, s),
                                       (P, width, context), mask[:, None])

    def _static_plan(self, batch) -> None:
        """A padded decode forward (`engine/graphs.py`): shapes by its bucket only, values only
        from its device buffers: one piece over every row's whole table `[B, W * s]`, masked past
        each row's length."""
        B, width = batch.n_tokens, batch.tables.shape[1] * batch.block_size
        past = torch.arange(width, device=batch.device)[None, :] >= batch.kv_lens_device[:, None]
        mask = torch.zeros(past.shape, device=batch.device).masked_fill_(past, float("-inf"))
        batch.meta["pieces"] = [_Piece(torch.arange(B, device=batch.device),
                                       _slots(batch.tables, width, batch.block_size), width, mask[:, None, None, :])]

    def _pieces(self, lens: list[int]) -> list[tuple[int, int]]:
        """Consecutive runs of decoding sequences: (count, longest length) each, under the budget."""
        out: list[tuple[int, int]] = []
        for n in lens:
            if out:
                count, width = out[-1]
                if self.piece_positions is None or (count + 1) * max(width, n) <= self.piece_positions:
                    out[-1] = (count + 1, max(width, n))
                    continue
            out.append((1, n))
        return out

    def attend(self, q: torch.Tensor, pool, batch) -> torch.Tensor:
        """q `[N, h, d]` over the pool `[B, s, g, d]` (this step's k, v already stored) -> `[N, h, d]`."""
        meta = batch.meta
        if meta["pieces"] is None:
            self._device_plan(batch)
        g, d = pool.k.shape[2:]
        h = q.shape[1]
        pieces = meta["pieces"]
        # a decode-only step's pieces are consecutive runs of q's rows, in order: each takes its
        # rows as a view and the outputs are joined once (one op a layer, none for one piece),
        # instead of a gather of the queries and a scatter of the output per piece
        in_order = meta["prefill"] is None
        out = None if in_order else torch.empty_like(q)
        outs, first = [], 0
        for i, piece in enumerate(pieces):
            Sp, C = piece.tokens.shape[0], piece.width
            keys, values = _keys_values(pool, lambda name, flat: self._gather(name, flat, piece.slots)
                                        .view(Sp, C, g, d).transpose(1, 2))  # [Sp, g, C, d]
            mask = piece.mask
            if mask is not None and mask.dtype != q.dtype:
                mask = meta["masks"].get((i, q.dtype))
                if mask is None:
                    mask = meta["masks"][(i, q.dtype)] = piece.mask.to(q.dtype)
            rows = q[first:first + Sp] if in_order else q.index_select(0, piece.tokens)
            o = _sdpa(rows.view(Sp, g, h // g, d), keys, values, attn_mask=mask).reshape(Sp, h, d)  # [Sp, g, r, d]
            first += Sp
            if in_order:
                outs.append(o)
            else:
                out.index_copy_(0, piece.tokens, o)
        if in_order:
            return outs[0] if len(outs) == 1 else torch.cat(outs) if outs else q
        pre = meta["prefill"]
        if pre is not None:
            P, L, C = pre.shape
            query = q.index_select(0, pre.queries).view(P, L, h, d).transpose(1, 2)
            keys, values = _keys_values(pool, lambda _, flat: flat.index_select(0, pre.slots)
                                        .view(P, C, g, d).transpose(1, 2))
            o = _sdpa(query, keys, values, attn_mask=pre.mask, enable_gqa=h != g)
            out.index_copy_(0, pre.tokens, o.transpose(1, 2).reshape(P * L, h, d).index_select(0, pre.keep))
        return out

    def _gather(self, name: str, flat: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """`flat[slots]` into a buffer reused across pieces, layers and steps: a fresh one of
        megabytes costs its page faults on every call, more than the copy."""
        n = slots.shape[0] * flat.shape[1] * flat.shape[2]
        buf = self.buffers.get(name)
        if buf is None or buf.numel() < n or buf.dtype != flat.dtype or buf.device != flat.device:
            buf = self.buffers[name] = torch.empty(n, dtype=flat.dtype, device=flat.device)
        return torch.index_select(flat, 0, slots, out=buf[:n].view(slots.shape[0], *flat.shape[1:]))


def _keys_values(pool, read) -> tuple[torch.Tensor, torch.Tensor]:
    """`read(name, flat)` of the pool's keys and of its values, each flat `[B * s, g, d]`; a
    keys-only pool's values are its keys, read once."""
    nb, s, g, d = pool.k.shape
    keys = read("k", pool.k.view(nb * s, g, d))
    return keys, keys if pool.keys_only else read("v", pool.v.view(nb * s, g, d))


def _slots(tables: torch.Tensor, width: int, block_size: int) -> torch.Tensor:
    """tables `[R, W]` -> the slots of positions 0 .. width-1 of each row, `[R * width]`."""
    blocks = -(-width // block_size)
    offsets = torch.arange(block_size, device=tables.device)
    return (tables[:, :blocks, None] * block_size + offsets).reshape(tables.shape[0], -1)[:, :width].reshape(-1)


def _sdpa(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, **options) -> torch.Tensor:
    """SDPA, never through cuDNN on CUDA (`NO_CUDNN`)."""
    if query.device.type != "cuda":
        return F.scaled_dot_product_attention(query, keys, values, **options)
    with sdpa_kernel(NO_CUDNN):
        return F.scaled_dot_product_attention(query, keys, values, **options)
