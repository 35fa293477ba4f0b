"""The simulator's schedule, memory accounting, bound, planner and command line."""

import dataclasses
import json

import pytest
import torch

from expertmesh.cli import main
from expertmesh.config import Workload, preset
from expertmesh.deployment import Deployment
from expertmesh.engine.shard import shard_model
from expertmesh.engine.spec import RunSpec
from expertmesh.model.transformer import build_model, parameter_bytes
from expertmesh.sim import simulator
from expertmesh.sim.cost import Cost
from expertmesh.sim.hardware import get_profile
from expertmesh.sim.memory import memory_report
from expertmesh.sim.plan import candidates, evaluate, plan
from expertmesh.sim.program import Exchange, Phase, StageProgram
from expertmesh.sim.routing import Routing
from expertmesh.sim.scenario import Scenario
from expertmesh.sim.simulator import simulate

H100 = get_profile("h100")
PAPER = preset("paper")
SHORT = Workload(batch_size=128, prompt_len=1000, gen_len=4)


def test_two_stage_pipeline_makespan_equals_the_hand_schedule(monkeypatch):
    """Stage 0 takes 1 s, stage 1 takes 2 s per micro-batch, links and control messages are
    free; 2 micro-batches. As the engine, a step starts once the previous one has ended on every
    stage (its tokens are gathered by all ranks), so micro-batches pipeline within a step only.

    step 0: s0 m0 [0,1] m1 [1,2]; s1 m0 [1,3] m1 [3,5]                       -> token 0 at 5
    step 1: s0 m0 [5,6] m1 [6,7]; s1 m0 [6,8] m1 [8,10]                      -> token 1 at 10
    step 2: s0 m0 [10,11] m1 [11,12]; s1 m0 [11,13] m1 [13,15]               -> token 2 at 15
    """
    def program(sc, stage, work):
        return StageProgram((), (Phase("work", (Cost(1.0 + stage, "compute"),)),), (), 1)

    monkeypatch.setattr(simulator, "stage_program", program)
    hw = H100.with_(nvlink_latency_s=0.0, nvlink_bw=1e30, net_latency_s=0.0, net_bw=1e30)
    sc = Scenario(preset("tiny"), Deployment(pp=2), Workload(batch_size=4, prompt_len=8, gen_len=3), hw)
    m = simulate(sc).metrics
    assert m.ttft_s == pytest.approx(5.0)
    assert m.total_s == pytest.approx(15.0)
    assert m.tpot_s == pytest.approx(5.0)
    # pipelined steps (step_barrier=False, not the engine): a micro-batch starts its next step as
    # soon as its token is back. step 1: s0 m0 [3,4] (token of m0 at 3), m1 [5,6]; s1 m0 [5,7]
    # m1 [7,9] -> 9; step 2: s0 m0 [7,8] m1 [9,10]; s1 m0 [9,11] m1 [11,13] -> 13
    piped = simulate(dataclasses.replace(sc, step_barrier=False)).metrics
    assert piped.total_s == pytest.approx(13.0) and piped.tpot_s == pytest.approx(4.0)


def test_chunked_exchange_overlaps_the_next_dispatch_with_expert_compute():
    busy = [dict.fromkeys(("compute", "hbm", "launch", "nvlink", "network"), 0.0)]

    def ex(chunks, scale):
        return Exchange((Cost(1.0 * scale, "network"),), (Cost(2.0 * scale, "compute"),),
                        (Cost(1.0 * scale, "network"),), chunks)

    task = simulator.StageTask(1, 1.0, busy, None, 0.0, False)
    # C=1: 2 + 4 + 2. C=2: D0 [0,1], E0 [1,3], D1 [1,2], E1 [3,5], R0 [3,4], R1 [5,6]
    assert task.play([ex(1, 2.0)], [0.0], [0.0])[0] == [8.0]
    assert task.play([ex(2, 1.0)], [0.0], [0.0])[0] == [6.0]


