#!/usr/bin/env bash
# The performance measurements of the README (results/perf.csv), one after the other so that nothing else shares
# the GPU while a time is taken. `start` copies the code and runs the steps below in the background (its own
# process session: it outlives the command, while the machine stays held); `poll` waits for it and copies what
# exists so far into OUT (perf.csv, compile_ab.csv, done.txt, the log, the profiles as one archive).
#   experiments/perf_session.sh start COMMIT [PRIOR]   (from the repository root)
#   experiments/perf_session.sh poll SECONDS [OUT]
# The code is the working tree, which must be a clean checkout of COMMIT, or, with CODE_TGZ set, that archive
# (`git archive COMMIT`, the testbeds left out: they are not used). A lent GPU may be taken back before the
# list ends: every step is one measurement (one model and method), its rows land in perf.csv only when it
# ends, and done.txt gives every finished step's exit status. PRIOR, a folder that an earlier poll of the same
# COMMIT filled, resumes that session: its perf.csv, compile_ab.csv, done.txt and profiles are taken over, the
# steps that succeeded are skipped (and compile_on once it ran: its failure means no compile), the others run
# again, so that the table still comes from one commit. The steps: `perf_session.sh steps`.
# KEEP (default /root/keep/perf) holds the copy and the results; PYTHONPATH must reach hydra/omegaconf
# (experiments/repro/offline_gpu.sh install puts them in /root/site).
set -u
K=${KEEP:-/root/keep/perf}
step=${1:-}; shift || true
list() {  # the steps: NAME then the command, run from the copied code; $B, $C are set by the runner
  cat <<'EOF'
gpu_tests python3 -m pytest -q -p no:cacheprovider tests/test_cuda_graphs.py tests/test_kernels.py tests/test_flatquant.py -k "cuda or gpu or graph"
compile_off $B --out $K/compile_ab.csv --models llada_8b --methods freeact --layers 1 --epochs 1 --compile off
compile_on $B --out $K/compile_ab.csv --models llada_8b --methods freeact --layers 1 --epochs 1 --compile on
llada_freeact $B --models llada_8b --methods freeact --layers 4 --epochs 15 --compile $C --profile-eval 15
llada_flatquant $B --models llada_8b --methods flatquant --layers 4 --epochs 15 --compile $C --profile-eval 15
llada_quarot $B --models llada_8b --methods quarot --layers 1 --profile-eval 15
dream_quarot $B --models dream_7b --methods quarot --layers 1 --profile-eval 15
dream_freeact $B --models dream_7b --methods freeact --layers 4 --epochs 15 --compile $C --profile-eval 15
dream_flatquant $B --models dream_7b --methods flatquant --layers 4 --epochs 15 --compile $C --profile-eval 15
kernels python3 experiments/bench_kernels.py --out $K/perf.csv
calib_profile $B --models dream_7b --methods freeact --layers 1 --epochs 3 --compile $C --profile-calib 30
llada_gptq $B --models llada_8b --methods gptq --layers 1
dream_gptq $B --models dream_7b --methods gptq --layers 1
llada_rtn $B --models llada_8b --methods rtn --layers 1
dream_rtn $B --models dream_7b --methods rtn --layers 1
EOF
}
case $step in
steps) list | cut -d' ' -f1 ;;
start)
  commit=$1 prior=${2:-}
  rm -rf "$K" && mkdir -p "$K/code" "$K/logs"
  if [ -n "${CODE_TGZ:-}" ]; then tar -xzf "$CODE_TGZ" -C "$K/code"
  else cp -r freeact experiments conf tests pyproject.toml "$K/code/"; fi
  if [ -n "$prior" ]; then
    for f in perf.csv compile_ab.csv done.txt; do [ -f "$prior/$f" ] && cp "$prior/$f" "$K/"; done
    [ -f "$prior/logs.tgz" ] && tar -xzf "$prior/logs.tgz" -C "$K"
    echo "resuming: $(grep -c . "$K/done.txt" 2>/dev/null || echo 0) steps done before"
  fi
  touch "$K/done.txt"
  date +%H%M%S > "$K/started"
  list > "$K/steps.txt"
  cat > "$K/run.sh" <<'EOF'
set -u
B="python3 experiments/bench_cost.py --out $K/perf.csv --profile-dir $K/logs --amp bf16"
C=on; grep -q "^compile_on rc=[1-9]" "$K/done.txt" && C=off  # compile when its A/B run worked
while read -r name cmd; do
  if grep -qx "$name rc=0" "$K/done.txt" || { [ "$name" = compile_on ] && grep -q "^$name rc=" "$K/done.txt"; }; then
    echo "=== skip $name (done)"; continue
  fi
  echo "=== $(date +%T) $name: $cmd"
  eval "$cmd"; rc=$?
  echo "=== $(date +%T) $name rc=$rc"
  echo "$name rc=$rc" >> "$K/done.txt"
  [ "$name" = compile_on ] && [ $rc -ne 0 ] && C=off
done < "$K/steps.txt"
echo "=== $(date +%T) all done"
EOF
  (cd "$K/code" && K=$K FREEACT_GIT_COMMIT=$commit PYTHONUNBUFFERED=1 setsid nohup bash "$K/run.sh" \
    > "$K/session.log" 2>&1 < /dev/null &)
  echo "started (commit $commit); log: $K/session.log"
  ;;
poll)
  end=$((SECONDS + $1)) out=${2:-${OUT:-$K/out}}
  mkdir -p "$out"
  while [ $SECONDS -lt $end ] && ! grep -q "all done" "$K/session.log" 2>/dev/null; do sleep 10; done
  cp "$K/session.log" "$out/session_$(cat "$K/started" 2>/dev/null).log" 2>/dev/null
  for f in perf.csv compile_ab.csv done.txt; do [ -f "$K/$f" ] && cp "$K/$f" "$out/"; done
  tar -czf "$out/logs.tgz" -C "$K" logs
  grep "^===" "$K/session.log" | tail -n 4
  ;;
*) echo "usage: perf_session.sh start COMMIT [PRIOR] | poll SECONDS [OUT] | steps"; exit 2 ;;
esac
