"""A request's logits before its draw, as vLLM processes them: logit bias, min_tokens, then
penalties, on the device, over a micro-batch's sampled rows at once with per-row values.

For each row (a request about to draw its next token, `engine/request.py` has the values), in
vLLM's order, in fp32:
  1. `logit_bias`: the bias is added to each listed token's logit;
  2. `min_tokens`: while fewer tokens than that are generated, the stop ids and (unless
     `ignore_eos`) the EOS ids get -inf, so they cannot be drawn;
  3. penalties over `seen` (every token of the prompt or the output) and `counts` (each token's
     occurrences in the output): a seen token's logit l becomes l / r if l > 0 else l * r
     (repetition_penalty r), then l - frequency * count - presence * (count > 0).
A row that asks for none of these keeps its logits exactly (r = 1, zero penalties, no bias), and
a micro-batch none of whose rows asks for one is returned as it came: no upload, no device op.

Per micro-batch that processes: one upload (non-blocking, int64; the fp64 values travel as their
bits): per row (presence, frequency, repetition) `[S, 3]`, then (row, token id) pairs of the
seen tokens, of the output tokens, of the biased tokens (with the biases) and of the masked
tokens, only for the rows whose options need them. The penalised rows' prompts go up again at
every step (a prompt of P tokens: 16 P bytes), as the scheduler keeps no device copy of them.
About 12 device ops on `[S, V]`; nothing is read.
"""

from __future__ import annotations

import torch

from expertmesh.engine.request import Request
from expertmesh.engine.scheduler import Sequence
from expertmesh.model.paged import upload


def processes(request: Request) -> bool:
    """Whether the request's logits change before its draw (any option away from its neutral value)."""
    return bool(request.logit_bias or request.min_tokens or _penalised(request))


def _penalised(r: Request) -> bool:
    return r.presence_penalty != 0 or r.frequency_penalty != 0 or r.repetition_penalty != 1


def process(logits: torch.Tensor, seqs: list[Sequence], eos: frozenset[int]) -> torch.Tensor:
    """logits `[S, V]` of `seqs` (each about to draw token `seq.generated`; `eos`: the engine's
    EOS ids) -> the processed logits `[S, V]` fp32, a new tensor; `logits` itself when no row
    processes."""
    if not any(processes(seq.request) for seq in seqs):
        return logits
    S, V = logits.shape
    values, seen, out, biased, biases, masked = [], [], [], [], [], []
    for row, seq in enumerate(seqs):
        r = seq.request
        values.append((r.presence_penalty, r.frequency_penalty, r.repetition_penalty))
        if _penalised(r):
            output = seq.tokens[len(r.prompt):]
            seen += [(row, t) for t in r.prompt]
            out += [(row, t) for t in output]
        for t, b in r.logit_bias:
            biased.append((row, t))
            biases.append(b)
        if seq.generated < r.min_tokens:
            masked += [(row, t) for t in sorted(set(r.stop) | (set() if r.ignore_eos else eos))]
    host = [torch.tensor(values, dtype=torch.float64).view(torch.int64)]
    host += [_pairs(p) for p in (seen, out, biased, masked)] + [torch.tensor(biases, dtype=torch.float64).view(torch.int64)]
    values_d, seen_d, out_d, biased_d, masked_d, biases_d = upload(host, logits.device)
    x = logits.to(torch.float32, copy=True)
    if biases:
        x.index_put_((biased_d[0], biased_d[1]), biases_d.view(torch.float64).float(), accumulate=True)
    if masked:
        x.index_put_((masked_d[0], masked_d[1]), torch.full((len(masked),), float("-inf"), device=x.device))
    if seen or out:
        counts = torch.zeros(S, V, device=x.device)
        counts.index_put_((out_d[0], out_d[1]), torch.ones(len(out), device=x.device), accumulate=True)
        present = torch.zeros(S, V, dtype=torch.bool, device=x.device)
        present.index_put_((seen_d[0], seen_d[1]), torch.ones(len(seen), dtype=torch.bool, device=x.device))
        present |= counts > 0
        p = values_d.view(torch.float64).float()
        rep = p[:, 2:3]
        x = torch.where(present, torch.where(x > 0, x / rep, x * rep), x)
        x = x - p[:, 1:2] * counts - p[:, 0:1] * (counts > 0)
    return x


def _pairs(pairs: list[tuple[int, int]]) -> torch.Tensor:
    """(row, token id) pairs -> `[2, n]` int64: rows, then ids."""
    return torch.tensor(pairs, dtype=torch.long).reshape(-1, 2).T.contiguous()
