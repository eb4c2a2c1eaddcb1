"""What the coordinator's checks cost a training run: one trainer (Hydra config, DeepSpeed engine, one process or
one per GPU under torchrun), phases with the checks on and off in turn on the same GPUs, so that every figure has
its baseline beside it:

  warm-up   1 step with the checks on, not counted
  off       steps without digests (the verifier detached: no chunk hooks, no hashing, no verdict waits)
  on        every chunk and step digested, sent to the coordinator, checked; the previous step's verdict awaited
            before each optimizer step

Interleaved (off, on, off, on, ...) so that drift of the machine falls on both alike.  Reported: each phase's mean
step, the overhead of on vs off, and the bytes each rank sent the coordinator per step.  One JSON line per phase
and a summary line (rank 0), to stdout and $OUT/coordinator_overhead.jsonl.

    python bench/coordinator_overhead.py --data DIR -- model=tinyllama_1b rollout.chunk_size=0 trainer.zero_stage=1
    torchrun --nproc-per-node=2 bench/coordinator_overhead.py --data DIR -- model=tinyllama_1b ...
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from rollout_dist.config import to_train_config  # noqa: E402
from rollout_dist.trainer import Trainer  # noqa: E402

OUT = Path(os.environ.get("OUT", "/tmp"))


def emit(rec: dict) -> None:
    line = json.dumps(rec)
    print(line, flush=True)
    with open(OUT / "coordinator_overhead.jsonl", "a") as f:
        f.write(line + "\n")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_phase(trainer: Trainer, verifier, name: str, steps: int) -> dict:
    if name == "on":
        trainer.verifier = verifier
        verifier.attach(trainer.step)
    else:
        verifier.detach()
        trainer.verifier = None
    sent0, secs0 = verifier.client.bytes_sent, dict(verifier.seconds)
    walls = []
    for _ in range(steps):
        t0 = time.perf_counter()
        stats = trainer.train_step()
        sync()
        walls.append(time.perf_counter() - t0)
    if name == "on":
        verifier.finish()  # the phase's last verdict, inside the phase's time
    return {"phase": name, "steps": steps, "step_s": [round(w, 3) for w in walls],
            "step_s_mean": sum(walls) / len(walls), "tok_s": round(stats.tokens / (sum(walls) / len(walls)), 1),
            "bytes_sent_per_step": (verifier.client.bytes_sent - sent0) / steps,
            # per step: hashing before the optimizer step (chunk checks, at-rest hashes, the copy of the weights),
            # waiting for the previous verdict, hashing after it; the chunk digests run inside the rollout
            **{f"{k}_s": round((v - secs0.get(k, 0.0)) / steps, 4) for k, v in verifier.seconds.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="documents (one per data-parallel replica and step)")
    ap.add_argument("--phases", default="off:2,on:2,off:2,on:2")
    ap.add_argument("--run-dir", default=None, help="run directory (default: a new temporary one)")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, after --")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    phases = [(n, int(k)) for n, k in (p.split(":") for p in args.phases.split(","))]
    run_dir = args.run_dir or tempfile.mkdtemp(prefix="coord_bench_")
    steps = 1 + sum(k for _, k in phases)
    with initialize_config_dir(config_dir=str(ROOT / "hydra_conf"), version_base="1.3"):
        cfg = compose("config", overrides=[*args.overrides, f"data.path={args.data}", f"checkpoint.dir={run_dir}",
                                           f"trainer.max_steps={steps}", "trainer.grad_accum=1",
                                           "trainer.tensorboard=false", "checkpoint.save_final=false",
                                           "data.max_doc_tokens=null", "coordinator.enabled=true"])
    trainer = Trainer(to_train_config(cfg))
    t0 = time.perf_counter()
    trainer.setup()
    setup_s = time.perf_counter() - t0
    verifier = trainer.verifier
    trainer.train_step()  # warm-up: kernels, the optimizer's state, the coordinator's link
    results = [run_phase(trainer, verifier, name, k) for name, k in phases]
    verifier.close()
    rank, world = trainer.rank, trainer.world
    per_rank = [r["bytes_sent_per_step"] for r in results if r["phase"] == "on"]
    gathered = [None] * world
    if world > 1:
        torch.distributed.all_gather_object(gathered, sum(per_rank) / len(per_rank))
    else:
        gathered = [sum(per_rank) / len(per_rank)]
    if rank == 0:
        for r in results:
            emit({**r, "step_s_mean": round(r["step_s_mean"], 3)})
        off = [w for r in results if r["phase"] == "off" for w in r["step_s"]]
        on = [w for r in results if r["phase"] == "on" for w in r["step_s"]]
        mean_off, mean_on = sum(off) / len(off), sum(on) / len(on)
        summary = {"summary": True, "world": world, "dp": trainer.layout.dp, "pp": trainer.layout.pp,
                   "T": trainer.longest_doc, "chunk": trainer.rollout.chunk_size, "setup_s": round(setup_s, 1),
                   "zero_stage": trainer.cfg.trainer.zero_stage, "topk": trainer.cfg.coordinator.topk,
                   "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                   "step_s_off": round(mean_off, 3), "step_s_on": round(mean_on, 3),
                   "overhead_pct": round(100 * (mean_on / mean_off - 1), 2),
                   "best_off": min(off), "best_on": min(on),
                   "overhead_best_pct": round(100 * (min(on) / min(off) - 1), 2),
                   "bytes_sent_per_step_per_rank": [round(b) for b in gathered]}
        emit(summary)
        print(f"\n{'phase':5} {'steps':>5} {'step s':>8} {'tok/s':>9} {'sent/step':>10}")
        for r in results:
            print(f"{r['phase']:5} {r['steps']:>5} {r['step_s_mean']:>8.3f} {r['tok_s']:>9} "
                  f"{r['bytes_sent_per_step']:>10.0f}")
        print(f"overhead (mean) {summary['overhead_pct']}%, (best step) {summary['overhead_best_pct']}%")
    trainer.close()


if __name__ == "__main__":
    main()
