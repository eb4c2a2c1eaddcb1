"""What a step reports (``StepStats``) and where it goes: sinks with ``on_step(stats)`` and ``close()``.

- ``ConsoleSink``: the step progress bar and, every ``trainer.log_every`` steps, the "step N  loss ..." line;
- ``TrainLog``: ``train.log`` in the run directory: every log record of the run plus those step lines;
- ``JsonlSink``: ``metrics.jsonl``, one JSON object per step with every ``StepStats`` field, flushed each step;
- ``TensorBoardSink``: DeepSpeed's TensorBoard monitor (``trainer.tensorboard``).

The trainer opens them on rank 0 only (every rank computes the same reduced statistics).  ``ChunkBar`` is the
per-document bar of chunk progress below the step bar, for documents long enough to take a while.
"""
from __future__ import annotations

import json
import logging
import os
import resource
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import torch
from tqdm.auto import tqdm

log = logging.getLogger("rollout_dist")

CHUNK_BAR_MIN = 32  # documents of at least this many chunks get a progress bar of their own within a step


@dataclass
class StepStats:
    step: int
    """Optimizer steps done, this one included (1-based)."""
    loss: float
    """Mean token cross-entropy of the step's window, over all replicas."""
    tokens: int
    chunks: int
    seconds: float
    tokens_per_s: float
    peak_mem_gib: float
    """Peak GPU memory of the step on this rank (CUDA), or the process's peak RSS (CPU)."""
    lr: float
    """The learning rate this step applied."""
    grad_norm: float | None


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux reports KiB


def step_line(s: StepStats) -> str:
    """The human-readable line of a step, as the console and train.log show it."""
    return (f"step {s.step:>5}  loss {s.loss:.4f}  tokens {s.tokens:>8}  chunks {s.chunks:>4}  "
            f"{s.tokens_per_s:>10,.0f} tok/s  peak {s.peak_mem_gib:.2f} GiB  lr {s.lr:.2e}"
            + (f"  grad_norm {s.grad_norm:.3g}" if s.grad_norm is not None else ""))


def reports(step: int, log_every: int) -> bool:
    """Whether a step gets its line: every ``log_every``-th, and the first (so a run shows it is alive)."""
    return step % log_every == 0 or step == 1


class MetricsSink(Protocol):
    def on_step(self, stats: StepStats) -> None: ...

    def close(self) -> None: ...


class ConsoleSink:
    """The step bar on stderr (steps done, loss and tokens/s as its postfix) and the step lines above it."""

    def __init__(self, max_steps: int, start_step: int, log_every: int):
        self.log_every = log_every
        self.bar = tqdm(total=max_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                        file=sys.stderr)

    def on_step(self, stats: StepStats) -> None:
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{stats.loss:.4f}", tok_s=f"{stats.tokens_per_s:,.0f}")
        if reports(stats.step, self.log_every):
            self.bar.write(step_line(stats))

    def close(self) -> None:
        self.bar.close()


class TrainLog:
    """``train.log``: a file handler on the root logger for the run's log records (opened at set-up, so that
    the set-up's own lines are in it), and as a sink the step lines, written to this file only (the console
    has them from ``ConsoleSink`` already)."""

    def __init__(self, path: Path, log_every: int):
        self.log_every = log_every
        self.handler = logging.FileHandler(path)
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger().addHandler(self.handler)

    def on_step(self, stats: StepStats) -> None:
        if reports(stats.step, self.log_every):
            self.handler.handle(log.makeRecord(log.name, logging.INFO, __file__, 0, step_line(stats), None, None))

    def close(self) -> None:
        logging.getLogger().removeHandler(self.handler)
        self.handler.close()


class JsonlSink:
    """``metrics.jsonl``: one JSON object per step (``StepStats`` fields; a NaN loss is written as NaN, which
    Python's and pandas' readers accept), flushed at every step so a killed run keeps its last one.

    A resumed run continues the file: lines of steps after ``start_step`` (written after the checkpoint it
    resumes from), and a line cut short by a crash, are dropped first, so no step appears twice."""

    def __init__(self, path: Path, start_step: int):
        self.path = path
        if path.exists():
            self._truncate_after(start_step)
        self.file = open(path, "a", encoding="utf-8")

    def _truncate_after(self, step: int) -> None:
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("step", step + 1) <= step:
                kept.append(line + "\n")
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, self.path)

    def on_step(self, stats: StepStats) -> None:
        self.file.write(json.dumps(asdict(stats)) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class TensorBoardSink:
    """Scalars of every step through DeepSpeed's monitor (``engine.monitor``, enabled by trainer.tensorboard)."""

    def __init__(self, monitor):
        self.monitor = monitor

    def on_step(self, s: StepStats) -> None:
        self.monitor.write_events([("train/loss", s.loss, s.step), ("train/tokens_per_s", s.tokens_per_s, s.step),
                                   ("train/peak_mem_gib", s.peak_mem_gib, s.step), ("train/chunks", s.chunks, s.step),
                                   ("train/lr", s.lr, s.step)])

    def close(self) -> None:
        pass


class ChunkBar:
    """Chunk progress within one long document (fill pass, then backward), below the step bar: a rollout's
    ``progress`` callback."""

    def __init__(self, what: str):
        self.what, self.bar = what, None

    def __call__(self, phase: str, done: int, total: int) -> None:
        if self.bar is None or self.bar.desc != f"{phase} ({self.what})":
            self.close()
            self.bar = tqdm(total=total, desc=f"{phase} ({self.what})", unit="chunk", leave=False, position=1,
                            dynamic_ncols=True, file=sys.stderr)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def chunk_bar(what: str, chunks: int) -> ChunkBar | None:
    """A ``ChunkBar`` for a document of ``chunks`` chunks if it is long enough to need one, else None."""
    return ChunkBar(what) if chunks >= CHUNK_BAR_MIN else None
