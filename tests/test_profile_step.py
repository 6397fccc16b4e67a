"""experiments/profile_step.py: one configuration cut to its first layers, its training steps timed and profiled."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_profile_step_reports_step_time_operators_and_why_no_graph(tmp_path):
    out = tmp_path / "profile.txt"
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, str(ROOT / "experiments" / "profile_step.py"), "model=tiny_llada",
                          "method=freeact", "quant=w4a4", "calib.nsamples=8", "calib.seqlen=32", "--layers", "1",
                          "--epochs", "2", "--profile-steps", "2", "--device", "cpu", "--out", str(out)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    report = out.read_text()
    assert "layers=1 epochs=2 steps=4" in report  # 8 sequences / batch 4 x 2 epochs, one layer (not the model's 2)
    assert "cuda_graph: not on a CUDA device" in report
    assert "top-level aten operators" in report and "aten::mm" in report
