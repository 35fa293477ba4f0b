"""FlashInfer's glue (model/attn_backends/flashinfer.py), checked on the CPU: the page table the
backend hands FlashInfer (qo_indptr, kv_indptr, kv_indices, kv_last_page_len over the pool in
NHD layout), built from real engine batches, is run here through a plain torch implementation of
FlashInfer's documented contract (`contract_attention`, independent of the backend's code); the
logits and greedy tokens equal the reference model's, and a wrong index array breaks them."""

import math
import sys
from types import SimpleNamespace

import pytest
import torch

from expertmesh.deployment import Deployment
from expertmesh.engine import runner
from expertmesh.engine.engine import Engine
from expertmesh.engine.request import Request
from expertmesh.engine.scheduler import EngineConfig
from expertmesh.model import attn_backends
from expertmesh.model.attn_backends import choose_backend
from expertmesh.model.attn_backends.flashinfer import FlashInferBackend, PageTable, page_table
from expertmesh.model.paged import PagedBatch
from serving import naive_tokens
from test_paged import reference_logits, run_schedule, scattered_tables


def contract_attention(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, t: PageTable,
                       causal: bool) -> torch.Tensor:
    """FlashInfer's batch attention over a paged cache, as its documentation states it. q `[N, h, d]`;
    k_pages, v_pages `[pages, page_size, g, d]` (NHD). Request i owns query rows
    qo_indptr[i] .. qo_indptr[i+1]-1 and pages kv_indices[kv_indptr[i] .. kv_indptr[i+1]-1], of
    which the last holds kv_last_page_len[i] positions. Query head j reads KV head j // (h / g);
    scale 1 / sqrt(d); causal: query row r of n sees positions 0 .. kv_len - n + r."""
    h, d = q.shape[1:]
    page, g = k_pages.shape[1], k_pages.shape[2]
    kv_head = torch.arange(h) // (h // g)
    out = torch.full_like(q, float("nan"))
    for i in range(len(t.qo_indptr) - 1):
        pages = t.kv_indices[int(t.kv_indptr[i]):int(t.kv_indptr[i + 1])].long()
        kv_len = (len(pages) - 1) * page + int(t.kv_last_page_len[i])
        keys = k_pages[pages].reshape(-1, g, d)[:kv_len, kv_head].double()  # [kv_len, h, d]
        values = v_pages[pages].reshape(-1, g, d)[:kv_len, kv_head].double()
        rows = slice(int(t.qo_indptr[i]), int(t.qo_indptr[i + 1]))
        queries = q[rows].double()
        n = queries.shape[0]
        scores = torch.einsum("nhd,khd->hnk", queries, keys) / math.sqrt(d)
        if causal:
            seen = torch.arange(kv_len)[None, :] <= kv_len - n + torch.arange(n)[:, None]
            scores = scores.masked_fill(~seen, float("-inf"))
        else:
            assert n == 1, "the decode wrapper takes one query per request"
        out[rows] = torch.einsum("hnk,khd->nhd", scores.softmax(-1), values).to(q.dtype)
    return out


class ContractBackend(FlashInferBackend):
    """The FlashInfer backend with FlashInfer's two calls replaced: `_plan` keeps the arguments it
    would hand FlashInfer, `_run` computes FlashInfer's contract from exactly those. `corrupt`
    rewrites a page table before it is used (to show a wrong one fails)."""

    def __init__(self, corrupt=None):  # no FlashInfer here: nothing of the wrappers is built
        self.planned: list[PageTable] = []
        self.corrupt = corrupt

    def prepare(self, batch, up):
        table = page_table(batch)
        if self.corrupt is not None:
            table = self.corrupt(table)
        if batch.n_tokens:
            self._plan(table, batch.block_size)
        return table

    def _plan(self, table: PageTable, page_size: int) -> None:
        self.planned.append(table)

    def _run(self, q, pool, table: PageTable):
        assert table is self.planned[-1], "run with the table planned for the step"
        return contract_attention(q, pool.k, pool.v, table, causal=not table.decode_only)


def test_the_page_table_of_a_batch_is_flashinfers_csr_layout():
    batch = PagedBatch([(0, 3, [5, 2]), (6, 1, [7, 1]), (2, 6, [3, 0, 9])], 4, torch.device("cpu"),
                       ContractBackend())
    t = page_table(batch)
    assert t.qo_indptr.tolist() == [0, 3, 4, 10]
    assert t.kv_indptr.tolist() == [0, 1, 3, 5]  # 3, 7 and 8 positions: 1, 2, 2 pages of 4
    assert t.kv_indices.tolist() == [5, 7, 1, 3, 0]
    assert t.kv_last_page_len.tolist() == [3, 3, 4]
    assert all(x.dtype == torch.int32 for x in (t.qo_indptr, t.kv_indptr, t.kv_indices, t.kv_last_page_len))
    assert not t.decode_only


