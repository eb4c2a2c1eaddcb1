"""What a step reports (``StepStats``) and where it goes: sinks with ``on_step(stats)`` and ``close()``.

- ``ConsoleSink``: the step progress bar and, every ``trainer.log_every`` steps, the "step N  loss ..." line;
- ``TrainLog``: ``train.log`` in the run directory: every log record of the run plus those step lines;
- ``JsonlSink``: ``metrics.jsonl``, one JSON object per step with every ``StepStats`` field, flushed each step;
- ``TensorBoardSink``: DeepSpeed's TensorBoard monitor (``trainer.tensorboard``);
- ``ChunkLog`` (memory mode): ``chunks.jsonl``, one JSON object per chunk of every document (step, document,
  span, loss weight, topic shift, damping), and a one-line summary of them in train.log on the steps that log.

The trainer opens them on rank 0 only (every rank computes the same reduced statistics).  ``ChunkBar`` is the
per-document bar of chunk progress below the step bar, for documents long enough to take a while.

``console_logging`` (the entry point's logging set-up) prints log lines above the bars, routes DeepSpeed's records
and Python's warnings through the same handlers, keeps DeepSpeed's notices that say nothing to a user of this
trainer (``OFF_CONSOLE``) off the console, and holds the records of the set-up until ``TrainLog`` opens, so that
train.log has every record of the run, those off the console included.
"""
from __future__ import annotations

import json
import logging
import os
import re
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
    snapshot_block_s: float | None = None
    """Seconds this step's snapshot blocked training (copy to host memory); None: no snapshot."""
    snapshot_wait_s: float | None = None
    """Seconds the snapshot waited for the previous one's background write (a store slower than training)."""


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


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

OFF_CONSOLE = (  # (logger, message pattern): records that say nothing to a user; train.log keeps them
    ("DeepSpeed", r"Setting accelerator to CPU"),  # DeepSpeed guessing its accelerator; the run logs its device
    ("DeepSpeed", r"total_num_steps \d+ is less than warmup_num_steps"),  # a short run; the LR is logged per step
    ("DeepSpeed", r"Attempting to get learning rate from scheduler before it has started"),  # at set-up
)


class TqdmHandler(logging.StreamHandler):
    """Writes each record through ``tqdm.write``: above the progress bars, which are redrawn below it, instead
    of glued to the end of a bar's line."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - logging's own contract: report, never raise
            self.handleError(record)


class OffConsole(logging.Filter):
    """Drops the records of ``OFF_CONSOLE`` (on the console handler; train.log's handler has no such filter)."""

    def __init__(self, rules=OFF_CONSOLE):
        super().__init__()
        self.rules = [(name, re.compile(pattern)) for name, pattern in rules]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(record.name == name and pattern.search(message) for name, pattern in self.rules)


class EarlyRecords(logging.Handler):
    """Holds the records logged before the run directory exists (DeepSpeed's at import, the data's warnings);
    ``TrainLog`` writes them to train.log first and removes this handler from the root logger."""

    def __init__(self, capacity: int = 10_000):
        super().__init__(logging.INFO)
        self.capacity, self.records = capacity, []

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.records) < self.capacity:  # a rank that never opens train.log keeps no more than this
            self.records.append(record)


