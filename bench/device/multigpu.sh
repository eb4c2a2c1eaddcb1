#!/usr/bin/env bash
# Issue 17 [multigpu] on 4 H200s (nvidia-h200-x4; pp=8 parts on nvidia-h200-x8). Carry .whl/ (see env.sh).
# Not run yet (no 4-GPU machine was lent when it was written); every script below was run on CPU with tiny shapes.
#   bash bench/device/multigpu.sh throughput   # (3) TinyLlama-1.1B shape, 131,072-token documents, chunks of 8192:
#                                              #     pp=1 on one GPU, then pp=4 and pp=2 x dp=2 on four, one JSON
#                                              #     line each in $OUT/parallel_bench.jsonl (about 6 min expected)
#   bash bench/device/multigpu.sh probe T [K] [PP] [extra overrides...]
#                                              # (4) Llama-3-8B shape, PP stages (default: the GPU count), K/V of
#                                              #     every layer offloaded, optimizer on the host (fp32): fill of every
#                                              #     chunk + backward of the last K chunks (default 2); one line per
#                                              #     rank (peak GPU memory, host RSS) in $OUT/train_long.jsonl
#   bash bench/device/multigpu.sh step T [PP] [extra overrides...]   # (4) whole steps (tokens/s, model TFLOP/s, mfu)
# Expected from the one-GPU figures (estimates, not measured): a 2,097,152-token probe at pp=4 fills for about
# 1000 s, beyond one 10-minute call; start with T=1048576, then derive longer lengths' time from backward_chunk_s.
set -uo pipefail
source "$(dirname "$0")/env.sh"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # KINDS.md: keep multicast off
GPUS=$(nvidia-smi -L | wc -l)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -1
grep -E "MemTotal|MemAvailable" /proc/meminfo; cat /sys/fs/cgroup/memory.max 2>/dev/null
run() { torchrun --standalone --nproc-per-node "$1" "${@:2}"; }
EIGHT_B=(model=llama3_8b rollout.offload=kv rollout.offload_layers=0 rollout.chunk_size=2048 rollout.vocab_tile=16384
         trainer.zero_stage=1 trainer.offload_optimizer=cpu trainer.optimizer_dtype=fp32)
case "${1:-throughput}" in
  throughput)
    python3 bench/parallel_bench.py --pp 1 --T 131072 --chunk 8192 --steps 2 2>&1 | grep -v Warning | tail -2
    run 4 bench/parallel_bench.py --pp 4 --T 131072 --chunk 8192 --steps 2 2>&1 | grep -v Warning | tail -2
    run 4 bench/parallel_bench.py --pp 2 --T 131072 --chunk 8192 --steps 2 2>&1 | grep -v Warning | tail -2
    cat "$OUT/parallel_bench.jsonl" ;;
  probe)
    T=${2:?tokens}; K=${3:-2}; PP=${4:-$GPUS}
    run "$PP" bench/train_long.py --tokens "$T" --probe-chunks "$K" -- "${EIGHT_B[@]}" "parallel.pp=$PP" "${@:5}" \
      2>&1 | grep -v Warning | tail -"$((PP + 4))" ;;
  step)
    T=${2:?tokens}; PP=${3:-$GPUS}
    run "$PP" bench/train_long.py --tokens "$T" --steps 1 -- "${EIGHT_B[@]}" "parallel.pp=$PP" "${@:4}" \
      2>&1 | grep -v Warning | tail -"$((PP + 4))" ;;
  *) echo "usage: $0 throughput | probe T [K] [PP] | step T [PP]"; exit 2 ;;
esac
