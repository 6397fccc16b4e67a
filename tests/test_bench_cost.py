"""experiments/bench_cost.py, as a dry run on the CPU (tiny widths): the rows it appends and the evaluation
profile it writes. The numbers themselves are GPU measurements (README, Performance)."""
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parent.parent


def dry_run(tmp_path, *args: str) -> tuple[Path, Path]:
    """bench_cost.py at tiny widths on the CPU (8 x 32 calibration tokens); returns (its CSV, its profile dir)."""
    out, prof = tmp_path / "perf.csv", tmp_path / "prof"
    p = subprocess.run([sys.executable, str(ROOT / "experiments/bench_cost.py"), "--device", "cpu", "--tiny",
                        "--nsamples", "8", "--seqlen", "32", "--eval-tokens", "32", "--epochs", "1",
                        "--eval-rounds", "1", *args,
                        "--profile-dir", str(prof), "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    return out, prof


def test_bench_cost_dry_run_writes_rows_and_the_eval_profile(tmp_path):
    out, prof = dry_run(tmp_path, "--models", "llada_8b", "--methods", "flatquant", "--layers", "2",
                        "--profile-eval", "5")
    rows = pd.read_csv(out)
    got = dict(zip(rows["metric"], rows["value"]))
    for metric in ("calib_total_s", "calib_per_layer_s_measured", "eval_bf16_ms", "eval_overhead", "peak_gpu_gb"):
        assert metric in got, metric
    assert got["calib_step_s"] > 0 and got["eval_overhead"] > 0
    step_note = rows.loc[rows["metric"] == "calib_step_s", "note"].item()
    assert "CUDA graph: not on a CUDA device" in step_note  # the trainer's own report, carried into the row
    assert set(rows["shape"]) == {"8x32, layers timed 2/32"}
    # every evaluation row says the host's time against the wall time: host-bound or not
    for metric in ("eval_bf16_ms", "eval_fakequant_ms", "eval_fused_ms", "eval_bf16_after_ms"):
        note = rows.loc[rows["metric"] == metric, "note"].item()
        assert "ms until return;" in note and "timed forwards" in note, note
    text = (prof / "eval_profile_llada_8b_flatquant.txt").read_text()
    assert "## llada_8b bf16 forward" in text and "## llada_8b flatquant fake-quant forward" in text
    assert "aten::" in text  # the operator table
    assert "Python, by own time (cProfile)" in text and "ncalls" in text  # the host time the operators miss


def test_profiled_calibration_writes_the_kernel_table_and_no_rows(tmp_path):
    out, prof = dry_run(tmp_path, "--models", "dream_7b", "--methods", "freeact", "--layers", "1",
                        "--profile-calib", "5")
    assert not out.exists()  # a profiled run is slower: its timings are not recorded
    text = (prof / "calib_profile_dream_7b_freeact.txt").read_text()
    assert "2 training steps" in text and "aten::" in text
    assert "block_training.step | 2 |" in text and "block_training.full_precision_pass | 1 |" in text
    assert "block_training.cast | 2 |" in text and "block_training.build | 1 |" in text  # to float32 and back
    assert "streaming.page_in |" in text  # the streamer's layer transfers


def test_rows_go_only_to_a_file_with_the_same_columns(tmp_path):
    sys.path.insert(0, str(ROOT / "experiments"))
    from bench_kernels import FIELDS, append_rows

    path = tmp_path / "perf.csv"
    append_rows(path, [{"bench": "cost", "metric": "x", "value": 1}])
    append_rows(path, [{"bench": "cost", "metric": "y", "value": 2}])
    assert list(pd.read_csv(path)["metric"]) == ["x", "y"] and list(pd.read_csv(path).columns) == FIELDS
    old = tmp_path / "old.csv"
    old.write_text("timestamp,bench,metric,value\n")
    with pytest.raises(SystemExit, match="other columns"):
        append_rows(old, [{"bench": "cost", "metric": "x", "value": 1}])


def test_paired_timing_cancels_the_hosts_drift():
    """The fake-quant and bf16 forwards are timed in alternation, and the overhead is the median of the rounds'
    ratios: a host whose speed changes between rounds (here 1x, 3x, 1.5x, 4x, 1x) still gives the true ratio."""
    sys.path.insert(0, str(ROOT / "experiments"))
    from bench_cost import extrapolated_ratio, paired_ratio, paired_times

    speeds = iter([1.0, 1.0, 3.0, 3.0, 1.5, 1.5, 4.0, 4.0, 1.0, 1.0])  # one per call: both of a round alike

    class Probe:
        def __init__(self, total, layers):
            self.total, self.layers, self.calls = total, layers, 0

        def time(self, model, ids, repeats):
            s = next(speeds)
            self.calls += 1
            return self.total * s, self.layers * s, f"speed {s}"

    q, b = Probe(total=5.0, layers=4.0), Probe(total=3.0, layers=2.0)
    got_q, got_b = paired_times(q, None, b, None, None, rounds=5)
    assert q.calls == b.calls == 5 and [g[2] for g in got_q] == [g[2] for g in got_b]  # alternated, same speeds
    assert paired_ratio(got_q, got_b, k=4, L=32) == pytest.approx(extrapolated_ratio(5.0, 4.0, 3.0, 2.0, 4, 32))


def test_kernel_ab_loads_an_older_kernel_module_beside_the_current_one(tmp_path):
    """experiments/kernel_ab.py's loader: an older act_quant.py (here a copy with a marker) imports inside the
    package, relative imports and all, and stays apart from the current module; without a GPU the script says so."""
    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        import kernel_ab
    finally:
        sys.path.remove(str(ROOT / "experiments"))
    import freeact.kernels.act_quant as current

    older = tmp_path / "act_quant_old.py"
    older.write_text((ROOT / "freeact/kernels/act_quant.py").read_text() + "\nOLDER_MARKER = 1\n")
    old = kernel_ab.load_old(str(older))
    assert old.OLDER_MARKER == 1 and not hasattr(current, "OLDER_MARKER")
    assert old.KronActQuant is not current.KronActQuant and old.tuned_tiling(64, 64)["path"] == "kernel"
    if not __import__("torch").cuda.is_available():
        with pytest.raises(SystemExit, match="needs a CUDA GPU"):
            kernel_ab.main([str(older)])
