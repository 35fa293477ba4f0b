"""vLLM's sampling options in the engine (`engine/logits_processing.py`, `engine/logprobs.py`),
held to an independent reference on every deployment.

The reference generates each request alone with the single-device model and no cache, and does
everything after the logits in plain Python on fp64 floats, per row: logit bias, min_tokens'
mask, the repetition / frequency / presence penalties as vLLM defines them, the draw (the
inverse CDF of the tempered, nucleus-restricted distribution at the request's uniform number
`uniform(seed, index)`, which is the seeded-draw contract of `engine/sampling.py`), and the raw
logprobs (log-softmax of the unprocessed logits). The engine must give the same tokens on every
deployment, under preemption and on the padded decode path (graphs' buffers, run eagerly here),
and logprobs within fp32's rounding.
"""

import functools
import math

import pytest
import torch
import torch.distributed as dist

from expertmesh.config import Workload, preset
from expertmesh.deployment import Deployment
from expertmesh.engine.engine import Engine
from expertmesh.engine.request import Request
from expertmesh.engine.sampling import uniform
from expertmesh.engine.scheduler import EngineConfig
from expertmesh.engine.serve import serve
from expertmesh.engine.shard import load_rank, shard_model
from expertmesh.engine.spec import RunSpec
from expertmesh.launch import launch
from expertmesh.model import moe
from expertmesh.model.synthetic import materialize
from expertmesh.model.transformer import reference_model
from fake_device import FakeDevice, move_to_device

SEED = 11
CFG = preset("tiny")
NEW = 6


def naive_process(raw: list[float], r: Request, output: list[int], eos: set[int]) -> list[float]:
    """vLLM's processing of one row, in plain Python: bias, min_tokens mask, penalties."""
    x = list(raw)
    for t, b in r.logit_bias:
        x[t] += b
    if len(output) < r.min_tokens:
        for t in set(r.stop) | (set() if r.ignore_eos else eos):
            x[t] = -math.inf
    seen = set(r.prompt) | set(output)
    for t in range(len(x)):
        if t in seen:
            x[t] = x[t] / r.repetition_penalty if x[t] > 0 else x[t] * r.repetition_penalty
        count = output.count(t)
        x[t] -= r.frequency_penalty * count + r.presence_penalty * (count > 0)
    return x


def naive_draw(x: list[float], r: Request, index: int) -> int:
    if r.temperature == 0:
        return max(range(len(x)), key=lambda t: (x[t], -t))
    top = max(x)
    p = [math.exp((v - top) / r.temperature) for v in x]
    total = sum(p)
    kept, mass = set(), 0.0
    for t in sorted(range(len(p)), key=lambda t: (-p[t], t)):
        if mass >= r.top_p * total:
            break
        kept.add(t)
        mass += p[t]
    p = [v if t in kept else 0.0 for t, v in enumerate(p)]
    bound, acc = uniform(r.seed, index) * sum(p), 0.0
    for t, v in enumerate(p):
        acc += v
        if acc >= bound and v > 0:
            return t
    return max(kept)


def naive_logprobs(raw: list[float], k: int) -> list[float]:
    top = max(raw)
    norm = top + math.log(sum(math.exp(v - top) for v in raw))
    return [v - norm for v in raw]


def reference(model, r: Request, eos: set[int]) -> tuple[list[int], list]:
    """(tokens, per token (its logprob, top-k [(id, logprob)]) or None) of `r` alone."""
    ids, out, lps = list(r.prompt), [], []
    with torch.inference_mode():
        for i in range(r.max_tokens):
            raw = model(torch.tensor([ids]), all_logits=True)[0, -1].double().tolist()
            token = naive_draw(naive_process(raw, r, out, eos), r, i)
            if r.logprobs is not None:
                lp = naive_logprobs(raw, r.logprobs)
                best = sorted(range(len(lp)), key=lambda t: -lp[t])[:r.logprobs]
                lps.append((lp[token], [(t, lp[t]) for t in best]))
            out.append(token)
            ids.append(token)
            if token in r.stop or (token in eos and not r.ignore_eos):
                break
    return out, lps


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return reference_model(CFG, seed=SEED)


