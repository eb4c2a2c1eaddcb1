"""On the GPU, backward kernels are not bit-reproducible, so a resumed run is compared with an uninterrupted one
against the spread between two uninterrupted runs: three runs of the same config (bf16, dropout on, snapshots
after every step), two straight through and one resumed after ``--kill-after`` steps (deleting the later
versions, as a run that died there would have left the store), then per parameter the relative L2 difference
resumed-vs-straight beside straight-vs-straight.  One JSON line to stdout and $OUT/checkpoint_resume_spread.jsonl.

    python bench/checkpoint_resume_spread.py --tokens 16384 --steps 6 --kill-after 3 -- rollout.chunk_size=4096
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from train_long import emit, trainer_for  # noqa: E402

OUT = Path(os.environ.get("OUT", "/tmp"))


def weights(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().cpu().clone() for n, p in trainer.engine.module.named_parameters()}


def rel_diffs(a: dict, b: dict) -> list[float]:
    return [float((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-30)) for k in a]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--kill-after", type=int, default=3)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    common = [*args.overrides, "checkpoint.every=1", f"checkpoint.keep={args.steps}", "model.attention_dropout=0.1"]
    with tempfile.TemporaryDirectory() as tmp:
        runs = []
        for i in range(2):
            t = trainer_for(args.tokens, common, Path(tmp) / f"straight{i}", args.steps)
            t.fit()
            runs.append(weights(t))
            del t
        work = Path(tmp) / "resumed"
        t = trainer_for(args.tokens, common, work, args.steps)
        t.fit()
        store = t.checkpointer.store
        for v in store.valid_versions()[args.kill_after:]:
            store.delete(v.name)
        del t
        r = trainer_for(args.tokens, [*common, "checkpoint.resume=latest"], work, args.steps)
        r.fit()
        assert r.history[args.kill_after].step == args.kill_after + 1
        resumed = weights(r)
    spread, ours = rel_diffs(runs[1], runs[0]), rel_diffs(resumed, runs[0])
    rec = {"T": args.tokens, "steps": args.steps, "resumed_after": args.kill_after,
           "straight_vs_straight_max": max(spread), "straight_vs_straight_median": sorted(spread)[len(spread) // 2],
           "resumed_vs_straight_max": max(ours), "resumed_vs_straight_median": sorted(ours)[len(ours) // 2],
           "params": len(ours), "bit_identical_params": sum(d == 0.0 for d in ours),
           "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    emit(rec, "checkpoint_resume_spread.jsonl")


if __name__ == "__main__":
    main()
