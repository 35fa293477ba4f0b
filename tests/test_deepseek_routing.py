"""DeepSeek-V3's routing and layer structure (no MLA yet): the group-limited sigmoid router (and
DeepSeek-V2's softmax one) against a naive per-token implementation written here and against
transformers' router, its MoE
block (with an ungated shared expert) against transformers' DeepseekV3MoE, and every deployment
of a model with it (first layer dense) reproducing the single-device model."""

import pytest
import torch
from torch import nn

from expertmesh.config import Workload
from expertmesh.deployment import Deployment
from expertmesh.engine.spec import RunSpec
from expertmesh.engine.worker import run
from expertmesh.model.moe import MoEBlock, SharedExpert
from expertmesh.model.routing import GroupLimitedRouter

T, D, E, G, TOPK_GROUPS, K = 64, 16, 16, 4, 2, 4


def _param(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


def _router(weight, bias, renormalize=True, scaling=2.5) -> GroupLimitedRouter:
    router = GroupLimitedRouter(D, E, K, renormalize, G, TOPK_GROUPS, scaling)
    router.weight, router.bias = _param(weight), _param(bias)
    return router


def _v2_router(weight, groups=G, topk_groups=TOPK_GROUPS) -> GroupLimitedRouter:
    router = GroupLimitedRouter(D, E, K, False, groups, topk_groups, 2.5, scoring="softmax")
    router.weight = _param(weight)
    return router


def naive_route_v2(x, weight, groups, topk_groups):
    """DeepSeek-V2's routing token by token: softmax scores, groups ranked by their best expert,
    the k best experts of the kept groups, weights their scores x 2.5 (never renormalized)."""
    out = []
    per_group = E // groups
    for row in x:
        logits = [torch.dot(row, w).item() for w in weight]
        top = max(logits)
        exps = [2.718281828459045 ** (v - top) for v in logits]
        scores = [v / sum(exps) for v in exps]
        best = [max(scores[g * per_group:(g + 1) * per_group]) for g in range(groups)]
        kept = sorted(range(groups), key=lambda g: -best[g])[:topk_groups]
        chosen = sorted((e for e in range(E) if e // per_group in kept), key=lambda e: -scores[e])[:K]
        out.append({e: scores[e] * 2.5 for e in chosen})
    return out


def naive_route(x, weight, bias, renormalize, scaling):
    """Token by token, in plain Python: {expert: weight} per token."""
    out = []
    per_group = E // G
    for row in x:
        scores = [torch.sigmoid(torch.dot(row, w)).item() for w in weight]
        biased = [s + b for s, b in zip(scores, bias.tolist())]
        group_score = [sum(sorted(biased[g * per_group:(g + 1) * per_group], reverse=True)[:2])
                       for g in range(G)]
        groups = sorted(range(G), key=lambda g: -group_score[g])[:TOPK_GROUPS]
        allowed = [e for e in range(E) if e // per_group in groups]
        chosen = sorted(allowed, key=lambda e: -biased[e])[:K]
        total = sum(scores[e] for e in chosen) if renormalize else 1.0
        out.append({e: scores[e] / total * scaling for e in chosen})
    return out


def _as_dicts(ids, weights):
    return [dict(zip(i.tolist(), w.tolist())) for i, w in zip(ids, weights)]


@pytest.fixture
def inputs():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(T, D, generator=gen)
    weight = torch.randn(E, D, generator=gen) * 0.5
    bias = torch.randn(E, generator=gen) * 0.3  # the size of the scores' spread: it moves choices
    return x, weight, bias


@pytest.mark.parametrize("renormalize", [True, False])
def test_router_matches_a_naive_per_token_implementation(inputs, renormalize):
    x, weight, bias = inputs
    ids, weights = _router(weight, bias, renormalize)(x)
    ours, theirs = _as_dicts(ids, weights), naive_route(x, weight, bias, renormalize, 2.5)
    for mine, want in zip(ours, theirs):
        assert mine.keys() == want.keys()
        assert all(abs(mine[e] - want[e]) < 1e-5 for e in want)


@pytest.mark.parametrize("groups,topk_groups", [(G, TOPK_GROUPS), (1, 1)], ids=["group_limited", "greedy"])
def test_softmax_router_matches_a_naive_per_token_implementation(inputs, groups, topk_groups):
    x, weight, _ = inputs
    ours = _as_dicts(*_v2_router(weight, groups, topk_groups)(x))
    for mine, want in zip(ours, naive_route_v2(x, weight, groups, topk_groups)):
        assert mine.keys() == want.keys()
        assert all(abs(mine[e] - want[e]) < 1e-5 for e in want)


def test_the_group_limit_changes_the_softmax_routers_choice(inputs):
    x, weight, _ = inputs
    limited, _ = _v2_router(weight)(x)
    greedy, _ = _v2_router(weight, 1, 1)(x)
    assert sum(set(a.tolist()) != set(b.tolist()) for a, b in zip(limited, greedy)) >= T // 8


@pytest.mark.parametrize("method", ["group_limited_greedy", "greedy"])
def test_softmax_router_matches_transformers_deepseek_v2(inputs, method):
    transformers = pytest.importorskip("transformers", reason="the reference is transformers' router")
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter

    x, weight, _ = inputs
    theirs = DeepseekV2TopkRouter(transformers.DeepseekV2Config(
        hidden_size=D, n_routed_experts=E, num_experts_per_tok=K, n_group=G, topk_group=TOPK_GROUPS,
        topk_method=method, routed_scaling_factor=2.5, num_attention_heads=2))
    theirs.weight.data.copy_(weight)
    _, their_w, their_ids = theirs(x)
    ours = _v2_router(weight) if method == "group_limited_greedy" else _v2_router(weight, 1, 1)
    for mine, want in zip(_as_dicts(*ours(x)), _as_dicts(their_ids, their_w)):
        assert mine.keys() == want.keys()
        assert all(abs(mine[e] - want[e]) < 1e-5 for e in want)


def test_the_correction_bias_changes_the_choice_but_not_the_weights(inputs):
    x, weight, bias = inputs
    biased_ids, biased_w = _router(weight, bias)(x)
    plain_ids, _ = _router(weight, torch.zeros(E))(x)
    changed = [set(a.tolist()) != set(b.tolist()) for a, b in zip(biased_ids, plain_ids)]
    assert sum(changed) >= T // 4  # the bias moves many tokens
    scores = torch.sigmoid(x @ weight.T)
    chosen = scores.gather(1, biased_ids)
    assert torch.allclose(biased_w, chosen / chosen.sum(-1, keepdim=True) * 2.5, atol=1e-6)


def _deepseek_config(transformers, **extra):
    return transformers.DeepseekV3Config(
        hidden_size=D, moe_intermediate_size=8, n_routed_experts=E, num_experts_per_tok=K, n_group=G,
        topk_group=TOPK_GROUPS, routed_scaling_factor=2.5, norm_topk_prob=True, n_shared_experts=2,
        vocab_size=32, num_hidden_layers=1, num_attention_heads=2, **extra)


def test_router_matches_transformers(inputs):
    transformers = pytest.importorskip("transformers", reason="the reference is transformers' router")
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    x, weight, bias = inputs
    theirs = DeepseekV3TopkRouter(_deepseek_config(transformers))
    theirs.weight.data.copy_(weight)
    theirs.e_score_correction_bias.copy_(bias)
    _, their_w, their_ids = theirs(x)
    ours = _as_dicts(*_router(weight, bias)(x))
    for mine, want in zip(ours, _as_dicts(their_ids, their_w)):
        assert mine.keys() == want.keys()
        assert all(abs(mine[e] - want[e]) < 1e-5 for e in want)


def test_moe_block_with_ungated_shared_experts_matches_transformers(inputs):
    transformers = pytest.importorskip("transformers", reason="the reference is transformers' MoE block")
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    x, weight, bias = inputs
    torch.manual_seed(1)
    theirs = DeepseekV3MoE(_deepseek_config(transformers)).eval()
    for p in (theirs.experts.gate_up_proj, theirs.experts.down_proj):
        nn.init.normal_(p, std=0.3)
    theirs.gate.weight.data.copy_(weight)
    theirs.gate.e_score_correction_bias.copy_(bias)
    H = 8
    block = MoEBlock(D, E, K, H, "swiglu", True)
    block.router = _router(weight, bias)
    block.shared = SharedExpert(D, 2 * H, gated=False)
    gate_up = theirs.experts.gate_up_proj.detach()
    experts = block.experts
    experts.w_gate, experts.w_up = _param(gate_up[:, :H].clone()), _param(gate_up[:, H:].clone())
    experts.w_down = _param(theirs.experts.down_proj.detach().clone())
    s = theirs.shared_experts
    block.shared.w_gate.weight = _param(s.gate_proj.weight.detach().clone())
    block.shared.w_up.weight = _param(s.up_proj.weight.detach().clone())
    block.shared.w_down.weight = _param(s.down_proj.weight.detach().clone())
    with torch.no_grad():
        want = theirs(x.view(4, T // 4, D))
        got = block(x.view(4, T // 4, D))
    assert (got - want).abs().max().item() < 1e-5


DEEPSEEK_LIKE = dict(expert_kind="swiglu", n_experts=8, router_kind="sigmoid_grouped", n_groups=4,
                     topk_groups=2, routed_scaling=2.5, shared_expert_hidden=64, shared_expert_gate=False,
                     dense_layers=(0,), dense_hidden=96)


@pytest.mark.parametrize("deployment", ["ep2", "ep4", "tp2", "pp2"])
def test_every_deployment_reproduces_the_single_device_model(small_config, deployment):
    cfg = small_config(**DEEPSEEK_LIKE)
    workload = Workload(batch_size=4, prompt_len=6, gen_len=4, seed=1)

    def go(dep):
        return run(RunSpec(cfg, Deployment.parse(dep), workload, seed=5, record_logits=True, warmup=False),
                   timeout=120)

    reference, result = go("single"), go(deployment)
    assert torch.equal(result.tokens, reference.tokens)
    assert (result.logits - reference.logits).abs().max().item() < 1e-4
