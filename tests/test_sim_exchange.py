"""The engine's exchange choices in the simulator, with the engine's flags: `--low-latency-tokens`
and `--overlap tbo|chunks|none`; attention data-parallel size inside EP (`--attn-dp`); replicas
that share a node's network. Each against hand-computed bytes and the bound of what it removes.

Notation: the paper model (d_model 4096, 16 experts top-2, expert hidden 16384, 16 layers, bf16)
as ep16 on two 8-GPU H100 nodes: one expert per rank, 7 NVLink peers, 8 network peers."""

import argparse
import dataclasses
from collections import defaultdict

import pytest

from expertmesh.config import Workload, preset
from expertmesh.deployment import Deployment
from expertmesh.sim import cost, simulator
from expertmesh.sim.cost import Cost
from expertmesh.sim.hardware import get_profile
from expertmesh.sim.memory import scenario_memory
from expertmesh.sim.program import Exchange, stage_program
from expertmesh.sim.scenario import Scenario
from expertmesh.sim.simulator import simulate

H100 = get_profile("h100")
PAPER = preset("paper")
EP16 = Deployment(ep=16)
D, BF16, LAYERS = 4096, 2, 16
# decode of 64 sequences per rank (1024 in all) at 2k context; graphs keep the host out of the way
WIDE = Workload(batch_size=1024, prompt_len=2000, gen_len=4)
NARROW = Workload(batch_size=128, prompt_len=2000, gen_len=4)  # 8 sequences per rank


def _layer(sc: Scenario, per_rank: int, L: int, start: float):
    return stage_program(sc, 0, [((per_rank, L, start),)] * 16).layer


def _exchange(layer) -> Exchange:
    return next(p for p in layer if isinstance(p, Exchange))


def _names(layer) -> list[str]:
    return [getattr(p, "name", "exchange") for p in layer]


def test_low_latency_messages_carry_cap_rows_to_every_peer_and_no_count_exchange():
    sc = Scenario(PAPER, EP16, WIDE, H100, cuda_graphs=True)  # 64 tokens <= the default 64
    layer = _layer(sc, 64, 1, 2000)
    assert "a2a counts" not in _names(layer)
    # cap = 64 tokens x min(top-2, 1 expert per rank) rows to every peer, each with its 1 count
    per_peer = 64 * 1 * D * BF16 + 1 * 4
    dispatch = _exchange(layer).dispatch[0]
    assert dispatch.nvlink_bytes == pytest.approx(7 * per_peer)
    assert dispatch.network_bytes == pytest.approx(8 * per_peer)
    standard = dataclasses.replace(sc, low_latency_tokens=0)
    std_layer = _layer(standard, 64, 1, 2000)
    assert "a2a counts" in _names(std_layer)
    # the real rows: 64 tokens x 2 assignments x 1/16 to each network peer
    assert _exchange(std_layer).dispatch[0].network_bytes == pytest.approx(8 * 64 * 2 / 16 * D * BF16)


def test_low_latency_tokens_saves_at_most_what_it_removes_and_loses_to_padding_when_wide():
    """8 tokens per rank: dropping the count exchange (a collective and a host sync) per layer
    wins; 64 tokens per rank with one expert per rank: every message carries 64 rows where 8 are
    real, and the standard exchange wins."""
    for workload, per_rank, low_wins in ((NARROW, 8, True), (WIDE, 64, False)):
        low = Scenario(PAPER, EP16, workload, H100, cuda_graphs=True)
        std = dataclasses.replace(low, low_latency_tokens=0)
        t_low, t_std = simulate(low).metrics.tpot_s, simulate(std).metrics.tpot_s
        assert (t_low < t_std) is low_wins
        layer = _layer(std, per_rank, 1, 2000)
        counts = next(p for p in layer if getattr(p, "name", "") == "a2a counts")
        ex = _exchange(layer)
        removed = (max(c.seconds for c in counts.costs) + max(c.seconds for c in ex.dispatch)
                   + max(c.seconds for c in ex.combine) + H100.launch_s)  # + the graph relaunch
        assert t_std - t_low <= LAYERS * removed


