"""`--model PATH`, the serving steady state, and the command line's handling of deployments
that do not fit."""

import dataclasses
import json

import pytest

from expertmesh.cli import main
from expertmesh.config import ModelConfig, Workload, preset
from expertmesh.deployment import Deployment
from expertmesh.sim.hardware import get_profile
from expertmesh.sim.models import load_model
from expertmesh.sim.scenario import Scenario
from expertmesh.sim.serving import iteration_seconds, kv_capacity_tokens, offline, simulate_serving
from expertmesh.sim.simulator import simulate

H100 = get_profile("h100")

LLAMA_JSON = {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336,
              "vocab_size": 128256, "max_position_embeddings": 131072, "torch_dtype": "bfloat16"}
MIXTRAL_JSON = {"model_type": "mixtral", "hidden_size": 4096, "num_hidden_layers": 32,
                "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336,
                "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 32000,
                "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "rope_theta": 1e6,
                "torch_dtype": "bfloat16"}


def _write(tmp_path, name, raw):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(raw))
    return d


def test_a_dense_llama_config_is_an_moe_of_one_expert(tmp_path):
    cfg = load_model("paper", str(_write(tmp_path, "llama", LLAMA_JSON) / "config.json"))
    assert (cfg.n_experts, cfg.top_k, cfg.expert_kind, cfg.expert_hidden) == (1, 1, "swiglu", 14336)
    assert (cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.dtype) == (32, 32, 8, 128, "bf16")


def test_an_moe_family_goes_through_the_engines_loader(tmp_path):
    cfg = load_model("paper", str(_write(tmp_path, "mixtral", MIXTRAL_JSON)))
    assert (cfg.n_experts, cfg.top_k, cfg.expert_hidden, cfg.rope_theta) == (8, 2, 14336, 1e6)


def test_an_unknown_model_type_is_a_one_line_error(tmp_path):
    with pytest.raises(ValueError, match="model_type 'gpt2' cannot be simulated"):
        load_model("paper", str(_write(tmp_path, "gpt2", {"model_type": "gpt2"})))
    with pytest.raises(ValueError, match="not found"):
        load_model("paper", str(tmp_path / "missing"))


