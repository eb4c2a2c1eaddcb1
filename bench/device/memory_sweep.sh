#!/usr/bin/env bash
# Several runs of bench/memory_eval.py at once on one H200: each argument is "NAME: ARGS...", one process per run.
# A memory-mode step of these small models is bound by kernel launches (the GPU idles most of a step), so runs side
# by side each keep most of their speed. Carry .whl/ (../shared/device/make-wheels.sh).
#   bash bench/device/memory_sweep.sh "memory: --variants memory --steps 900" "local: --variants local --steps 900"
# Every run's JSON lines (with "run": NAME) in $OUT/memory_sweep.jsonl, their logs in $OUT/memory_sweep.log; every
# run's table last.
set -uo pipefail
source bench/device/env.sh
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader
base=$(mktemp -d)
pids=()
for run in "$@"; do
  name=${run%%:*}; args=${run#*:}
  mkdir -p "$base/$name"
  # shellcheck disable=SC2086  # ARGS are words
  OUT=$base/$name OMP_NUM_THREADS=1 python3 bench/memory_eval.py $args > "$base/$name/memory_eval.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
nvidia-smi --query-gpu=memory.used --format=csv,noheader
for run in "$@"; do
  name=${run%%:*}
  echo "== $name:${run#*:}"
  grep -v UserWarning "$base/$name/memory_eval.log" | grep -E "steps would|step .*/|^variant|^memory|^local|^exact|Error|error" \
    | tail -14
done
for run in "$@"; do
  name=${run%%:*}
  sed "s/^{\"bench\": \"memory_eval\"/{\"bench\": \"memory_eval\", \"run\": \"$name\"/" "$base/$name/memory_eval.jsonl" \
    >> "$OUT/memory_sweep.jsonl"
  { echo "== $name:${run#*:}"; grep -v UserWarning "$base/$name/memory_eval.log"; } >> "$OUT/memory_sweep.log"
done
echo "exit $status"