def _exchange_seconds(sc: Scenario, per_rank: int, L: int, start: float) -> float:
    """The exchange's seconds of a step (dispatch + combine, slowest rank, every layer) with no
    overlap."""
    ex = _exchange(_layer(dataclasses.replace(sc, overlap="none"), per_rank, L, start))
    return LAYERS * (max(c.seconds for c in ex.dispatch) + max(c.seconds for c in ex.combine))


def test_two_batch_overlap_hides_at_most_the_smaller_of_exchange_and_compute_in_decode():
    none = Scenario(PAPER, EP16, WIDE, H100, cuda_graphs=True, overlap="none")
    tbo = dataclasses.replace(none, overlap="tbo")
    t_none, t_tbo = simulate(none).metrics.tpot_s, simulate(tbo).metrics.tpot_s
    exchange = _exchange_seconds(none, 64, 1, 2000)
    assert 0 < t_none - t_tbo <= min(exchange, t_none - exchange)


def test_two_batch_overlap_needs_an_exchange_without_host_syncs():
    """The standard exchange's count read makes the host wait for everything queued, the other
    micro-batch's work too: nothing is left to overlap, and each half pays its own syncs."""
    none = Scenario(PAPER, EP16, WIDE, H100, cuda_graphs=True, overlap="none", low_latency_tokens=0)
    assert simulate(dataclasses.replace(none, overlap="tbo")).metrics.tpot_s >= simulate(none).metrics.tpot_s


def test_two_batch_overlap_costs_a_second_read_of_the_weights_when_the_exchange_is_small():
    """8 sequences per rank: the exchange is a small part of a step, and each micro-batch reads
    the expert and attention weights again; TBO is slower, by at most that second read."""
    none = Scenario(PAPER, EP16, NARROW, H100, cuda_graphs=True, overlap="none")
    tbo = dataclasses.replace(none, overlap="tbo")
    t_none, t_tbo = simulate(none).metrics.tpot_s, simulate(tbo).metrics.tpot_s
    assert t_tbo > t_none
    expert = 2 * D * 16384 * BF16          # the rank's one expert, two matrices
    attention = 4 * D * 32 * 128 * BF16    # q, k, v, o
    reread = LAYERS * (expert + attention) / (H100.hbm_bw * H100.hbm_efficiency)
    assert t_tbo - t_none <= reread


def test_two_batch_overlap_hides_prefill_exchange_within_the_same_bound():
    w = Workload(batch_size=32, prompt_len=1000, gen_len=1)  # two sequences per rank, one per half
    none = Scenario(PAPER, EP16, w, H100, overlap="none")
    tbo = dataclasses.replace(none, overlap="tbo")
    t_none, t_tbo = simulate(none).metrics.ttft_s, simulate(tbo).metrics.ttft_s
    exchange = _exchange_seconds(none, 2, 1000, 0)
    assert 0 < t_none - t_tbo <= min(exchange, t_none - exchange)


def test_a_lone_prompt_per_rank_gains_nothing_from_two_batch_overlap():
    """The engine cuts between sequences: one sequence per rank leaves the second half empty."""
    w = Workload(batch_size=16, prompt_len=2000, gen_len=1)
    none = Scenario(PAPER, EP16, w, H100, overlap="none")
    assert simulate(dataclasses.replace(none, overlap="tbo")).metrics.ttft_s >= simulate(none).metrics.ttft_s


def test_halves_split_whole_sequences_as_the_engine_does():
    a, b = simulator.halves([((5, 1, 100),), ((1, 9, 0),), ((2.5, 1, 50),)])
    assert a == [((3, 1, 100),), ((1, 9, 0),), ((1.25, 1, 50),)]
    assert b == [((2, 1, 100),), ((0, 9, 0),), ((1.25, 1, 50),)]