def test_simulate_takes_a_model_path_and_prints_every_deployments_assumptions(tmp_path, capsys):
    path = _write(tmp_path, "mixtral", MIXTRAL_JSON)
    out = tmp_path / "r.json"
    assert main(["simulate", "--model", str(path), "--deployments", "tp8,ep8", "--batch", "16",
                 "--prompt-len", "512", "--gen-len", "3", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "schedule (tp8, 8 GPUs)" in printed and "schedule (ep8, 8 GPUs)" in printed
    assert "host syncs: every MoE layer" in printed
    assert [r["deployment"] for r in json.loads(out.read_text())] == ["tp8", "ep8"]


def test_simulate_exits_non_zero_when_no_deployment_fits(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["simulate", "--deployments", "ep2", "--prompt-len", "10000", "--gen-len", "2",
                 "--json", str(out)]) == 1
    assert "DOES NOT FIT" in capsys.readouterr().out
    [row] = json.loads(out.read_text())
    assert row["metrics"] is None and not row["memory"]["fits"]


def _single(cfg: ModelConfig, batch: int, prompt: int) -> Scenario:
    return Scenario(cfg, Deployment(), Workload(batch_size=batch, prompt_len=prompt, gen_len=2), H100)


def test_a_decode_iteration_costs_what_a_static_decode_step_costs():
    cfg = preset("paper")
    sc = _single(cfg, 4, 1000)
    step = simulate(sc).metrics.tpot_s  # the one decode step: 4 sequences after 1000 positions
    assert iteration_seconds(sc, 4.0, 1000.0) == pytest.approx(step, rel=1e-6)


def test_offline_concurrency_is_capped_by_the_tightest_limit():
    sc = _single(preset("paper"), 1, 1000)
    kv = kv_capacity_tokens(sc)
    long = offline(sc, 1000, 1000)
    assert long.limit == "kv" and long.concurrency == pytest.approx(kv / 2000)
    short = offline(sc, 100, 10, token_budget=1100)
    assert short.limit == "tokens" and short.concurrency == pytest.approx(1100 / 11)
    assert offline(sc, 10, 10, max_batch=8).limit == "batch"


def test_serving_latency_grows_with_load_and_goodput_never_exceeds_the_rate():
    sc = _single(preset("paper"), 1, 1000)
    light, heavy = simulate_serving(sc, 0.5, 500, 50, requests=60), simulate_serving(sc, 50.0, 500, 50, requests=60)
    assert heavy.percentile("ttft_s", 90) > light.percentile("ttft_s", 90)
    assert light.goodput(None, None) <= 0.5 * 2  # within the arrivals' own randomness
    assert light.goodput(1e-9, None) == 0.0
    # the same seed draws the same requests at any rate: every one delivers all its tokens
    assert heavy.output_tokens == light.output_tokens > 60
    with pytest.raises(ValueError, match="rate"):
        simulate_serving(sc, 0.0, 10, 10)
    with pytest.raises(ValueError, match="cannot hold the KV cache of one"):  # never admitted: no hang
        simulate_serving(dataclasses.replace(sc, hardware=H100.with_(hbm_bytes=72e9)), 1.0, 8000, 100, requests=3)


def test_a_prefix_hit_rate_prefills_only_the_uncached_part_of_each_prompt():
    """At a light load (no queue) TTFT is the prefill of what is not cached; under a heavy one
    the saved prefill also shortens the queue. The same requests are drawn either way."""
    sc = _single(preset("paper"), 1, 1000)
    for rate in (0.5, 50.0):
        none, most = simulate_serving(sc, rate, 2000, 20, requests=40), simulate_serving(sc, rate, 2000, 20, requests=40, prefix_hit_rate=0.9)
        assert most.percentile("ttft_s", 50) < none.percentile("ttft_s", 50) / 2
        assert most.output_tokens == none.output_tokens
    with pytest.raises(ValueError, match="--prefix-hit-rate"):
        simulate_serving(sc, 1.0, 10, 10, prefix_hit_rate=1.0)


def test_a_replica_that_holds_no_sequence_is_refused():
    sc = dataclasses.replace(_single(preset("paper"), 1, 1000), hardware=H100.with_(hbm_bytes=40e9))
    with pytest.raises(ValueError, match="less than one"):
        offline(sc, 8000, 8000)


def test_plan_under_a_rate_ranks_by_goodput_and_says_why_the_top_choice_wins(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", "--gpus", "4", "--batch", "16", "--prompt-len", "500", "--gen-len", "20",
                 "--rate", "4", "--ttft-slo", "1s", "--tpot-slo", "30ms", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "best goodput first" in printed and "wins: the highest goodput" in printed
    assert "of a step" in printed  # the dominant cost of the top candidates
    assert all(r["memory"]["fits"] for r in json.loads(out.read_text()))


def test_goodput_counts_only_requests_within_both_slos():
    sc = _single(preset("paper"), 1, 1000)
    s = simulate_serving(sc, 2.0, 200, 20, requests=40)
    assert s.goodput(None, None) == pytest.approx(40 / s.arrival_span_s)
    tight = sorted(s.tpot_s)[len(s.tpot_s) // 2]  # half the requests at most
    assert s.goodput(None, tight) < s.goodput(None, None)


def test_the_expert_sweep_grows_ep_with_the_gpus_up_to_the_expert_count():
    from expertmesh.sim.report import expert_sweep
    base = Scenario(preset("paper"), Deployment(), Workload(batch_size=64, prompt_len=200, gen_len=2), H100)
    curves = expert_sweep(base, (16, 32, 64), experts=(16, 64))
    assert [r.scenario.deployment.ep for r in curves["EP, 16 experts"]] == [16, 16, 16]
    assert [r.scenario.replicas for r in curves["EP, 16 experts"]] == [1, 2, 4]
    assert [r.scenario.deployment.ep for r in curves["EP, 64 experts"]] == [16, 32, 64]
    assert all(r.scenario.cfg.top_k == 2 and r.scenario.cfg.expert_hidden == 16384
               for r in curves["EP, 64 experts"])

