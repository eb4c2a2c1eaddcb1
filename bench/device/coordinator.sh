#!/usr/bin/env bash
# Issue 15 [coordinator] on nvidia-h200-x2.  Carry .whl/ (../shared/device/make-wheels.sh, plus an xxhash wheel for
# Python 3.12).
#   bash bench/device/coordinator.sh tests      # the coordinator's GPU tests, a clean bf16 GPU run (no false alarm)
#                                               # and a flipped bit in the carried state caught on the GPU
#   bash bench/device/coordinator.sh overhead   # checks on vs off at 131,072 tokens, TinyLlama-1.1B shape, ZeRO-1:
#                                               # one GPU, then dp=2 on two (bench/coordinator_overhead.py)
set -uo pipefail
source bench/device/env.sh
T=${T:-131072}
DATA=/tmp/coord_docs_$T
python3 - "$DATA" "$T" <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, "bench")
from train_long import write_document
d = Path(sys.argv[1]); d.mkdir(exist_ok=True)
for i in range(4):  # one document per replica per step
    write_document(d, int(sys.argv[2]), seed=i); (d / "doc.txt").rename(d / f"doc{i}.txt")
PY
case "${1:-overhead}" in none) exit 0;; esac  # "none": only the documents
COMMON="model=tinyllama_1b rollout.chunk_size=0 rollout.keep_attention=true trainer.zero_stage=1 data.shuffle=false"
case "${1:-overhead}" in
  tests)
    python3 -m pytest -q -p no:cacheprovider tests/coordinator 2>&1 | tee "$OUT/gpu_tests.log" | tail -3
    rm -rf /tmp/clean /tmp/flip
    python3 launch/train.py checkpoint.dir=/tmp/clean trainer.max_steps=20 model.dtype=bfloat16 \
      rollout.chunk_size=256 trainer.log_every=5 2>&1 | tee "$OUT/gpu_clean.log" | grep -c mismatch
    python3 launch/train.py checkpoint.dir=/tmp/flip trainer.max_steps=4 model.dtype=bfloat16 rollout.chunk_size=256 \
      fault.kind=state_bitflip fault.step=2 fault.chunk=1 fault.layer=1 2>&1 | tee "$OUT/gpu_flip.log" \
      | grep "^mismatch" | cut -c1-400; echo "exit ${PIPESTATUS[0]}"
    ;;
  overhead)
    python3 bench/coordinator_overhead.py --data "$DATA" --phases "${PHASES:-off:2,on:2,off:2,on:2}" -- $COMMON \
      2>&1 | tee "$OUT/overhead_1gpu.log" | grep "^{\|^phase\|^on\|^off\|^overhead\|Error" | cut -c1-600
    torchrun --standalone --nproc-per-node=2 bench/coordinator_overhead.py --data "$DATA" \
      --phases "${PHASES:-off:2,on:2,off:2,on:2}" -- $COMMON 2>&1 | tee "$OUT/overhead_dp2.log" \
      | grep "^{\|^phase\|^on\|^off\|^overhead\|Error" | cut -c1-600
    ;;
esac
