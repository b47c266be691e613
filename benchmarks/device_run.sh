#!/usr/bin/env bash
# The accelerator session in one script: the paper run and its speed, inside a hard time budget.
#
#   bash benchmarks/device_run.sh DATA_DIR OUT_DIR [BUDGET_S]
#
# DATA_DIR: CIFAR-10 as NumPy files (rebuilt there by `python -m benchmarks.transfer receive`).
# OUT_DIR: what comes back: env.txt, results.jsonl (one JSON line per benchmark), each stage's
#          log, and the run's results.json, metrics.jsonl, synthetic.png.
# BUDGET_S (default 540): seconds for the whole script; every stage has its own cap inside it
#          and the order is the order of priority, so a cut run still leaves the first figures:
#   1. environment line; the cifar10-ipc10 iteration benchmark (compile apart, timed
#      iterations, TFLOP/s against the reference's 2.06 TFLOP per iteration, peak memory) and
#      the projected 20,000-iteration time;
#   2. benchmarks.torch_reference on the same device (the side-by-side ratio), capped at 90 s;
#   3. where the time goes: the queue-training variants alone, a profile's top ops, bfloat16;
#   4. the faithful `experiments.cifar10 --ipc 10` run with its final 5-model evaluation if the
#      projection fits the time left, else as many iterations as fit (reported as a partial
#      run, never as the paper number), checkpoints on the machine's disk;
#   5. with what is left: the cifar10-ipc50 and cifar10-ipc1 iteration timings.
# The stage logs end up in OUT_DIR/logs.tgz (a call brings back at most 8 files).
# SMOKE=1 runs the same stages at a seconds-long size (to dry-run the script on a CPU).
set -uo pipefail
DATA=${1:?usage: bash benchmarks/device_run.sh DATA_DIR OUT_DIR [BUDGET_S]}
OUT=${2:?usage: bash benchmarks/device_run.sh DATA_DIR OUT_DIR [BUDGET_S]}
BUDGET=${3:-540}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
JSON="$OUT/results.jsonl"
START=$(date +%s)
WORK=${WORK:-/tmp/idm-device-run}     # checkpoints on that machine's disk, outside the repo
left() { echo $(( BUDGET - ($(date +%s) - START) )); }

SMOKE=${SMOKE:-0}
if [[ "$SMOKE" == 1 ]]; then
  BENCH=(--smoke --iters 2); RUN=(--smoke); TORCH=(--iters 1 --batch_real 16 --train_steps 1)
  ITERATIONS=10; EVAL_S=60
else
  BENCH=(--iters 20); RUN=(); TORCH=(--iters 3); ITERATIONS=20000; EVAL_S=90
  # (the empty RUN is expanded as ${RUN[@]+"${RUN[@]}"}: bash < 4.4 calls "${RUN[@]}" unbound)
fi

stage() {   # stage NAME CAP_S COMMAND...: run with a time cap, keep its log, carry on if it fails
  local name=$1 cap=$2; shift 2
  if (( cap > $(left) )); then cap=$(left); fi
  if (( cap < 20 )); then echo "[$name] skipped: $(left) s left"; return 1; fi
  echo "[$(date +%H:%M:%S)] $name (cap ${cap} s): $*"
  timeout --signal=INT --kill-after=15 "$cap" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  (( rc != 0 )) && echo "  $name exited $rc (124: time cap); see $OUT/$name.log"
  grep '^|' "$OUT/$name.log" | tail -1
  return $rc
}

# 1. Environment and the iteration benchmark.
"$PY" - >"$OUT/env.txt" 2>&1 <<'EOF'
import jax
d = jax.devices()[0]
stats = d.memory_stats() or {}
print(f"device {d.device_kind} x {jax.device_count()} ({jax.default_backend()}), "
      f"jax {jax.__version__}, memory {stats.get('bytes_limit', 0) / 2**30:.1f} GiB")
EOF
cat "$OUT/env.txt"
stage iteration_ipc10 150 "$PY" -m benchmarks.iteration --preset cifar10-ipc10 \
  --data_dir "$DATA" "${BENCH[@]}" --json "$JSON"

