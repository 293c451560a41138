#!/usr/bin/env bash
# One GPU call of the time-to-accuracy sweep (docs/estimators.md, "How to run it on the GPU"), on a machine
# without internet: everything it needs travels with the call.
#
#   GGUF     the SmolLM2 GGUF, or its two halves PIECE_A (copied to /tmp by the call before) + PIECE_B
#   WHEELS   a folder of wheels to install (gguf, zstandard: tools lacking on the GPU machine)
#   SWEEP    the sweep JSONL (default tools/sweeps/time_to_accuracy_h200.jsonl)
#   DATA     the task splits folder (default runs/tta/data)
#   RESUME   an earlier call's progress folder (unpacked from its progress.tgz): its runs go on from there
#   WORKERS, DEADLINE_S (default 12, 540), GIT_REV (the device copy's .git may be stale)
#   DEVICE, N_TRAIN, N_DEV, N_TEST (default cuda, 4000, 500, 1000: the splits' sizes, as in DATA's folder names)
#
# It converts the GGUF once into a store (~20 s; every run then opens in ~3 s instead of ~25 s), runs the
# sweep with a deadline inside this call (a process does not outlive its call), and leaves under $OUT the
# records (records.jsonl) and progress.tgz: every run's last snapshot with its update log, for RESUME next time.
source "$(dirname "$0")/gpu_setup.sh"
mkdir -p /tmp/tta/progress && cp -r "${DATA:-runs/tta/data}" /tmp/tta/
RESUME_ARG=""
[ -n "${RESUME:-}" ] && RESUME_ARG="--resume_dir=$RESUME"
LEFT=$(( ${DEADLINE_S:-540} - ($(date +%s) - T0) ))
python3 tools/bench_time_to_accuracy.py --model=$STORE --model_name="SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)" \
  --device=${DEVICE:-cuda} --work=/tmp/tta --n_train=${N_TRAIN:-4000} --n_dev=${N_DEV:-500} --n_test=${N_TEST:-1000} --tf32=1 --steps=5000 --sweep="${SWEEP:-tools/sweeps/time_to_accuracy_h200.jsonl}" --workers=${WORKERS:-12} \
  --deadline_s=$LEFT --progress_dir=/tmp/tta/progress $RESUME_ARG --out=$OUT/records.jsonl 2>&1 | awk '/cannot run its copies stacked/ || !/Warn/'
tar czf $OUT/progress.tgz -C /tmp/tta progress
echo "call took $(( $(date +%s) - T0 )) s"
