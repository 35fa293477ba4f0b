"""Every deployment against the single-process reference: same greedy tokens, logits within
tolerance, at world sizes 2, 4, 8 and 16 (local gloo ranks)."""

import functools

import pytest
import torch
import torch.distributed as dist

from expertmesh.config import Workload, preset
from expertmesh.deployment import Deployment
from expertmesh.engine.shard import shard_model
from expertmesh.engine.spec import RunSpec
from expertmesh.engine.worker import run
from expertmesh.model.transformer import build_model, parameter_bytes
from expertmesh.parallel import tensor

FP32_ATOL = 1e-4  # observed max |Δlogit| about 2e-6: only the order of float sums differs
BF16_MEAN_ATOL = 0.01  # mean |Δ prefill logit| of bf16 vs fp32 without near-ties (observed 0.0035)

# 6 sequences: under ep8 and ep16 some ranks own no sequence and still take part in every layer
WORKLOAD = Workload(batch_size=6, prompt_len=12, gen_len=6, seed=3)


def _run(cfg, deployment: str, workload=WORKLOAD, **kw):
    return run(RunSpec(cfg, Deployment.parse(deployment), workload, seed=11, record_logits=True, **kw),
               timeout=120)


@pytest.fixture(scope="module")
def reference():
    return _run(preset("tiny"), "single")


@pytest.mark.parametrize("deployment", [
    "ep2", "tp2", "pp2",
    "ep4", "tp4", "pp4", "ep2pp2", "tp2pp2",
    "ep8", "tp8", "ep4pp2", "tp4pp2", "pp3",
    "ep16", "tp8pp2", "ep8pp2",
])
def test_deployment_reproduces_the_reference_in_fp32(reference, deployment):
    result = _run(preset("tiny"), deployment)
    assert torch.equal(result.tokens, reference.tokens)
    assert (result.logits - reference.logits).abs().max().item() < FP32_ATOL


def test_more_micro_batches_than_stages_change_nothing(reference):
    result = _run(preset("tiny"), "ep2pp2", n_micro=4)
    assert torch.equal(result.tokens, reference.tokens)


# bf16 against fp32 is measured on a model whose routing has no near-ties to flip: with top_k ==
# n_experts every token uses every expert, so the error is the arithmetic's alone. On the tiny
# preset (top-2 of 16 near-uniform synthetic routers) the relative margin between a token's 2nd and
# 3rd expert can be 0.1%, below bf16's 0.4% rounding: one rounding difference flips an expert for
# 1-5% of tokens, and a flipped token moves its sequence's logits about 25x more than rounding does.
# Which tokens flip depends on the BLAS kernel (Intel avx512_bf16 vs AMD) and on how a deployment
# splits its sums, so a relative bound on the tiny preset measured the luck of those flips.
NO_TIES = dict(n_experts=4, top_k=4)
BF16_RATIO = 1.4  # deployment / single error; measured 1.00 (ep4) to 1.05 (tp2) on AMD and avx2 kernels


@pytest.fixture(scope="module")
def bf16_errors():
    """`bf16_errors(deployment)`: mean |prefill logit - fp32 reference| of the no-ties model in bf16."""
    reference = _run(preset("tiny", **NO_TIES), "single")

    def error(deployment: str) -> float:
        result = _run(preset("tiny", dtype="bf16", **NO_TIES), deployment)
        return (result.logits[:, 0] - reference.logits[:, 0]).abs().mean().item()

    return functools.lru_cache(error)


@pytest.mark.parametrize("deployment", ["ep4", "tp2", "tp2pp2"])
def test_bf16_adds_no_more_error_than_bf16_itself(bf16_errors, deployment):
    """In bf16 a deployment cannot match the reference bit for bit (TP rounds each partial sum to
    bf16 before the all-reduce adds them), so the statement is relative: against the fp32 reference,
    its prefill logits are no further off than the single-device bf16 model's."""
    assert bf16_errors("single") < BF16_MEAN_ATOL
    assert bf16_errors(deployment) <= BF16_RATIO * bf16_errors("single")


def test_the_bf16_bound_catches_a_wrong_tensor_parallel_partial_sum(bf16_errors, monkeypatch):
    """The bound above is tight enough to see a real defect: scaling one TP rank's partial output
    by 1 + 2^-6 before the all-reduce (the forked ranks inherit the patch) breaks it."""
    def scaled_all_reduce(group):
        def hook(module, args, output):
            if dist.get_rank(group) == 1:
                output.mul_(1 + 2**-6)
            dist.all_reduce(output, group=group)
            return output
        return hook

    monkeypatch.setattr(tensor, "_all_reduce_output", scaled_all_reduce)
    cfg = preset("tiny", dtype="bf16", **NO_TIES)
    result = _run(cfg, "tp2")
    reference = _run(preset("tiny", **NO_TIES), "single")
    error = (result.logits[:, 0] - reference.logits[:, 0]).abs().mean().item()
    assert error > BF16_RATIO * bf16_errors("single")


def test_each_rank_holds_only_its_shard_of_the_paper_model():
    cfg = preset("paper")
    d, L, H, E = cfg.d_model, cfg.n_layers, cfg.expert_hidden, cfg.n_experts
    attention = 4 * d * cfg.n_heads * cfg.head_dim
    norms = 2 * d
    expert = 2 * d * H
    router = E * d
    embed = head = cfg.vocab_size * d
    full = L * (attention + norms + router + E * expert) + embed + head + d
    assert parameter_bytes(build_model(cfg), torch.bfloat16) == 2 * full

    def shard_bytes(deployment: str, rank: int) -> int:
        spec = RunSpec(cfg, Deployment.parse(deployment), Workload())
        return parameter_bytes(shard_model(spec, rank, group=None), torch.bfloat16)

    # ep16: one expert per layer, everything else replicated
    assert shard_bytes("ep16", 5) == 2 * (L * (attention + norms + router + expert) + embed + head + d)
    # tp8pp2: 1/8 of attention and of every expert of 8 layers; embedding on stage 0, head on 1
    stage_layers = 8 * (attention // 8 + norms + router + E * expert // 8)
    assert shard_bytes("tp8pp2", 0) == 2 * (stage_layers + embed)
    assert shard_bytes("tp8pp2", 15) == 2 * (stage_layers + head + d)
