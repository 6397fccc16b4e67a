"""experiments/bench_cost.py, as a dry run on the CPU (tiny widths): the rows it appends and the evaluation
profile it writes. The numbers themselves are GPU measurements (README, Performance)."""
import subprocess
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent


def test_bench_cost_dry_run_writes_rows_and_the_eval_profile(tmp_path):
    out, prof = tmp_path / "perf.csv", tmp_path / "prof"
    p = subprocess.run([sys.executable, str(ROOT / "experiments/bench_cost.py"), "--device", "cpu", "--tiny",
                        "--nsamples", "8", "--seqlen", "32", "--eval-tokens", "32", "--models", "llada_8b",
                        "--methods", "flatquant", "--layers", "2", "--epochs", "1", "--profile-eval", "5",
                        "--profile-dir", str(prof), "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = pd.read_csv(out)
    got = dict(zip(rows["metric"], rows["value"]))
    for metric in ("calib_total_s", "calib_per_layer_s_measured", "eval_bf16_ms", "eval_overhead", "peak_gpu_gb"):
        assert metric in got, metric
    assert got["calib_step_s"] > 0 and got["eval_overhead"] > 0
    assert set(rows["shape"]) == {"8x32, layers timed 2/32"}
    text = (prof / "eval_profile_llada_8b_flatquant.txt").read_text()
    assert "## llada_8b bf16 forward" in text and "## llada_8b flatquant fake-quant forward" in text
    assert "aten::" in text  # the operator table
