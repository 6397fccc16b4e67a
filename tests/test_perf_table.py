"""experiments/perf_table.py: the README's performance tables come from perf.csv rows of one clean commit."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "experiments"))

from bench_kernels import append_rows  # noqa: E402
from perf_table import main  # noqa: E402

BASE = dict(timestamp="2026-12-07T17:00:00", device="NVIDIA H100 80GB HBM3", torch="2.11.0", triton="3.6.0",
            transformers="5.17.0", commit="5e11741")  # a hash that reads as a number (5 x 10^11741)


def _rows(commit="5e11741"):
    cost = dict(BASE, commit=commit, bench="cost", model="llada_8b", method="freeact",
                shape="128x2048, layers timed 4/32")
    return [dict(cost, metric="calib_wall_s_measured", value=200.0, note="streaming=True amp=bf16 epochs=15"),
            dict(cost, metric="calib_step_s", value=0.0812),
            dict(cost, metric="calib_total_s", value=1500.0),
            dict(cost, metric="eval_overhead", value=1.91),
            dict(BASE, commit=commit, bench="kernels", item="fused_act_quant", shape="4096=64x64", tokens=8192,
                 metric="pct_peak_bw", value=41.6)]


def test_one_commit_renders_both_tables_with_their_provenance(tmp_path, capsys):
    path = tmp_path / "perf.csv"
    append_rows(path, _rows())
    main([str(path)])
    out = capsys.readouterr().out
    assert "| llada_8b | freeact | bf16 | 4/32 | 0.081 |" in out and "| 25.0 min |" in out and "| 1.91x |" in out
    assert "| 4096=64x64 | 8192 |" in out and "| 42% |" in out
    assert "commit 5e11741" in out and "DRAFT" not in out and "NVIDIA H100 80GB HBM3" in out


def test_rows_of_two_commits_or_a_dirty_tree_are_refused_unless_allowed(tmp_path, capsys):
    path = tmp_path / "perf.csv"
    append_rows(path, _rows() + _rows("def5678+dirty"))
    with pytest.raises(SystemExit, match="one clean commit"):
        main([str(path)])
    main([str(path), "--allow-mixed"])
    out = capsys.readouterr().out
    assert "commit 5e11741, def5678+dirty (DRAFT: mixed or dirty commits)" in out
