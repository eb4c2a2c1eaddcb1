#!/usr/bin/env bash
# Issue 13 [defects] on one H200 (< 10 min). Carry .whl/ (../shared/device/make-wheels.sh plus an xxhash wheel).
#   bash bench/device/defects.sh           # all of the below
#   bash bench/device/defects.sh stage     # item 4 only
# 1. the oldest transformers tested (the image's 5.17, whose decoder layers take past_key_values): the adapter's
#    cache-argument tests and the exactness, carried-state and offload tests, CPU and GPU;
# 2. bf16 gradients over 8, 64 and 256 chunks of one document against fp32, beside full-sequence bf16 (item 6);
# 3. rank 0's peak GPU memory while an 8B-shape model is trimmed to its stage of pp=2 (item 4), after the keyed
#    initialisation tests on this transformers.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD TORCH_CUDA_ARCH_LIST=9.0 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
stage() {
  python3 -m pytest -q -p no:cacheprovider tests/train/test_model_setup.py tests/test_stage.py tests/test_adapter.py \
    2>&1 | tee "$OUT/tests_stage_build.log" | tail -3
  python3 bench/stage_build.py --model llama3_8b --pp 2
}
if [ "${1:-}" = stage ]; then stage; exit; fi
python3 -c "import transformers, torch; print('transformers', transformers.__version__, 'torch', torch.__version__)"
python3 -m pytest -q -p no:cacheprovider tests/test_adapter.py tests/test_exact.py tests/test_carried_state.py \
  tests/test_offload.py tests/test_isolation.py tests/test_streams.py 2>&1 | tee "$OUT/tests_oldest_transformers.log" \
  | tail -4
python3 bench/bf16_chunks.py --chunk 256 --chunks 8 64 256 2>&1 | grep -v Warning | tail -8
stage
