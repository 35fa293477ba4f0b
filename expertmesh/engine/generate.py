"""The static prefill / decode loop of one rank: a fixed batch of equal-length prompts, a
contiguous KV cache, every sequence decoded to the same length. Not how expertmesh serves (`run`,
`compare` and `serve` go through the engine, `engine/engine.py`); kept as a baseline and a
reference loop: the contiguous-cache loop `benchmarks/serving_engine.py` measures the engine
against, the fixed schedule the simulator's calibration (`sim/calibrate.py`) times, and the loop
`benchmarks/gpu_check.py` runs the ep1 / tp1 model paths through on one GPU (without the engine's
choice of exchange, so that each path is the one named).

A rank runs the layers it holds for the sequences it owns, in micro-batches. On a single device
that is the whole model and the whole batch in one micro-batch. Under pipeline parallelism the
`StageLinks` (`engine/stages.py`) move hidden states to the next stage and sampled tokens from the
last stage back to the first; under expert parallelism the MoE layers exchange tokens inside the
model's forward, so every rank of a stage must run every micro-batch, even one with no sequence
of its own. NaN and inf are checked once per step (`engine/finite.py`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from expertmesh import faults
from expertmesh.config import Workload
from expertmesh.engine.finite import FiniteCheck
from expertmesh.engine.sampling import sample
from expertmesh.engine.stages import SingleStage, StageLinks
from expertmesh.model.transformer import MoETransformer
from expertmesh.split import split_evenly
from expertmesh.trace import span


@dataclass
class RankOutput:
    """What one rank produced: tokens `[b, gen_len]` of its sequences `rows` (global indices).

    `step_times` is the event log of `engine/metrics.py`, relative to `start`; it is filled on
    ranks that sample (the last pipeline stage). `logits` `[b, gen_len, V]` only when recorded.
    """

    rows: list[int]
    tokens: torch.Tensor
    start: float
    step_times: list[float] = field(default_factory=list)
    logits: torch.Tensor | None = None
    kv_cache_bytes: int = 0


def generate(model: MoETransformer, workload: Workload, prompts: torch.Tensor, rows: list[int],
             n_micro: int = 1, links: StageLinks | None = None, record_logits: bool = False,
             on_step: Callable[[int], None] | None = None, check_finite: bool = True) -> RankOutput:
    """Prefill then decode `workload.gen_len` tokens for this rank's sequences.

    prompts `[b, prompt_len]` int64 are the prompts of the global sequences `rows` (needed on the
    first stage only). Returns this rank's `RankOutput`. `check_finite=False` skips the NaN / inf
    check (to measure its cost).
    """
    links = links or SingleStage()
    record_logits = record_logits and links.is_last
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    b, P, G = len(rows), workload.prompt_len, workload.gen_len
    caches = model.make_caches(b, workload.total_len)
    parts = split_evenly(b, n_micro)
    tokens = torch.zeros(b, G, dtype=torch.long, device=device)
    global_rows = torch.tensor(rows, dtype=torch.long)
    prompts = prompts.to(device)
    logits_log = [] if record_logits else None
    result = RankOutput(rows=rows, tokens=tokens, start=0.0,
                        kv_cache_bytes=sum(c.nbytes for c in caches.values()))
    d_model = model.cfg.d_model

    result.start = time.perf_counter()
    with torch.inference_mode(), FiniteCheck(model) if check_finite else nullcontext() as finite:
        for step in range(G):
            faults.at_step(step, model)  # test-only fault injection; nothing unless asked
            start, length = (0, P) if step == 0 else (P + step - 1, 1)
            step_logits = []
            for m, part in enumerate(parts):
                n = part.stop - part.start
                if links.is_first:
                    if step == 0:
                        x = prompts[part]
                    else:
                        if not links.is_last and n:
                            tokens[part, step - 1] = links.recv_tokens(m, n).to(device)
                        x = tokens[part, step - 1:step]
                else:
                    shape = (n, length, d_model)
                    x = links.recv_hidden(m, shape, dtype) if n else torch.zeros(shape, dtype=dtype, device=device)
                out = model(x, caches, part, start)
                if not links.is_last:
                    if n:
                        links.send_hidden(m, out)
                    continue
                if finite is not None:
                    finite.add(FiniteCheck.LOGITS, out)
                with span("sample"):
                    next_tokens = sample(out, global_rows[part], step, workload)
                tokens[part, step] = next_tokens
                if record_logits:
                    step_logits.append(out.float().cpu())
                if not links.is_first and n and step < G - 1:
                    links.send_tokens(m, next_tokens)
            if finite is not None:
                finite.check(step)
            if links.is_last:
                result.step_times.append(time.perf_counter())
                if record_logits:
                    logits_log.append(torch.cat(step_logits))
            if on_step is not None:
                on_step(step)
    links.finish()
    if record_logits:
        result.logits = torch.stack(logits_log, dim=1)
    result.tokens = tokens.cpu()
    return result
