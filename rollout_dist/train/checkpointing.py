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


def check_run_dir(run_dir: Path, resume: bool, checkpointer: Checkpointer) -> None:
    """A run starts in an empty (or new) directory, or resumes one that holds a checkpoint: nothing of an earlier
    run is overwritten, and a resume that has nothing to resume from is refused before anything is written."""
    if resume:
        if not checkpointer.exists():
            raise ConfigError(f"checkpoint.resume=true but checkpoint.dir={str(run_dir)!r} holds no training "
                              f"checkpoint ({checkpointer.location}); start it with checkpoint.every=N")
        return
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise ConfigError(f"checkpoint.dir={str(run_dir)!r} already holds an earlier run; nothing is "
                          "overwritten: choose a new checkpoint.dir, move that run away, or continue it "
                          "with checkpoint.resume=true")
