"""Pipeline parallelism: contiguous layers per stage, micro-batches passed stage to stage.

`apply_pipeline` drops the layers of other stages (layer names keep their global index), the
embedding on all but the first stage and the final norm and LM head on all but the last.
`PipelineLinks` carries, for micro-batch m: hidden states `[b_m, L, D]` from stage s to s + 1
(rank + inner, `isend`, tag 0) and the sampled tokens `[b_m]` int64 from the last stage back to
the first (tag 1), which needs them as the next step's input. Sends are asynchronous and
waited for at the end of the run; receives block, which is where a stage waits for the previous.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from expertmesh.deployment import Deployment
from expertmesh.model.transformer import MoETransformer
from expertmesh.trace import span

_HIDDEN, _TOKENS = 0, 1


def apply_pipeline(model: MoETransformer, deployment: Deployment, stage: int) -> MoETransformer:
    keep = deployment.stage_layers(model.cfg.n_layers)[stage]
    model.layers = nn.ModuleDict({name: layer for name, layer in model.layers.items() if int(name) in keep})
    if stage > 0:
        model.embed = None
    if stage < deployment.pp - 1:
        model.norm = None
        model.lm_head = None
    return model


class PipelineLinks:
    """The `StageLinks` of rank `rank` under `deployment` (see `engine/stages.py`)."""

    def __init__(self, deployment: Deployment, rank: int, device: torch.device):
        stage, _ = deployment.coords(rank)
        inner, pp = deployment.inner, deployment.pp
        is_first, is_last = stage == 0, stage == pp - 1
        # the last stage sends tokens to the first stage's rank with the same place in its stage
        self._link(is_first, is_last, None if is_first else rank - inner, None if is_last else rank + inner,
                   rank % inner + (0 if is_last else (pp - 1) * inner), device)

    @classmethod
    def of(cls, is_first: bool, is_last: bool, prev_rank: int | None, next_rank: int | None,
           token_peer: int | None, device: torch.device) -> "PipelineLinks":
        """Links to the neighbours named (ranks of the default group), not a deployment's: an
        elastic recovery's pipelines (`elastic/slots.py`). A rank of a stage that serves experts
        only has none: it runs zero-token forwards, which send and receive nothing."""
        links = cls.__new__(cls)
        links._link(is_first, is_last, prev_rank, next_rank, token_peer, device)
        return links

    def _link(self, is_first, is_last, prev_rank, next_rank, token_peer, device) -> None:
        self.is_first, self.is_last = is_first, is_last
        self.prev_rank, self.next_rank, self.token_peer = prev_rank, next_rank, token_peer
        self.device = device
        self.pending: list[dist.Work] = []

    def _track(self, work: dist.Work) -> None:
        self.pending = [w for w in self.pending if not w.is_completed()]
        self.pending.append(work)

    def send_hidden(self, micro: int, h: torch.Tensor) -> None:
        with span("pipeline send"):
            self._track(dist.isend(h.contiguous(), self.next_rank, tag=_HIDDEN))

    def recv_hidden(self, micro: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        buf = torch.empty(shape, dtype=dtype, device=self.device)
        with span("pipeline recv"):
            dist.recv(buf, self.prev_rank, tag=_HIDDEN)
        return buf

    def send_tokens(self, micro: int, tokens: torch.Tensor) -> None:
        self._track(dist.isend(tokens.contiguous(), self.token_peer, tag=_TOKENS))

    def recv_tokens(self, micro: int, n: int) -> torch.Tensor:
        buf = torch.empty(n, dtype=torch.long, device=self.device)
        with span("pipeline recv tokens"):
            dist.recv(buf, self.token_peer, tag=_TOKENS)
        return buf

    def finish(self) -> None:
        for work in self.pending:
            work.wait()
        self.pending.clear()