def _prompt(i: int, n: int) -> tuple[int, ...]:
    return tuple((37 * i + 11 * (j % 5)) % CFG.vocab_size for j in range(n))  # repeats: penalties bite


@pytest.fixture(scope="module")
def workload(model):
    """Requests each with some options, their stop / EOS ids picked from what the model says
    without them (so that min_tokens and ignore_eos change the tokens), the engine's EOS, and
    the reference's (tokens, logprobs) per request."""
    plain = [reference(model, Request(i, _prompt(i, 9 + i), NEW), set())[0] for i in range(8)]
    eos = plain[4][0]
    requests = [
        Request(0, _prompt(0, 9), NEW, repetition_penalty=1.8, logprobs=2),
        Request(1, _prompt(1, 10), NEW, temperature=0.9, seed=5, presence_penalty=1.5,
                frequency_penalty=0.7, logprobs=3),
        Request(2, _prompt(2, 11), NEW, logit_bias=((plain[2][0], -100.0), (17, 2.5), (300, 4.0))),
        Request(3, _prompt(3, 12), NEW, stop=(plain[3][0], plain[3][1]), min_tokens=4),
        Request(4, _prompt(4, 13), NEW, ignore_eos=True),
        Request(5, _prompt(5, 14), NEW, temperature=0.8, seed=9),  # no option: the draws of before
        Request(6, _prompt(6, 15), NEW, logprobs=0, repetition_penalty=0.6, min_tokens=2),
        Request(7, _prompt(7, 16), NEW, temperature=1.3, top_p=0.9, seed=-3, frequency_penalty=-1.0, repetition_penalty=0.3,
                logit_bias=((5, 1.0),), logprobs=20),
    ]
    want = {r.id: reference(model, r, {eos}) for r in requests}
    return requests, eos, want, plain


def test_the_reference_options_change_what_the_model_says(workload):
    """Guards the test itself: every request's option makes a difference the engine must copy."""
    requests, eos, want, plain = workload
    assert want[2][0][0] != plain[2][0]  # the -100 bias removes the first choice
    assert len(want[3][0]) >= 4 and want[3][0][0] != plain[3][0]  # min_tokens masks the stop id
    assert want[4][0][0] == eos and len(want[4][0]) == NEW  # past EOS
    assert want[0][0] != plain[0]


def _serve_rank(spec: RunSpec, engine: EngineConfig, arrivals, eos, graphs: str, device):
    model, links, _ = load_rank(spec, device)
    rank = dist.get_rank() if dist.is_initialized() else 0
    eng = Engine(model, spec.cfg, spec.deployment, engine, rank, links, (eos,), n_micro=spec.micro_batches,
                 graphs=graphs)
    return serve(eng, arrivals)


def _run(deployment: str, arrivals, eos, engine: EngineConfig, graphs: str = "off"):
    dep = Deployment.parse(deployment)
    spec = RunSpec(CFG, dep, Workload(), seed=SEED)
    fn = functools.partial(_serve_rank, spec, engine, arrivals, eos, graphs)
    if dep.world_size == 1:
        return fn(torch.device("cpu"))
    return launch(fn, dep.world_size, timeout=300)


def _check(transcript, requests, want) -> None:
    for r in requests:
        tokens, lps = want[r.id]
        assert transcript.tokens[r.id] == tokens, f"request {r.id}"
        got = transcript.logprobs[r.id]
        assert len(got) == len(lps), f"request {r.id}: a logprobs entry per token when asked"
        for (lp, top), (want_lp, want_top) in zip(got, lps):
            assert lp == pytest.approx(want_lp, abs=1e-4)
            assert [t for t, _ in top] == [t for t, _ in want_top]
            assert [v for _, v in top] == pytest.approx([v for _, v in want_top], abs=1e-4)
    for stats in transcript.rank_stats:
        assert stats.blocks_used == 0 and stats.running == stats.waiting == 0


