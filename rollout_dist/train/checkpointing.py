"""Training checkpoints behind one interface: ``Checkpointer`` (exists / save / load), so that a second store
(the Zarr store of rollout_dist.checkpoint) can replace DeepSpeed's without the loop changing.

A checkpoint holds the engine's state (weights, optimizer, LR schedule) plus the loop's ``client_state``, which
the trainer assembles from its roles' ``state_dict``s (step, data position, random state, history).  Whether
a run directory may be used at all (``check_run_dir``) depends on whether it holds a checkpoint to resume.
"""
from __future__ import annotations

import logging
import shutil
from abc import ABC, abstractmethod
from pathlib import Path

from ..config import ConfigError
from .context import RunContext

log = logging.getLogger("rollout_dist")


class Checkpointer(ABC):
    """Saves and loads training checkpoints of one run.  ``bind`` gives it the engine (set-up creates that after
    the checkpointer, which construction needs already to check the run directory) and the run context."""

    engine = None
    context: RunContext | None = None

    def bind(self, engine, context: RunContext) -> None:
        self.engine, self.context = engine, context

    @property
    @abstractmethod
    def location(self) -> str:
        """Where the checkpoints are, for messages."""

    @abstractmethod
    def exists(self) -> bool:
        """Whether a complete checkpoint is there to resume from (no engine needed)."""

    @abstractmethod
    def save(self, step: int, client_state: dict) -> None:
        """Saves the engine's state and ``client_state`` as the checkpoint of ``step`` (collective: every rank
        calls it).  A crash while saving must leave the previous checkpoint the one ``load`` finds."""

    @abstractmethod
    def load(self) -> dict | None:
        """Loads the newest complete checkpoint into the engine and returns its ``client_state``; None if there
        is none that loads."""


class DeepSpeedCheckpointer(Checkpointer):
    """DeepSpeed's own checkpoints: ``<directory>/stepXXXXXXXX/`` from every rank, and ``latest`` naming the
    newest, which DeepSpeed writes only once the checkpoint is complete.  The ``keep`` newest are kept."""

    def __init__(self, directory: Path, keep: int):
        self.directory, self.keep = Path(directory), keep

    @property
    def location(self) -> str:
        return str(self.directory)

    def exists(self) -> bool:
        return (self.directory / "latest").is_file()

    def save(self, step: int, client_state: dict) -> None:
        tag = f"step{step:08d}"
        self.engine.save_checkpoint(str(self.directory), tag=tag, client_state=client_state)
        self.context.barrier()  # every rank's part is written before older checkpoints go
        if self.context.is_main:
            self._rotate()
            log.info("saved training checkpoint %s", self.directory / tag)

    def _rotate(self) -> None:
        tags = sorted(p for p in self.directory.iterdir() if p.is_dir() and p.name.startswith("step"))
        for old in tags[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def load(self) -> dict | None:
        path, client_state = self.engine.load_checkpoint(str(self.directory))
        if path is None:
            return None
        log.info("loaded training checkpoint %s", path)
        return client_state


RUN_FILES = ("config.yaml", "train.log", "metrics.jsonl", "summary.json", "checkpoints", "final", "tensorboard")
"""What a run writes into its directory (trainer, metrics sinks, checkpointer, export)."""


def _names(entries: list[Path], shown: int = 3) -> str:
    """"a.txt, b.txt, data/, ... 2 more": the first names of a directory's entries."""
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in entries)
    return ", ".join(names[:shown]) + (f", ... {len(names) - shown} more" if len(names) > shown else "")


def _describe(entries: list[Path]) -> str:
    """"1 file (notes.txt)", "2 files and 1 folder (a.txt, b.txt, data/)": what a directory holds, in words."""
    files = sum(1 for p in entries if not p.is_dir())
    folders = len(entries) - files
    counts = [f"{n} {word}{'s' if n != 1 else ''}" for n, word in ((files, "file"), (folders, "folder")) if n]
    return f"{' and '.join(counts)} ({_names(entries)})"


def check_run_dir(run_dir: Path, resume: bool, checkpointer: Checkpointer) -> None:
    """A run starts in an empty (or new) directory, or resumes one that holds a checkpoint: nothing of an earlier
    run is overwritten, and a resume that has nothing to resume from is refused before anything is written.  The
    refusal says what the directory holds, and suggests ``checkpoint.resume`` only where there is a checkpoint."""
    if resume:
        if not checkpointer.exists():
            raise ConfigError(f"checkpoint.resume=true but checkpoint.dir={str(run_dir)!r} holds no training "
                              f"checkpoint ({checkpointer.location}); start it with checkpoint.every=N")
        return
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise ConfigError(f"checkpoint.dir={str(run_dir)!r} is a file, not a directory: choose a new checkpoint.dir")
    entries = list(run_dir.iterdir())
    if not entries:
        return
    if checkpointer.exists():
        raise ConfigError(f"checkpoint.dir={str(run_dir)!r} already holds an earlier run with a training checkpoint "
                          f"({checkpointer.location}); nothing is overwritten: continue it with "
                          "checkpoint.resume=true, or choose a new checkpoint.dir")
    if any(p.name in RUN_FILES for p in entries):
        raise ConfigError(f"checkpoint.dir={str(run_dir)!r} already holds an earlier run ({_names(entries)}) with "
                          "no training checkpoint to resume; nothing is overwritten: choose a new checkpoint.dir or "
                          "move that run away")
    raise ConfigError(f"checkpoint.dir={str(run_dir)!r} holds {_describe(entries)} and no run: choose an empty or "
                      "new checkpoint.dir")
