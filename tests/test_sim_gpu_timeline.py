"""Host and device timelines, CUDA graphs, NCCL algorithm choice, low-latency all-to-all, FP8,
memory at peak: the simulator's section-2 behaviours against hand-computed cases."""

import dataclasses

import pytest

from expertmesh.config import Workload, preset
from expertmesh.deployment import Deployment
from expertmesh.sim import cost, simulator
from expertmesh.sim.cost import Cost
from expertmesh.sim.hardware import get_profile
from expertmesh.sim.memory import scenario_memory
from expertmesh.sim.program import Phase, stage_program
from expertmesh.sim.scenario import Scenario
from expertmesh.sim.simulator import simulate
from expertmesh.topology import Topology

H100 = get_profile("h100")
PAPER = preset("paper")
SHORT = Workload(batch_size=128, prompt_len=1000, gen_len=4)


def _play(phases, launch_s=0.0, graphs=False) -> float:
    busy = [dict.fromkeys(cost.RESOURCES, 0.0)]
    task = simulator.StageTask(1, 1.0, busy, None, launch_s, graphs)
    dev, _ = task.play(phases, [0.0], [launch_s if graphs else 0.0])
    return dev[0]


def _ops(host_s: float, sync_first: bool = False) -> list[Phase]:
    return [Phase("a", (Cost(1.0, "compute", host_s=host_s),), sync=sync_first, host_sync=sync_first),
            Phase("b", (Cost(1.0, "compute", host_s=host_s),))]


def test_launches_hide_behind_queued_device_work():
    # host issues a at 0.5 and b at 1.0; the device runs a [0.5, 1.5], b [1.5, 2.5]
    assert _play(_ops(0.5)) == pytest.approx(2.5)


def test_a_step_is_bounded_by_the_host_when_launches_outlast_the_work():
    # a launched at 2 runs [2, 3]; b launched at 4 runs [4, 5]
    assert _play(_ops(2.0)) == pytest.approx(5.0)


def test_a_host_sync_drains_the_queue_so_the_next_launch_is_exposed():
    # a [0.5, 1.5]; the host waits until 1.5, launches b by 2.0, b runs [2.0, 3.0]
    assert _play(_ops(0.5, sync_first=True)) == pytest.approx(3.0)


def test_cuda_graphs_replace_per_op_launches_by_one_per_stretch():
    # one graph launch (0.1) then a and b back to back
    assert _play(_ops(0.5), launch_s=0.1, graphs=True) == pytest.approx(2.1)


def test_cuda_graphs_shorten_decode_and_stay_above_the_bound():
    for name in ("tp8pp2", "ep16"):
        base = Scenario(PAPER, Deployment.parse(name), SHORT, H100)
        eager, graphs = simulate(base), simulate(dataclasses.replace(base, cuda_graphs=True))
        assert graphs.metrics.tpot_s < eager.metrics.tpot_s
        assert graphs.metrics.tpot_s >= graphs.bound.tpot_s
        assert graphs.metrics.ttft_s == pytest.approx(eager.metrics.ttft_s)  # prefill runs eager


def test_all_reduce_picks_the_algorithm_nccl_would_for_the_size():
    assert cost.all_reduce_algorithm(H100, 1024, 8)[0] == "LL"
    assert cost.all_reduce_algorithm(H100, 16 * 2**20, 8)[0] == "tree"
    assert cost.all_reduce_algorithm(H100, 2**30, 8)[0] == "NVLS"
    assert cost.all_reduce_algorithm(H100, 2**30, 2)[0] == "ring"  # NVLS gains only with more GPUs
    sizes = [2**k for k in range(8, 34, 2)]
    times = [cost.all_reduce(H100, Topology(1, 8), list(range(8)), s).seconds for s in sizes]
    assert times == sorted(times)


