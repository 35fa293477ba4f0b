"""A plain expert-parallel MoE layer: what a user would write in an afternoon with
`torch.distributed`, as a peer for `peers.deepspeed_moe` (the issue's "plain uneven all-to-all
layer").

Top-k routing in fp32 (renormalized), assignments sorted by expert, then four blocking
`all_to_all_single` calls over the default group: rows per destination (int64), the rows, their
local expert ids, and the results back; each rank computes its experts with one GELU MLP per
expert over the rows it received (`nonzero` per expert), and the token's output is the weighted
sum of its k results. Rank r holds experts r * El .. (r + 1) * El - 1 (the contiguous placement).
No chunking, no overlap, no grouped kernel: the baseline every optimization should beat.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class PlainEPLayer(nn.Module):
    """router `[E, D]`, this rank's w_up `[El, H, D]`, w_down `[El, D, H]`; x `[1, T, D]` -> `[1, T, D]`."""

    def __init__(self, router: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, top_k: int):
        super().__init__()
        self.top_k = top_k
        for name, weight in (("router", router), ("w_up", w_up), ("w_down", w_down)):
            self.register_buffer(name, weight)  # buffers: `.to(dtype)` converts them

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, T, D = x.shape
        x = x.reshape(T, D)
        k, local = self.top_k, self.w_up.shape[0]
        weights, ids = F.linear(x, self.router).float().softmax(-1).topk(k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        flat = ids.reshape(-1)
        order = flat.argsort(stable=True)
        experts = flat[order]
        send = torch.bincount(experts // local, minlength=dist.get_world_size())
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send)
        send_n, recv_n = send.tolist(), recv.tolist()
        rows = x[order // k]
        got = rows.new_empty(sum(recv_n), D)
        dist.all_to_all_single(got, rows, recv_n, send_n)
        got_expert = experts.new_empty(sum(recv_n))
        dist.all_to_all_single(got_expert, experts % local, recv_n, send_n)
        out = torch.empty_like(got)
        for e in range(local):
            mine = (got_expert == e).nonzero().squeeze(1)
            out[mine] = F.linear(F.gelu(F.linear(got[mine], self.w_up[e])), self.w_down[e])
        back = torch.empty_like(rows)
        dist.all_to_all_single(back, out, send_n, recv_n)
        result = torch.empty_like(back)
        result[order] = back
        return (result.view(T, k, D) * weights.to(x.dtype).unsqueeze(-1)).sum(1).view(1, T, D)
