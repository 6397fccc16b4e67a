#!/usr/bin/env bash
# The performance measurements of the README (results/perf.csv) in one GPU session, one after the other so that
# nothing else shares the GPU while a time is taken. `start` copies the tree and runs the list below in the
# background (its own process session: it outlives the command, while the machine stays held); `poll` waits
# for it and copies what exists so far into OUT (perf.csv, compile_ab.csv, the log, the profiles as one archive).
#   experiments/perf_session.sh start COMMIT       (from the repository root, a clean checkout of COMMIT)
#   experiments/perf_session.sh poll SECONDS [OUT]
# KEEP (default /root/keep/perf) holds the copy and the results; PYTHONPATH must reach hydra/omegaconf
# (experiments/repro/offline_gpu.sh install puts them in /root/site).
set -u
K=${KEEP:-/root/keep/perf}
step=$1; shift
case $step in
start)
  commit=$1
  rm -rf "$K" && mkdir -p "$K/code" "$K/logs" && cp -r freeact experiments conf tests pyproject.toml "$K/code/"
  cat > "$K/list.sh" <<'EOF'
set -u
B="python3 experiments/bench_cost.py --out $K/perf.csv --profile-dir $K/logs --amp bf16"
run() { echo "=== $(date +%T) $*"; "$@"; local rc=$?; echo "=== $(date +%T) rc=$rc"; return $rc; }
# -1. the tests that run only on a GPU (kernels, int8, streaming, CUDA graphs, FlatQuant's captured steps): the code
#     paths timed below
run python3 -m pytest -q -p no:cacheprovider tests/test_cuda_graphs.py tests/test_kernels.py tests/test_flatquant.py \
  -k "cuda or gpu or graph"
# 0. method.compile off / on, one layer, one epoch (32 steps): the ratio of the step times; the runs below use
#    compile when it ran
AB="$B --out $K/compile_ab.csv --models llada_8b --methods freeact --layers 1 --epochs 1"  # apart from perf.csv
run $AB --compile off
C=on; run $AB --compile on || C=off
# 1. four consecutive full layers at the published settings (128 x 2048, 15 epochs), learned methods
run $B --models llada_8b --methods freeact,flatquant --layers 4 --epochs 15 --compile $C --profile-eval 15
# 2. QuaRot's evaluation overhead (one layer: its calibration has no training to time)
run $B --models llada_8b,dream_7b --methods quarot --layers 1 --profile-eval 15
run $B --models dream_7b --methods freeact,flatquant --layers 4 --epochs 15 --compile $C --profile-eval 15
# 3. the kernels, then where one FreeAct training step spends its time (profiled: no rows)
run python3 experiments/bench_kernels.py --out "$K/perf.csv"
run $B --models llada_8b --methods freeact --layers 1 --epochs 3 --compile $C --profile-calib 30
run $B --models llada_8b,dream_7b --methods gptq,rtn --layers 1
echo "=== $(date +%T) all done"
EOF
  (cd "$K/code" && K=$K FREEACT_GIT_COMMIT=$commit PYTHONUNBUFFERED=1 setsid nohup bash "$K/list.sh" \
    > "$K/session.log" 2>&1 < /dev/null &)
  echo "started (commit $commit); log: $K/session.log"
  ;;
poll)
  end=$((SECONDS + $1)) out=${2:-${OUT:-$K/out}}
  mkdir -p "$out"
  while [ $SECONDS -lt $end ] && ! grep -q "all done" "$K/session.log" 2>/dev/null; do sleep 10; done
  cp "$K/session.log" "$out/" 2>/dev/null
  for f in perf.csv compile_ab.csv; do [ -f "$K/$f" ] && cp "$K/$f" "$out/"; done
  tar -czf "$out/logs.tgz" -C "$K" logs
  grep "^===" "$K/session.log" | tail -n 4
  ;;
*) echo "usage: perf_session.sh start COMMIT | poll SECONDS [OUT]"; exit 2 ;;
esac
