"""The experts' kernel (`model/expert_kernels.py`): every kernel computes what a token-by-token
reference computes, `auto` picks the faster by timings (a fake timer here: real timings would
make the test depend on the machine), caches its choice and reads it back, every rank of a run
takes rank 0's plan, and no kernel adds a host read to a forward on a device."""

import functools
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from expertmesh.engine.shard import install_expert_kernels
from expertmesh.launch import launch
from expertmesh.model import expert_kernels as ek
from expertmesh.model import moe
from expertmesh.model.moe import GroupedExperts
from expertmesh.model.synthetic import materialize
from tests.fake_device import DEVICE, FakeDevice, move_to_device, to_host

D, H = 32, 64  # fp32 and bf16 rows of whole 16-byte units: the grouped kernel applies
COUNTS = [3, 0, 9, 1, 0, 5]  # ragged, two experts without a row
PADDING = 2  # rows past sum(COUNTS): a fixed-size buffer's tail
# max |kernel - reference| / max |reference|: fp32 sums in another order; bf16 rounds x, h and
# every output to 8 bits of mantissa (the reference computes in fp32 from the same bf16 values)
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


def reference(experts: GroupedExperts, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Each row through its expert alone, one token at a time, in fp32: `[sum(counts), D]`."""
    expert_of_row = [e for e, n in enumerate(counts) for _ in range(n)]
    w = {name: getattr(experts, name).float() for name in ("w_up", "w_down", "w_gate") if hasattr(experts, name)}
    rows = []
    for row, e in zip(x.float(), expert_of_row):
        if experts.kind == "swiglu":
            h = F.silu(w["w_gate"][e] @ row) * (w["w_up"][e] @ row)
        else:
            h = F.gelu(w["w_up"][e] @ row)
        rows.append(w["w_down"][e] @ h)
    return torch.stack(rows)


def make_experts(kind: str, dtype: torch.dtype, n_experts: int = len(COUNTS)) -> GroupedExperts:
    return materialize(GroupedExperts(n_experts, D, H, kind), 0, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["mlp", "swiglu"])
@pytest.mark.parametrize("kernel", ek.KERNELS)
def test_every_kernel_computes_the_token_by_token_reference(kernel, kind, dtype):
    experts = make_experts(kind, dtype)
    experts.kernels = ek.fixed(kernel)
    x = torch.randn(sum(COUNTS) + PADDING, D, generator=torch.Generator().manual_seed(1)).to(dtype)
    want = reference(experts, x, COUNTS)
    counts = torch.tensor(COUNTS)
    for got in (experts(x, counts), experts(x, counts, splits=COUNTS),
                experts(x, None, ends=counts.cumsum(0, dtype=torch.int32))):
        assert got.shape == x.shape and got.dtype == dtype
        error = (got[:sum(COUNTS)].float() - want).abs().max() / want.abs().max()
        assert error < TOLERANCE[dtype], f"{kernel} {kind} {dtype}: relative error {error:.1e}"


def test_the_grouped_and_loop_kernels_agree_bitwise_on_cpu():
    """What lets `auto` choose per call size without changing a token between deployments."""
    experts = make_experts("swiglu", torch.float32)
    x = torch.randn(sum(COUNTS), D, generator=torch.Generator().manual_seed(2))
    outs = []
    for kernel in ek.KERNELS:
        experts.kernels = ek.fixed(kernel)
        outs.append(experts(x, torch.tensor(COUNTS)))
    assert torch.equal(*outs)


def fake_timer(seconds: dict[tuple[str, int], float], calls: list | None = None) -> ek.Timer:
    """A timer that reports `seconds[(kernel, rows)]` without running anything."""
    def timer(kernel, rows, fn):
        if calls is not None:
            calls.append((kernel, rows))
        return seconds[(kernel, rows)]
    return timer


# the loop wins the smallest bucket, the grouped kernel the others
LOOP_SMALL = {("loop", 4): 1.0, ("grouped", 4): 2.0, ("loop", 32): 3.0, ("grouped", 32): 2.0,
              ("loop", 256): 9.0, ("grouped", 256): 8.0}


def test_auto_picks_the_faster_kernel_per_bucket():
    seconds = ek.measure(D, H, torch.float32, torch.device("cpu"), fake_timer(LOOP_SMALL))
    assert seconds == {rows: {k: LOOP_SMALL[(k, rows)] for k in ("loop", "grouped")} for rows in ek.BUCKETS}
    plan = ek.choose(seconds)
    assert plan.choices == ((4, "loop"), (32, "grouped"), (256, "grouped"))
    # a call takes the bucket nearest its mean rows per expert, on a log scale
    assert [plan.pick(rows, 4) for rows in (0, 4, 44, 48, 400, 40_000)] == \
        ["loop", "loop", "loop", "grouped", "grouped", "grouped"]
    tie = {key: 1.0 for key in LOOP_SMALL}
    assert set(kernel for _, kernel in ek.choose(ek.measure(D, H, torch.float32, torch.device("cpu"),
                                                            fake_timer(tie))).choices) == {"grouped"}


def test_where_the_grouped_kernel_does_not_apply_auto_times_the_loop_alone():
    calls = []
    seconds = ek.measure(6, H, torch.float32, torch.device("cpu"), fake_timer(LOOP_SMALL, calls))  # 24-byte rows
    assert {kernel for kernel, _ in calls} == {"loop"}
    assert ek.choose(seconds) == ek.KernelPlan(tuple((rows, "loop") for rows in ek.BUCKETS))


def test_auto_times_once_then_reads_its_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EXPERTMESH_CACHE", str(tmp_path))
    cpu, calls = torch.device("cpu"), []
    timer = fake_timer(LOOP_SMALL, calls)
    first = ek.resolve("auto", D, H, torch.float32, cpu, timer)
    assert len(calls) == 2 * len(ek.BUCKETS)
    data = json.loads((tmp_path / ek.CACHE_FILE).read_text())
    key = ek.cache_key(D, H, torch.float32, cpu)
    assert ek.machine_name(cpu) in key and torch.__version__ in key and "float32" in key
    assert data[key]["plan"] == {"4": "loop", "32": "grouped", "256": "grouped"}

    calls.clear()
    assert ek.resolve("auto", D, H, torch.float32, cpu, timer) == first
    assert calls == [], "a second start must not time again"
    ek.resolve("auto", D, H, torch.bfloat16, cpu, timer)  # another dtype: its own entry
    assert len(calls) == 2 * len(ek.BUCKETS) and len(json.loads((tmp_path / ek.CACHE_FILE).read_text())) == 2

    (tmp_path / ek.CACHE_FILE).write_text("{not json")  # damaged: timed again and rewritten
    assert ek.resolve("auto", D, H, torch.float32, cpu, timer) == first
    assert key in json.loads((tmp_path / ek.CACHE_FILE).read_text())


def test_a_named_kernel_and_a_pretend_device_are_never_timed(tmp_path, monkeypatch):
    monkeypatch.setenv("EXPERTMESH_CACHE", str(tmp_path))
    calls = []
    timer = fake_timer(LOOP_SMALL, calls)
    assert ek.resolve("loop", D, H, torch.float32, torch.device("cpu"), timer) == ek.fixed("loop")
    assert ek.resolve("auto", D, H, torch.float32, DEVICE, timer) == ek.DEFAULT
    assert calls == [] and not (tmp_path / ek.CACHE_FILE).exists()


def _rank_plan(cache: str, device: torch.device) -> list:
    """Each rank times with a fake timer of its own (rank 1's says the opposite of rank 0's);
    returns every rank's installed choices."""
    os.environ["EXPERTMESH_CACHE"] = f"{cache}/rank{dist.get_rank()}"
    opposite = {(k, rows): 10.0 - s for (k, rows), s in LOOP_SMALL.items()}
    timer = fake_timer(LOOP_SMALL if dist.get_rank() == 0 else opposite)
    block = moe.MoEBlock(D, 4, 2, H, "mlp", renormalize=True)
    install_expert_kernels(materialize(block, 0, torch.float32), "auto", torch.device("cpu"), timer)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, block.experts.kernels.choices)
    return everyone


