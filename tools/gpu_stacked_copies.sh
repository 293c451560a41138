#!/usr/bin/env bash
# One GPU call: seconds per step of SmolLM2 with a block part's copies stacked (one vmapped call per part)
# against one copy at a time (--stack_bytes=0), every layer on the GPU, on disk (O_DIRECT) and in host RAM
# (docs/estimators.md, "Stacked copies"). Same inputs as tools/gpu_time_to_accuracy.sh:
#
#   GGUF     the SmolLM2 GGUF          WHEELS  a folder of wheels to install (gguf, zstandard)
#   DATA     the task splits folder    GIT_REV the revision to record (the device copy's .git may be stale)
#   METHODS  estimator:q list with stacking (default mezo:1,fzoo:8,fzoo:16,fzoo:32,fzoo:auto)
#   LOOP     estimator:q list one copy at a time (default fzoo:8,fzoo:16)
#   PLACES   placements (default device disk host)
#
# Leaves $OUT/records.jsonl (kinds time_device, time_disk, time_host).
source "$(dirname "$0")/gpu_setup.sh"
mkdir -p /tmp/tta && cp -r "${DATA:-runs/tta/data}" /tmp/tta/
COMMON=(--model=$STORE "--model_name=SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)" --device=cuda --work=/tmp/tta
  --n_train=4000 --n_dev=500 --n_test=1000 --tf32=1 --task=tweets --time_disk=1 --time_steps=10
  --out=$OUT/records.jsonl)
for place in ${PLACES:-device disk host}; do
  python3 tools/bench_time_to_accuracy.py "${COMMON[@]}" --time_placement=$place \
    --methods=${METHODS:-mezo:1,fzoo:8,fzoo:16,fzoo:32,fzoo:auto} 2>&1 | awk '/cannot run its copies stacked/ || !/Warn/'
  python3 tools/bench_time_to_accuracy.py "${COMMON[@]}" --time_placement=$place --stack_bytes=0 \
    --methods=${LOOP:-fzoo:8,fzoo:16} 2>&1 | awk '/cannot run its copies stacked/ || !/Warn/'
done
echo "call took $(( $(date +%s) - T0 )) s"
