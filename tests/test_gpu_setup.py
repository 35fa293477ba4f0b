"""What a GPU node decides before and while its ranks start, checked on the CPU with the figures a
GPU node reports: where the ranks run, which interface gloo binds, NCCL's diagnostics, the groups'
timeouts, the KV pool's size from free memory, and whether compare's reference fits one GPU."""

import functools

import pytest
import torch
import torch.distributed as dist

from expertmesh import launch as launch_mod
from expertmesh.cli import reference_refusal
from expertmesh.config import Workload, preset
from expertmesh.deployment import Deployment
from expertmesh.engine.engine import Engine
from expertmesh.engine.kv_budget import activation_reserve, kv_blocks_from_memory
from expertmesh.engine.scheduler import EngineConfig
from expertmesh.engine.spec import RunSpec
from expertmesh.launch import launch, local_plan, torchrun_device
from expertmesh.model.transformer import reference_model
from expertmesh.parallel.mesh import stage_group
from expertmesh.rank_env import gloo_interface, nccl_diagnostic_defaults

GIB = 2**30


# ---- where the ranks run ----
@pytest.mark.parametrize("world, backend, gpus, plan", [
    (1, None, 0, ("cpu", "gloo")),     # a CPU machine: as before
    (4, None, 0, ("cpu", "gloo")),
    (1, None, 8, ("cuda", "nccl")),    # `single` on a GPU node runs on cuda:0
    (8, None, 8, ("cuda", "nccl")),    # one GPU and NCCL per local rank
    (4, "gloo", 8, ("cpu", "gloo")),   # asked for: CPU ranks even on a GPU node
])
def test_local_ranks_get_one_gpu_each_or_the_cpu(world, backend, gpus, plan):
    assert local_plan(world, backend, gpus) == plan


def test_too_few_gpus_for_the_local_ranks_is_refused_in_one_line():
    with pytest.raises(ValueError, match="16 local ranks need 16 GPUs .* has 8; .*torchrun.*--backend gloo"):
        local_plan(16, None, 8)
    with pytest.raises(ValueError, match="--backend nccl needs CUDA GPUs"):
        local_plan(2, "nccl", 0)


def test_the_cli_refuses_too_few_gpus_before_any_rank_starts(monkeypatch, capsys):
    from expertmesh.cli import main
    monkeypatch.setattr(launch_mod, "cuda_devices", lambda: 8)
    assert main(["run", "--deployment", "ep16", "--gen-len", "2"]) == 2
    assert "16 local ranks need 16 GPUs" in capsys.readouterr().err


@pytest.mark.parametrize("local_rank, gpus, index", [(5, 8, 5), (5, 1, 0), (9, 8, 1)])
def test_a_torchrun_rank_takes_gpu_local_rank_modulo_the_visible_count(monkeypatch, local_rank, gpus, index):
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    assert torchrun_device("nccl", gpus) == torch.device("cuda", index)  # SLURM: one visible GPU
    assert torchrun_device("gloo", gpus) == torch.device("cpu")


# ---- the interface gloo binds ----
HOST = {"127.0.0.1": "lo", "10.1.0.7": "eth0", "192.168.5.7": "ib0"}
TWO_NODES = {"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8", "MASTER_ADDR": "node0"}


def _route(ip):
    return lambda host: ip


