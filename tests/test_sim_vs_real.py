"""The simulator predicts real CPU runs it was not calibrated on, within the band measured.

`benchmarks/sim_vs_real.py --quick` fits four constants shared by every deployment (per-op
overhead, per-step host time, a scale on the matmul rate, the ranks' worth of cores the ranks
get at once) on `single` and `ep2` at batch 4 x 16 and 1 x 24, and predicts `tp2` and `pp2` (in
the benchmark also `ep2` and `ep4`) at batch 2 x 32. Measured on the shared 2-core development
machine (load average 2-4, other suites running), two runs of this command: held-out median
error 29% and 15%, worst ratio 1.46x and 1.30x; the full sizes, three runs: median 21%, 13%,
25%, worst ratio 1.39x, 1.26x, 1.65x. Before the per-step control path, the low-latency
exchange, the step barrier and the shared cores were modelled it measured 36% / 3.1x (quick)
and 39% / 1.9x (full) at load 12-16. The same deployment's repeats differ by up to 2x on that
machine; the band leaves room for it.
"""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "sim_vs_real.py"
MEDIAN_BAND = 0.45  # measured 0.29, 0.15 (quick); 0.21, 0.13, 0.25 (full)
RATIO_BAND = 2.5    # measured 1.46, 1.30 (quick); 1.39, 1.26, 1.65 (full)


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
