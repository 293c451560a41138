#!/usr/bin/env bash
# The first-order reference (tools/bench_first_order.py) in one GPU call: AdamW with backprop on the
# time-to-accuracy tasks' splits, every (task, lr, seed) its own process, WORKERS at a time.
#
#   GGUF, WHEELS, DATA   as in tools/gpu_time_to_accuracy.sh (the SmolLM2 GGUF, gguf/zstandard wheels, the splits)
#   TASKS, LRS, SEEDS    default "tweets mr", "1e-5 3e-5 1e-4", "0 1 2"
#   STEPS, WORKERS       default 1000 (4 epochs of the 4,000 training examples at batch 16), 6
#   GIT_REV              the device copy's .git may be stale
# Records go to $OUT/first_order.jsonl.
source "$(dirname "$0")/gpu_setup.sh"
mkdir -p /tmp/fo && cp -r "${DATA:-runs/tta/data}" /tmp/fo/
python3 -c "import sys; sys.path.insert(0, 'tools'); import bench_first_order as b; print(b.hf_folder({'model': '$STORE', 'work': '/tmp/fo'}))" || exit 1
for t in ${TASKS:-tweets mr}; do for lr in ${LRS:-1e-5 3e-5 1e-4}; do for s in ${SEEDS:-0 1 2}; do
  echo "--task=$t --lr=$lr --seed=$s"
done; done; done | xargs -P ${WORKERS:-6} -L1 python3 tools/bench_first_order.py --model=$STORE \
  --model_name="SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)" --device=cuda --tf32=1 --work=/tmp/fo \
  --n_train=4000 --n_dev=500 --n_test=1000 --steps=${STEPS:-1000} --out=$OUT/first_order.jsonl 2>&1 | grep -v Warn
echo "call took $(( $(date +%s) - T0 )) s"
