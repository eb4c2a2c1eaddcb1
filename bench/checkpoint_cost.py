"""What snapshots cost a training run: one trainer (Hydra config, DeepSpeed engine), one process, phases run in turn
on the same GPU so that every figure has its baseline beside it:

  warm-up        1 step, not counted
  none           steps without snapshots (the baseline)
  every1         a snapshot after every step (checkpoint.every=1): background write, fsync, commit, retention
  every5         a snapshot after every 5th step
  chunks         checkpoint.every=1 plus a chunk snapshot after every chunk of the fill pass (chunk_every=1)

Each phase's time counts every step's wall time, snapshot copy and waits included, plus the drain of the last
background write at the phase's end (``drain_s``, reported apart: in a longer run it overlaps the next step).
Per snapshot: the seconds it blocked training (copy to pinned host memory), the seconds it waited for the previous
one's write, and the seconds the write took (zarr arrays, xxh3, fsync of every file and directory, manifest).
One JSON line per phase, and a summary line, to stdout and $OUT/checkpoint_cost.jsonl.

    python bench/checkpoint_cost.py --tokens 131072 --store /tmp/ckpt -- model=tinyllama_1b rollout.chunk_size=0 \
        rollout.keep_attention=true trainer.zero_stage=1
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from train_long import emit as emit_to, trainer_for  # noqa: E402

OUT = Path(os.environ.get("OUT", "/tmp"))


def emit(rec: dict) -> None:
    emit_to(rec, "checkpoint_cost.jsonl")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_phase(trainer, name: str, steps: int, every: int, chunk_every: int = 0) -> dict:
    ck = trainer.cfg.checkpoint
    ck.every, ck.chunk_every = every, chunk_every
    if chunk_every and trainer.chunk_snapshots is None:
        trainer.chunk_snapshots = trainer._chunk_snapshotter()
    if not chunk_every:
        trainer.chunk_snapshots = None
    walls, blocks, waits = [], [], []
    writes_before = _write_seconds(trainer)
    t_phase = time.perf_counter()
    for _ in range(steps):
        t0 = time.perf_counter()
        stats = trainer.train_step()
        trainer.history.append(stats)
        trainer._checkpoint_if_due(stats)
        sync()
        walls.append(time.perf_counter() - t0)
        if stats.snapshot_block_s is not None:
            blocks.append(stats.snapshot_block_s)
            waits.append(stats.snapshot_wait_s)
    t_drain = time.perf_counter()
    trainer.checkpointer.close()
    drain = time.perf_counter() - t_drain
    rec = {"phase": name, "steps": steps, "every": every, "chunk_every": chunk_every,
           "step_s_mean": round(sum(walls) / len(walls), 3), "step_s": [round(w, 3) for w in walls],
           "phase_s": round(time.perf_counter() - t_phase, 2), "drain_s": round(drain, 2),
           "snapshots": len(blocks), "block_s": [round(b, 3) for b in blocks],
           "wait_s": [round(w, 3) for w in waits], "write_s": _write_seconds(trainer)[len(writes_before):],
           "tok_s": round(stats.tokens / (sum(walls) / len(walls)), 1)}
    if chunk_every and trainer.chunk_snapshots is not None:
        cs = trainer.chunk_snapshots.snaps
        rec.update(chunk_snapshots=cs.count, chunk_capture_s=round(cs.capture_seconds, 3),
                   chunk_write_s=round(cs.write_seconds, 3), chunks_per_step=stats.chunks)
    emit(rec)
    return rec


def _write_seconds(trainer) -> list[float]:
    return list(getattr(trainer.checkpointer, "write_seconds", []))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=131072)
    ap.add_argument("--store", required=True, help="a directory on the disk under test (emptied first)")
    ap.add_argument("--phases", default="none:4,every1:5,every5:10,chunks:2",
                    help="name:steps, in order (names: none, every1, every5, chunks)")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, after --")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    store = Path(args.store)
    shutil.rmtree(store, ignore_errors=True)
    store.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = trainer_for(args.tokens, [*args.overrides, f"checkpoint.store={store / 'state.zarr'}",
                                            "checkpoint.keep=1", "checkpoint.every=1"], Path(tmp), 10 ** 6)
        t0 = time.perf_counter()
        trainer.setup()
        setup_s = time.perf_counter() - t0
        ck = trainer.cfg.checkpoint
        ck.every = 0
        trainer.history.append(trainer.train_step())  # warm-up: kernels, FusedAdam's build, allocator
        trainer.checkpointer.poll()  # after the first step, as in a run: pins the snapshots' host buffers
        t0 = time.perf_counter()
        trainer.checkpointer.wait_for_host_buffers()
        pin_wait_s = time.perf_counter() - t0
        results = []
        for spec in args.phases.split(","):
            name, steps = spec.split(":")
            every, chunk_every = {"none": (0, 0), "every1": (1, 0), "every5": (5, 0), "chunks": (1, 1)}[name]
            results.append(run_phase(trainer, name, int(steps), every, chunk_every))
        base = next(r for r in results if r["phase"] == "none")
        nbytes = trainer.checkpointer.store.valid_versions()[-1].manifest["nbytes"]
        summary = {"summary": True, "T": args.tokens, "setup_s": round(setup_s, 1),
                   "snapshot_gb": round(nbytes / 1e9, 2),
                   "chunk": trainer.rollout.chunk_size, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available()
                   else "cpu", "baseline_step_s": base["step_s_mean"],
                   "pin_host_buffers_s": trainer.checkpointer.reserve_seconds, "pin_wait_s": round(pin_wait_s, 2)}
        for r in results:
            if r["phase"] == "none":
                continue
            # steady state: mean step (copy and waits included) vs the baseline's; with the drain: the whole phase
            summary[f"{r['phase']}_overhead_pct"] = round(100 * (r["step_s_mean"] / base["step_s_mean"] - 1), 2)
            summary[f"{r['phase']}_overhead_with_drain_pct"] = round(
                100 * ((r["step_s_mean"] * r["steps"] + r["drain_s"]) / (base["step_s_mean"] * r["steps"]) - 1), 2)
            if r["block_s"]:
                summary[f"{r['phase']}_block_s_max"] = max(r["block_s"])
        emit(summary)
    print(f"\n{'phase':8} {'steps':>5} {'step s':>7} {'vs none':>8} {'drain s':>8} {'block s (max)':>13} "
          f"{'wait s (max)':>12} {'write s (mean)':>14}")
    for r in results:
        w = r["write_s"]
        print(f"{r['phase']:8} {r['steps']:>5} {r['step_s_mean']:>7} "
              f"{100 * (r['step_s_mean'] / base['step_s_mean'] - 1):>7.1f}% {r['drain_s']:>8} "
              f"{max(r['block_s'], default=0):>13} {max(r['wait_s'], default=0):>12} "
              f"{(sum(w) / len(w) if w else 0):>14.2f}")
    shutil.rmtree(store, ignore_errors=True)


if __name__ == "__main__":
    main()
