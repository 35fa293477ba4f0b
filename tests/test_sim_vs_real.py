"""The simulator predicts real CPU runs it was not calibrated on, within the band measured.

`benchmarks/sim_vs_real.py --quick` fits four constants shared by every deployment (per-op
overhead, per-step host time, a scale on the matmul rate, the ranks' worth of cores the ranks
get at once) on `single` and `ep2` at batch 4 x 16 and 1 x 24, and predicts `tp2` and `pp2` (in
the benchmark also `ep2` and `ep4`) at batch 2 x 32. Measured with this command on the shared
2-core development machine (other suites running): earlier, at load 2-4, held-out median error
29% and 15%, worst ratio 1.46x and 1.30x; on 2026-12-04, five runs at load 4.7-9: median 37%,
22%, 17%, 18%, 22%, worst ratio 1.87x, 1.48x, 1.30x, 1.48x, 1.43x (the 37% / 1.87x run at load
9, beside another suite's multi-rank tests). The full sizes, three runs: median 21%, 13%, 25%,
worst ratio 1.39x, 1.26x, 1.65x. On 2026-12-05 a fresh-clone suite run (load 1.6-1.9, the suite
alone) gave median 18%, worst ratio 2.11x (tp2 TPOT at batch 2: 25.6 ms measured against 12.1 ms
predicted), and passed alone twice right after. The bands are the worst quick run, rounded up.
"""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "sim_vs_real.py"
MEDIAN_BAND = 0.40  # worst measured 0.37 (quick, load 9): 0.29, 0.15, 0.37, 0.22, 0.17, 0.18, 0.22
RATIO_BAND = 2.5    # worst measured 2.11x (quick, in a full suite): 1.46, 1.30, 1.87, 1.48, 1.30, 1.48, 1.43, 2.11


def test_held_out_runs_are_predicted_within_the_measured_band(tmp_path):
    out = tmp_path / "cmp.json"
    subprocess.run([sys.executable, str(SCRIPT), "--quick", "--repeat", "2", "--held-out", "tp2,pp2",
                    "--json", str(out)], check=True, timeout=900)
    data = json.loads(out.read_text())
    rows = data["rows"]
    held = [r for r in rows if r["set"] == "held-out"]
    assert {(r["deployment"], r["metric"]) for r in held} == {
        (d, m) for d in ("tp2", "pp2") for m in ("ttft", "tpot")}
    # nothing held out shares a (deployment, batch) with the calibration runs
    calibration = {(r["deployment"], r["batch"]) for r in rows if r["set"] == "calibration"}
    assert calibration and not calibration & {(r["deployment"], r["batch"]) for r in held}
    for r in held:
        assert r["predicted_s"] > 0 and r["measured_s"] > 0
        ratio = r["predicted_s"] / r["measured_s"]
        assert 1 / RATIO_BAND < ratio < RATIO_BAND, r
    assert data["summary"]["median_rel_error"] <= MEDIAN_BAND
    assert data["profile"]["launch_s"] >= 0
