"""One rank's forward of an engine step: the scheduler's choice -> a ragged batch -> tokens.

Every rank of a deployment runs exactly one `Runner.forward` per engine step, also with no
sequence (N = 0), so that the collectives inside the model (the EP token exchange, the TP
all-reduces) always match across ranks. Pipeline stages pass hidden states `[N, D]` of the whole
step's batch to the next stage (one batch in flight per step); every stage knows N from its own
replica of the scheduler. The last stage samples.
"""

from __future__ import annotations

import torch

from expertmesh.engine.generate import FiniteCheck, SingleStage, StageLinks
from expertmesh.engine.sampling import sample_requests
from expertmesh.engine.scheduler import Sequence
from expertmesh.model.paged import PagedBatch, Workspace
from expertmesh.model.transformer import MoETransformer
from expertmesh.trace import span


class Runner:
    def __init__(self, model: MoETransformer, num_blocks: int, block_size: int,
                 links: StageLinks | None = None, record_logits: bool = False):
        self.model, self.block_size = model, block_size
        self.links = links or SingleStage()
        self.pools = model.make_pools(num_blocks, block_size)
        ref = next(model.parameters())
        self.device, self.dtype = ref.device, ref.dtype
        self.record_logits = record_logits and self.links.is_last
        self.finite = FiniteCheck(model)
        self.workspace = Workspace()
        self.steps = 0

    @property
    def kv_cache_bytes(self) -> int:
        return sum(p.nbytes for p in self.pools.values())

    def forward(self, chosen: list[tuple[Sequence, int]], sampled: list[bool]) -> dict | None:
        """Run the step's batch through the layers held here. On the last stage returns
        {request id: (token, logits [V] or None)} for the sequences in `sampled`; else None."""
        batch = PagedBatch([(seq.computed, n, seq.blocks) for seq, n in chosen], self.block_size,
                           self.device, self.workspace)
        N = batch.n_tokens
        links = self.links
        with torch.inference_mode():
            if links.is_first:
                ids = [t for seq, n in chosen for t in seq.tokens[seq.computed:seq.computed + n]]
                x = torch.tensor(ids, dtype=torch.long, device=self.device)
            elif N:
                x = links.recv_hidden(0, (N, self.model.cfg.d_model), self.dtype)
            else:
                x = torch.zeros(0, self.model.cfg.d_model, dtype=self.dtype, device=self.device)
            out = self.model.forward_paged(x, self.pools, batch)
            result = None
            if not links.is_last:
                if N:
                    links.send_hidden(0, out)
            else:
                rows = [i for i, s in enumerate(sampled) if s]
                logits = out[rows]
                self.finite.add(FiniteCheck.LOGITS, logits)
                reqs = [chosen[i][0] for i in rows]
                with span("sample"):
                    tokens = sample_requests(logits, [s.request.temperature for s in reqs],
                                             [s.request.top_p for s in reqs], [s.request.seed for s in reqs],
                                             [s.generated for s in reqs])
                kept = logits.float().cpu() if self.record_logits else [None] * len(rows)
                result = {s.request.id: (t, row) for s, t, row in zip(reqs, tokens, kept)}
            self.finite.check(self.steps)
        self.steps += 1
        return result

    def close(self) -> None:
        self.links.finish()
        self.finite.__exit__()
