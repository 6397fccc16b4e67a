"""experiments/repro/report.py: the study's numbers regenerate from its result CSVs (and refuse mixed commits)."""
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "experiments" / "repro" / "report.py"


def _rows(seeds_a, seeds_b, commit="abc1234"):
    rows = []
    for label, vals in (("flatquant", seeds_a), ("freeact_flat", seeds_b)):
        for seed, v in enumerate(vals):
            rows.append({"run_hash": f"{label}{seed}", "status": "ok", "model.name": "m", "method.name": label,
                         "method.label": label, "quant.name": "w4a4", "seed": seed, "wiki.nll": v,
                         "git_commit": commit, "info.layer0.qkv.energy_init.mask": 0.01 * (seed + 1),
                         "info.layer0.qkv.energy_final.mask": 0.02, "info.layer0.err.mask": 0.5})
    return rows


def _report(tmp_path, rows, name="t.csv") -> str:
    """The report of ``rows`` written as the CSV ``name`` (a testbed's name holds it against that sweep)."""
    csv = tmp_path / name
    pd.DataFrame(rows).to_csv(csv, index=False)
    out = tmp_path / "r.md"
    subprocess.run([sys.executable, str(SCRIPT), str(csv), "--out", str(out)], check=True, cwd=ROOT)
    return out.read_text()


def test_report_regenerates_paired_differences(tmp_path):
    csv = tmp_path / "t.csv"
    pd.DataFrame(_rows([4.0, 4.1, 4.2], [3.9, 3.98, 4.06])).to_csv(csv, index=False)
    out = tmp_path / "r.md"
    subprocess.run([sys.executable, str(SCRIPT), str(csv), "--out", str(out), "--energy-dir", str(tmp_path)],
                   check=True, cwd=ROOT)
    text = out.read_text()
    # differences -0.10, -0.12, -0.14: mean -0.12, t(2) = 4.302653, sd 0.02 -> half width 0.049683
    assert "| freeact_flat | -0.1200 [-0.1697, -0.0703] (n = 3; lower) |" in text
    assert "| flatquant | 4.1000 ± 0.1000 (3) |" in text
    assert "rows from commit abc1234 (6 rows)" in text
    energy = pd.read_csv(tmp_path / "energy_t.csv")
    assert sorted(energy["energy_init"]) == pytest.approx([0.01, 0.01, 0.02, 0.02, 0.03, 0.03])  # 2 labels x 3 seeds


def test_report_times_against_flatquant_on_the_same_device(tmp_path):
    rows = _rows([4.0, 4.1], [3.9, 4.0])
    for r, (dev, secs) in zip(rows, [("GPU-A", 100.0), ("cpu", 400.0), ("GPU-A", 150.0), ("cpu", 200.0)]):
        r.update({"device_name": dev, "info.train_seconds": secs})
    text = _report(tmp_path, rows)
    assert "devices: GPU-A (2 rows), cpu (2 rows)" in text
    assert "| freeact_flat | GPU-A | 150 | 1.50x |" in text and "| freeact_flat | cpu | 200 | 0.50x |" in text


