"""Cost-model arithmetic against hand-computed cases."""

import math

import pytest

from expertmesh.sim import cost
from expertmesh.sim.hardware import HardwareProfile
from expertmesh.sim.routing import Routing
from expertmesh.topology import Topology


def profile(**changes) -> HardwareProfile:
    base = dict(name="test", bf16_flops=1e12, fp32_flops=5e11, hbm_bytes=1e10, hbm_bw=1e11,
                nvlink_bw=1e10, net_bw=1e9, nvlink_latency_s=1e-6, net_latency_s=1e-5,
                gpus_per_node=2, launch_s=0.0, gemm_peak_efficiency=1.0, gemm_half_tokens=1e-9,
                hbm_efficiency=1.0)
    return HardwareProfile(**{**base, **changes})


def test_large_gemm_is_compute_bound_at_peak():
    c = cost.gemm(profile(), "bf16", 2, 1000, 1000, 1000)
    assert c.flops == 2e9
    assert c.hbm_bytes == 3e6 * 2
    assert c.seconds == pytest.approx(2e9 / 1e12)
    assert c.resource == "compute"


def test_one_row_gemm_reads_its_weight_from_memory():
    c = cost.gemm(profile(), "bf16", 2, 1, 4096, 4096)
    assert c.resource == "hbm"
    assert c.seconds == pytest.approx((4096 * 4096 + 2 * 4096) * 2 / 1e11)


def test_gemm_efficiency_halves_at_half_tokens():
    hw = profile(gemm_half_tokens=64.0, gemm_peak_efficiency=0.8)
    assert cost.gemm_efficiency(hw, 64) == pytest.approx(0.4)


def test_launch_adds_on_cpu_and_is_host_time_on_gpu():
    cpu = cost.gemm(profile(launch_s=1e-3, launch_overlaps=False), "bf16", 2, 1000, 1000, 1000)
    gpu = cost.gemm(profile(launch_s=1e-3, launch_overlaps=True), "bf16", 2, 1000, 1000, 1000)
    assert cpu.seconds == pytest.approx(2e-3 + 1e-3) and cpu.host_s == 0
    assert gpu.seconds == pytest.approx(2e-3) and gpu.host_s == pytest.approx(1e-3)


def test_decode_attention_reads_the_kv_cache():
    b, S, g, d = 2, 100, 4, 64
    c = cost.attention(profile(), "bf16", 2, b, 1, S - 1, g, g, d)
    kv = 2 * b * S * g * d * 2
    q_and_out = 2 * b * 1 * g * d * 2
    assert c.hbm_bytes == kv + q_and_out
    assert c.seconds == pytest.approx((kv + q_and_out) / 1e11)
    assert c.flops == 4 * g * d * b * S


def test_prefill_attention_flops_grow_with_the_square_of_the_prompt():
    one = cost.attention(profile(), "bf16", 2, 1, 1000, 0, 8, 8, 64).flops
    two = cost.attention(profile(), "bf16", 2, 1, 2000, 0, 8, 8, 64).flops
    assert two / one == pytest.approx(4, rel=1e-2)


def test_ring_all_reduce_without_published_curves():
    hw = profile(gpus_per_node=4)
    c = cost.all_reduce(hw, Topology(nodes=1, gpus_per_node=4), [0, 1, 2, 3], 8e6)
    assert c.seconds == pytest.approx(6 * 1e-6 + 1.5 * 8e6 / 1e10)
    assert c.nvlink_bytes == pytest.approx(1.5 * 8e6)


def test_all_to_all_across_two_nodes_is_limited_by_the_slower_link_class():
    hw = profile()
    topo = Topology(nodes=2, gpus_per_node=2)
    send = [[0 if i == j else 1e6 for j in range(4)] for i in range(4)]
    costs = cost.all_to_all(hw, topo, [0, 1, 2, 3], send)
    nv = 1 * 1e-6 + 1e6 / 1e10
    net = 2 * 1e-5 + 2e6 / 1e9
    assert all(c.seconds == pytest.approx(max(nv, net)) for c in costs)
    assert costs[0].network_bytes == 2e6 and costs[0].nvlink_bytes == 1e6


def test_all_to_all_with_uneven_splits_takes_what_each_rank_receives():
    hw = profile()
    topo = Topology(nodes=1, gpus_per_node=2)
    costs = cost.all_to_all(hw, topo, [0, 1], [[0, 1e3], [5e6, 0]])
    expected = 1e-6 + 5e6 / 1e10  # both ranks wait for the larger direction of their link
    assert costs[0].seconds == pytest.approx(expected) and costs[1].seconds == pytest.approx(expected)


def test_hierarchical_all_to_all_sends_fewer_network_messages():
    hw = profile(net_latency_s=1e-3)
    topo = Topology(nodes=2, gpus_per_node=2)
    send = [[0 if i == j else 1.0 for j in range(4)] for i in range(4)]
    flat = max(c.seconds for c in cost.all_to_all(hw, topo, [0, 1, 2, 3], send))
    hier = max(c.seconds for c in cost.hierarchical_all_to_all(hw, topo, [0, 1, 2, 3], send))
    assert hier < flat


def test_zipf_routing_is_skewed_capped_and_sums_to_one():
    shares = Routing("zipf", 2.0).shares(16, 2)
    assert math.isclose(sum(shares), 1.0)
    assert max(shares) <= 0.5 + 1e-12
    assert shares[0] > shares[-1]
    assert Routing().shares(16, 2) == [1 / 16] * 16


def test_profiles_round_trip_through_json(tmp_path):
    hw = profile(compute_slots=2, launch_overlaps=False)
    hw.save(tmp_path / "p.json")
    assert HardwareProfile.load(tmp_path / "p.json") == hw


def test_topology_places_ranks_node_by_node():
    topo = Topology.for_gpus(20, 8)
    assert topo.nodes == 3 and topo.node_of(7) == 0 and topo.node_of(8) == 1
    with pytest.raises(ValueError, match="outside"):
        topo.node_of(24)


def test_grouped_gemm_reads_the_weights_of_the_experts_expected_to_be_used():
    hw = profile()
    all_used = cost.grouped_gemm(hw, "bf16", 2, (0.5, 0.5), 8, 4)
    half = cost.grouped_gemm(hw, "bf16", 2, (0.5, 0.5), 8, 4, (0.5, 0.5))
    assert all_used.hbm_bytes - half.hbm_bytes == pytest.approx(1 * 8 * 4 * 2)  # one weight fewer


def test_one_token_of_a_top2_model_reads_two_experts_weights():
    from expertmesh.config import Workload, preset
    from expertmesh.deployment import Deployment
    from expertmesh.sim import program
    from expertmesh.sim.hardware import get_profile
    from expertmesh.sim.scenario import Scenario

    sc = Scenario(preset("paper"), Deployment(), Workload(batch_size=1, prompt_len=8, gen_len=2),
                  get_profile("h100"))
    c = program._experts(sc, [2 / 16] * 16, 1.0)
    weights = 2 * 2 * 16384 * 4096 * 2            # 2 experts x (up, down) x [H, D] in bf16
    rows = 2 * 2 * (4096 + 16384) * 2             # 2 rows in and out of both GEMMs
    activation = 2 * 16384 * 2 * 2                # gelu over [2, H], read and written
    assert c.hbm_bytes == pytest.approx(weights + rows + activation)
