"""`python -m benchmarks` and `benchmarks/gpu_check.py` run end to end at their smallest sizes;
a peer that cannot be imported is reported as skipped, not as a failure."""

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from expertmesh.sim.hardware import HardwareProfile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `benchmarks` is a folder of the repository, not an installed package

from benchmarks import __main__ as bench, gpu_check, peers, report  # noqa: E402


def test_expertmesh_sections_write_results_and_plots(tmp_path):
    results = bench.main(["--smoke", "--only", "efficiency,deployments,overlap,cross-node", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["sections"]) == {"efficiency", "deployments", "overlap", "cross-node"}
    efficiency = results["sections"]["efficiency"]
    assert efficiency["status"] == "ok"
    # a share of the same FLOPs as plain matmuls (measured 0.17 here at load 3, and 0.006 once in
    # a full suite run with other tests on the 2 cores): over 1.5, or under 0.001 (a FLOP count
    # off by a dimension), the FLOP count or the timing is wrong
    assert 0.001 < efficiency["rows"][0]["ratio"] < 1.5
    deployments = results["sections"]["deployments"]
    assert {r["deployment"] for r in deployments["rows"]} == {"single", "ep2", "tp2", "pp2"}
    for r in deployments["rows"]:
        assert r["overall_tps"] > 0 and 0 < r["ttft_ms"] < 60_000 and 0 < r["tpot_ms"] < 60_000, r
        assert 1 <= r["imbalance"] <= 2, r  # max / mean rows over at most 2 ranks
    overlap = results["sections"]["overlap"]  # rendered like the others: named columns, formats
    assert overlap["status"] == "ok" and [c["header"] for c in overlap["columns"]] == [
        "variant", "ms per call", "vs sync", "overlap efficiency"]
    assert report.cell(overlap["rows"][1]["efficiency"], overlap["columns"][3]["fmt"]).endswith("%")
    sync_ms = overlap["rows"][0]["ms"]
    for r in overlap["rows"][1:]:
        # the same work as the synchronous call, or a part of it ("exchange only" measured 0.09x
        # and, at the smoke sizes, 1.17x of it): never 10x more, and only a part far less
        low = 0 if r["variant"] in ("exchange only", "compute only") else 0.1
        assert low < r["ms"] / sync_ms < 10, r
        assert "ratio" not in r or abs(r["ratio"] * r["ms"] - sync_ms) < 1e-9 * sync_ms, r
    cross = results["sections"]["cross-node"]  # bytes, not times: exact relations hold
    assert cross["status"] == "ok" and len(cross["rows"]) == 4 and cross["rows"][0]["vs_flat"] == 1.0
    kib = {r["exchange"]: r["kib_per_step"] for r in cross["rows"]}
    for exchange in ("flat", "hierarchical"):  # a placement optimised in-sample never adds bytes
        assert kib[f"{exchange}, optimised placement"] <= kib[f"{exchange}, default placement"]
    # a token crosses to a remote node at most once instead of once per expert there
    assert kib["hierarchical, default placement"] < kib["flat, default placement"]
    assert all(r["ratio"] == 1 / r["vs_flat"] >= 1 for r in cross["rows"])
    summaries = report.headline(results["sections"])  # only self-comparisons ran: no peer summary
    assert [t.title.split(" (")[0] for t in summaries] == ["Summary against ourselves"]
    assert (tmp_path / "efficiency.png").stat().st_size > 0
    assert (tmp_path / "deployments.png").stat().st_size > 0


def test_the_summary_keeps_comparisons_with_peers_apart_from_comparisons_with_ourselves():
    sections = {"deepspeed": peers.section("vs DeepSpeed", "peers", rows=[{"ratio": 1.5}, {"ratio": 0.5}]),
                "overlap": peers.section("overlapped vs sync", "ourselves", rows=[{"ratio": 2.0}]),
                "transformers": peers.skipped("vs transformers", "peers", "not installed"),
                "simulator": peers.section("sim vs published", "published")}
    tables = report.headline(sections)
    assert [t.title.split(" (")[0] for t in tables] == [
        "Summary against peers", "Summary against ourselves", "Summary against published measurements"]
    rows = [[c for c in t.columns[0].cells] for t in tables]
    assert rows == [["vs DeepSpeed", "vs transformers"], ["overlapped vs sync"], ["sim vs published"]]
    assert list(tables[0].columns[2].cells) == ["x0.50", "-"] and list(tables[0].columns[3].cells) == ["x1.50", "-"]
    with pytest.raises(ValueError, match="against"):
        peers.section("unlabelled", "nobody")


def test_a_peer_that_cannot_be_imported_is_skipped_with_its_reason(monkeypatch):
    def missing():
        raise ModuleNotFoundError("No module named 'deepspeed'")

    monkeypatch.setattr(peers, "import_deepspeed", missing)
    out = peers.deepspeed_moe((4,), 1, bench.TINY)
    assert out["status"] == "skipped"
    assert "deepspeed" in out["reason"] and "[peers]" in out["reason"]


def _doubled(steps):
    """A dispatcher's steps whose result is twice the right one: a silent bug of ours."""
    def wrong(self, *args, **kwargs):
        return 2 * (yield from steps(self, *args, **kwargs))
    return wrong


@pytest.mark.parametrize("planted", ["crash", "wrong outputs"])
def test_a_failure_of_our_own_layer_is_failed_and_never_blamed_on_the_peer(monkeypatch, planted):
    """expertmesh's EP layer runs and is checked against its single-device block before the peer:
    a crash or a wrong result of ours is `failed`, naming expertmesh (the peer is a stub that
    imports: this runs without DeepSpeed)."""
    from expertmesh.parallel.dispatch import AllToAllDispatcher

    def crash(self, *args, **kwargs):
        raise RuntimeError("planted")

    monkeypatch.setattr(peers, "import_deepspeed", lambda: types.SimpleNamespace(__version__="stub"))
    monkeypatch.setattr(AllToAllDispatcher, "steps", crash if planted == "crash" else _doubled(AllToAllDispatcher.steps))
    out = peers.deepspeed_moe((4,), 1, bench.TINY, timeout=120)  # the ranks are forked: they see the patch
    assert out["status"] == "failed", out["reason"]
    assert out["reason"].startswith("expertmesh's EP layer")


def test_transformers_blocks_agree_with_expertmesh_before_timing():
    pytest.importorskip("transformers", reason="the peer blocks are transformers' own")
    out = peers.transformers_blocks((4,), 1, bench.TINY, threads=1)
    assert out["status"] == "ok", out["reason"]
    assert {r["family"] for r in out["rows"]} == {"mixtral", "qwen2_moe"}
    assert all(r["fp32_rel_diff"] < peers.FP32_RTOL for r in out["rows"])


def test_gpu_check_dry_run_runs_every_step_and_writes_a_profile_the_simulator_loads(tmp_path):
    record = gpu_check.main(["--dry-run", "--out", str(tmp_path)])
    steps = record["steps"]
    assert list(steps) == [name for name, _ in gpu_check.STEPS]
    assert all(s["ok"] for s in steps.values()), {n: s.get("error") for n, s in steps.items()}
    profile = HardwareProfile.load(tmp_path / "profile.json")
    assert profile.bf16_flops > 0 and profile.hbm_bw > 0 and profile.gemm_half_tokens > 0
    assert steps["engine single"]["metrics"]["tpot_s"] > 0
    assert "tpot_s" in record["simulated_end_to_end"]
    paths = {n: p for n, p in steps["engine ep1"].items() if isinstance(p, dict)}
    assert len(paths) == 4 and all(p["tokens_match"] and p["max_abs_logit_diff"] < 1e-4 for p in paths.values())
    for case in (c for c in steps["attention backends"].values() if isinstance(c, dict)):  # paged vs math
        paged = [r for name, r in case.items() if "paged" in name]
        assert paged and all(r["max_abs_diff"] < 1e-4 for r in paged)
    assert steps["prefill memory"]["simulated_activation_bytes"] > 0
    assert json.loads((tmp_path / "gpu_check.json").read_text())["dry_run"]


def test_gpu_check_reports_a_failing_step_and_runs_the_next(tmp_path):
    def broken(ctx):
        raise RuntimeError("No available kernel. Aborting execution.\n(details)")

    steps = [("broken", broken), ("launch", gpu_check.launch)]
    record = gpu_check.check(tmp_path, dry_run=True, log=lambda line: None, steps=steps)
    assert record["steps"]["broken"] == {"ok": False, "error": "RuntimeError: No available kernel. "
                                         "Aborting execution.", "s": record["steps"]["broken"]["s"]}
    assert record["steps"]["launch"]["ok"]


def test_gpu_check_puts_only_decode_forwards_under_the_sync_check(monkeypatch, tmp_path):
    """The wiring of the check, with the CUDA call recorded: "error" around each decode forward
    (a step whose token bound rank 0 sent), never around a prefill."""
    from expertmesh.config import Workload, preset
    from expertmesh.deployment import Deployment
    from expertmesh.engine.engine import Engine
    from expertmesh.engine.serve import serve
    from expertmesh.engine.worker import static_engine, static_requests
    from expertmesh.model.transformer import reference_model

    modes = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    ctx = gpu_check.Ctx(gpu_check.DRY, torch.device("cuda", 0), torch.float32, False, tmp_path)
    cfg = preset("tiny")
    requests = static_requests(Workload(batch_size=2, prompt_len=4, gen_len=3), cfg)
    engine = Engine(reference_model(cfg), cfg, Deployment(), static_engine(requests, Deployment()), 0)
    with gpu_check.no_host_sync_in_decode_forwards(ctx):
        serve(engine, [(0, r) for r in requests])
    assert modes == ["error", "default"] * 2  # 3 tokens: one prefill step, then two decode steps


def test_gpu_multi_without_two_gpus_is_one_line_unless_dry(tmp_path, capsys):
    from benchmarks import gpu_multi
    assert gpu_multi.main(["--out", str(tmp_path)]) == 2
    assert "gpu_multi needs 2 GPUs (this machine has 0); --dry-run" in capsys.readouterr().err


def test_scripts_answer_help_without_running():
    for args in (["-m", "benchmarks", "--help"], [str(ROOT / "benchmarks" / "gpu_check.py"), "--help"],
                 [str(ROOT / "benchmarks" / "gpu_multi.py"), "--help"]):
        done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stderr
        assert "usage" in done.stdout


def test_a_failed_sync_check_names_the_line_of_expertmesh_that_raised():
    """The H200 run said only that ep1's low-latency forward synchronized, not where: the verdict
    now carries the innermost expertmesh frame of the error."""
    from benchmarks.gpu_engine_steps import code_line
    from expertmesh.parallel.low_latency import LowLatencyExchange
    exchange = LowLatencyExchange(None, [2], 0, [0])
    steps = exchange.steps(torch.zeros(3, 4), torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1),
                           None, max_tokens=1, stats=None)
    with pytest.raises(ValueError) as caught:
        next(steps)
    where = code_line(caught.value)
    assert where.startswith("parallel/low_latency.py:") and "raise ValueError" in where
    assert code_line(ValueError("no traceback")) == "outside expertmesh"


def test_without_deepspeed_the_ep_section_can_still_time_ours_against_the_plain_layer(monkeypatch):
    """`python benchmarks/peers.py` runs the section without DeepSpeed: expertmesh (auto and
    grouped only), the plain layer and the ceiling, with auto's plan and the reason DS is absent."""
    def missing():
        raise ModuleNotFoundError("No module named 'deepspeed'")

    monkeypatch.setattr(peers, "import_deepspeed", missing)
    out = peers.deepspeed_moe((4,), 1, bench.TINY, timeout=120, skip_without_deepspeed=False)
    assert out["status"] == "ok", out["reason"]
    (row,) = out["rows"]
    assert row["expertmesh_of_ceiling"] > 0 and row["grouped_of_ceiling"] > 0 and row["plain_of_ceiling"] > 0
    assert row.get("deepspeed_tps") is None and all(k in row["plan"] for k in ("4:", "32:", "256:"))
    assert any("DeepSpeed-MoE skipped" in note and "[peers]" in note for note in out["notes"])