def test_every_rank_takes_rank_0s_plan(tmp_path):
    plans = launch(functools.partial(_rank_plan, str(tmp_path)), 2, timeout=120)
    assert plans[0] == plans[1] == ek.choose({r: {k: LOOP_SMALL[(k, r)] for k in ek.KERNELS}
                                              for r in ek.BUCKETS}).choices
    assert not (tmp_path / "rank1").exists(), "rank 1 neither times nor writes a cache"


@pytest.mark.parametrize("grouped_applies", [True, False])
def test_the_loop_adds_no_host_read_on_a_device(monkeypatch, grouped_applies):
    """On a device, the loop runs where its counts are already host ints; given device counts
    only, the grouped kernel runs instead, unless it does not apply there (then the loop reads
    the counts, as it always has)."""
    monkeypatch.setattr(moe, "_grouped_mm_applies", lambda x, hidden: grouped_applies)
    experts = make_experts("mlp", torch.float32)
    x = torch.randn(sum(COUNTS), D, generator=torch.Generator().manual_seed(3))
    want = reference(experts, x, COUNTS)
    experts.kernels = ek.fixed("loop")
    move_to_device(experts)
    with FakeDevice() as mode:
        counts = torch.tensor(COUNTS, device=DEVICE)
        before = mode.syncs
        with_ints = experts(x.to(DEVICE), counts, splits=COUNTS)
        with_ints_syncs = mode.syncs - before
        before = mode.syncs
        device_only = experts(x.to(DEVICE), counts)
        device_only_syncs = mode.syncs - before
    assert with_ints_syncs == 0
    assert device_only_syncs == (0 if grouped_applies else 1)
    for got in (with_ints, device_only):
        torch.testing.assert_close(to_host(got), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("command", ["run", "compare", "serve"])
@pytest.mark.parametrize("setting", ek.SETTINGS)
def test_each_command_hands_its_flag_to_the_ranks_shards(command, setting):
    """`--expert-kernel` reaches the spec of `run`, `compare` and `serve`, and `load_rank` gives
    every MoE layer of the shard that plan (`auto`: the one timed and cached for its shapes)."""
    from expertmesh.cli import build_parser
    from expertmesh.deployment import Deployment
    from expertmesh.engine.shard import load_rank
    from expertmesh.run_flags import spec_from_flags
    from expertmesh.server.cli import serve_plan

    args = build_parser().parse_args([command, "--expert-kernel", setting] + (["--port", "0"] if command == "serve" else []))
    spec = serve_plan(args)[0] if command == "serve" else spec_from_flags(args, Deployment.parse("single"))
    assert spec.expert_kernel == setting
    model, _, _ = load_rank(spec, torch.device("cpu"))
    plans = {m.kernels for m in model.modules() if isinstance(m, GroupedExperts)}
    want = ek.resolve(setting, spec.cfg.d_model, spec.cfg.expert_hidden, spec.cfg.torch_dtype, torch.device("cpu"))
    assert plans == {want}
