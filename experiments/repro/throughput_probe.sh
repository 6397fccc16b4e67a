#!/usr/bin/env bash
# How much block training one GPU gives several concurrent runs (the study's queue runs them side by side):
# N copies of one testbed_dream FlatQuant calibration (all 30 layers, 1 epoch = 32 steps a layer) at once,
# with 10 and with 30 layers in flight, then the same under CUDA MPS when its control daemon is there
# (kernels of different processes share the multiprocessors instead of taking turns). Prints, per variant,
# the training steps per second of all runs together (sum of steps / longest training time).
#   experiments/repro/throughput_probe.sh [N=4] [OUT=/tmp/probe]
# VARIANTS (default "inflight10 inflight30 mps_inflight10 mps_inflight30") picks which to measure.
# Needs what the queue needs (offline_gpu.sh install/add/launch done: run it from KEEP/code).
set -u
n=${1:-4} out=${2:-/tmp/probe}
variants=" ${VARIANTS:-inflight10 inflight30 mps_inflight10 mps_inflight30} "
mkdir -p "$out"
probe() {  # label, layers in flight
  local label=$1 inflight=$2 i
  [[ $variants == *" $label "* ]] || return 0
  for i in $(seq "$n"); do
    python3 experiments/profile_step.py +experiment=repro_testbed_dream method=flatquant seed="$i" \
      all_methods.layers_in_flight="$inflight" --layers 30 --epochs 1 --profile-steps 0 > "$out/$label.$i.log" 2>&1 &
  done
  wait
  python3 - "$out" "$label" <<'PY'
import re, sys, pathlib
out, label = pathlib.Path(sys.argv[1]), sys.argv[2]
runs = [re.search(r"train ([0-9.]+) s for ([0-9]+) steps", p.read_text()) for p in sorted(out.glob(f"{label}.*.log"))]
ok = [(float(m[1]), int(m[2])) for m in runs if m]
if not ok:
    print(f"{label}: no run finished; see {out}/{label}.*.log")
else:
    secs = max(s for s, _ in ok)
    print(f"{label}: {len(ok)} runs, {sum(k for _, k in ok)} steps in {secs:.1f} s -> "
          f"{sum(k for _, k in ok) / secs:.1f} steps/s together (per run: "
          + ", ".join(f"{s:.1f} s" for s, _ in ok) + ")")
PY
}
probe "inflight10" 10
probe "inflight30" 30
if [[ $variants != *" mps_"* ]]; then
  :
elif command -v nvidia-cuda-mps-control > /dev/null; then
  export CUDA_MPS_PIPE_DIRECTORY=$out/mps_pipe CUDA_MPS_LOG_DIRECTORY=$out/mps_log
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  if nvidia-cuda-mps-control -d; then
    probe "mps_inflight10" 10
    probe "mps_inflight30" 30
    echo quit | nvidia-cuda-mps-control
  else
    echo "MPS: the control daemon did not start"
  fi
else
  echo "MPS: nvidia-cuda-mps-control is not installed here"
fi
