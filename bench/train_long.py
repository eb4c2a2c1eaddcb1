"""Long documents through the real trainer (Hydra config, DeepSpeed engine, ZeRO / ZeRO-Offload), one GPU.

For each length T: a synthetic document of T byte tokens, a Trainer composed from hydra_conf/ with the given
overrides (e.g. ``+experiment=llama3_8b_500k``), then either ``--steps`` full optimizer steps (tokens/s, peak GPU
memory, peak host RSS) or, with ``--probe-chunks K``, the fill pass over every chunk plus the backward of the
last K chunks: the memory then held (all carried state, weights, optimizer, one chunk's activations) is the
step's peak, which later chunks do not exceed.  A probe is for lengths whose whole step outlasts a device call.
One JSON line per measurement to stdout and $OUT/train_long.jsonl.

    python bench/train_long.py --tokens 131072 524288 --probe-chunks 0 3 -- +experiment=llama3_8b_500k
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from _probe import BackwardStopper, ProbeDone  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from rollout_dist.config import ConfigError, to_train_config  # noqa: E402
from rollout_dist.data import DataError  # noqa: E402
from rollout_dist.trainer import Trainer  # noqa: E402

OUT = Path(os.environ.get("OUT", "/tmp"))


def emit(rec: dict, name: str = "train_long.jsonl") -> None:
    """One JSON line to stdout and to $OUT/``name``."""
    line = json.dumps(rec)
    print(line, flush=True)
    with open(OUT / name, "a") as f:
        f.write(line + "\n")


def host_peak_gib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2)  # ru_maxrss is KiB on Linux


class HostMemoryPhases:
    """Largest resident host memory (VmRSS, sampled every 0.2 s) per phase of the run: engine set-up, the
    rollout (fill and backward), the optimizer step; a peak only tells how much, this tells when."""

    def __init__(self):
        self.phase, self.peaks, self._stop = "setup", {}, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def take(self) -> None:
        try:
            with open("/proc/self/status") as f:
                kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            return
        self.peaks[self.phase] = max(self.peaks.get(self.phase, 0.0), round(kib / 2 ** 20, 2))

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.take()
            self._stop.wait(0.2)

    def switch(self, phase: str) -> None:
        self.take()  # the end of the phase before
        self.phase = phase
        self.take()

    def wrap(self, fn, phase: str, after: str):
        def wrapped(*args, **kwargs):
            self.switch(phase)
            try:
                return fn(*args, **kwargs)
            finally:
                self.switch(after)
        return wrapped

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        self.take()
        return {f"host_rss_gib_{k.replace(' ', '_')}": v for k, v in self.peaks.items()}


def write_document(directory: Path, tokens: int, seed: int = 0) -> None:
    """T bytes of word-like ASCII: T tokens for the byte tokenizer."""
    rng = random.Random(seed)
    words = ["the", "contract", "party", "shall", "annual", "report", "patient", "record", "log", "line", "of",
             "and", "to", "in", "page", "section", "term", "notice", "amount", "date"]
    parts, n = [], 0
    while n < tokens:
        w = rng.choice(words) + " "
        parts.append(w)
        n += len(w)
    (directory / "doc.txt").write_text("".join(parts)[:tokens])


def trainer_for(tokens: int, overrides: list[str], workdir: Path, steps: int) -> Trainer:
    data = workdir / f"data_{tokens}"
    if not data.exists():  # a second trainer of the same run (a resume) reads the same document
        data.mkdir(parents=True)
        write_document(data, tokens)
    with initialize_config_dir(config_dir=str(ROOT / "hydra_conf"), version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, f"data.path={data}",
                                           f"checkpoint.dir={workdir / f'run_{tokens}'}",
                                           f"trainer.max_steps={steps}", "trainer.grad_accum=1",
                                           "trainer.tensorboard=false", "checkpoint.save_final=false",
                                           "data.shuffle=false", "data.max_doc_tokens=null"])
    return Trainer(to_train_config(cfg))


def run_length(tokens: int, overrides: list[str], steps: int, probe_chunks: int, workdir: Path) -> dict:
    trainer = trainer_for(tokens, overrides, workdir, max(steps, 1))
    phases = HostMemoryPhases()
    trainer.setup()
    phases.switch("rollout")
    trainer.engine.step = phases.wrap(trainer.engine.step, "optimizer step", "rollout")
    cfg = trainer.cfg
    rec = {"T": tokens, "model": cfg.model.name, "chunk": trainer.rollout.chunk_size, "offload": cfg.rollout.offload,
           "vocab_tile": cfg.rollout.vocab_tile, "zero_stage": cfg.trainer.zero_stage,
           "offload_layers": cfg.rollout.offload_layers, "offload_optimizer": cfg.trainer.offload_optimizer,
           "optimizer_dtype": cfg.trainer.optimizer_dtype, "attention": cfg.rollout.attention,
           "keep_attention": trainer.rollout.keep_attention, "keep_tokens": trainer.rollout.keep_tokens,
           "overrides": overrides,
           "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "torch": torch.__version__}
    if torch.cuda.is_available():
        rec["predicted_peak_gib"] = round(trainer.predicted_peak().total / 2 ** 30, 2)
    n_params = sum(p.numel() for p in trainer.model.parameters())
    mc = trainer.model.config
    flops = 6 * n_params * tokens + 6 * mc.num_hidden_layers * mc.hidden_size * tokens ** 2
    try:
        if probe_chunks:
            rec.update(probe(trainer, probe_chunks))
        else:
            stats = [trainer.train_step() for _ in range(steps)]
            best = min(stats, key=lambda s: s.seconds)
            rec.update(mode="steps", steps=len(stats), step_s=round(best.seconds, 2),
                       tok_s=round(best.tokens_per_s, 1), model_tflops=round(flops / best.seconds / 1e12, 1),
                       loss=round(stats[-1].loss, 4), peak_mem_gib=round(max(s.peak_mem_gib for s in stats), 2))
    except torch.OutOfMemoryError as err:
        rec.update(oom=True, error=str(err).splitlines()[0])
    rec["host_peak_rss_gib"] = host_peak_gib()
    rec.update(phases.stop())
    emit(rec)
    return rec


def probe(trainer: Trainer, chunks: int) -> dict:
    engine, real = trainer.engine, trainer.engine.backward
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    engine.backward = stopper = BackwardStopper(real, chunks)
    try:
        trainer.accumulate([trainer.docs[0]])
    except ProbeDone:
        pass
    finally:
        engine.backward = real
    peak = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if torch.cuda.is_available() else 0.0
    return {"mode": "probe", **stopper.summary(), "peak_mem_gib": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", required=True, help="document lengths")
    ap.add_argument("--probe-chunks", type=int, nargs="*", default=[0],
                    help="per length (the last value repeats): 0 = full steps, K = fill + K backward chunks")
    ap.add_argument("--steps", type=int, default=2, help="full steps per length (the fastest is reported)")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, after --")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    probes = args.probe_chunks + [args.probe_chunks[-1]] * len(args.tokens)
    if len(args.tokens) > 1:  # one process per length: nothing of one length's engine stays for the next
        for tokens, k in zip(args.tokens, probes):
            subprocess.run([sys.executable, __file__, "--tokens", str(tokens), "--probe-chunks", str(k),
                            "--steps", str(args.steps), "--", *args.overrides], check=False)
        return
    with tempfile.TemporaryDirectory() as tmp:
        try:
            records = [run_length(args.tokens[0], args.overrides, args.steps, probes[0], Path(tmp))]
        except (ConfigError, DataError) as err:  # a bad override: its one-line message, as launch/train.py
            sys.exit(f"bench/train_long.py: {err}")
    print("\nmodel        T          mode    tok/s     step s   GPU peak GiB  host RSS GiB")
    for r in records:
        print(f"{r['model']:<12} {r['T']:<10} {r.get('mode', 'OOM'):<7} {r.get('tok_s', '-'):<9} "
              f"{r.get('step_s', '-'):<8} {r.get('peak_mem_gib', '-'):<13} {r['host_peak_rss_gib']}")


if __name__ == "__main__":
    main()