ROOMY = EngineConfig(block_size=4, num_blocks=96, max_batched_tokens=256, max_seqs=8)


@pytest.mark.parametrize("deployment", ["single", "ep2", "tp2", "pp2"])
def test_every_option_gives_the_reference_tokens_and_logprobs_on_every_deployment(workload, deployment):
    requests, eos, want, _ = workload
    transcript = _run(deployment, [(i // 3, r) for i, r in enumerate(requests)], eos, ROOMY)
    _check(transcript, requests, want)


def test_under_preemption_a_recomputed_request_penalises_and_draws_as_before(workload):
    """A pool of 12 blocks of 4 cannot hold the 8 requests: the newest are preempted and
    recomputed, their output so far kept and counted by the penalties again."""
    requests, eos, want, _ = workload
    tight = EngineConfig(block_size=4, num_blocks=12, max_batched_tokens=64, max_seqs=8)
    transcript = _run("single", [(0, r) for r in requests], eos, tight)
    assert transcript.rank_stats[0].preemptions > 0
    _check(transcript, requests, want)


def test_the_padded_decode_path_processes_and_reads_logprobs_the_same(workload):
    requests, eos, want, _ = workload
    transcript = _run("single", [(0, r) for r in requests], eos, ROOMY, graphs="padded")
    _check(transcript, requests, want)


def test_options_and_logprobs_add_no_host_read_to_a_decode_step(workload, monkeypatch):
    """On the pretend accelerator (a Hopper GPU in bf16: the grouped expert kernel, which reads
    nothing): one read per decode step (the finite flags, the tokens and the logprobs in one
    copy), and the options' uploads wait for nothing; the tokens are the CPU's."""
    requests, eos, _, _ = workload
    monkeypatch.setattr(moe, "_grouped_mm_applies", lambda x, hidden: True)
    spec = RunSpec(CFG, Deployment.parse("single"), Workload(), seed=SEED)

    def decode_step(mode: FakeDevice | None):
        model = materialize(shard_model(spec, 0, None), seed=3, dtype=torch.float32)
        if mode is not None:
            model = move_to_device(model)
        eng = Engine(model, CFG, spec.deployment, ROOMY, eos=(eos,))
        for r in requests:
            eng.add_request(r)
        eng.step()
        before = mode.counts() if mode else (0, 0, 0)
        outputs = eng.step()
        counts = [a - b for a, b in zip(mode.counts(), before)] if mode else None
        eng.shutdown()
        return counts, sorted((o.request_id, o.token, o.logprobs is not None) for o in outputs)

    with FakeDevice() as mode:
        counts, tokens = decode_step(mode)
    _, cpu_tokens = decode_step(None)
    syncs, uploads, blocking = counts
    assert syncs == 1 and blocking == 0
    # paged layout with the token ids, sampling's rows, the options' values, the logprobs' row indices
    assert uploads == 4
    assert tokens == cpu_tokens and sum(lp for _, _, lp in tokens) == 4


@pytest.mark.parametrize("field, value", [
    ("presence_penalty", 2.5), ("frequency_penalty", -2.1), ("repetition_penalty", 0.0),
    ("logit_bias", ((1, 101.0),)), ("logit_bias", tuple((t, 1.0) for t in range(301))),
    ("min_tokens", NEW + 1), ("logprobs", 21), ("logprobs", -1)])
def test_an_option_out_of_range_is_one_line_naming_it(field, value):
    with pytest.raises(ValueError, match=field):
        Request(0, (1,), NEW, **{field: value})


def test_a_logit_bias_id_outside_the_vocabulary_is_refused():
    with pytest.raises(ValueError, match="outside the vocabulary"):
        Request(0, (1,), NEW, logit_bias=((CFG.vocab_size, 1.0),)).check_for(CFG.vocab_size, 64)
