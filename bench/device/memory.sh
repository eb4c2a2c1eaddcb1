#!/usr/bin/env bash
# Memory mode at long documents on one H200 (~6 min). Carry .whl/ (../shared/device/make-wheels.sh).
#   bash bench/device/memory.sh                 # bench/memory_scale.py: TinyLlama-1.1B shape, bf16, one process:
#                                               # exact mode at 131,072 tokens (chunk 16,384) vs memory mode
#                                               # (16 slots, chunk 16,384) at 131,072, 1,048,576 and 4,194,304:
#                                               # tokens/s, peak GPU memory, carried state per chunk vs K/V
#   bash bench/device/memory.sh --longest 4194304 8388608 --budget 560   # also 8M if the time budget allows
# Any arguments go to bench/memory_scale.py; JSON lines in $OUT/memory_scale.jsonl, the log in
# $OUT/memory_scale.log.
set -uo pipefail
source bench/device/env.sh
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader
python3 bench/memory_scale.py "$@" 2>&1 | tee "$OUT/memory_scale.log"
echo "exit ${PIPESTATUS[0]}"