def test_small_all_to_all_pays_one_collective_latency_not_one_per_peer():
    send = [[0.0 if i == j else 8.0 for j in range(8)] for i in range(8)]
    c = max(x.seconds for x in cost.all_to_all(H100, Topology(1, 8), list(range(8)), send))
    assert c == pytest.approx(cost.collective_latency(H100, 8) + 56 / (H100.nvlink_bw * H100.nvlink_efficiency))


def test_forwards_under_the_low_latency_threshold_drop_the_count_exchange_and_host_sync():
    """As the engine's --low-latency-tokens: decode (8 tokens per rank) takes the low-latency
    exchange, a 1000-token prefill the standard one; 0 never takes it."""
    sc = Scenario(PAPER, Deployment(ep=16), SHORT, H100)

    def names(sc, L):
        return [getattr(p, "name", "exchange") for p in stage_program(sc, 0, [((8, L, 0),)] * 16).layer]
    assert "a2a counts" not in names(sc, 1) and "exchange" in names(sc, 1)
    assert "a2a counts" in names(sc, 1000)
    assert "prefill steps" in sc.host_syncs and "decode" not in sc.host_syncs
    never = dataclasses.replace(sc, low_latency_tokens=0)
    assert "a2a counts" in names(never, 1)
    assert "prefill and decode" in never.host_syncs
    everything = dataclasses.replace(sc, low_latency_tokens=8000)
    assert "a2a counts" not in names(everything, 1000) and "none inside a step" in everything.host_syncs
    with pytest.raises(ValueError, match="a2a kernel"):
        dataclasses.replace(sc, a2a_kernel="deepep")
    with pytest.raises(ValueError, match="low-latency-tokens -1 must be >= 0"):
        dataclasses.replace(sc, low_latency_tokens=-1)


def test_fp8_halves_weight_and_kv_bytes_and_needs_an_fp8_profile():
    base = Scenario(PAPER, Deployment(ep=16), SHORT, H100)
    fp8 = dataclasses.replace(base, fp8=True)
    assert scenario_memory(fp8).weights_bytes * 2 == scenario_memory(base).weights_bytes
    assert scenario_memory(fp8).kv_bytes * 2 == scenario_memory(base).kv_bytes
    assert simulate(fp8).metrics.tpot_s < simulate(base).metrics.tpot_s
    with pytest.raises(ValueError, match="FP8"):
        dataclasses.replace(base, hardware=get_profile("a100"), fp8=True)


def test_memory_counts_the_permuted_prefill_rows_buffers_and_reserve():
    sc = Scenario(PAPER, Deployment(ep=16), SHORT, H100)
    mem = scenario_memory(sc)
    t = 8 * 1000                 # the rank's 8 sequences x 1000 prompt tokens
    rows = t * 2                 # top-2 rows; uniform routing sends a rank 1/16 of each of 16 ranks'
    moe = rows * (2 * 4096 + 16384)        # rows in and out [N, D] and the MLP hidden [N, H]
    attention = t * (2 * 32 + 2 * 32) * 128
    assert mem.activation_bytes == pytest.approx((2 * t * 4096 + max(moe, attention)) * 2)
    assert mem.buffer_bytes == pytest.approx(2 * rows * 4096 * 2)
    assert mem.reserve_bytes == pytest.approx(0.1 * H100.hbm_bytes)
    assert mem.total_bytes == pytest.approx(mem.weights_bytes + mem.kv_bytes + mem.activation_bytes
                                            + mem.buffer_bytes + mem.reserve_bytes)


def test_prefill_and_decode_micro_batches_are_separate():
    base = Scenario(PAPER, Deployment(tp=8, pp=2), SHORT, H100)
    more_decode = dataclasses.replace(base, decode_micro=4)
    assert more_decode.micro_batches(True) == 2 and more_decode.micro_batches(False) == 4
    a, b = simulate(base), simulate(more_decode)
    assert a.metrics.ttft_s == pytest.approx(b.metrics.ttft_s)
    assert a.metrics.tpot_s != pytest.approx(b.metrics.tpot_s)
