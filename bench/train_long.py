"""Long documents through the real trainer (Hydra config, DeepSpeed engine, ZeRO / ZeRO-Offload), one GPU or,
under torchrun, one pipeline (``parallel.pp``) over several GPUs.

For each length T: a synthetic document of T byte tokens, a Trainer composed from hydra_conf/ with the given
overrides (e.g. ``+experiment=llama3_8b_500k``), then either ``--steps`` full optimizer steps (tokens/s, peak GPU
memory, peak host RSS) or, with ``--probe-chunks K``, the fill pass over every chunk plus the backward of the
last K chunks: the memory then held (all carried state, weights, optimizer, one chunk's activations) is the
step's peak, which later chunks do not exceed.  A probe is for lengths whose whole step outlasts a device call.
One JSON line per measurement to stdout and $OUT/train_long.jsonl.

    python bench/train_long.py --tokens 131072 524288 --probe-chunks 0 3 -- +experiment=llama3_8b_500k

Under torchrun every rank writes its own line (``rank``, ``stage``: peak GPU memory and host RSS per rank), one
length per launch:

    torchrun --standalone --nproc-per-node 4 bench/train_long.py --tokens 2097152 --probe-chunks 2 -- \
        model=llama3_8b parallel.pp=4 rollout.offload=kv

With stages the probe stops every stage after its K-th backward chunk (a chunk hook, after the chunk's gradient
went to the stage before) and the processes leave without tearing down the process group.  Model TFLOP/s count
the whole model (all stages) and every replica's tokens; ``mfu`` divides them by the GPUs' bf16 dense peak.
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
from _probe import BackwardStopper, ProbeDone, StageStopper  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from rollout_dist.config import ConfigError, to_train_config  # noqa: E402
from rollout_dist.data import DataError  # noqa: E402
from rollout_dist.parallel.p2p import P2P  # noqa: E402
from rollout_dist.trainer import Trainer  # noqa: E402

OUT = Path(os.environ.get("OUT", "/tmp"))
WORLD = int(os.environ.get("WORLD_SIZE", 1))
RANK = int(os.environ.get("RANK", 0))
PENDING_SENDS: list = []  # a pipeline probe's sends, alive until the process leaves
BF16_PEAK_TFLOPS = 989.4  # H100/H200 SXM dense bf16, per GPU: the denominator of ``mfu``


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
    data = workdir / (f"data_{tokens}" + ("" if WORLD == 1 else f"_rank{RANK}"))  # each rank writes its own copy
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
    lay = trainer.layout
    if WORLD > 1:
        rec.update(rank=RANK, stage=lay.stage, dp_rank=lay.dp_rank, pp=lay.pp, dp=lay.dp, gpus=WORLD)
    n_params, layers = whole_model_size(trainer)
    mc = trainer.model.config
    flops_per_token = 6 * n_params + 6 * layers * mc.hidden_size * tokens  # of a T-token document
    try:
        if probe_chunks:
            rec.update(probe(trainer, probe_chunks))
        else:
            stats = [trainer.train_step() for _ in range(steps)]
            best = min(stats, key=lambda s: s.seconds)
            tflops = flops_per_token * best.tokens / best.seconds / 1e12  # best.tokens: every replica's
            rec.update(mode="steps", steps=len(stats), step_s=round(best.seconds, 2),
                       tok_s=round(best.tokens_per_s, 1), model_tflops=round(tflops, 1),
                       mfu=round(tflops / (WORLD * BF16_PEAK_TFLOPS), 3),
                       loss=round(stats[-1].loss, 4), peak_mem_gib=round(max(s.peak_mem_gib for s in stats), 2))
    except torch.OutOfMemoryError as err:
        rec.update(oom=True, error=str(err).splitlines()[0])
    rec["host_peak_rss_gib"] = host_peak_gib()
    rec.update(phases.stop())
    emit(rec)
    return rec


def whole_model_size(trainer: Trainer) -> tuple[int, int]:
    """(parameters, decoder layers) of the whole model: a pipeline stage holds only its own, so the stages'
    counts are summed over the ranks of one replica."""
    n = sum(p.numel() for p in trainer.model.parameters())
    stage = getattr(trainer.model, "rollout_stage", None)
    if stage is None:
        return n, trainer.model.config.num_hidden_layers
    total = torch.tensor([float(n) if trainer.layout.dp_rank == 0 else 0.0], device=trainer.device)
    torch.distributed.all_reduce(total)
    return int(total.item()), stage.total_layers


def probe(trainer: Trainer, chunks: int) -> dict:
    engine, real = trainer.engine, trainer.engine.backward
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    staged = trainer.layout.pp > 1
    drain = P2P.drain
    if staged:  # a stage stops after sending its chunk's gradient back (StageStopper)
        stopper = StageStopper(chunks)
        trainer.chunk_hooks.append(stopper)
        # the cut 1F1B schedule leaves one send per stage boundary unmatched: the rollout leaves its sends
        # pending instead of waiting for them, kept alive here (a send's work collected before the other stage
        # read it is lost); main() then meets the other ranks at a barrier and leaves
        P2P.drain = lambda self: PENDING_SENDS.extend(self._pending)
    else:
        engine.backward = stopper = BackwardStopper(real, chunks)
    try:
        trainer.accumulate([trainer.docs[0]])
    except ProbeDone:
        pass
    finally:
        engine.backward = real
        P2P.drain = drain
        if staged:
            trainer.chunk_hooks.remove(stopper)
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
    if WORLD > 1 and len(args.tokens) > 1:
        sys.exit("bench/train_long.py: under torchrun give one length per launch (--tokens T)")
    if len(args.tokens) > 1:  # one process per length: nothing of one length's engine stays for the next
        for tokens, k in zip(args.tokens, probes):
            subprocess.run([sys.executable, __file__, "--tokens", str(tokens), "--probe-chunks", str(k),
                            "--steps", str(args.steps), "--", *args.overrides], check=False)
        return
    # the ranks of one launch share the run directory (MASTER_PORT is the same on all of them)
    shared = None if WORLD == 1 else Path(tempfile.gettempdir()) / f"train_long_{os.environ.get('MASTER_PORT')}"
    with tempfile.TemporaryDirectory() as tmp:
        try:
            records = [run_length(args.tokens[0], args.overrides, args.steps, probes[0], shared or Path(tmp))]
        except (ConfigError, DataError) as err:  # a bad override: its one-line message, as launch/train.py
            sys.exit(f"bench/train_long.py: {err}")
    if WORLD > 1 and probes[0]:
        # every stage's sends that a later stage read were delivered once all ranks are here; the unmatched ones
        # stay pending, so no process-group teardown (it would wait for them)
        torch.distributed.barrier()
        sys.stdout.flush()
        os._exit(0)
    if RANK != 0:
        return
    print("\nmodel        T          mode    tok/s     step s   GPU peak GiB  host RSS GiB")
    for r in records:
        print(f"{r['model']:<12} {r['T']:<10} {r.get('mode', 'OOM'):<7} {r.get('tok_s', '-'):<9} "
              f"{r.get('step_s', '-'):<8} {r.get('peak_mem_gib', '-'):<13} {r['host_peak_rss_gib']}")


if __name__ == "__main__":
    main()
