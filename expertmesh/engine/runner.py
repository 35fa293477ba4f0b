"""One rank's forward of an engine step: the scheduler's choice -> ragged batches -> tokens.

Every rank of a deployment runs the same number of forwards per engine step (`n_micro`), also
with no sequence (N = 0), so that the collectives inside the model (the EP token exchange, the
TP all-reduces) always match across ranks. The step's sequences are split into `n_micro`
contiguous micro-batches (by sequence, so capacity per sequence is unchanged); pipeline stages
pass each micro-batch's hidden states `[N_m, D]` to the next stage as soon as it is done, so
stage s + 1 works on micro-batch m while stage s works on m + 1. Every stage knows each N_m from
its own replica of the scheduler. The last stage samples.

A forward's plan (`model/paged.py`) takes its block tables from the rank's persistent ones
(`engine/block_tables.py`) and its attention backend from `model/attn_backends/`. A decode-only
step, where padded decodes apply (one stage, no EP, no capacity), runs on the
persistent buffers of `engine/graphs.py`, replayed from a CUDA graph on CUDA.

Under expert parallelism each forward is planned first (`parallel/expert.py`'s ExchangeChoice,
agreed over the EP group): which exchange its MoE layers use, and whether it runs as two
micro-batches that take turns (two-batch overlap: the forward's sequences split in two halves
of near-equal tokens; one half's token exchange is in flight while the other half's attention,
routing or expert compute runs, `model/steps.py`).
"""

from __future__ import annotations

from bisect import bisect_left
from itertools import accumulate

import torch

from expertmesh.engine.block_tables import BlockTables
from expertmesh.engine.finite import FiniteCheck
from expertmesh.engine.graphs import MODES, DecodeGraphs
from expertmesh.engine.logits_processing import process
from expertmesh.engine.logprobs import Logprobs
from expertmesh.engine.stages import SingleStage, StageLinks
from expertmesh.engine.sampling import sample_requests
from expertmesh.engine.sampling_rows import SamplingRows
from expertmesh.engine.scheduler import Sequence
from expertmesh.model.forward_context import forward_context
from expertmesh.model.moe import rotate_skew
from expertmesh.model.paged import Layout, PagedBatch, upload
from expertmesh.model.attn_backends import choose_backend
from expertmesh.model.steps import take_turns
from expertmesh.model.transformer import MoETransformer
from expertmesh.parallel.expert import ExchangeChoice, dispatchers
from expertmesh.split import split_evenly
from expertmesh.trace import span


