"""Killing a sweep mid-way leaves only whole rows; re-running it executes only what is missing."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from freeact.tracking.results import read_rows

REPO = Path(__file__).resolve().parent.parent
SWEEP = ["-m", "method=rtn", "quant=w4a4,w4a8,w8a8", "seed=0,1", "model=tiny_llama", "calib.nsamples=2",
         "calib.seqlen=32", "eval.seqlen=32", "eval.max_chunks=2", "progress=false"]


def test_killed_sweep_resumes(tmp_path):
    csv = tmp_path / "r.csv"
    args = [sys.executable, "-m", "freeact.run", *SWEEP, f"results_file={csv}"]
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and (not csv.exists() or len(read_rows(csv)) < 3):
        time.sleep(0.2)
        assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(read_rows(csv))
    assert 3 <= done < 6, done  # killed part-way, every row whole (read_csv would fail on a torn row)

    res = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.count("skipping") == done
    assert res.stdout.count("freeact: tiny_llama rtn") == 6 - done
    df = read_rows(csv)
    assert len(df) == 6 and df["run_hash"].is_unique
    assert sorted(zip(df["quant.name"], df["seed"])) == sorted(
        (q, s) for q in ("w4a4", "w4a8", "w8a8") for s in (0, 1))


def test_parallel_launcher_rows_do_not_interleave(tmp_path):
    """Two processes (joblib launcher) append to one CSV: both rows arrive whole."""
    csv = tmp_path / "r.csv"
    args = [sys.executable, "-m", "freeact.run", "-m", "hydra/launcher=parallel", "method=rtn", "quant=w4a4,w8a8",
            "model=tiny_llama", "calib.nsamples=2", "calib.seqlen=32", "eval.seqlen=32", "eval.max_chunks=2",
            "progress=false", f"results_file={csv}"]
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    res = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    df = read_rows(csv)
    assert sorted(df["quant.name"]) == ["w4a4", "w8a8"] and df["wiki.ppl"].notna().all()