def test_flashinfers_contract_over_the_page_table_gives_the_reference_logits(small_model):
    """Prefill chunks beside decodes (the prefill wrapper) and decode-only steps (the decode
    wrapper), GQA, blocks scattered over the pool."""
    model = small_model(seed=1, n_kv_heads=2)
    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, model.cfg.vocab_size, (n,), generator=gen).tolist() for n in (9, 2, 14, 7)]
    steps = [[(0, 5), (2, 3)], [(0, 1), (1, 1), (2, 7)], [(0, 1), (2, 4), (3, 5)],
             [(0, 1), (3, 1)], [(0, 1)], [(1, 1), (0, 1), (3, 1)]]
    seqs[0] += [5]
    backend = ContractBackend()
    seen = run_schedule(model, seqs, steps, scattered_tables(4, 4, seed=2), backend)
    assert [t.decode_only for t in backend.planned] == [False, False, False, True, True, True]
    for i, ids in enumerate(seqs):
        ref = reference_logits(model, ids)
        for pos, logits in seen[i]:
            torch.testing.assert_close(logits, ref[pos], rtol=1e-4, atol=1e-4)


def _engine_tokens(model, backend, graphs: str = "off") -> dict:
    engine = Engine(model, model.cfg, Deployment(), EngineConfig(block_size=4, num_blocks=64,
                                                                  max_batched_tokens=16, max_seqs=4),
                    graphs=graphs)
    if backend is not None:
        engine.runner.backend = backend
    prompts = {0: (3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4), 1: (2, 7, 1), 2: (8, 2, 8, 1, 8)}
    for rid, prompt in prompts.items():
        engine.add_request(Request(rid, prompt, 6))
    tokens = {rid: [] for rid in prompts}
    while engine.has_work:
        for out in engine.step():
            tokens[out.request_id].append(out.token)
    engine.shutdown()
    return {rid: (prompts[rid], got) for rid, got in tokens.items()}


def test_engine_batches_through_the_contract_generate_the_reference_tokens(small_model):
    """Chunked prefill (a 20-token prompt over a 16-token budget) beside decodes, then decodes."""
    model = small_model(seed=2, n_kv_heads=2)
    backend = ContractBackend()
    for prompt, got in _engine_tokens(model, backend).values():
        assert got == naive_tokens(model, prompt, 6)
    assert any(t.decode_only for t in backend.planned) and not all(t.decode_only for t in backend.planned)


def test_a_wrong_index_array_gives_other_tokens(small_model):
    """The same engine run with each sequence's pages in reverse order: the contract reads other
    keys and values, and the tokens change (so the check above can fail)."""
    model = small_model(seed=2, n_kv_heads=2)

    def reverse_pages(t: PageTable) -> PageTable:
        pages = [t.kv_indices[int(a):int(b)].flip(0) for a, b in zip(t.kv_indptr[:-1], t.kv_indptr[1:])]
        return PageTable(t.qo_indptr, t.kv_indptr, torch.cat(pages), t.kv_last_page_len, t.decode_only)

    wrong = _engine_tokens(model, ContractBackend(reverse_pages))
    assert any(got != naive_tokens(model, prompt, 6) for prompt, got in wrong.values())


