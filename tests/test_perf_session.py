"""experiments/perf_session.sh: every step's exit status lands in done.txt, and a session started with an earlier
session's output (PRIOR) runs only the steps that did not succeed, with the compile choice the earlier one made.
The GPU work is replaced by a fake ``python3`` that logs its arguments and fails where told to."""
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = str(REPO / "experiments/perf_session.sh")
pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("tar") is None,
                                reason="needs bash and tar")

FAKE = """#!/bin/sh
echo "$*" >> "$CALLS"
args="$*"
IFS='|'
for bad in $FAIL; do case "$args" in *"$bad"*) exit 3 ;; esac; done
exit 0
"""


def _session(tmp_path: Path, keep: Path, out: Path, fail: str, prior: Path | None = None) -> list[str]:
    shim = tmp_path / "bin"
    shim.mkdir(exist_ok=True)
    (shim / "python3").write_text(FAKE)
    (shim / "python3").chmod(0o755)
    code = tmp_path / "code.tgz"
    if not code.exists():
        (tmp_path / "src/experiments").mkdir(parents=True)
        subprocess.run(["tar", "-czf", str(code), "-C", str(tmp_path / "src"), "."], check=True)
    calls = tmp_path / f"calls_{out.name}.txt"
    env = dict(os.environ, KEEP=str(keep), CODE_TGZ=str(code), CALLS=str(calls), FAIL=fail,
               PATH=f"{shim}{os.pathsep}{os.environ['PATH']}")
    start = ["bash", SCRIPT, "start", "abc1234"] + ([str(prior)] if prior else [])
    p = subprocess.run(start, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    for _ in range(100):  # the steps run in the background; the fake ones take milliseconds
        if "all done" in (keep / "session.log").read_text():
            break
        time.sleep(0.1)
    p = subprocess.run(["bash", SCRIPT, "poll", "5", str(out)], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "all done" in p.stdout, p.stdout + p.stderr
    return calls.read_text().splitlines() if calls.exists() else []


def test_perf_session_records_each_step_and_resumes_only_what_did_not_succeed(tmp_path):
    steps = subprocess.run(["bash", SCRIPT, "steps"], capture_output=True, text=True, check=True).stdout.split()
    assert steps[:3] == ["gpu_tests", "compile_off", "compile_on"] and len(steps) == len(set(steps))
    keep = tmp_path / "keep"
    first = _session(tmp_path, keep, tmp_path / "out1", fail="--compile on|--methods flatquant")
    assert len(first) == len(steps)
    done = (tmp_path / "out1/done.txt").read_text().splitlines()
    failed = {ln.split()[0] for ln in done if not ln.endswith(" rc=0")}
    assert failed == {"compile_on", "llada_flatquant", "dream_flatquant"}, done
    assert all("rc=3" in ln for ln in done if ln.split()[0] in failed)
    # compile failed: the learned runs after it do not compile
    assert all("--compile off" in c for c in first if "--layers 4" in c)
    assert list((tmp_path / "out1").glob("session_*.log")) and (tmp_path / "out1/logs.tgz").exists()
    # a second session from the first one's output: only the failed learned runs again, compile_on not retried
    second = _session(tmp_path, keep, tmp_path / "out2", fail="", prior=tmp_path / "out1")
    assert [c.split("--methods ")[1].split()[0] for c in second] == ["flatquant", "flatquant"], second
    assert all("--compile off" in c for c in second)
    done2 = (tmp_path / "out2/done.txt").read_text().splitlines()
    assert done2[:len(done)] == done and done2[len(done):] == ["llada_flatquant rc=0", "dream_flatquant rc=0"]
