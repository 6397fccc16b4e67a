#!/usr/bin/env bash
# Run many freeact.run configurations as parallel processes on one GPU (how the reproduction-study
# rows were made: small models leave a GPU mostly idle, so several runs share it).
#   experiments/repro/gpu_queue.sh JOBS_FILE PARALLEL OUT_DIR
# JOBS_FILE: one run per line, the overrides of `python -m freeact.run` (no spaces inside one override),
# in priority order. Each run logs to OUT_DIR/logs/N.log and appends "time done N rc=... overrides"
# to OUT_DIR/done.txt; rows go wherever the overrides' results_file says (a run already in that CSV
# is skipped, so re-running the queue resumes it).
# A run that dies of CUDA out-of-memory (its log says so: the other runs held the GPU's memory) is
# started again after OOM_PAUSE seconds (default 60), at most OOM_RETRIES times (default 2); each try
# is a line in done.txt ("rc=1 oom, retry 1/2 ...").
set -u
jobs=$1 par=$2 out=$3
mkdir -p "$out/logs" "$out/runs"
export OUT=$out OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
export OOM_PAUSE=${OOM_PAUSE:-60} OOM_RETRIES=${OOM_RETRIES:-2}
run_one() {
  local i=$1 try=0 rc; shift
  while :; do
    python3 -m freeact.run "$@" progress=false "hydra.run.dir=$OUT/runs/$i" >"$OUT/logs/$i.log" 2>&1
    rc=$?  # before anything else runs (a $(date) in the echo would reset $?)
    if [ "$rc" -ne 0 ] && [ "$try" -lt "$OOM_RETRIES" ] && grep -q "OutOfMemoryError" "$OUT/logs/$i.log"; then
      try=$((try + 1))
      echo "$(date +%T) done $i rc=$rc oom, retry $try/$OOM_RETRIES $*" >>"$OUT/done.txt"
      cp "$OUT/logs/$i.log" "$OUT/logs/$i.oom$try.log"
      sleep "$OOM_PAUSE"
      continue
    fi
    echo "$(date +%T) done $i rc=$rc $*" >>"$OUT/done.txt"
    return 0
  done
}
export -f run_one
sed 's/[[:space:]]*$//' "$jobs" | grep -v '^$' | grep -v '^#' | nl -ba -w1 -s' ' | xargs -P "$par" -L 1 bash -c 'run_one "$@"' _