def test_no_overlap_waits_for_each_chunk_before_the_next():
    busy = [dict.fromkeys(("compute", "hbm", "launch", "nvlink", "network"), 0.0)]
    task = simulator.StageTask(1, 1.0, busy, None, 0.0, False)
    chunks = Exchange((Cost(1.0, "network"),), (Cost(2.0, "compute"),), (Cost(1.0, "network"),), 2,
                      overlapped=False)
    # D0 [0,1] E0 [1,3] R0 [3,4] D1 [4,5] E1 [5,7] R1 [7,8]; overlapped it ends at 6
    assert task.play([chunks], [0.0], [0.0])[0] == [8.0]
    assert task.play([dataclasses.replace(chunks, overlapped=True)], [0.0], [0.0])[0] == [6.0]


def test_overlap_is_validated_with_the_engine_flag_name():
    with pytest.raises(ValueError, match="--overlap 'both'; use one of: auto, tbo, chunks, none"):
        Scenario(PAPER, EP16, NARROW, H100, overlap="both")


def test_attention_groups_split_heads_and_pay_a_reduce_scatter_and_all_gather():
    """ep16 with attention DP 4: groups of 4 ranks; each runs attention over the group's 4 x 8
    sequences with 8 of the 32 heads, and moves the group's [32, D] before and after the MoE."""
    plain = Scenario(PAPER, EP16, NARROW, H100)
    split = dataclasses.replace(plain, attn_dp=4)
    assert split.attn_tp == 4 and split.name == "ep16 (attn dp4 x tp4)"
    layer = _layer(split, 8, 1, 2000)
    names = _names(layer)
    assert names.index("attention reduce-scatter") < names.index("router")
    assert names[-1] == "attention all-gather"
    group = list(range(4))
    rs = layer[names.index("attention reduce-scatter")].costs[0]
    ring = cost.all_reduce(H100, split.topology, group, 32 * D * BF16)
    assert rs.seconds == pytest.approx(ring.seconds / 2)  # its launch is host time on a GPU
    # FLOPs of a rank's attention: q, k, v, o GEMMs over 32 tokens at 8 heads x 128, and the
    # causal core over 32 sequences x 2001 cached positions
    h_d = 8 * 128
    flops = 4 * 2 * 32 * h_d * D + 4 * 8 * 128 * 32 * 2001
    attention = layer[names.index("attention")].costs[0]
    assert attention.flops == pytest.approx(flops)
    # memory: 3/4 of each layer's attention weights go; the KV cache stays (4x sequences, 1/4 heads)
    mp, ms = scenario_memory(plain), scenario_memory(split)
    assert mp.weights_bytes - ms.weights_bytes == 16 * 3 / 4 * 4 * D * 32 * 128 * BF16
    assert ms.kv_bytes == mp.kv_bytes


def test_attention_groups_of_a_later_pipeline_stage_stay_inside_it():
    sc = Scenario(PAPER, Deployment(ep=8, pp=2), NARROW, H100, attn_dp=2)
    layer = stage_program(sc, 1, [((16, 1, 2000),)] * 8).layer
    rs = layer[_names(layer).index("attention reduce-scatter")].costs
    # groups {8..11} and {12..15}, each inside a node: NVLink only, the group's 64 tokens
    assert all(c.network_bytes == 0 for c in rs)
    assert rs[0].nvlink_bytes == pytest.approx(cost.all_gather(H100, sc.topology, [8, 9, 10, 11],
                                                               64 * D * BF16).nvlink_bytes)
    assert simulate(sc).metrics.tpot_s > 0


def test_attn_dp_is_validated_with_a_one_line_fix():
    with pytest.raises(ValueError, match=r"--attn-dp 3 must divide ep=16 .* use one of 1, 2, 4, 8, 16"):
        Scenario(PAPER, EP16, NARROW, H100, attn_dp=3)
    with pytest.raises(ValueError, match="--attn-dp acts on expert-parallel deployments only"):
        Scenario(PAPER, Deployment(tp=8, pp=2), NARROW, H100, attn_dp=4)


