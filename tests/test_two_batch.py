"""Two micro-batches taking turns (`model/steps.py`): while one's token exchange is in flight the
other computes, and the outputs are those of the micro-batches run one after the other."""

import functools

import torch
import torch.distributed as dist

from expertmesh.config import Workload, preset
from expertmesh.deployment import Deployment
from expertmesh.engine.shard import shard_model
from expertmesh.engine.spec import RunSpec
from expertmesh.launch import launch
from expertmesh.model.forward_context import forward_context
from expertmesh.model.paged import PagedBatch
from expertmesh.model.steps import run_steps, take_turns
from expertmesh.model.synthetic import materialize
from expertmesh.parallel.mesh import stage_group
from expertmesh.trace import COMM, COMPUTE, start_tracing, take_spans

CFG = preset("tiny", n_layers=2)
BLOCK = 8


def _halves_on_rank(low_latency_tokens: int | None, turns: bool) -> tuple[torch.Tensor, int]:
    """Two micro-batches of prefill (3 and 2 sequences of rank-dependent lengths) through an ep2
    shard; their hidden states `[N, D]`, and how many compute spans ran while an exchange of this
    rank was in flight."""
    dep, rank = Deployment.parse("ep2"), dist.get_rank()
    model = materialize(shard_model(RunSpec(CFG, dep, Workload()), rank, stage_group(dep, rank)),
                        seed=1, dtype=torch.float32)
    model.lm_head = None  # hidden states out: every token's, not only the last
    pools = model.make_pools(64, BLOCK)
    gen = torch.Generator().manual_seed(rank)
    lengths = [[5 + rank, 9, 3], [7, 4 + 2 * rank]]
    halves, next_block = [], 0
    for lens in lengths:
        chunks = []
        for n in lens:
            blocks = -(-n // BLOCK)
            chunks.append((0, n, list(range(next_block, next_block + blocks))))
            next_block += blocks
        ids = torch.randint(0, CFG.vocab_size, (sum(lens),), generator=gen)
        halves.append((ids, PagedBatch(chunks, BLOCK, torch.device("cpu"))))
    start_tracing()
    with torch.inference_mode():
        with forward_context(low_latency_tokens):
            steps = [model.paged_steps(ids, pools, batch) for ids, batch in halves]
            out = take_turns(steps) if turns else [run_steps(s) for s in steps]
    spans = take_spans()
    in_flight = [(t0, t0 + d) for _, t0, d, lane in spans if lane == COMM]
    computed = [(t0, t0 + d) for name, t0, d, lane in spans
                if lane == COMPUTE and name in ("attention", "expert compute", "route")]
    overlapped = sum(any(a <= s and e <= b for a, b in in_flight) for s, e in computed)
    return torch.cat(out), overlapped


def _compare(low_latency_tokens: int | None, device) -> tuple[bool, int, int]:
    """Outputs equal on every rank; the fewest overlapped compute spans of any rank with turns,
    the most without."""
    turns, overlapped = _halves_on_rank(low_latency_tokens, turns=True)
    in_order, overlapped_in_order = _halves_on_rank(low_latency_tokens, turns=False)
    least = torch.tensor([float(torch.equal(turns, in_order)), overlapped, -overlapped_in_order])
    dist.all_reduce(least, op=dist.ReduceOp.MIN)
    return bool(least[0]), int(least[1]), -int(least[2])


def test_one_micro_batch_computes_while_the_others_exchange_is_in_flight():
    """Standard exchange: compute spans of one half lie inside the other half's exchanges in
    flight, which never happens when the halves run one after the other; outputs bit for bit."""
    same, overlapped, overlapped_in_order = launch(functools.partial(_compare, None), 2, timeout=120)
    assert same
    assert overlapped > 0 and overlapped_in_order == 0


def test_the_low_latency_exchange_takes_turns_too():
    same, overlapped, overlapped_in_order = launch(functools.partial(_compare, 20), 2, timeout=120)
    assert same
    assert overlapped > 0 and overlapped_in_order == 0


def test_the_cut_is_the_first_nearest_half_of_the_tokens():
    """`runner._halves` (bisected) against the rule written out: among cuts 1 .. S-1, the first
    whose tokens before it are nearest half the forward's."""
    import random

    from expertmesh.engine.runner import _halves

    rng = random.Random(0)
    assert _halves([]) == (0, 0) and _halves([(None, 5)]) == (0, 0)
    for _ in range(2000):
        lens = [rng.choice([1, 1, 1, 2, 3, 7, 40]) for _ in range(rng.randint(2, 12))]
        before = [sum(lens[:i]) for i in range(1, len(lens))]
        want = min(range(len(before)), key=lambda i: abs(2 * before[i] - sum(lens)))
        assert _halves([(None, n) for n in lens]) == (want + 1, before[want]), lens