class FakeWrapper:
    """A FlashInfer wrapper with the documented signatures (`__init__(float_workspace_buffer,
    kv_layout)`, `plan(...)`, `run(q, paged_kv_cache)`), whose `run` is the contract over what was
    planned: so the backend's own calls (argument order and names, layout, once-per-step plans)
    are what is checked here."""

    calls: list = []

    def __init__(self, float_workspace_buffer: torch.Tensor, kv_layout: str = "NHD", use_cuda_graph: bool = False,
                 paged_kv_indptr_buffer=None, paged_kv_indices_buffer=None, paged_kv_last_page_len_buffer=None):
        assert kv_layout == "NHD"
        self.table = None
        self.fixed = paged_kv_last_page_len_buffer.shape[0] if use_cuda_graph else None  # FlashInfer checks both
        self.max_indices = paged_kv_indices_buffer.shape[0] if use_cuda_graph else None

    def run(self, q: torch.Tensor, paged_kv_cache: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        k_pages, v_pages = paged_kv_cache
        h, g, d = self.heads
        assert q.shape[1:] == (h, d) and k_pages.shape[1:] == (self.page_size, g, d)
        assert q.dtype == self.dtypes[0] and k_pages.dtype == self.dtypes[1]
        self.calls.append(("run", type(self).__name__ if getattr(self, "fixed", None) is None
                               else f"FakeDecode graph {self.fixed}"))
        return contract_attention(q, k_pages, v_pages, self.table, causal=self.causal)


class FakeDecode(FakeWrapper):
    def plan(self, indptr, indices, last_page_len, num_qo_heads, num_kv_heads, head_dim, page_size, *,
             pos_encoding_mode="NONE", q_data_type="float16", kv_data_type=None):
        assert pos_encoding_mode == "NONE", "the model applies RoPE itself"
        if self.fixed is not None:  # the CUDA-graph variant: the batch of its buffers, no more indices
            assert len(last_page_len) == self.fixed and len(indices) <= self.max_indices
        qo = torch.arange(len(last_page_len) + 1, dtype=torch.int32)
        self.table = PageTable(qo, indptr, indices, last_page_len, True)
        self.heads, self.page_size, self.causal = (num_qo_heads, num_kv_heads, head_dim), page_size, False
        self.dtypes = (q_data_type, kv_data_type or q_data_type)
        self.calls.append(("plan", "FakeDecode" if self.fixed is None else f"FakeDecode graph {self.fixed}"))


class FakePrefill(FakeWrapper):
    def plan(self, qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len, num_qo_heads,
             num_kv_heads, head_dim_qk, page_size, *, causal=False, pos_encoding_mode="NONE",
             q_data_type="float16", kv_data_type=None):
        assert pos_encoding_mode == "NONE"
        self.table = PageTable(qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len, False)
        self.heads, self.page_size, self.causal = (num_qo_heads, num_kv_heads, head_dim_qk), page_size, causal
        self.dtypes = (q_data_type, kv_data_type or q_data_type)
        self.calls.append(("plan", "FakePrefill"))


@pytest.fixture
def fake_flashinfer(small_model, monkeypatch):
    """A model and the FlashInfer backend built over `FakeDecode` / `FakePrefill` (calls reset)."""
    monkeypatch.setitem(sys.modules, "flashinfer", SimpleNamespace(
        BatchDecodeWithPagedKVCacheWrapper=FakeDecode, BatchPrefillWithPagedKVCacheWrapper=FakePrefill))
    monkeypatch.setattr(FakeWrapper, "calls", [])
    model = small_model(seed=2, n_kv_heads=2)
    attn = model.layers["0"].attn
    return model, FlashInferBackend(attn.n_heads, attn.n_kv_heads, attn.head_dim, torch.float32,
                                    torch.device("cpu"))


def test_the_backend_plans_once_per_step_and_runs_each_layer_on_its_pool(fake_flashinfer):
    """The FlashInfer backend itself, over wrappers with FlashInfer's documented signatures."""
    model, backend = fake_flashinfer
    for prompt, got in _engine_tokens(model, backend).values():
        assert got == naive_tokens(model, prompt, 6)
    calls = FakeWrapper.calls
    plans = [i for i, (what, _) in enumerate(calls) if what == "plan"]
    layers = model.cfg.n_layers
    assert len(calls) == len(plans) * (1 + layers), "one plan per step, then one run per layer"
    for i in plans:
        assert calls[i + 1:i + 1 + layers] == [("run", calls[i][1])] * layers
    assert {kind for _, kind in calls} == {"FakeDecode", "FakePrefill"}


def test_without_flashinfer_cuda_warns_in_one_line_and_runs_the_torch_backend(small_model, monkeypatch, capsys):
    monkeypatch.setattr(attn_backends.importlib.util, "find_spec", lambda name: None)
    layer = small_model().layers["0"]
    backend = choose_backend(layer, torch.device("cuda"), torch.bfloat16)  # builds nothing on the device
    assert backend.name == "torch" and backend.piece_positions is None  # one piece on CUDA
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: flashinfer is not installed")
    assert choose_backend(layer, torch.device("cpu"), torch.float32).piece_positions is not None
    assert capsys.readouterr().err == ""


def test_padded_decodes_plan_flashinfers_graph_wrapper_of_their_size_each_step(fake_flashinfer, monkeypatch):
    """Decode graphs (engine/graphs.py, eager here) with the FlashInfer backend: each padded
    decode forward (3 sequences, bucket 4) plans the CUDA-graph wrapper of its bucket (fixed
    batch, padded rows one scratch page) and runs it in every layer; the tokens are the
    reference's."""
    model, backend = fake_flashinfer
    monkeypatch.setattr(runner, "choose_backend", lambda layer, device, dtype: backend)
    for prompt, got in _engine_tokens(model, None, graphs="padded").values():
        assert got == naive_tokens(model, prompt, 6)
    calls = FakeWrapper.calls
    kinds = {kind for _, kind in calls}
    assert kinds == {"FakeDecode graph 4", "FakePrefill"}, "every decode-only step ran padded, in bucket 4"
    padded_runs = calls.count(("run", "FakeDecode graph 4"))
    assert padded_runs > model.cfg.n_layers and padded_runs % model.cfg.n_layers == 0  # beyond the warm-up