def test_replicas_that_span_nodes_share_the_nodes_network_ports():
    four_nics = H100.with_(nics_per_node=4)
    w = Workload(batch_size=128, prompt_len=2000, gen_len=4)
    # 4 replicas of ep4 on 2 nodes: none spans nodes, nobody uses the network
    ep4 = Scenario(PAPER, Deployment(ep=4), w, four_nics, gpus=16)
    assert ep4.network_users(0) == 0 and ep4.net_bw_per_gpu == H100.net_bw
    # ep16: the 8 GPUs of a node send at once through 4 ports: 50 x 4 / 8 GB/s each
    ep16 = Scenario(PAPER, EP16, w, four_nics)
    assert ep16.network_users(0) == 8 and ep16.net_bw_per_gpu == pytest.approx(25e9)
    assert simulate(ep16).metrics.tpot_s > simulate(dataclasses.replace(ep16, hardware=H100)).metrics.tpot_s
    # 2 replicas of tp4pp3 (12 ranks) on 3 nodes: the middle node holds the end of one and the
    # start of the other, both spanning nodes; alone, the first replica uses 4 GPUs there
    tp4pp3 = Deployment(tp=4, pp=3)
    two = Scenario(PAPER, tp4pp3, w, four_nics, gpus=24)
    one = Scenario(PAPER, tp4pp3, w, four_nics, gpus=12)
    assert two.network_users(1) == 8 and one.network_users(1) == 4
    assert "4 network ports" in two.sharing() and "(shared)" in two.sharing()


def test_replicas_on_a_cpu_host_share_its_cores():
    cpu = H100.with_(launch_overlaps=False, compute_slots=2, gpus_per_node=4)
    w = Workload(batch_size=8, prompt_len=16, gen_len=2)
    one = Scenario(preset("tiny"), Deployment(ep=2), w, cpu, gpus_per_node=4)
    two = dataclasses.replace(one, gpus=4)
    assert simulator.host_sharing(one) == 1.0 and simulator.host_sharing(two) == 2.0
    # a pipeline of 2 stages with 2 micro-batches keeps 2 x 2 / 3 ranks busy on average
    pp = Scenario(preset("tiny"), Deployment(pp=2), w, cpu.with_(compute_slots=1), gpus_per_node=4)
    assert simulator.host_sharing(pp) == pytest.approx(4 / 3)


def _cli(*argv):
    from expertmesh.sim.cli import add_commands
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(required=True))
    args = parser.parse_args(list(argv))
    return args.func(args)


def test_simulate_takes_the_engine_flags_and_says_what_each_deployment_assumes(capsys):
    assert _cli("simulate", "--deployments", "tp8pp2,ep16", "--attn-dp", "4", "--overlap", "tbo",
                "--low-latency-tokens", "16", "--nics-per-node", "4", "--prompt-len", "1000",
                "--gen-len", "3") == 0
    out = capsys.readouterr().out
    assert "ep16 (attn dp4 x tp4)" in out
    assert "--overlap tbo: two-batch overlap" in out
    assert "at most 16 tokens per EP rank" in out
    assert "4 network ports" in out
    with pytest.raises(ValueError, match="none of tp8pp2 has an EP axis"):
        _cli("simulate", "--deployments", "tp8pp2", "--attn-dp", "4")


def test_both_halves_of_a_two_batch_forward_take_the_larger_halfs_exchange():
    """Rank 0 prefills 1,000 tokens, rank 1 decodes 4: the second half alone (2 decode tokens a
    rank) would take the low-latency exchange, but the engine plans both halves from the larger
    (`ExchangeChoice`): the standard exchange, its count exchange included."""
    sc = Scenario(PAPER, Deployment(ep=2), Workload(batch_size=2, prompt_len=100, gen_len=2), H100, overlap="tbo")
    work = [((1, 1000, 0.0),), ((4, 1, 100.0),)]
    a, b = simulator.halves(work)
    names = _names(stage_program(sc, 0, b, plan_work=a).layer)
    assert "a2a counts" in names and names == _names(stage_program(sc, 0, a).layer)
    task = simulator.StageTask(2, 1.0, [defaultdict(float) for _ in range(2)], None, 0.0, False)
    assert simulator.stage_seconds(sc, 0, work, task) > 0  # was an AttributeError: the halves' layers differed
