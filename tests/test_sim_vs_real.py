"""The calibration comparison script runs end to end on a tiny case and its errors add up."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "sim_vs_real.py"


def test_sim_vs_real_quick_predicts_every_run(tmp_path):
    out = tmp_path / "cmp.json"
    subprocess.run([sys.executable, str(SCRIPT), "--quick", "--deployments", "single,ep2,pp2",
                    "--json", str(out)], check=True, timeout=120)
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert {(r["deployment"], r["metric"]) for r in rows} == {
        (d, m) for d in ("single", "ep2", "pp2") for m in ("ttft", "tpot")}
    for r in rows:
        assert r["predicted_s"] > 0 and r["measured_s"] > 0
        assert r["abs_error_s"] == abs(r["predicted_s"] - r["measured_s"])
        assert 0.05 < r["predicted_s"] / r["measured_s"] < 20  # same order of magnitude
    assert data["summary"]["worst_abs_error_s"] == max(r["abs_error_s"] for r in rows)
