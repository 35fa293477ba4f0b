"""`expertmesh profile` (profile.py) and the op counter it shares with these tests (op_count.py):
a decode step's anatomy per rank, within the goals of issue 24 (at most 35 aten ops per decode
layer on `single`, 50 on ep2 with the low-latency exchange, at most 2 host reads per step)."""

import json

import pytest
import torch

from expertmesh import profile
from expertmesh.cli import main
from expertmesh.engine.engine import Engine
from expertmesh.op_count import OpCounter
from expertmesh.profile import KEYS, KVReads

GOALS = {"single": 35, "ep2": 50}


@pytest.fixture(scope="module", params=["single", "ep2"])
def report(request, tmp_path_factory):
    """The op goals are of the grouped expert kernel (the one a CUDA graph can hold): with auto the
    kernel is timed on the machine, and one loaded by other work may time the loop kernel faster
    at decode's few rows per expert, which adds a matmul per expert (46 ops per layer on single)."""
    out = tmp_path_factory.mktemp("profile") / "p.json"
    assert main(["profile", "--preset", "small", "--deployment", request.param, "--batch", "8", "--context", "16",
                 "--steps", "1", "--expert-kernel", "grouped", "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_profile_reports_every_rank_its_reads_and_kv_bytes(report):
    assert len(report["ranks"]) == (1 if report["deployment"] == "single" else 2)
    for rank in report["ranks"]:
        assert set(KEYS) <= set(rank)
        assert rank["host_reads_per_step"] <= 2
        # 4 sequences per rank (8 on single) of 17 .. 19 positions, 4 layers of K and V: 16 heads x 64, bf16
        per_position = 4 * 2 * 16 * 64 * 2
        assert rank["kv_bytes_resident"] % per_position == 0 and rank["kv_bytes_resident"] > 0
        assert rank["kv_bytes_read"] >= rank["kv_bytes_resident"]  # a gather path reads a copy too


def test_a_decode_layer_runs_within_the_op_goal(report):
    for rank in report["ranks"]:
        assert rank["expert_kernels"] == {"1": "grouped"}
        assert rank["ops_per_layer"] <= GOALS[report["deployment"]], rank["ops_by_name_per_step"]


def test_profile_runs_and_reports_the_expert_kernel_asked_for(tmp_path):
    """The loop kernel's matmul per expert shows in the ops, beside the grouped kernel's one."""
    ops = {}
    for kernel in ("grouped", "loop"):
        out = tmp_path / f"{kernel}.json"
        assert main(["profile", "--preset", "tiny", "--batch", "4", "--context", "8", "--steps", "1",
                     "--expert-kernel", kernel, "--json", str(out)]) == 0
        (rank,) = json.loads(out.read_text())["ranks"]
        assert rank["expert_kernels"] == {"1": kernel}
        ops[kernel] = rank["ops_by_name_per_step"]
    assert ops["loop"]["linear.default"] > ops["grouped"]["linear.default"]
    assert ops["grouped"]["_grouped_mm.default"] > 0 and "_grouped_mm.default" not in ops["loop"]


def test_profile_counts_an_eager_engine_whatever_graph_mode_the_engine_would_take(monkeypatch, tmp_path):
    """On CUDA the engine's default decode replays captured graphs, which dispatch no aten op:
    profile reported 0 ops per layer and 0 host reads on an H200. "padded", the graphs' buffers
    run eagerly, stands in for them on the CPU: taking it wherever an engine would default must
    leave every counted figure as it is."""
    argv = ["profile", "--preset", "tiny", "--batch", "2", "--context", "16", "--steps", "1", "--json"]
    assert main([*argv, str(tmp_path / "eager.json")]) == 0
    modes = []

    def engine(*args, graphs="auto", **kwargs):
        modes.append(graphs)
        return Engine(*args, graphs="padded" if graphs == "auto" else graphs, **kwargs)

    monkeypatch.setattr(profile, "Engine", engine)
    assert main([*argv, str(tmp_path / "as_on_cuda.json")]) == 0
    (eager,), (as_on_cuda,) = (json.loads((tmp_path / f).read_text())["ranks"]
                               for f in ("eager.json", "as_on_cuda.json"))
    for key in ("ops_per_layer", "ops_by_name_per_step", "kv_bytes_read", "kv_bytes_resident",
                "host_reads_per_step"):
        assert as_on_cuda[key] == eager[key], key
    assert modes and set(modes) == {"off"}, modes


def test_the_op_counter_counts_launches_not_views_allocations_or_reads():
    x = torch.randn(4, 8)
    with OpCounter() as counter:
        y = x.t().contiguous()  # a view, then one copy
        z = (y * 2).sum()  # two ops
        torch.empty(3)
        z.item()
        x.add_(1)  # in place: one op
    assert counter.ops == 4, counter.by_name


def test_kv_reads_count_a_gather_and_the_reads_of_its_copy_but_no_view_or_write():
    pool = torch.randn(10, 4)
    with KVReads([pool]) as reads:
        copy = pool.index_select(0, torch.tensor([1, 3, 5]))  # reads 3 rows of the pool: 48 bytes
        copy.t().sum()  # a view reads nothing, the sum reads the copy: 48 bytes
        pool[0] = 1.0  # a write into the pool reads nothing of it
        (pool[:2] * 1).sum()  # a slice (a view), a multiply reading its 2 rows: 32 bytes, a sum of no KV
    assert reads.kv_bytes == 48 + 48 + 32


@pytest.mark.parametrize("flags, message", [
    (["--batch", "0"], "--batch 0 must be a positive integer"),
    (["--deployment", "pp2"], "profile runs deployments without pipeline stages"),
    (["--preset", "nope"], "unknown preset"),
    (["--context", "100000"], "lower --context"),
])
def test_bad_profile_flags_are_one_line_and_exit_2(capsys, flags, message):
    assert main(["profile", *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