class _ToRoot(logging.Filter):
    """On DeepSpeed's logger (which does not propagate and prints to stdout with its own format): hands each
    record to the root logger's handlers instead (console, train.log) and stops DeepSpeed's own handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        logging.getLogger().handle(record)
        return False


def console_logging(level: int = logging.INFO, stream=None) -> logging.Handler:
    """The entry point's logging: records at ``level`` and above on ``stream`` (stderr), written above the
    progress bars, in ``LOG_FORMAT``, without those of ``OFF_CONSOLE``; DeepSpeed's records and Python's warnings
    go the same way (and to train.log); records before train.log opens are held for it.  Returns the console
    handler."""
    root = logging.getLogger()
    root.setLevel(level)
    console = TqdmHandler(sys.stderr if stream is None else stream)
    console.setFormatter(logging.Formatter(LOG_FORMAT))
    console.addFilter(OffConsole())
    root.addHandler(console)
    root.addHandler(EarlyRecords())
    deepspeed_log = logging.getLogger("DeepSpeed")  # the same object DeepSpeed configures when imported later
    if not any(isinstance(f, _ToRoot) for f in deepspeed_log.filters):
        deepspeed_log.addFilter(_ToRoot())
    logging.captureWarnings(True)  # warnings.warn -> logger "py.warnings": above the bars and in train.log
    return console


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
    the set-up's own lines are in it, and those held by ``EarlyRecords`` before it), and as a sink the step
    lines, written to this file only (the console has them from ``ConsoleSink`` already)."""

    def __init__(self, path: Path, log_every: int):
        self.log_every = log_every
        self.handler = logging.FileHandler(path)
        self.handler.setFormatter(logging.Formatter(LOG_FORMAT))
        root = logging.getLogger()
        for early in [h for h in root.handlers if isinstance(h, EarlyRecords)]:
            root.removeHandler(early)
            for record in early.records:
                self.handler.handle(record)
        root.addHandler(self.handler)

    def on_step(self, stats: StepStats) -> None:
        if reports(stats.step, self.log_every):
            self.write_line(step_line(stats))

    def write_line(self, text: str) -> None:
        """A line in train.log only (not on the console)."""
        self.handler.handle(log.makeRecord(log.name, logging.INFO, __file__, 0, text, None, None))

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
        self.write(asdict(stats))

    def write(self, *records: dict) -> None:
        """Appends records (each with a ``step``) and flushes."""
        self.file.write("".join(json.dumps(r) + "\n" for r in records))
        self.file.flush()

    def close(self) -> None:
        self.file.close()


CHUNK_FIELDS = ("chunk", "start", "end", "tokens", "weight", "topic_shift", "damping")
"""What ``chunks.jsonl`` keeps of each chunk record of a memory rollout (``MemoryRollout.last_chunks``)."""


class ChunkLog:
    """Memory mode's per-chunk records.  After each document every rank hands the rollout's ``last_chunks`` to
    ``add``; ``end_step`` (collective: every rank calls it once per step) gathers them on rank 0, which writes one
    line per chunk to ``chunks.jsonl`` (``step`` 1-based as the logs count, ``rank`` the data-parallel rank,
    ``document`` the document's index in the corpus, then ``CHUNK_FIELDS``; a resumed run drops the lines of steps
    after its snapshot first, as ``JsonlSink`` does) and, as a step reporter (``on_step``), one summary line in
    train.log on the steps that log.  On the other ranks ``path`` is None: they only send."""

    def __init__(self, path: Path | None, start_step: int, log_every: int, context, train_log: TrainLog | None):
        self.sink = JsonlSink(path, start_step) if path is not None else None
        self.log_every, self.context, self.train_log = log_every, context, train_log
        self.rows: list[dict] = []
        self.summary: str | None = None

    def add(self, step: int, document: int, chunks: list[dict]) -> None:
        """The chunks of one document of (1-based) ``step``."""
        rank = self.context.layout.dp_rank if self.context.layout is not None else 0
        self.rows.extend({"step": step, "rank": rank, "document": document,
                          **{k: c.get(k) for k in CHUNK_FIELDS}} for c in chunks)

    def end_step(self, step: int) -> None:
        rows, self.rows = self.rows, []
        if self.context.world > 1:
            parts = [None] * self.context.world if self.context.is_main else None
            torch.distributed.gather_object(rows, parts, dst=0)
            rows = [r for part in parts or [] for r in part]
        if self.sink is None:
            return
        self.sink.write(*rows)
        self.summary = chunk_summary(step, rows) if rows and reports(step, self.log_every) else None

    def on_step(self, stats: StepStats) -> None:
        if self.summary is not None and self.train_log is not None:
            self.train_log.write_line(self.summary)
        self.summary = None

    def close(self) -> None:
        if self.sink is not None:
            self.sink.close()


def chunk_summary(step: int, rows: list[dict]) -> str:
    """One line over a step's chunk records: counts, the loss weights' range, topic shift and damping."""
    def stat(key: str, how) -> float:
        values = [float(r[key]) for r in rows if r.get(key) is not None]
        return how(values) if values else float("nan")
    documents = len({(r["rank"], r["document"]) for r in rows})
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    return (f"step {step:>5}  memory: {len(rows)} chunks in {documents} document{'s' if documents != 1 else ''}"
            f"  weight {stat('weight', min):.3g}-{stat('weight', max):.3g}  topic shift mean "
            f"{stat('topic_shift', mean):.3g} max {stat('topic_shift', max):.3g}  damping mean "
            f"{stat('damping', mean):.3g} min {stat('damping', min):.3g}"
            "  (per chunk: chunks.jsonl)")


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
