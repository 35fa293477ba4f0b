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
are stored by `PagedView` before `attend`, as for every backend. Padded decode forwards
(`engine/graphs.py`, CUDA graphs) use FlashInfer's CUDA-graph decode wrapper, one per padded
size, planned on the host before each replay (padded rows: one page, the scratch block). `tests/test_flashinfer_glue.py`
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
    return page_table_of(batch.tables_host, torch.tensor(batch.kv_lens, dtype=torch.int32),
                         batch.seq_lens, batch.block_size)


def page_table_of(tables: torch.Tensor, kv_lens: torch.Tensor, seq_lens: list[int], page_size: int) -> PageTable:
    """Block tables `[S, W]`, positions in the cache `[S]` and new tokens per sequence (host) ->
    FlashInfer's page table."""
    kv_lens = kv_lens.int()
    pages = (kv_lens + page_size - 1) // page_size
    used = torch.arange(tables.shape[1])[None, :] < pages[:, None]  # [S, W]
    zero = torch.zeros(1, dtype=torch.int32)
    return PageTable(
        qo_indptr=torch.cat([zero, torch.tensor(seq_lens, dtype=torch.int32).cumsum(0).int()]),
        kv_indptr=torch.cat([zero, pages.cumsum(0).int()]),
        kv_indices=tables[used].int(),
        kv_last_page_len=(kv_lens - 1) % page_size + 1,
        decode_only=all(n == 1 for n in seq_lens))


class FlashInferBackend:
    """The step's FlashInfer wrappers for layers of `n_heads` query and `n_kv_heads` KV heads
    (this rank's, under tensor parallelism) of `head_dim`, in `dtype`."""

    name = "flashinfer"

    def __init__(self, n_heads: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device):
        import flashinfer  # the optional extra `.[gpu]`; `choose_backend` checks it first

        self.heads = (n_heads, n_kv_heads, head_dim)
        self.dtype = dtype
        self.workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self.decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(self.workspace, "NHD")
        self.prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD")
        self.graph_decode: dict = {}  # padded batch size -> its CUDA-graph decode wrapper

    def add_graph_size(self, B: int, max_pages: int) -> None:
        """A decode wrapper for padded decode forwards of B rows of at most `max_pages` pages
        (`engine/graphs.py`): FlashInfer's CUDA-graph variant, whose page table lives in buffers of
        fixed size and address that `plan_graph` rewrites before each replay."""
        import flashinfer

        device = self.workspace.device
        self.graph_decode[B] = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            self.workspace, "NHD", use_cuda_graph=True,
            paged_kv_indptr_buffer=torch.zeros(B + 1, dtype=torch.int32, device=device),
            paged_kv_indices_buffer=torch.zeros(B * max_pages, dtype=torch.int32, device=device),
            paged_kv_last_page_len_buffer=torch.zeros(B, dtype=torch.int32, device=device))

    def plan_graph(self, tables: torch.Tensor, kv_lens: torch.Tensor, page_size: int) -> None:
        """Plan the padded decode of `tables` `[B, W]`, `kv_lens` `[B]` (host) on its size's wrapper."""
        table = page_table_of(tables, kv_lens, [1] * len(kv_lens), page_size)
        self._plan_decode(self.graph_decode[len(kv_lens)], table, page_size)

    def host_arrays(self, batch) -> dict[str, torch.Tensor]:
        return {}  # FlashInfer takes its page table from the host, in `prepare`

    def prepare(self, batch, up: dict[str, torch.Tensor]) -> PageTable:
        table = page_table(batch)
        if batch.n_tokens:
            self._plan(table, batch.block_size)
        return table

    def attend(self, q: torch.Tensor, pool, batch) -> torch.Tensor:
        """q `[N, h, d]` over the pool (this step's k, v already stored) -> `[N, h, d]`."""
        # q arrives as a strided view (rows of the joint q, k rotation, `model/attention.py`); the
        # kernels' stride support is unverified here, so they get dense rows
        q = q.contiguous()
        if batch.static:  # a padded decode forward: its size's wrapper, planned by `plan_graph`
            return self.graph_decode[q.shape[0]].run(q, (pool.k, pool.v))
        if q.shape[0] == 0:
            return q
        return self._run(q, pool, batch.meta)

    def _plan_decode(self, wrapper, table: PageTable, page_size: int) -> None:
        h, g, d = self.heads
        wrapper.plan(table.kv_indptr, table.kv_indices, table.kv_last_page_len, h, g, d, page_size,
                     pos_encoding_mode="NONE", q_data_type=self.dtype, kv_data_type=self.dtype)

    def _plan(self, table: PageTable, page_size: int) -> None:
        h, g, d = self.heads
        if table.decode_only:
            self._plan_decode(self.decode, table, page_size)
        else:
            self.prefill.plan(table.qo_indptr, table.kv_indptr, table.kv_indices, table.kv_last_page_len,
                              h, g, d, page_size, causal=True, q_data_type=self.dtype,
                              kv_data_type=self.dtype)

    def _run(self, q: torch.Tensor, pool, table: PageTable) -> torch.Tensor:
        wrapper = self.decode if table.decode_only else self.prefill
        return wrapper.run(q, (pool.k, pool.v))