def _kv_bytes(dep: Deployment, batch: int, context: int) -> int:
    """2 (K, V) x sequences held x context x KV heads held x head_dim x 2 bytes, per layer held."""
    return (16 // dep.pp) * 2 * (batch // dep.ep) * context * (32 // dep.tp) * 128 * 2


def test_memory_of_paper_under_tp8pp2_equals_the_meta_shards():
    dep = Deployment(tp=8, pp=2)
    w = Workload(batch_size=128, prompt_len=10000, gen_len=128)
    report = memory_report(PAPER, dep, w, H100.hbm_bytes)
    spec = RunSpec(PAPER, dep, w)
    shard_bytes = [parameter_bytes(shard_model(spec, r, None), torch.bfloat16) for r in (0, 15)]
    assert report.weights_bytes == max(shard_bytes)
    assert report.kv_bytes == _kv_bytes(dep, 128, 10128)
    assert report.fits


def test_memory_of_paper_under_ep16_equals_the_parameter_arithmetic():
    # the whole model less the 15 of 16 experts per layer a rank does not hold (2 matrices each)
    whole = parameter_bytes(build_model(PAPER), torch.bfloat16)
    not_held = 16 * 15 * 2 * 16384 * 4096 * 2
    w = Workload(batch_size=128, prompt_len=10000, gen_len=128)
    report = memory_report(PAPER, Deployment(ep=16), w, H100.hbm_bytes)
    assert report.weights_bytes == whole - not_held
    assert report.kv_bytes == _kv_bytes(Deployment(ep=16), 128, 10128)


def test_a_deployment_that_does_not_fit_is_reported():
    w = Workload(batch_size=128, prompt_len=10000, gen_len=4)
    r = simulate(Scenario(PAPER, Deployment(ep=2), w, H100))
    assert not r.memory.fits
    assert r.memory.total_bytes > H100.hbm_bytes


@pytest.mark.parametrize("name", ["ep16", "tp8pp2", "tp8", "ep4pp2"])
def test_simulated_times_are_never_below_the_roofline_bound(name):
    r = simulate(Scenario(PAPER, Deployment.parse(name), SHORT, H100))
    assert r.bound.ttft_s <= r.metrics.ttft_s
    assert r.bound.tpot_s <= r.metrics.tpot_s
    assert r.bound.total_s <= r.metrics.total_s


def test_replicas_split_the_batch_and_shorten_the_steps():
    one = simulate(Scenario(PAPER, Deployment(ep=16), SHORT, H100))
    four = simulate(Scenario(PAPER, Deployment(ep=16), SHORT, H100, gpus=64))
    assert four.scenario.replicas == 4 and four.scenario.replica_workload.batch_size == 32
    assert four.metrics.ttft_s < one.metrics.ttft_s
    assert four.metrics.batch_size == 128


def test_gpu_counts_must_hold_whole_replicas():
    with pytest.raises(ValueError, match="multiple of 16"):
        Scenario(PAPER, Deployment(ep=16), SHORT, H100, gpus=24)


def test_skewed_routing_slows_expert_parallelism():
    uniform = simulate(Scenario(PAPER, Deployment(ep=16), SHORT, H100))
    skewed = simulate(Scenario(PAPER, Deployment(ep=16), SHORT, H100, routing=Routing("zipf", 1.2)))
    assert skewed.metrics.ttft_s > uniform.metrics.ttft_s


def test_overlap_chunks_shorten_expert_parallel_prefill():
    base = Scenario(PAPER, Deployment(ep=16), SHORT, H100, overlap="chunks")
    chunked = dataclasses.replace(base, a2a_chunks=4)
    assert simulate(chunked).metrics.ttft_s < simulate(base).metrics.ttft_s


def test_trace_has_one_track_per_rank_of_complete_events():
    r = simulate(Scenario(PAPER, Deployment(tp=2, pp=2), SHORT, H100))
    spans = [e for e in r.trace["traceEvents"] if e["ph"] == "X"]
    assert {e["tid"] for e in spans} == {0, 1, 2, 3}
    assert all(e["dur"] >= 0 and e["ts"] >= 0 for e in spans)
    json.dumps(r.trace)


def test_candidates_are_all_valid_and_cover_both_families():
    names = {d.name for d in candidates(PAPER, 16)}
    assert {"ep16", "tp8pp2", "ep8pp2", "single", "pp16"} <= names
    assert "tp16" not in {d.name for d in candidates(PAPER.with_(n_heads=8, n_kv_heads=8), 16)}


def test_planner_returns_only_deployments_that_fit_and_meet_the_slo():
    base = Scenario(PAPER, Deployment(), Workload(batch_size=64, prompt_len=8000, gen_len=3), H100)
    verdicts = evaluate(base, 4, tpot_slo_s=0.07)
    assert any(not v.fits for v in verdicts)
    ranked = plan(base, 4, tpot_slo_s=0.07)
    assert ranked
    assert all(r.memory.fits and r.metrics.tpot_s <= 0.07 for r in ranked)
    assert not plan(base, 4, tpot_slo_s=0.001)  # nothing decodes 8k contexts that fast on 4 GPUs
    tps = [r.metrics.decode_tps for r in ranked]  # decode by default: issue 16 section 3
    assert tps == sorted(tps, reverse=True)


def test_cli_simulate_writes_json_and_a_trace(tmp_path, capsys):
    out = tmp_path / "out.json"
    assert main(["simulate", "--deployments", "tp8pp2,ep16", "--prompt-len", "1000", "--gen-len", "3",
                 "--json", str(out), "--trace", str(tmp_path)]) == 0
    rows = json.loads(out.read_text())
    assert [r["deployment"] for r in rows] == ["tp8pp2", "ep16"]
    assert (tmp_path / "ep16.trace.json").exists()
    printed = capsys.readouterr().out
    assert "top-2" in printed and "context up to 1003" in printed


def test_cli_sweep_writes_plots(tmp_path):
    pytest.importorskip("matplotlib")
    assert main(["simulate", "--sweep", "--max-gpus", "32", "--prompt-len", "500", "--gen-len", "2",
                 "--out", str(tmp_path)]) == 0
    assert (tmp_path / "tps.png").stat().st_size > 0 and (tmp_path / "tpot.png").stat().st_size > 0


def test_cli_plan_with_an_slo(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", "--gpus", "4", "--batch", "16", "--prompt-len", "2000", "--gen-len", "3",
                 "--tpot-slo", "50ms", "--json", str(out)]) == 0
    assert all(r["memory"]["fits"] for r in json.loads(out.read_text()))


def test_the_torch_attention_backend_pays_for_its_gathered_copy_of_the_kv_cache():
    """Decode attention over a 10k context: gathering K and V into a copy (written, then read
    again) moves 2x the cached bytes more than reading them in place, and takes longer."""
    w = Workload(batch_size=128, prompt_len=10000, gen_len=4)
    in_place = simulate(Scenario(PAPER, Deployment(ep=16), w, H100)).metrics
    gather = simulate(Scenario(PAPER, Deployment(ep=16), w, H100, attention_backend="torch")).metrics
    assert gather.tpot_s > in_place.tpot_s
    with pytest.raises(ValueError, match="attention-backend 'nope'"):
        Scenario(PAPER, Deployment(ep=16), w, H100, attention_backend="nope")
