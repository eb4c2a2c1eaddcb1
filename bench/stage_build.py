"""Peak GPU memory of rank 0 while a model is built and trimmed to its pipeline stage (one GPU, one process
standing in for rank 0 of pp stages: trimming needs no process group).

``whole``: the whole model materialised on the GPU, then trimmed (what every rank did before);
``stage``: built on the meta device, trimmed, and only the stage materialised (rollout_dist.model.build).
Each in its own process, so the peaks are clean.  One JSON line each to stdout and $OUT/stage_build.jsonl.

    python bench/stage_build.py --model llama3_8b --pp 2
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from rollout_dist.config import ModelConfig  # noqa: E402
from rollout_dist.model import stage_layer_counts, trim_to_stage  # noqa: E402
from rollout_dist.model.build import build_model, materialize  # noqa: E402

SHAPES = {"llama3_8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                            num_heads=32, num_kv_heads=8, rope_theta=500000.0),
          "tiny": dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4,
                       num_kv_heads=2)}


def one(model_name: str, pp: int, how: str, device: torch.device) -> dict:
    cfg = ModelConfig(name=model_name, dtype="bfloat16", **SHAPES[model_name])
    t0 = time.perf_counter()
    model, _ = build_model(cfg, device, seed=0, materialized=how == "whole")
    counts = stage_layer_counts(model, pp)
    trim_to_stage(model, 0, counts)
    if how == "stage":
        materialize(model, device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    return {"how": how, "model": model_name, "pp": pp, "stage_layers": counts[0],
            "seconds": round(time.perf_counter() - t0, 2),
            "stage_params": sum(p.numel() for p in model.parameters()),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if cuda else None,
            "allocated_after_gib": round(torch.cuda.memory_allocated() / 2 ** 30, 2) if cuda else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(SHAPES), default="llama3_8b")
    ap.add_argument("--pp", type=int, default=2)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--one", choices=["whole", "stage"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.model, args.pp, args.one, torch.device(args.device))))
        return
    out = os.environ.get("OUT", "/tmp")
    for how in ("whole", "stage"):
        proc = subprocess.run([sys.executable, __file__, "--model", args.model, "--pp", str(args.pp), "--device",
                               args.device, "--one", how], capture_output=True, text=True)
        line = proc.stdout.strip().splitlines()[-1] if proc.returncode == 0 else json.dumps(
            {"how": how, "error": proc.stderr.strip().splitlines()[-1]})
        print(line, flush=True)
        with open(os.path.join(out, "stage_build.jsonl"), "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
