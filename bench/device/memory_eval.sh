#!/usr/bin/env bash
# Memory mode's evaluation on one H200 (bench/memory_eval.py). Carry .whl/ (../shared/device/make-wheels.sh).
#   bash bench/device/memory_eval.sh                         # memory, chunk-local and exact one after another, 4 layers
#                                                            # x 512, pass-key recall k in {1,2,4,8} chunks back, 500
#                                                            # questions per k (bench/device/memory_sweep.sh: side by side)
#   bash bench/device/memory_eval.sh --variants memory --steps 3000   # any arguments go to bench/memory_eval.py
# JSON lines in $OUT/memory_eval.jsonl, the log in $OUT/memory_eval.log.
set -uo pipefail
source bench/device/env.sh
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader
python3 bench/memory_eval.py "$@" 2>&1 | grep --line-buffered -v UserWarning | tee "$OUT/memory_eval.log"
echo "exit ${PIPESTATUS[0]}"
