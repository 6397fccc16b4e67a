"""The reproduction study's queue runner (experiments/repro/gpu_queue.sh): every run's exit status is the
one written to done.txt (a failing run must read as failed), and rows land in the results file."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parent.parent
FAST = "calib.nsamples=4 calib.seqlen=32 eval.seqlen=32 eval.max_chunks=2 eval.mc_num=2"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_queue_records_each_runs_own_exit_status(tmp_path):
    csv = tmp_path / "res.csv"
    jobs = tmp_path / "jobs.txt"
    jobs.write_text(f"model=tiny_llama method=rtn {FAST} results_file={csv}\n"
                    f"model=tiny_llama method=rtn {FAST} calib.nsamples=0 results_file={csv}\n"  # a bad config
                    "# a comment line\n\n")
    # the runner calls python3: make it this interpreter
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "python3").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (shim / "python3").chmod(0o755)
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", PATH=f"{shim}{os.pathsep}{os.environ['PATH']}")
    p = subprocess.run(["bash", str(REPO / "experiments/repro/gpu_queue.sh"), str(jobs), "2", str(tmp_path / "q")],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    done = {ln.split()[2]: ln for ln in (tmp_path / "q/done.txt").read_text().splitlines()}
    assert set(done) == {"1", "2"}
    assert " rc=0 " in done["1"], done["1"]
    assert " rc=0 " not in done["2"] and " rc=2 " in done["2"], done["2"]  # validate's exit status
    assert len(pd.read_csv(csv)) == 1
    assert "calib.nsamples=0 must be > 0" in (tmp_path / "q/logs/2.log").read_text()
