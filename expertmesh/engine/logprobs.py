"""Log-probabilities of the drawn tokens and of the most likely ones, computed on the device.

As vLLM by default ("raw_logprobs"): log_softmax, in fp32, of the model's raw logits `[V]`,
before logit bias, min_tokens, penalties, temperature, top-k or top-p. For each row of a
micro-batch that asks (`Request.logprobs` = k, 0 .. 20): the drawn token's log-probability and
the k largest, with their ids, most likely first. K is the largest k of the micro-batch's rows;
a row that asked for fewer gets its first k.

Nothing is read here: `Logprobs.flat` (int64 `[R K + R (K + 1)]`, R the rows that ask: the top
ids `[R, K]`, then the values `[R, K + 1]` (drawn token's, then the top K) as the bits of fp64)
joins the step's one host read (`engine/runner.py: Runner._read`), and `read` turns its host
copy into each row's numbers. One upload (the rows' indices) when only some rows ask.
"""

from __future__ import annotations

import torch

from expertmesh.model.paged import upload


class Logprobs:
    """The logprobs of one micro-batch: `logits` `[S, V]` (raw), `tokens` `[S]` (drawn, on the
    device), `asked[i]`: row i's k, or None (at least one row asks)."""

    def __init__(self, logits: torch.Tensor, tokens: torch.Tensor, asked: list[int | None]):
        self.asked = asked
        self.rows = [i for i, k in enumerate(asked) if k is not None]
        self.k = max(asked[i] for i in self.rows)
        if len(self.rows) < len(asked):
            index = upload([torch.tensor(self.rows, dtype=torch.long)], logits.device)[0]
            logits, tokens = logits[index], tokens[index]
        lp = logits.float().log_softmax(dim=-1)
        top, ids = lp.topk(self.k, dim=-1)
        drawn = lp.gather(1, tokens.unsqueeze(1))
        values = torch.cat([drawn, top], dim=1).double()
        self.flat = torch.cat([ids.reshape(-1), values.reshape(-1).view(torch.int64)])

    def read(self, host: torch.Tensor) -> list[tuple | None]:
        """`flat` on the host -> per row of the micro-batch: (drawn token's log-probability,
        ((id, log-probability), ...) of its k most likely tokens), or None if it did not ask."""
        R, K = len(self.rows), self.k
        ids = host[:R * K].view(R, K).tolist()
        values = host[R * K:].view(torch.float64).view(R, K + 1).tolist()
        out: list[tuple | None] = [None] * len(self.asked)
        for row, top_ids, vals in zip(self.rows, ids, values):
            k = self.asked[row]
            out[row] = (vals[0], tuple(zip(top_ids[:k], vals[1:k + 1])))
        return out
