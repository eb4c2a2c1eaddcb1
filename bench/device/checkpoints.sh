#!/usr/bin/env bash
# Issue 14 [checkpoints] on one H200.  Carry .whl/ (../shared/device/make-wheels.sh, plus an xxhash wheel for
# Python 3.12).
#   bash bench/device/checkpoints.sh cost     # snapshot cost at 131,072 tokens, TinyLlama-1.1B shape, ZeRO-1
#                                             # (~14.5 GB a snapshot): no snapshots / every=1 / every=5 / chunk
#                                             # snapshots, one trainer, same GPU (bench/checkpoint_cost.py)
#   bash bench/device/checkpoints.sh spread   # resumed vs uninterrupted against the run-to-run spread (bf16, GPU),
#                                             # and the GPU tests the change touches
set -uo pipefail
source bench/device/env.sh
STORE=${STORE:-/tmp/ckpt_bench}
df -h "$(dirname "$STORE")" | tail -1
case "${1:-cost}" in
  cost)
    python3 bench/checkpoint_cost.py --tokens 131072 --store "$STORE" --phases "${PHASES:-none:4,every1:5,every5:10,chunks:2}" \
      -- model=tinyllama_1b rollout.chunk_size=0 rollout.keep_attention=true trainer.zero_stage=1 2>&1 \
      | tee "$OUT/checkpoint_cost.log" | grep -v "it/s\|step/s" | grep "^{\|^phase\|^none\|^every\|^chunks\|Error\|error" \
      | cut -c1-900
    ;;
  spread)
    python3 bench/checkpoint_resume_spread.py --tokens 16384 --steps 6 --kill-after 3 -- rollout.chunk_size=2048 \
      model.dtype=bfloat16 2>&1 | tee "$OUT/spread.log" | grep "^{\|Error" | cut -c1-600
    python3 -m pytest -q -p no:cacheprovider tests/checkpoint/test_store.py tests/checkpoint/test_chunk_snapshots.py \
      tests/test_carried_state.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -3
    ;;
esac