class Runner:
    def __init__(self, model: MoETransformer, num_blocks: int, block_size: int,
                 links: StageLinks | None = None, record_logits: bool = False, n_micro: int = 1,
                 overlap: str = "auto", max_seqs: int = 64, graphs: str = "auto", eos: tuple[int, ...] = ()):
        self.model, self.block_size, self.n_micro = model, block_size, n_micro
        self.eos = frozenset(eos)  # masked before a request's min_tokens
        self.links = links or SingleStage()
        ref = next(model.parameters())
        self.device, self.dtype = ref.device, ref.dtype
        layer = next(iter(model.layers.values()), None)
        self.backend = choose_backend(layer, self.device, self.dtype)
        mode = self._graph_mode(graphs, layer)
        # padded decode rows write their k, v into one block past those the scheduler hands out
        self.pools = model.make_pools(num_blocks + (mode != "off"), block_size)
        self.record_logits = record_logits and self.links.is_last
        self.finite = FiniteCheck(model)
        self.graphs = None if mode == "off" else DecodeGraphs(
            model, self.pools, self.finite, block_size, max_seqs, model.cfg.max_seq_len, num_blocks, mode,
            self.backend)
        self.block_tables = BlockTables()
        self.sampling: dict[int, SamplingRows] = {}  # per micro-batch, kept while its sequences are
        self.layouts: dict[int, Layout] = {}  # per micro-batch, its last decode step's (`PagedBatch.layout`)
        self.exchange = ExchangeChoice(model, overlap)
        self.steps = 0

    def _graph_mode(self, asked: str, layer) -> str:
        """`engine/graphs.py`'s mode for this rank: "auto" captures graphs on CUDA; any mode is
        "off" where padded decodes do not apply (several stages, expert parallelism, capacity, a
        stage without layers)."""
        if asked not in MODES:
            raise ValueError(f"unknown decode graph mode {asked!r}; use one of {', '.join(MODES)}")
        applies = (layer is not None and self.links.is_first and self.links.is_last
                   and not dispatchers(self.model)
                   and all(lay.moe is None or lay.moe.capacity is None
                           for lay in self.model.layers.values()))
        if asked == "off" or not applies:
            return "off"
        if asked == "auto":
            return "graphs" if self.device.type == "cuda" else "off"
        return asked

    @property
    def kv_cache_bytes(self) -> int:
        return sum(p.nbytes for p in self.pools.values())

    def forward(self, chosen: list[tuple[Sequence, int]], sampled: list[bool],
                decode_tokens: int | None = None) -> dict | None:
        """Run the step's sequences through the layers held here. On the last stage returns
        {request id: (token, logits [V] or None, logprobs or None)} for the sequences in
        `sampled` (logprobs: `Logprobs.read`'s, when the request asks); else None.
        `decode_tokens`: when the step only decodes, the most sequences any rank of the EP group
        runs in it, the same on all of them (then the forwards' plans need no all-reduce).

        The device is read once per step, on every rank: the finite check's flags, with every
        micro-batch's sampled token ids on the last stage."""
        draws = []
        if self.model.cfg.router_skew_shift:  # synthetic moving hot experts (`--router-skew`)
            rotate_skew(self.model, self.steps)
        with torch.inference_mode():
            bounds = split_evenly(decode_tokens, self.n_micro) if decode_tokens is not None else None
            for m, part in enumerate(split_evenly(len(chosen), self.n_micro)):
                bound = bounds[m].stop - bounds[m].start if bounds else None  # a micro-batch's, on every rank
                logits = self._micro(m, chosen[part], bound)
                if self.links.is_last:
                    draws.append(self._start_sampling(m, chosen[part], sampled[part], logits))
            host = self._read([d for _, d, _, _ in draws])
        self.steps += 1
        if not self.links.is_last:
            return None
        result = {}
        for (reqs, _, kept, logprobs), read in zip(draws, host):
            lps = logprobs.read(read[len(reqs):]) if logprobs else [None] * len(reqs)
            result.update({r.id: (t, row, lp) for r, t, row, lp in zip(reqs, read[:len(reqs)].tolist(), kept, lps)})
        return result

    def _read(self, parts: list[torch.Tensor]) -> list[torch.Tensor]:
        """One copy to the host: the step's finite flags (checked here, raising on a non-finite
        value) and each micro-batch's token ids `[S_m]` int64 (with its logprobs' `flat` when a row
        asks) -> those parts, on the host."""
        flags = self.finite.take(self.device)
        host = torch.cat(parts + [flags.long()]).cpu()
        *mine, flags = host.split([p.numel() for p in parts] + [flags.numel()])
        self.finite.verify(self.steps, flags)
        return mine

    def _micro(self, m: int, chosen: list[tuple[Sequence, int]], bound: int | None) -> torch.Tensor | None:
        N, links, D = sum(n for _, n in chosen), self.links, self.model.cfg.d_model
        previous = self.layouts.pop(m, None)
        if self.graphs is not None and self.graphs.takes(chosen):
            return self._padded_decode(chosen)
        ids = batch = None
        if links.is_first:
            ids = _token_ids(chosen)
        elif N:
            x = links.recv_hidden(m, (N, D), self.dtype)
        else:
            x = torch.zeros(0, D, dtype=self.dtype, device=self.device)
        cut, first_half = _halves(chosen)
        plan = self.exchange(N, max(first_half, N - first_half), bound)  # the same on every EP rank
        if not plan.two_batch:
            batch = self._batch(chosen, ids, previous)  # the ids go up in its one copy
            self.layouts[m] = batch.layout
        if ids is not None and batch is not None:
            x = batch.ids
        elif ids is not None:  # each half plans apart: the ids go up alone
            x = upload([ids], self.device)[0]  # waits for nothing
        with forward_context(plan.low_latency_tokens):
            if plan.two_batch:
                halves = take_turns([self.model.paged_steps(x[rows], self.pools, self._batch(part))
                                     for rows, part in ((slice(0, first_half), chosen[:cut]),
                                                        (slice(first_half, N), chosen[cut:]))])
                out = torch.cat(halves)
            else:
                out = self.model.forward_paged(x, self.pools, batch)
        if links.is_last:
            return out
        if N:
            links.send_hidden(m, out)
        return None

    def _padded_decode(self, chosen: list[tuple[Sequence, int]]) -> torch.Tensor:
        """A decode forward on the persistent buffers (`engine/graphs.py`) -> logits `[S, V]`."""
        seqs = [seq for seq, _ in chosen]
        needed = [seq.computed // self.block_size + 1 for seq in seqs]  # blocks of positions 0 .. computed
        return self.graphs.forward(seqs, self.block_tables.plan(seqs, needed))

    def _batch(self, chosen: list[tuple[Sequence, int]], ids: torch.Tensor | None = None,
               previous: Layout | None = None) -> PagedBatch:
        """The plan of a forward of `chosen`, with the token `ids` `[N]` in its upload when given,
        advanced from the `previous` decode step's layout when it continues it."""
        needed = [-(-(seq.computed + n) // self.block_size) for seq, n in chosen]
        tables = self.block_tables.plan([seq for seq, _ in chosen], needed)
        return PagedBatch([(seq.computed, n, None) for seq, n in chosen], self.block_size, self.device,
                          self.backend, tables, ids, previous)

    def _start_sampling(self, m: int, chosen: list[tuple[Sequence, int]], sampled: list[bool],
                        logits: torch.Tensor) -> tuple[list, torch.Tensor, list, Logprobs | None]:
        """Micro-batch `m`'s logits `[N_m, V]` -> (its sampled requests, their token ids `[S_m]` on the
        device (then their logprobs' `flat` when a row asks), their raw logits on the host when
        recorded, else None each, their `Logprobs` or None). Rows that ask for it have their
        logits processed (`engine/logits_processing.py`) before the draw."""
        rows = self.sampling[m] = SamplingRows.reuse(self.sampling.get(m), chosen, sampled)
        if len(rows.rows) < logits.shape[0]:  # a prefill chunk mid-prompt samples nothing
            logits = logits[upload([torch.tensor(rows.rows, dtype=torch.long)], logits.device)[0]]
        self.finite.add(FiniteCheck.LOGITS, logits)
        with span("sample"):
            processed = process(logits, rows.seqs, self.eos) if rows.processed else logits
            tokens = sample_requests(processed, rows.temperature, rows.top_p, rows.top_k, rows.seeds, rows.index())
            logprobs = Logprobs(logits, tokens, rows.logprobs) if rows.asks_logprobs else None
        kept = logits.float().cpu() if self.record_logits else [None] * len(rows.rows)
        part = tokens if logprobs is None else torch.cat([tokens, logprobs.flat])
        return rows.reqs, part, kept, logprobs

    def close(self) -> None:
        self.links.finish()
        self.finite.__exit__()


def _token_ids(chosen: list[tuple[Sequence, int]]) -> torch.Tensor:
    """The forward's new token ids `[N]` int64 on the host, sequence after sequence."""
    if all(n == 1 for _, n in chosen):  # a decode step: one list index per sequence, no slices
        return torch.tensor([seq.tokens[seq.computed] for seq, _ in chosen], dtype=torch.long)
    return torch.tensor([t for seq, n in chosen for t in seq.tokens[seq.computed:seq.computed + n]], dtype=torch.long)


def _halves(chosen: list[tuple[Sequence, int]]) -> tuple[int, int]:
    """Where to cut the forward's sequences into two micro-batches of near-equal tokens, each
    with at least one sequence when there are two: (sequences before the cut, their tokens)."""
    before = list(accumulate(n for _, n in chosen))  # tokens before cuts 1 .. S, rising
    total = before.pop() if before else 0
    if not before:
        return 0, 0
    # the cut nearest half the tokens, the first of two as near: one side of where half would go
    cut = bisect_left(before, total / 2)
    if cut == len(before) or (cut > 0 and total - 2 * before[cut - 1] <= 2 * before[cut] - total):
        cut -= 1
    return cut + 1, before[cut]
