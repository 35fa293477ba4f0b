"""`python -m benchmarks` and `benchmarks/gpu_check.py` run end to end at their smallest sizes;
a peer that cannot be imported is reported as skipped, not as a failure."""

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

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
    assert 0 < efficiency["rows"][0]["ratio"]
    deployments = results["sections"]["deployments"]
    assert {r["deployment"] for r in deployments["rows"]} == {"single", "ep2", "tp2", "pp2"}
    assert all(r["overall_tps"] > 0 for r in deployments["rows"])
    overlap = results["sections"]["overlap"]  # rendered like the others: named columns, formats
    assert overlap["status"] == "ok" and [c["header"] for c in overlap["columns"]] == [
        "variant", "ms per call", "vs sync", "overlap efficiency"]
    assert report.cell(overlap["rows"][1]["efficiency"], overlap["columns"][3]["fmt"]).endswith("%")
    cross = results["sections"]["cross-node"]
    assert cross["status"] == "ok" and len(cross["rows"]) == 4 and cross["rows"][0]["vs_flat"] == 1.0
    assert (tmp_path / "efficiency.png").stat().st_size > 0
    assert (tmp_path / "deployments.png").stat().st_size > 0


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


def test_gpu_check_dry_run_writes_a_profile_the_simulator_loads(tmp_path):
    record = gpu_check.main(["--dry-run", "--out", str(tmp_path)])
    profile = HardwareProfile.load(tmp_path / "profile.json")
    assert profile.bf16_flops > 0 and profile.hbm_bw > 0 and profile.gemm_half_tokens > 0
    assert record["end_to_end"]["metrics"]["tpot_s"] > 0
    assert "tpot_s" in record["end_to_end"]["simulated"]
    paths = record["parallel_paths"]  # ep1 and tp1 give single's tokens (fp32 in a dry run)
    assert len(paths) == 3 and all(p["tokens_match"] and p["max_abs_logit_diff"] < 1e-4 for p in paths.values())
    assert json.loads((tmp_path / "gpu_check.json").read_text())["dry_run"]


def test_scripts_answer_help_without_running():
    for args in (["-m", "benchmarks", "--help"], [str(ROOT / "benchmarks" / "gpu_check.py"), "--help"]):
        done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stderr
        assert "usage" in done.stdout