# 2. PyTorch beside us on the same device (on the GPU when PyTorch sees one), with a short cap:
#    the side-by-side ratio is worth more than the last minute of a run that is partial anyway.
stage torch_reference 90 "$PY" -m benchmarks.torch_reference "${TORCH[@]}" --json "$JSON"

# 3. Where the iteration's time goes and what would cut it (on the first H200 session queue
#    training was 92 of its 95 ms): the queue-training variants alone (the backend's choice,
#    vmapped and looped trainees), a profile of one iteration (its top ops go to the log; the
#    trace stays on that machine), then the iteration in bfloat16.
stage queue_variants_ipc10 150 "$PY" -m benchmarks.iteration --preset cifar10-ipc10 \
  --data_dir "$DATA" "${BENCH[@]}" --trainees all --profile "$WORK/profile-ipc10" --json "$JSON"
stage bf16_ipc10 90 "$PY" -m benchmarks.iteration --preset cifar10-ipc10 --data_dir "$DATA" \
  "${BENCH[@]}" --no_parts --set compute_dtype=bfloat16 --json "$JSON"

# 4. The paper run, or as much of it as fits.
MS=$("$PY" -c "import json,sys
rows=[json.loads(l) for l in open(sys.argv[1])]
rows=[r for r in rows if r.get('preset') == 'cifar10-ipc10' and 'iteration_s' in r]
print(rows[-1]['iteration_s'] * 1000 if rows else 0)" "$JSON" 2>/dev/null || echo 0)
# Unknown speed (the benchmark failed or was cut) counts as "does not fit": no run.
FIT=$("$PY" -c "import sys; ms,left,ev,n=map(float,sys.argv[1:]); room=left-ev-60; \
print(0 if ms<=0 else int(n) if ms*n/1000<=room else max(0,int(room*1000/ms)))" \
  "${MS:-0}" "$(left)" "$EVAL_S" "$ITERATIONS")
if (( FIT < ITERATIONS )); then
  echo "projection: ${MS} ms/iteration -> $FIT of $ITERATIONS iterations fit; a PARTIAL run"
fi
if (( FIT > 0 )); then
  RUN_DIR="$WORK/cifar10-ipc10-$FIT"        # a folder per planned length: never mixed
  stage paper_run $(( $(left) - 30 )) "$PY" -m experiments.cifar10 --ipc 10 --source npy \
    --data_dir "$DATA" --workdir "$RUN_DIR" --quiet ${RUN[@]+"${RUN[@]}"} \
    --iterations "$FIT" --eval_every 0
  RC=$?
  for f in results.json metrics.jsonl synthetic.png metrics.png; do
    cp "$RUN_DIR/$f" "$OUT/" 2>/dev/null
  done
  "$PY" - "$RUN_DIR" "$FIT" "$ITERATIONS" "$RC" >>"$JSON" <<'EOF'
import json, os, sys
folder, planned, paper, rc = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
steps = []
if os.path.exists(os.path.join(folder, "metrics.jsonl")):
    for line in open(os.path.join(folder, "metrics.jsonl")):
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if "event" not in r:
            steps.append(r["iteration"])
done = os.path.exists(os.path.join(folder, "results.json"))
print(json.dumps({"stage": "paper_run", "planned_iterations": planned, "paper_iterations": paper,
                  "iterations_reached": (max(steps) + 1) if steps else 0, "evaluated": done,
                  "partial": planned < paper or not done, "exit_code": rc}))
EOF
fi

# 5. With what is left: the other IPCs' iteration timings.
for preset in cifar10-ipc50 cifar10-ipc1; do
  stage "iteration_$preset" 120 "$PY" -m benchmarks.iteration --preset "$preset" \
    --data_dir "$DATA" "${BENCH[@]}" --no_parts --json "$JSON"
done
# A call brings back at most 8 files: the stage logs travel as one archive.
(cd "$OUT" && tar czf logs.tgz ./*.log && rm -f ./*.log)
echo "[$(date +%H:%M:%S)] done in $(( $(date +%s) - START )) s; records in $JSON, logs in $OUT/logs.tgz"
