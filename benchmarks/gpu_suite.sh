#!/usr/bin/env bash
# Every accelerator measurement BENCHMARKS.md lists as missing, in one go.
#
#   bash benchmarks/gpu_suite.sh DATA_DIR [OUT_DIR]
#
# DATA_DIR: CIFAR-10 as NumPy chunks (train_x_*.npy, train_y.npy, test_x.npy, test_y.npy).
# OUT_DIR (default bench-out): one JSON line per program in results.jsonl, one log per program.
# Order: the cheap, most wanted figures first, so a run cut short still leaves them behind.
# About 10 minutes on one H200 at the targets (30 ms per iteration, 1 minute per evaluation);
# most of it is compiling. SMOKE=1 runs the same steps at seconds-long sizes (to check the
# script on a CPU before spending accelerator time).
set -uo pipefail
DATA=${1:?usage: bash benchmarks/gpu_suite.sh DATA_DIR [OUT_DIR]}
OUT=${2:-bench-out}
mkdir -p "$OUT"
JSON="$OUT/results.jsonl"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
SIZE=(); ITERS=20; EPOCHS=1000; SHORT=100
if [[ "${SMOKE:-0}" == 1 ]]; then SIZE=(--smoke); ITERS=2; EPOCHS=1; SHORT=1; fi

step() {   # step NAME COMMAND...: run one benchmark, keep its log, carry on if it fails
  local name=$1; shift
  echo "[$(date +%H:%M:%S)] $name: $*"
  if ! "$@" --json "$JSON" >"$OUT/$name.log" 2>&1; then
    echo "  failed (exit $?); see $OUT/$name.log"
  fi
  grep '^|' "$OUT/$name.log" | tail -1
}

# 1. The faithful iteration: compile time, the matching/queue split, TFLOP/s, peak memory.
step iteration "$PY" -m benchmarks.iteration --preset cifar10-ipc10 --data_dir "$DATA" \
  "${SIZE[@]}" --iters "$ITERS"
# 2. The final 5-model evaluation: a 1-epoch and the protocol's 1001-epoch program, for the 5
#    models vmapped, looped in one program, and called one after another.
step evaluate "$PY" -m benchmarks.evaluate --ipc 10 --epochs "$EPOCHS" --num_eval 5 --iters 1
# 3. Mixed precision: bf16 compute, fp32 images and optimiser states.
step iteration_bf16 "$PY" -m benchmarks.iteration --preset cifar10-ipc10 --data_dir "$DATA" \
  "${SIZE[@]}" --iters "$ITERS" --no_parts --set compute_dtype=bfloat16
# 4. Are whole batches and vmapped evaluation models the better choice here, as expected?
step iteration_chunk16 "$PY" -m benchmarks.iteration --preset cifar10-ipc10 --data_dir "$DATA" \
  "${SIZE[@]}" --iters "$ITERS" --no_parts --set microbatch=16
step evaluate_chunk16 "$PY" -m benchmarks.evaluate --ipc 10 --epochs "$SHORT" --num_eval 5 \
  --iters 1 --microbatch 16
# 5. The other paper settings' iteration, for the projected run times in RESULTS.md.
for preset in cifar10-ipc1 cifar10-ipc50; do
  step "iteration_$preset" "$PY" -m benchmarks.iteration --preset "$preset" --data_dir "$DATA" \
    "${SIZE[@]}" --iters "$ITERS" --no_parts
done
echo "[$(date +%H:%M:%S)] done; records in $JSON"
