#!/usr/bin/env bash
# Issue 12 [seams] on one H200 (< 10 min). Carry .whl/ (../shared/device/make-wheels.sh, plus an xxhash wheel for
# Python 3.12) and .old/ (the engine before the seams: `git archive 145fefc rollout_dist bench | tar -x -C .old`).
#   bash bench/device/seams.sh [VARIANTS...]   (default: cudnn+keep:16384 cudnn+kv:16384)
#   bash bench/device/seams.sh final           # the final tree: every GPU test and the trainer's 131K step
#   bash bench/device/seams.sh trainer         # the trainer before and after its split into roles, TinyLlama
#                                              # shape at 131,072 tokens, chunk size and kept outputs picked from
#                                              # GPU memory (the memory planner's GPU path), ZeRO-1, 2 steps each
# 1. every GPU test (split attention, bf16 exactness, offload, carried state on CUDA streams);
# 2. the 131K TinyLlama step before and after the seams (keyed random streams enter a scope per layer and chunk,
#    the kernel and host pool belong to the rollout), same call, same GPU, two variants each.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .whl/*.whl || exit 1
export TORCH_CUDA_ARCH_LIST=9.0 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
ROOT=$PWD
if [ "${1:-}" = final ]; then  # the final tree only: every GPU test, and the trainer's 131K step
  PYTHONPATH=/tmp/site:$ROOT python3 -m pytest -q -m gpu -p no:cacheprovider tests/ 2>&1 | tee "$OUT/gpu_tests.log" \
    | tail -3
  PYTHONPATH=/tmp/site:$ROOT python3 bench/train_long.py --tokens 131072 --steps 2 -- model=tinyllama_1b \
    rollout.chunk_size=0 rollout.keep_attention=true trainer.zero_stage=1 2>&1 | tee "$OUT/trainer_final.log" \
    | grep '^{' | cut -c1-600
  exit 0
fi
if [ "${1:-}" = trainer ]; then
  for tree in old new; do
    dir=$ROOT; [ $tree = old ] && dir=$ROOT/.old
    (cd "$dir" && OUT=$OUT PYTHONPATH=/tmp/site:$dir python3 bench/train_long.py --tokens 131072 --steps 2 -- \
       model=tinyllama_1b rollout.chunk_size=0 rollout.keep_attention=true trainer.zero_stage=1 2>&1 \
       | tee "$OUT/trainer_$tree.log" | grep '^{' | sed "s/^{/{\"tree\": \"$tree\", /" >> "$OUT/seams_trainer.jsonl")
  done
  grep -h "chunk_size=0\|keep_attention\|predicted peak\|Error\|error" "$OUT"/trainer_*.log | cut -c1-200
  cut -c1-400 "$OUT/seams_trainer.jsonl"
  exit 0
fi
PYTHONPATH=/tmp/site:$ROOT python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_split_attention.py tests/test_exact.py tests/test_offload.py \
  tests/test_carried_state.py tests/test_budget.py 2>&1 | tee "$OUT/gpu_tests.log" \
  | tail -8
VARIANTS="${*:-cudnn+keep:16384 cudnn+kv:16384}"
for tree in old new; do
  dir=$ROOT; [ $tree = old ] && dir=$ROOT/.old
  (cd "$dir" && OUT=$OUT PYTHONPATH=/tmp/site:$dir python3 bench/rollout_vs_hf.py --hf --ours 131072 --steps 2 \
     --budget 150 --variants $VARIANTS 2>&1 | grep '^{' | sed "s/^{/{\"tree\": \"$tree\", /" >> "$OUT/seams_speed.jsonl")
done
python3 - "$OUT/seams_speed.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(f"{'tree':5} {'variant':28} {'T':>7} {'step_s':>7} {'tok/s':>8} {'peak GiB':>8}")
for r in rows:
    if "tok_s" in r:
        print(f"{r['tree']:5} {r.get('variant', r.get('system')):28} {r['T']:>7} {r['step_s']:>7} {r['tok_s']:>8} "
              f"{r['peak_mem_gib']:>8}")
PY
