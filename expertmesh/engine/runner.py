"""One rank's forward of an engine step: the scheduler's choice -> ragged batches -> tokens.

Every rank of a deployment runs the same number of forwards per engine step (`n_micro`), also
with no sequence (N = 0), so that the collectives inside the model (the EP token exchange, the
TP all-reduces) always match across ranks. The step's sequences are split into `n_micro`
contiguous micro-batches (by sequence, so capacity per sequence is unchanged); pipeline stages
pass each micro-batch's hidden states `[N_m, D]` to the next stage as soon as it is done, so
stage s + 1 works on micro-batch m while stage s works on m + 1. Every stage knows each N_m from
its own replica of the scheduler. The last stage samples.
"""

from __future__ import annotations

import torch

from expertmesh.engine.finite import FiniteCheck
from expertmesh.engine.stages import SingleStage, StageLinks
from expertmesh.engine.sampling import sample_requests
from expertmesh.engine.scheduler import Sequence
from expertmesh.model.paged import PagedBatch, Workspace
from expertmesh.model.transformer import MoETransformer
from expertmesh.parallel.expert import ExchangeChoice
from expertmesh.split import split_evenly
from expertmesh.trace import span


class Runner:
    def __init__(self, model: MoETransformer, num_blocks: int, block_size: int,
                 links: StageLinks | None = None, record_logits: bool = False, n_micro: int = 1):
        self.model, self.block_size, self.n_micro = model, block_size, n_micro
        self.links = links or SingleStage()
        self.pools = model.make_pools(num_blocks, block_size)
        ref = next(model.parameters())
        self.device, self.dtype = ref.device, ref.dtype
        self.record_logits = record_logits and self.links.is_last
        self.finite = FiniteCheck(model)
        self.workspace = Workspace()
        self.exchange = ExchangeChoice(model)
        self.steps = 0

    @property
    def kv_cache_bytes(self) -> int:
        return sum(p.nbytes for p in self.pools.values())

    def forward(self, chosen: list[tuple[Sequence, int]], sampled: list[bool]) -> dict | None:
        """Run the step's sequences through the layers held here. On the last stage returns
        {request id: (token, logits [V] or None)} for the sequences in `sampled`; else None."""
        result = {} if self.links.is_last else None
        with torch.inference_mode():
            for m, part in enumerate(split_evenly(len(chosen), self.n_micro)):
                logits = self._micro(m, chosen[part])
                if result is not None:
                    result.update(self._sample(chosen[part], sampled[part], logits))
            self.finite.check(self.steps)
        self.steps += 1
        return result

    def _micro(self, m: int, chosen: list[tuple[Sequence, int]]) -> torch.Tensor | None:
        batch = PagedBatch([(seq.computed, n, seq.blocks) for seq, n in chosen], self.block_size,
                           self.device, self.workspace)
        N, links, D = batch.n_tokens, self.links, self.model.cfg.d_model
        if links.is_first:
            ids = [t for seq, n in chosen for t in seq.tokens[seq.computed:seq.computed + n]]
            x = torch.tensor(ids, dtype=torch.long, device=self.device)
        elif N:
            x = links.recv_hidden(m, (N, D), self.dtype)
        else:
            x = torch.zeros(0, D, dtype=self.dtype, device=self.device)
        self.exchange(N)  # the EP layers' exchange for this forward, agreed over the EP group
        out = self.model.forward_paged(x, self.pools, batch)
        if links.is_last:
            return out
        if N:
            links.send_hidden(m, out)
        return None

    def _sample(self, chosen: list[tuple[Sequence, int]], sampled: list[bool], logits: torch.Tensor) -> dict:
        rows = [i for i, s in enumerate(sampled) if s]
        logits = logits[rows]
        self.finite.add(FiniteCheck.LOGITS, logits)
        reqs = [chosen[i][0].request for i in rows]
        with span("sample"):
            tokens = sample_requests(logits, [r.temperature for r in reqs], [r.top_p for r in reqs],
                                     [r.seed for r in reqs], [chosen[i][0].generated for i in rows])
        kept = logits.float().cpu() if self.record_logits else [None] * len(rows)
        return {r.id: (t, row) for r, t, row in zip(reqs, tokens, kept)}

    def close(self) -> None:
        self.links.finish()
        self.finite.__exit__()
