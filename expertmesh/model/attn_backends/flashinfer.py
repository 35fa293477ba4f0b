"""FlashInfer's paged attention on CUDA: planned once per step, reading the pool in place.

The glue is `page_table`: the step's sequences (batch order) as FlashInfer's page table, built on
the host from the plan's block tables and lengths (int32, CSR; S sequences, N new tokens):

  qo_indptr [S + 1]         sequence i's queries are rows qo_indptr[i] .. qo_indptr[i+1]-1 of q `[N, h, d]`
  kv_indptr [S + 1]         its pages are kv_indices[kv_indptr[i] .. kv_indptr[i+1]-1], in position order
  kv_indices [pages]        block ids of the pool
  kv_last_page_len [S]      positions used in its last page, 1 .. page_size
  layout "NHD"              each of k, v: `[B, page_size, g, d]`, the pool itself (`model/paged.py`)

A step that only decodes runs `BatchDecodeWithPagedKVCacheWrapper`; any other step
`BatchPrefillWithPagedKVCacheWrapper`, causal: query j of a chunk of n new tokens over kv_len
positions sees positions 0 .. kv_len - n + j. Both are planned once per step (`prepare`), then
run per layer on that layer's pool; no RoPE inside (the model applies it). The new tokens' k, v
are stored by `PagedView` before `attend`, as for every backend. `tests/test_flashinfer_glue.py`
checks these arrays on the CPU against a plain torch implementation of the contract above.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

WORKSPACE_BYTES = 128 << 20  # FlashInfer's float workspace; its examples allocate 128 MiB


@dataclass(frozen=True)
class PageTable:
    """FlashInfer's arguments for one step (host int32 tensors, as described above)."""

    qo_indptr: torch.Tensor
    kv_indptr: torch.Tensor
    kv_indices: torch.Tensor
    kv_last_page_len: torch.Tensor
    decode_only: bool


def page_table(batch) -> PageTable:
    """A `PagedBatch`'s sequences as FlashInfer's page table."""
    s = batch.block_size
    kv_lens = torch.tensor(batch.kv_lens, dtype=torch.int32)
    pages = (kv_lens + s - 1) // s
    tables = batch.tables_host
    used = torch.arange(tables.shape[1])[None, :] < pages[:, None]  # [S, W]
    zero = torch.zeros(1, dtype=torch.int32)
    return PageTable(
        qo_indptr=torch.cat([zero, torch.tensor(batch.seq_lens, dtype=torch.int32).cumsum(0).int()]),
        kv_indptr=torch.cat([zero, pages.cumsum(0).int()]),
        kv_indices=tables[used].int(),
        kv_last_page_len=(kv_lens - 1) % s + 1,
        decode_only=all(n == 1 for n in batch.seq_lens))


class FlashInferBackend:
    """The step's FlashInfer wrappers for layers of `n_heads` query and `n_kv_heads` KV heads
    (this rank's, under tensor parallelism) of `head_dim`, in `dtype`."""

    name = "flashinfer"

    def __init__(self, n_heads: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device):
        import flashinfer  # the optional extra `.[gpu]`; `choose_backend` checks it first

        self.heads = (n_heads, n_kv_heads, head_dim)
        self.dtype = dtype
        workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self.decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD")
        self.prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD")

    def host_arrays(self, batch) -> dict[str, torch.Tensor]:
        return {}  # FlashInfer takes its page table from the host, in `prepare`

    def prepare(self, batch, up: dict[str, torch.Tensor]) -> PageTable:
        table = page_table(batch)
        if batch.n_tokens:
            self._plan(table, batch.block_size)
        return table

    def attend(self, q: torch.Tensor, pool, batch) -> torch.Tensor:
        """q `[N, h, d]` over the pool (this step's k, v already stored) -> `[N, h, d]`."""
        if q.shape[0] == 0:
            return q
        return self._run(q, pool, batch.meta)

    def _plan(self, table: PageTable, page_size: int) -> None:
        h, g, d = self.heads
        if table.decode_only:
            self.decode.plan(table.kv_indptr, table.kv_indices, table.kv_last_page_len, h, g, d, page_size,
                             pos_encoding_mode="NONE", q_data_type=self.dtype, kv_data_type=self.dtype)
        else:
            self.prefill.plan(table.qo_indptr, table.kv_indptr, table.kv_indices, table.kv_last_page_len,
                              h, g, d, page_size, causal=True, q_data_type=self.dtype,
                              kv_data_type=self.dtype)

    def _run(self, q: torch.Tensor, pool, table: PageTable) -> torch.Tensor:
        wrapper = self.decode if table.decode_only else self.prefill
        return wrapper.run(q, (pool.k, pool.v))
