#!/usr/bin/env bash
# Issue 4 on the device tool's machines. Needs .whl/ (../shared/device/make-wheels.sh) carried with each call.
#   bash bench/device/issue4.sh quick     # one H200, < 10 min: GPU tests of offload/tiles, speed variants vs HF
#   bash bench/device/issue4.sh round4    # one H200, < 10 min: profile of the 131K step by kernel kind; Llama-3-8B
#                                         # (fwd/bwd, optimizer off the GPU) at 32K vs HF, and a 512K probe, kv offload
#   bash bench/device/issue4.sh round5    # one H200, ~6 min: Llama-3-8B at 131K with kept outputs (MFU at hdim 128);
#                                         # what is allocated at the peak of 512K probes with and without kv offload
#   bash bench/device/issue4.sh start1m [VARIANT]  # one H200: GPU exactness tests, then a whole training step at
#                                         # 1,048,576 tokens (default cudnn+keep327680:16384), detached (~16 min)
#   bash bench/device/issue4.sh start2m   # one H200: starts the 2M-token offload probe detached (about 20 min)
#   bash bench/device/issue4.sh check8b   # one H200, ~6 min: host memory seen, GPU tests of partial offload, and
#                                         # Llama-3-8B (+experiment=llama3_8b_500k: ZeRO-Offload in bf16, K/V of 26
#                                         # layers on the host) one step at 32K through the trainer
#   bash bench/device/issue4.sh check8b T [OVERRIDES...]  # then start8b T in the same call (CPU Adam built once)
#   bash bench/device/issue4.sh probe8b [T] [OVERRIDES...]  # that recipe's memory probe at T, in the foreground
#   bash bench/device/issue4.sh start8b [T] [OVERRIDES...]  # one H200: that recipe, one whole step at T tokens
#                                         # (default 501760), detached (~15 min)
#   bash bench/device/issue4.sh poll [S]  # waits up to S seconds (default 0) for the detached run to end, then
#                                         # copies what it wrote to $OUT (the machine is released 30 s after a
#                                         # call ends, detached runs with it: keep a poll call in flight)
set -uo pipefail
if [ "${1:-quick}" != poll ]; then  # poll must not rewrite the packages a detached run is importing
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD
export TORCH_CUDA_ARCH_LIST=9.0 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
LONG=/tmp/issue4_long   # survives between calls while the machine is held

detach() {  # a new process session outlives the call (device README); its files stay in $LONG
  mkdir -p "$LONG"
  OUT=$LONG setsid nohup "$@" > "$LONG/log" 2>&1 < /dev/null &
  echo "started pid $! -> $LONG"
}

case "${1:-quick}" in
  quick)
    python -m pytest -q -m gpu tests/test_offload.py tests/test_exact.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -5
    python bench/rollout_vs_hf.py --hf 131072 --ours 131072 --steps 1 --budget 420 \
      --variants cudnn:16384 cudnn+keep:16384 cudnn+keep+vt8192:32768 cudnn+kv:16384 cudnn+all:16384
    ;;
  round4)
    python bench/profile_rollout.py --T 131072 --variants cudnn+keep:16384 --micro 16384 2>&1 | tail -45
    python bench/rollout_vs_hf.py --model llama3_8b --optimizer none --hf 32768 --ours 32768 --steps 1 --budget 150 \
      --variants cudnn+vt16384:8192 cudnn+keep+vt16384:8192
    python bench/rollout_vs_hf.py --model llama3_8b --optimizer none --hf --ours --probe 524288 --probe-chunks 2 \
      --variants cudnn+kv+vt16384:2048 --budget 400
    ;;
  round5)
    python bench/rollout_vs_hf.py --model llama3_8b --optimizer none --hf --ours 131072 --steps 1 --budget 200 \
      --variants cudnn+keep+vt16384:4096
    python bench/rollout_vs_hf.py --hf --ours --probe 524288 --probe-chunks 2 --trace --budget 200 \
      --variants cudnn+kv:16384 cudnn:16384
    ;;
  start1m)
    detach bash -c "python -m pytest -q -m gpu tests/test_exact.py -k bf16_gpu > $LONG/gpu_tests.log 2>&1;
      python bench/rollout_vs_hf.py --hf --ours 1048576 --steps 1 --budget 3000 \
        --variants ${2:-cudnn+keep327680:16384}" ;;
  start2m)
    detach python bench/rollout_vs_hf.py --hf --ours --variants cudnn+kv:16384 --probe 2097152 --probe-chunks 2 \
      --budget 3000 ;;
  check8b)
    grep -E "MemTotal|MemAvailable" /proc/meminfo; cat /sys/fs/cgroup/memory.max 2>/dev/null; nproc
    nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv
    python -m pytest -q -m gpu tests/test_offload.py 2>&1 | tee "$OUT/gpu_tests_partial_offload.log" | tail -3
    python bench/train_long.py --tokens 32768 --steps 1 -- +experiment=llama3_8b_500k 2>&1 \
      | grep -vE "it/s\]|chunk/s\]|step/s\]" | tail -25
    grep -E "MemAvailable" /proc/meminfo
    if [ -n "${2:-}" ]; then cp "$OUT"/train_long.jsonl "$OUT"/check8b.jsonl; shift; bash "$0" start8b "$@"; fi ;;
  probe8b)  # foreground: fill + 2 backward chunks of that recipe at T tokens (the memory peak), no optimizer step
    pkill -f "[p]ython bench/train_long"; find ~/.cache/torch_extensions -name lock -delete 2>/dev/null
    T=${2:-501760}; shift $(( $# > 1 ? 2 : 1 ))
    python bench/train_long.py --tokens "$T" --probe-chunks 2 -- +experiment=llama3_8b_500k "$@" 2>&1 \
      | tr '\r' '\n' | grep -vE "it/s\]|chunk/s\]|step/s\]|^\s*$" | tail -12 ;;
  start8b)
    T=${2:-501760}; shift $(( $# > 1 ? 2 : 1 ))
    detach python bench/train_long.py --tokens "$T" --steps 1 -- +experiment=llama3_8b_500k "$@" ;;
  poll)
    end=$(( $(date +%s) + ${2:-0} ))
    while [ "$(date +%s)" -lt "$end" ] && pgrep -f "bench/(rollout_vs_hf|train_long).py" > /dev/null; do sleep 10; done
    cp -r "$LONG"/. "$OUT"/ 2>/dev/null; tail -5 "$LONG/log"
    pgrep -f "bench/(rollout_vs_hf|train_long).py" > /dev/null && echo "still running" || echo "finished"
    nvidia-smi --query-gpu=memory.used --format=csv ;;
esac