def test_report_refuses_mixed_commits(tmp_path):
    csv = tmp_path / "t.csv"
    rows = _rows([4.0, 4.1], [3.9, 4.0])
    rows[0]["git_commit"] = "def5678+dirty"
    pd.DataFrame(rows).to_csv(csv, index=False)
    res = subprocess.run([sys.executable, str(SCRIPT), str(csv)], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode != 0 and "dirty" in res.stderr


def test_job_lists_follow_the_experiment_sweeps_seed_by_seed(compose):
    import importlib.util

    from freeact.validate import validate

    spec = importlib.util.spec_from_file_location("repro_jobs", ROOT / "experiments" / "repro" / "jobs.py")
    jobs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(jobs)
    methods, seeds = jobs.sweep("testbed_dream")
    lines = jobs.job_lines(["testbed_dream"], "/out")
    assert len(lines) == len(methods) * len(seeds) - (len(seeds) - 1)  # fp16 once
    order = [int(line.split("seed=")[1].split()[0]) for line in lines]
    assert order == sorted(order)  # whole seeds first: a queue cut short keeps every method of a seed
    assert sum("method=fp16 " in line for line in lines) == 1
    few = jobs.job_lines(["testbed_dream", "testbed_ar"], "/out", methods=["flatquant"], seeds=[1])
    assert few == ["+experiment=repro_testbed_dream method=flatquant seed=1 results_file=/out/testbed_dream.csv",
                   "+experiment=repro_testbed_ar method=flatquant seed=1 results_file=/out/testbed_ar.csv"]
    ranked = jobs.job_lines(["testbed_dream", "testbed_ar"], "/out", methods=["freeact_r0", "flatquant"], by_method=True)
    assert [(line.split()[1], line.split()[2]) for line in ranked[:4]] == [
        ("method=freeact_r0", "seed=0"), ("method=freeact_r0", "seed=1"), ("method=freeact_r0", "seed=2"),
        ("method=freeact_r0", "seed=0")]  # testbed_ar after testbed_dream, then flatquant
    assert len(ranked) == 12 and all("method=flatquant " in line for line in ranked[6:])
    cfg = compose(few[0].split())  # a job line is a valid run
    validate(cfg)
    assert cfg.method.label == "flatquant" and cfg.seed == 1 and cfg.calib.nsamples == 128


def test_job_lists_skip_finished_runs_and_carry_extra_overrides(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("repro_jobs", ROOT / "experiments" / "repro" / "jobs.py")
    jobs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(jobs)
    rows = [{"method.label": "flatquant", "seed": 0, "status": "ok"},
            {"method.label": "flatquant", "seed": 1, "status": "failed"},  # not finished: run again
            {"method.label": "freeact", "seed": 2, "status": "ok"}]
    pd.DataFrame(rows).to_csv(tmp_path / "testbed_dream.csv", index=False)
    lines = jobs.job_lines(["testbed_dream"], "/out", methods=["flatquant", "freeact"], skip_done=str(tmp_path),
                           extra=["all_methods.layers_in_flight=30"])
    runs = {(line.split("method=")[1].split()[0], int(line.split("seed=")[1].split()[0])) for line in lines}
    assert runs == {("flatquant", 1), ("flatquant", 2), ("freeact", 0), ("freeact", 1)}
    assert all(line.endswith(" all_methods.layers_in_flight=30") for line in lines)


def test_report_pairs_the_iso_time_control(tmp_path):
    rows = []
    for label, vals in (("flatquant", [4.0, 4.1, 4.2]), ("freeact_flat_r0", [3.9, 4.0, 4.1]),
                        ("freeact_flat_r0_7ep", [3.95, 4.05, 4.15]), ("flatquant_31ep", [3.8, 3.9, 4.0])):
        rows += [{"run_hash": f"{label}{s}", "status": "ok", "model.name": "m", "method.name": label.split("_7ep")[0],
                  "method.label": label, "quant.name": "w4a4", "seed": s, "wiki.nll": v, "git_commit": "abc1234"}
                 for s, v in enumerate(vals)]
    csv = tmp_path / "t.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    out = tmp_path / "r.md"
    subprocess.run([sys.executable, str(SCRIPT), str(csv), "--out", str(out)], check=True, cwd=ROOT)
    text = out.read_text().split("Iso-time control")[1]
    # constant per-seed differences: a zero-width interval
    assert "| freeact_flat_r0_7ep | flatquant | -0.0500 [-0.0500, -0.0500] (n = 3; lower) |" in text
    assert "| freeact_flat_r0 | flatquant_31ep | +0.1000 [+0.1000, +0.1000] (n = 3; higher) |" in text


def test_report_says_what_the_sweep_still_lacks(tmp_path):
    # a CSV named after a testbed is held against conf/experiment/repro_testbed_ar.yaml: 11 methods x seeds 0-2,
    # fp16 once (31 runs), of which FlatQuant and the FreeAct variants (flatquant_orth ablations included) are 18
    rows = _rows([4.0, 4.1, 4.2], [])
    rows += [dict(rows[0], run_hash="r0", **{"method.name": "freeact", "method.label": "freeact_r0", "seed": 0}),
             dict(rows[0], run_hash="r1", status="failed", **{"method.label": "freeact_r0", "seed": 1}),
             dict(rows[0], run_hash="fp", **{"method.label": "fp16", "seed": 0})]
    text = _report(tmp_path, rows, "testbed_ar.csv")
    assert "5 of 31 runs; FlatQuant and the FreeAct variants (what issue 12 must show) 4 of 18." in text
    assert "`freeact_r0` (1, 2); `freeact_flat_r0` (0, 1, 2);" in text  # a failed run is not a row
    assert "`fp16`" not in text and "`flatquant` (" not in text
