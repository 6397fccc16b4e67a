#!/usr/bin/env bash
# The iso-time control of the reproduction study (issue 12), run on the GPU machine after
# `offline_gpu.sh unpack COMMIT`, before the queue starts (each run must have the GPU to itself):
# times the block training of FlatQuant and of freeact_flat_r0 alone on the GPU, one after the other
# (the first LAYERS decoder layers, one epoch, the experiment's layers in flight), on each testbed, and
# prints the queue lines that give each method the other's time, seeds 0-2:
#   freeact_flat_r0 at floor(EPOCHS / t) epochs  (label freeact_flat_r0_<M>ep; left out when t <= 1)
#   FlatQuant       at round(EPOCHS * t) epochs  (label flatquant_<N>ep)
# with t = freeact_flat_r0's training seconds / FlatQuant's. The first kind of every testbed comes first.
#   iso_time.sh COMMIT LOGDIR [TESTBED...] > iso_jobs.txt     (default testbeds: testbed_dream testbed_ar)
# LOGDIR receives each profile report (a report already there is reused, not timed again) and ratio.csv
# (testbed, seconds of each, t, M, N).
set -euo pipefail
K=${KEEP:-/root/keep} SITE=${SITE:-/root/site} LAYERS=${LAYERS:-10} EPOCHS=${EPOCHS:-15} PY=${PY:-python3}
commit=$1 logs=$2; shift 2
testbeds=${*:-testbed_dream testbed_ar}
export PYTHONPATH=$SITE HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline FREEACT_GIT_COMMIT=$commit
mkdir -p "$logs"
echo "testbed,flatquant_s,freeact_flat_r0_s,t,freeact_epochs,flatquant_epochs" > "$logs/ratio.csv"
first="" second=""
secs() { grep -o 'train [0-9.]* s' "$logs/$1.txt" | head -n 1 | cut -d' ' -f2; }  # a profile report's seconds
for tb in $testbeds; do
  for m in flatquant freeact_flat_r0; do
    [ -s "$logs/${tb}_$m.txt" ] && continue  # timed in an earlier call on this machine
    (cd "$K/code" && "$PY" experiments/profile_step.py "+experiment=repro_$tb" "method=$m" --layers "$LAYERS" \
      --epochs 1 --profile-steps 0 --out "$logs/${tb}_$m.txt") >&2
  done
  flat=$(secs "${tb}_flatquant") free=$(secs "${tb}_freeact_flat_r0")
  read -r t M N <<< "$(awk -v a="$flat" -v b="$free" -v e="$EPOCHS" \
    'BEGIN { t = b / a; m = int(e / t); if (m < 1) m = 1; printf "%.3f %d %d\n", t, m, int(e * t + 0.5) }')"
  echo "$tb,$flat,$free,$t,$M,$N" >> "$logs/ratio.csv"
  echo "$tb: FlatQuant $flat s, freeact_flat_r0 $free s, t = $t: freeact_flat_r0 at $M epochs, FlatQuant at $N" >&2
  res="results_file=$K/res/$tb.csv" slower=$(awk -v t="$t" 'BEGIN { print (t > 1) }')
  for s in 0 1 2; do
    [ "$slower" = 1 ] && first+="+experiment=repro_$tb method=freeact_flat_r0 method.epochs=$M method.label=freeact_flat_r0_${M}ep seed=$s $res"$'\n'
    second+="+experiment=repro_$tb method=flatquant method.epochs=$N method.label=flatquant_${N}ep seed=$s $res"$'\n'
  done
done
printf '%s%s' "$first" "$second"