@pytest.mark.parametrize("env, route, expected", [
    ({**TWO_NODES, "GLOO_SOCKET_IFNAME": "bond0"}, "10.1.0.7", "bond0"),     # the user's choice
    ({**TWO_NODES, "NCCL_SOCKET_IFNAME": "ib0"}, "10.1.0.7", "ib0"),         # NCCL's network
    ({**TWO_NODES, "NCCL_SOCKET_IFNAME": "=ib0,ib1"}, "10.1.0.7", "ib0"),
    ({**TWO_NODES, "NCCL_SOCKET_IFNAME": "^docker"}, "10.1.0.7", "eth0"),     # an exclusion: route
    (TWO_NODES, "192.168.5.7", "ib0"),                                        # the route to the master
    ({"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "8", "MASTER_ADDR": "127.0.0.1"}, "127.0.0.1", "lo"),
    ({"WORLD_SIZE": "8", "MASTER_ADDR": "localhost"}, None, "lo"),          # one node, no route
    ({**TWO_NODES, "MASTER_ADDR": "127.0.0.1"}, "127.0.0.1", "lo"),          # two "nodes" on one host
    ({**TWO_NODES, "MASTER_ADDR": "localhost"}, "127.0.0.1", "lo"),
])
def test_gloo_binds_the_interface_of_the_network_between_the_ranks(env, route, expected):
    assert gloo_interface(env, _route(route), HOST) == expected


def test_a_multi_node_run_never_binds_loopback():
    env = {**TWO_NODES, "MASTER_ADDR": "node0"}  # /etc/hosts on node0: node0 -> 127.0.1.1
    with pytest.raises(ValueError, match="reached through lo on this node, but the run spans nodes; set GLOO_SOCKET_IFNAME"):
        gloo_interface(env, _route("127.0.0.1"), HOST)
    with pytest.raises(ValueError, match="no known interface"):
        gloo_interface(TWO_NODES, _route(None), HOST)


def test_nccl_diagnostics_are_defaults_the_user_can_override():
    added = nccl_diagnostic_defaults({"TORCH_NCCL_DUMP_ON_TIMEOUT": "0"})
    assert "TORCH_NCCL_DUMP_ON_TIMEOUT" not in added
    assert added["TORCH_NCCL_TRACE_BUFFER_SIZE"] == added["TORCH_FR_BUFFER_SIZE"] != "0"


# ---- every group is bounded by --timeout ----
def _group_timeouts(device) -> list[float]:
    """Seconds of the default group, a stage group, its twin (absent under gloo) and the engine's
    control group, as the gloo backend of each holds them."""
    cfg = preset("tiny")
    group = stage_group(Deployment.parse("ep2"), dist.get_rank())
    engine = Engine(reference_model(cfg), cfg, Deployment.parse("ep2"), EngineConfig(num_blocks=4),
                    dist.get_rank())
    groups = [dist.group.WORLD, group] + ([engine.group] if engine.group is not None else [])
    return [g._get_backend(torch.device("cpu")).options._timeout.total_seconds() for g in groups]


def test_every_group_gets_the_runs_timeout():
    assert launch(_group_timeouts, 2, timeout=37) == [37.0, 37.0]


# ---- the KV pool from free device memory ----
def test_kv_blocks_are_what_the_utilization_leaves_after_weights_and_activations():
    # An H100 as torch.cuda.mem_get_info reports it, with 40 GiB of weights loaded.
    total, weights, reserve, per_block = 79 * GIB + 2**29, 40 * GIB, 3 * GIB, 2 * 2**20
    free = total - weights - GIB // 2  # the CUDA context holds half a GiB more
    budget = 0.9 * total - weights - GIB // 2 - reserve
    assert kv_blocks_from_memory(free, total, weights, reserve, per_block, 0.9) == int(budget // per_block)
    assert kv_blocks_from_memory(free, total, weights, reserve, per_block, 0.95) > int(budget // per_block)


def test_no_room_for_a_block_is_one_line_with_the_figures():
    total = 80 * GIB
    with pytest.raises(ValueError, match=r"weights take 70.0 GiB, other allocations 8.0 GiB.*raise --gpu-memory-utilization"):
        kv_blocks_from_memory(2 * GIB, total, 70 * GIB, GIB, 2**20, 0.9)


def test_the_activation_reserve_grows_with_the_step_budget_and_expert_parallelism():
    cfg = preset("paper")
    one = activation_reserve(cfg, Deployment(), 512, 64)
    assert activation_reserve(cfg, Deployment(), 1024, 64) > one
    assert activation_reserve(cfg, Deployment.parse("ep8"), 512, 64) > one
    # 512 tokens x top-2 through a 16384-wide expert in bf16: far below a GiB, above 30 MiB
    assert 30 * 2**20 < one < GIB


def test_explicit_sizes_still_override_the_memory_rule():
    from expertmesh.engine.engine import pool_blocks
    cfg = preset("tiny")
    assert pool_blocks(cfg, Deployment(), EngineConfig(num_blocks=7, kv_cache_gb=2.0), torch.device("meta")) == 7
    assert (pool_blocks(cfg, Deployment(), EngineConfig(kv_cache_gb=0.5))
            == pool_blocks(cfg, Deployment(), EngineConfig()) // 2)  # the CPU's default: 1 GiB


# ---- compare's reference on one GPU ----
def test_compare_refuses_a_reference_that_does_not_fit_one_gpu():
    spec = RunSpec(preset("paper"), Deployment(), Workload(batch_size=16, prompt_len=32, gen_len=16))
    l40s, h100 = 44.4 * GIB, 79.6 * GIB  # the paper model's 66.5 GiB of bf16 weights: not on an L40S
    refusal = reference_refusal(spec, free=int(l40s - GIB), total=int(l40s))
    assert refusal and "weights 66.5" in refusal and "one GPU gives 39.0 GiB" in refusal
    assert reference_refusal(spec, free=int(h100 - GIB), total=int(h100)) is None
    assert reference_refusal(spec, free=int(h100 - 10 * GIB), total=int(h100))  # 10 GiB held elsewhere


def test_single_runs_on_cuda_zero_where_there_is_a_gpu(monkeypatch):
    monkeypatch.setattr(launch_mod, "cuda_devices", lambda: 8)
    assert launch_mod.local_device(1, None) == torch.device("cuda", 0)
    assert launch_mod.local_device(1, "gloo") == torch.device("cpu")
    monkeypatch.setattr(launch_mod, "cuda_devices", lambda: 0)
    assert launch_mod.local_device(1, None) == torch.device("cpu")


# ---- synthetic weights made where they live ----
def _naive_value(seed: int, name: str, shape: tuple, element: tuple) -> float:
    """One synthetic weight by the module docstring's rule, in plain Python integers."""
    import zlib

    def wrap(x):  # to a signed 32-bit integer
        x &= 0xFFFFFFFF
        return x - 2**32 if x >= 2**31 else x

    def mix(x):
        x = wrap(x ^ ((x >> 16) & 0xFFFF))
        x = wrap(x * 0x7FEB352D)
        x = wrap(x ^ ((x >> 15) & 0x1FFFF))
        x = wrap(x * -0x7B935975)
        return wrap(x ^ ((x >> 16) & 0xFFFF))

    linear = sum(i * int(torch.tensor(shape[d + 1:]).prod()) for d, i in enumerate(element))
    return mix(wrap(mix(linear) ^ wrap(zlib.crc32(f"{seed}:{name}".encode())))) * 2.0**-31 / shape[-1] ** 0.5


def test_synthetic_weights_hashed_in_slabs_are_the_rule_s_values(monkeypatch):
    from expertmesh.model import synthetic
    shape, index = (6, 5, 4), [[4, 1], slice(1, 5), slice(None)]
    whole = synthetic.synthetic_values(9, "layers.0.moe.w_up", shape, index)
    monkeypatch.setattr(synthetic, "SLAB_ELEMENTS", 3)  # one row of the shard per slab
    slabs = synthetic.synthetic_values(9, "layers.0.moe.w_up", shape, index)
    assert torch.equal(whole, slabs)
    for e, g in ((0, 4), (1, 1)):
        for h in range(4):
            for d in range(4):
                expected = _naive_value(9, "layers.0.moe.w_up", shape, (g, h + 1, d))
                assert slabs[e, h, d].item() == pytest.approx(expected, rel=1e-6)


# ---- --trace on a GPU times the device ----
class _StreamEvent:
    """A CUDA event as the trace uses it: recorded at the pretend stream's current time (ms)."""

    stream_ms = 0.0

    def record(self):
        self.ms = _StreamEvent.stream_ms

    def elapsed_time(self, later) -> float:
        return later.ms - self.ms


def test_trace_spans_on_a_gpu_are_device_time_not_host_enqueue(monkeypatch):
    from expertmesh import trace
    synced = []
    monkeypatch.setattr(trace, "DeviceClock", functools.partial(
        trace.DeviceClock, event=_StreamEvent, synchronize=lambda: synced.append(1)))
    trace.start_tracing(torch.device("cuda", 0))
    with trace.span("attention"):
        _StreamEvent.stream_ms += 2.5  # the kernels take 2.5 ms on the device; the host returns at once
    _StreamEvent.stream_ms += 1.0
    with trace.span("experts"):
        _StreamEvent.stream_ms += 4.0
    (a, a0, a_ns, _), (e, e0, e_ns, _) = trace.take_spans()
    assert synced and (a, e) == ("attention", "experts")
    assert (a_ns, e_ns) == (2_500_000, 4_000_000) and e0 - a0 == 3_500_000


# ---- the GEMM curve fitted to a GPU's timings ----
# One expert's up + down matmuls (d_model 4096, hidden 16384, bf16) per row count, as gpu_check
# measured them on an H200 (torch 2.11): flat at ~0.1 ms per call up to 128 rows.
H200_BF16_S = {1: 132.2e-6, 2: 105.8e-6, 4: 114.9e-6, 8: 103.4e-6, 16: 123.4e-6, 32: 114.2e-6,
               64: 111.6e-6, 128: 117.9e-6, 256: 141.2e-6, 512: 241.5e-6, 1024: 429.7e-6,
               2048: 762.9e-6, 4096: 1571.2e-6, 8192: 2974.6e-6, 16384: 5889.9e-6}


def test_the_gemm_fit_of_launch_bound_gpu_timings_is_a_real_peak():
    from expertmesh.sim.calibrate import fit_gemm
    flops = {m: 4 * m * 4096 * 16384 / s for m, s in H200_BF16_S.items()}
    peak, half = fit_gemm(flops)
    assert max(flops.values()) <= peak < 989e12  # not above the H200's dense bf16 peak (1e18 before)
    assert 64 < half < 1024


def test_the_gemm_fit_recovers_a_curve_and_keeps_a_flat_one_at_its_best():
    from expertmesh.sim.calibrate import fit_gemm
    peak, half = fit_gemm({m: 5e14 * m / (m + 200) for m in (1, 16, 256, 4096)})
    assert peak == pytest.approx(5e14) and half == pytest.approx(200)
    assert fit_gemm({m: 3e14 * (1 + 1e-3 * (m % 3)) for m in (1, 2, 4, 8)})[0] == pytest.approx(3e14, rel=1e-2)


@pytest.mark.parametrize("value", ["0", "1.5", "nan"])
def test_a_bad_gpu_memory_utilization_is_one_line_before_any_rank_starts(value, capsys):
    from expertmesh.cli import main
    assert main(["serve", "--port", "0", "--gpu-memory-utilization", value]) == 2
    assert f"gpu-memory-utilization {float(value)} must be in (0, 1]" in capsys.readouterr().err


# ---- torch 2.11 / 2.12: the engine's collectives under their older names ----
def _gather_ranks(device) -> list:
    from expertmesh.engine.messages import Messages
    return Messages(None).all_gather({"rank": dist.get_rank()})


def test_the_engine_gathers_where_torch_has_no_all_gather_single(monkeypatch):
    monkeypatch.delattr(dist, "all_gather_single")  # torch < 2.13; the forked ranks inherit it
    assert launch(_gather_ranks, 2, timeout=60) == [{"rank": 0}, {"rank": 1}]


def test_a_gpu_rank_binds_its_group_to_its_gpu_with_the_runs_timeout(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls.append((backend, kw)))
    launch_mod.init_group("nccl", None, 3, 8, 45.0, torch.device("cuda", 3))
    (_, device), (backend, kw) = calls
    assert device == kw["device_id"] == torch.device("cuda", 3) and backend == "nccl"
    assert kw["timeout"].total_seconds() == 45.0 == launch_mod.group_timeout().total_seconds()


def test_compare_forks_its_ranks_before_it_runs_a_rank_itself(monkeypatch, capsys):
    """On a GPU the launcher's process must not have used CUDA when it forks ranks, so `compare`
    runs `single` (in this process) after the multi-rank deployments; the table keeps its order."""
    from expertmesh import cli
    ran = []
    real = cli.execute
    monkeypatch.setattr(cli, "execute", lambda spec, args, label, alone=False: ran.append(label) or real(spec, args, label, alone))
    assert cli.main(["compare", "--deployments", "single,ep2", "--gen-len", "2", "--batch", "2", "--prompt-len", "4"]) == 0
    assert ran == ["ep2", "single", "reference"]
    table = capsys.readouterr().out
    assert table.index("single") < table.index("ep2")


def test_compare_fails_when_a_deployment_gives_other_tokens_than_the_reference(monkeypatch, capsys):
    """compare's correctness gate: one changed token in one deployment's output is a NO in the
    table, an error line and exit 1 (fp32 greedy, where outputs must be equal)."""
    from expertmesh import cli
    real = cli.execute

    def one_token_off(spec, args, label, alone=False):
        result = real(spec, args, label, alone)
        if label == "ep2":
            result.tokens = result.tokens.clone()
            result.tokens[0, -1] += 1
        return result

    monkeypatch.setattr(cli, "execute", one_token_off)
    assert cli.main(["compare", "--deployments", "single,ep2", "--gen-len", "2", "--batch", "2", "--prompt-len", "4"]) == 1
    out = capsys.readouterr().out
    assert "NO" in out and "outputs differ from the single-process reference" in out
