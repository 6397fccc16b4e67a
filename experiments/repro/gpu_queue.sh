#!/usr/bin/env bash
# Run many freeact.run configurations as parallel processes on one GPU (how the reproduction-study
# rows were made: small models leave a GPU mostly idle, so ~20 runs share it).
#   experiments/repro/gpu_queue.sh JOBS_FILE PARALLEL OUT_DIR
# JOBS_FILE: one run per line, the overrides of `python -m freeact.run` (no spaces inside one override),
# in priority order. Each run logs to OUT_DIR/logs/N.log and appends "time done N rc=... overrides"
# to OUT_DIR/done.txt; rows go wherever the overrides' results_file says (a run already in that CSV
# is skipped, so re-running the queue resumes it).
set -u
jobs=$1 par=$2 out=$3
mkdir -p "$out/logs" "$out/runs"
export OUT=$out OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
run_one() {
  local i=$1; shift
  python3 -m freeact.run "$@" progress=false "hydra.run.dir=$OUT/runs/$i" >"$OUT/logs/$i.log" 2>&1
  local rc=$?  # before anything else runs (a $(date) in the echo would reset $?)
  echo "$(date +%T) done $i rc=$rc $*" >>"$OUT/done.txt"
}
export -f run_one
sed 's/[[:space:]]*$//' "$jobs" | grep -v '^$' | grep -v '^#' | nl -ba -w1 -s' ' | xargs -P "$par" -L 1 bash -c 'run_one "$@"' _
