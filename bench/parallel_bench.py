"""Training throughput of one layout (parallel.pp x parallel.dp) through the real trainer, one JSON line.

Run under the launcher for several GPUs; compare layouts measured in the same device call:

    python bench/parallel_bench.py --pp 1 --T 131072 --chunk 8192                     # one GPU
    torchrun --standalone --nproc-per-node 2 bench/parallel_bench.py --pp 2 --T 131072  # two stages
    torchrun --standalone --nproc-per-node 2 bench/parallel_bench.py --pp 1 --T 131072  # two replicas

Documents are random bytes of exactly T tokens (byte tokenizer), the model is the TinyLlama-1.1B shape in bf16
(random init), DeepSpeed AdamW, one document per replica per step.  The first step is a warm-up; tokens/s is
the best of the timed steps (tokens of all replicas / step time); peak memory is the largest over ranks.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from rollout_dist.config import to_train_config  # noqa: E402
from rollout_dist.trainer import Trainer  # noqa: E402

OUT = os.environ.get("OUT", "/tmp")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--T", type=int, default=131072)
    ap.add_argument("--chunk", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    ap.add_argument("--model", default="tinyllama_1b")
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--device", default="cuda", help="cpu for a smoke test of the script")
    ap.add_argument("--zero", type=int, default=1, help="DeepSpeed ZeRO stage (1: fp32 master weights and grads)")
    args = ap.parse_args()
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    data = Path(tempfile.gettempdir()) / f"parallel_bench_docs_{args.T}"
    launch_id = os.getpid() if world == 1 else os.environ.get("MASTER_PORT", 0)  # the same on every rank
    run_dir = Path(tempfile.gettempdir()) / f"parallel_bench_run_pp{args.pp}_w{world}_{launch_id}"
    if rank == 0 or world == 1:
        data.mkdir(exist_ok=True)
        rng = random.Random(0)
        for i in range(4):
            path = data / f"doc{i}.txt"
            if not path.exists():
                path.write_bytes(bytes(rng.randrange(32, 127) for _ in range(args.T)))
    if world > 1:
        import time
        while len(list(data.glob("doc*.txt"))) < 4:
            time.sleep(0.5)
        time.sleep(1.0)
    conf = str(Path(__file__).resolve().parents[1] / "hydra_conf")
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            f"model={args.model}", f"data.path={data}", f"rollout.chunk_size={args.chunk}",
            f"rollout.attention={args.attention}", f"parallel.pp={args.pp}", f"trainer.device={args.device}",
            f"trainer.zero_stage={args.zero}",
            f"trainer.max_steps={args.steps + 1}", "trainer.warmup_steps=0", "trainer.log_every=1",
            "trainer.tensorboard=false", "checkpoint.save_final=false", f"checkpoint.dir={run_dir}"])
    trainer = Trainer(to_train_config(cfg))
    history = trainer.fit()
    peak = torch.tensor([max(s.peak_mem_gib for s in history)], device=trainer.device)
    if world > 1:
        torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
    timed = history[1:] or history
    best = max(timed, key=lambda s: s.tokens_per_s)
    rec = {"layout": f"pp{trainer.layout.pp}xdp{trainer.layout.dp}", "gpus": world, "T": args.T,
           "chunk": args.chunk, "tokens_per_step": best.tokens, "step_s": round(best.seconds, 3),
           "tok_s": round(best.tokens_per_s, 1), "peak_mem_gib_max_rank": round(float(peak), 2),
           "loss": round(best.loss, 4),
           "gpu": torch.cuda.get_device_name() if trainer.device.type == "cuda" else "cpu", "timed_steps": len(timed)}
    if rank == 0:
        print(json.dumps(rec), flush=True)
        with open(os.path.join(OUT, "parallel_bench.jsonl"), "a") as f:
            f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
