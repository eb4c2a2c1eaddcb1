"""Training checkpoints behind one interface: ``Checkpointer`` (exists / save / load / poll / close), and its
implementation on the Zarr snapshot store of rollout_dist.checkpoint (``SnapshotCheckpointer``).

A snapshot holds the engine's state (weights, optimizer, LR schedule, step counters) plus the loop's
``client_state``, which the trainer assembles from its roles' ``state_dict``s (step, data position, random state,
history), from every rank.  Whether a run directory may be used at all (``check_run_dir``) depends on whether it
holds snapshots to resume.
"""
from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from pathlib import Path

import torch

from ..checkpoint import engine_state, tree
from ..checkpoint.store import (DIGESTS, CorruptSnapshot, SnapshotError, SnapshotStore, VersionInfo, rank_name,
                                version_name)
from ..checkpoint.writer import BackgroundWriter, HostCopy
from ..config import CheckpointConfig, ConfigError
from .context import RunContext

log = logging.getLogger("rollout_dist")


class Checkpointer(ABC):
    """Saves and loads training checkpoints of one run.  ``bind`` gives it the engine (set-up creates that after
    the checkpointer, which construction needs already to check the run directory) and the run context."""

    engine = None
    context: RunContext | None = None
    base_step: int | None = None
    """The step whose saved (or loaded) snapshot the engine's current weights are: chunk snapshots of the
    next step's document depend on it."""

    gate = None
    """Called by rank 0 as ``gate(step)`` before it publishes the snapshot of ``step``: False withholds it (the
    verification role's verdict that the step did not agree: rollout_dist.train.verification)."""

    digest_files = None
    """Called by rank 0 as ``digest_files(step)`` once the gate passed: (path, bytes) to write into the store
    before the version is published (the coordinator's ordered digest log)."""

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
    def load(self, at_most: int | None = None) -> dict | None:
        """Loads the newest complete checkpoint (of a step up to ``at_most``, if given) into the engine and
        returns its ``client_state``; None if there is none that loads."""

    def poll(self) -> None:
        """Raises the error of a save that failed in the background (none here)."""

    def close(self) -> None:
        """Waits for saves still being written; raises their errors."""


class SnapshotCheckpointer(Checkpointer):
    """Snapshots in the Zarr v3 store ``checkpoint.store`` (rollout_dist.checkpoint.store): every rank writes
    its own arrays, a version counts once rank 0 has published its manifest, and reads are checked against it.

    ``save`` blocks only while the state is copied to host memory (reported as ``last_block_s``; and
    ``last_wait_s``, the time it waited for the previous snapshot's write); the write, fsync and commit run in
    the background (``checkpoint.background``).  ``load`` takes ``checkpoint.resume`` (latest or a version),
    falls back past damaged versions, and returns None where no version is valid."""

    def __init__(self, cfg: CheckpointConfig, run_dir: Path, zero_stage: int, resolved_config: str | None = None):
        self.cfg, self.zero_stage, self.resolved_config = cfg, zero_stage, resolved_config
        self.store = SnapshotStore(cfg.store or str(Path(run_dir) / "state.zarr"))
        self.writer = BackgroundWriter(background=cfg.background)
        self.host = HostCopy()
        self.role: dict | None = None
        self.last_block_s = self.last_wait_s = None
        self.write_seconds: list[float] = []  # each snapshot's background write (and, on rank 0, commit)
        self._reserve_due, self._reserver = False, None
        self.reserve_seconds: float | None = None  # the pinning of the host buffers (GPU runs)

    @property
    def location(self) -> str:
        return self.store.url

    def exists(self) -> bool:
        try:
            return any(v.valid for v in self.store.versions())
        except OSError:
            return False

    def bind(self, engine, context: RunContext) -> None:
        super().bind(engine, context)
        self.role = engine_state.roles(context.layout, self.zero_stage)
        if context.is_main:
            try:
                self.store.ensure_root()
                gone = self.store.remove_incomplete()
            except OSError as err:
                raise SnapshotError(f"checkpoint store {self.location}: cannot be prepared: {err}") from None
            if gone:
                log.warning("removed half-written snapshot versions of an earlier attempt: %s", ", ".join(gone))
        context.barrier()
        self._reserve_due = bool(self.cfg.every) and context.device.type == "cuda"

    def _meta(self) -> dict:
        layout = self.context.layout
        return {"layout": {"world": layout.world, "dp": layout.dp, "pp": layout.pp, "zero_stage": self.zero_stage},
                "config": self.resolved_config,
                "model_dtype": str(next(self.engine.module.parameters()).dtype).replace("torch.", "")}

    # ------------------------------------------------------------------------------------------------- save
    def save(self, step: int, client_state: dict) -> None:
        # the previous snapshot is committed (or its error raised here), and the host buffers are pinned
        self.last_wait_s = self.writer.wait() + self.wait_for_host_buffers()
        t0 = time.perf_counter()
        state = engine_state.capture(self.engine, self.role)
        state["loop"] = client_state
        skeleton, arrays = tree.split(state)
        host = self.host(arrays)
        self.last_block_s = time.perf_counter() - t0
        rank, world, meta = self.context.rank, self.context.world, self._meta()
        self.base_step = step
        self.writer.submit(lambda: self._persist(step, rank, world, skeleton, host, meta))

    def _persist(self, step: int, rank: int, world: int, skeleton, arrays: dict, meta: dict) -> str | None:
        """The background job of one snapshot; returns the line the training thread logs."""
        t0 = time.perf_counter()
        try:
            self.store.write_rank(step, rank, skeleton, arrays, self.role)
            if rank == 0 and self.gate is not None and not self.gate(step):
                return (f"snapshot {version_name(step)} not published: step {step} did not agree (or its verdict "
                        "never came); the newest published snapshot is of an agreed step")
            if rank == 0 and self.digest_files is not None:  # the coordinator's ordered log, with the snapshot
                for rel, data in self.digest_files(step):
                    self.store.loc.write_atomic(rel, data)
            if rank == 0:
                body = self.store.commit(step, world, meta, self.cfg.commit_timeout_s)
                self._retain()
                self.write_seconds.append(time.perf_counter() - t0)
                return (f"snapshot {version_name(step)} committed: {body['nbytes'] / 1e9:.2f} GB written in "
                        f"{self.write_seconds[-1]:.1f} s ({self.location})")
            self.write_seconds.append(time.perf_counter() - t0)
            return None
        except Exception as err:  # a full disk, a denied permission, a peer that never finished: say where
            raise SnapshotError(f"checkpoint store {self.location}: writing snapshot {version_name(step)} failed: "
                                f"{err}; the versions before it are intact: {self._valid_names()}") from None

    def _valid_names(self) -> str:
        try:
            names = [v.name for v in self.store.valid_versions()]
        except OSError:
            return "(cannot list)"
        return ", ".join(names) or "(none)"

    def _retain(self) -> None:
        """Keeps the ``keep`` newest valid versions and every ``keep_every``-th; deletes the others."""
        valid = self.store.valid_versions()
        newest = {v.step for v in valid[-self.cfg.keep:]}
        for v in valid:
            if v.step not in newest and not (self.cfg.keep_every and v.step % self.cfg.keep_every == 0):
                self.store.delete(v.name)
        for name in self.store.loc.dirs("chunks"):  # chunk snapshots of steps a committed version has passed
            if name[1:].isdigit() and int(name[1:]) < valid[-1].step:
                self.store.loc.remove(f"chunks/{name}")
        # the digest log: every step from the oldest of the ``keep`` newest versions on, and the kept versions' own
        kept = {v.step for v in valid
                if v.step in newest or (self.cfg.keep_every and v.step % self.cfg.keep_every == 0)}
        for name in self.store.loc.files(DIGESTS):
            step = name[1:].split(".")[0]
            if step.isdigit() and int(step) < min(newest) and int(step) not in kept:
                self.store.loc.remove(f"{DIGESTS}/{name}")

    def poll(self) -> None:
        self._log_finished()
        self.writer.check()
        if self._reserve_due:
            self._reserve_host_buffers()

    def _reserve_host_buffers(self) -> None:
        """Pins the host buffers snapshots copy into (seconds for GBs), on a thread, once the state is complete
        (the optimizer creates its moments at the first step): at a step's end, not inside a snapshot."""
        self._reserve_due = False
        shapes = tree.split(engine_state.capture(self.engine, self.role))[1]

        def reserve():
            t0 = time.perf_counter()
            self.host.reserve(shapes)
            self.reserve_seconds = time.perf_counter() - t0
        self._reserver = threading.Thread(target=reserve, name="snapshot-host-buffers", daemon=True)
        self._reserver.start()

    def wait_for_host_buffers(self) -> float:
        """Waits for the pinning of the host buffers, if it is under way; returns the seconds waited."""
        t0 = time.perf_counter()
        if self._reserver is not None:
            self._reserver.join()
            self._reserver = None
        return time.perf_counter() - t0

    def close(self) -> None:
        try:
            self.writer.wait()
        finally:
            self._log_finished()

    def _log_finished(self) -> None:
        for line in self.writer.finished():
            if line:
                log.info("%s", line)

    # ------------------------------------------------------------------------------------------------- load
    def load(self, at_most: int | None = None) -> dict | None:
        """The newest valid snapshot ``checkpoint.resume`` allows (with ``at_most``: the newest of a step up to
        that, for a rollback), put into the engine; returns the loop's state, or None where there is none."""
        self.writer.wait()  # a snapshot of this process still being written counts
        versions = self._candidates() if at_most is None else [v for v in self._candidates(latest=True)
                                                                if v.step <= at_most]
        damaged: list[VersionInfo] = []
        for v in reversed(versions):
            self._check_layout(v)
            parts, problem = None, None
            try:
                parts = self._read(v)
            except CorruptSnapshot as err:
                problem = str(err)
                log.error("snapshot %s is damaged: %s", v.name, problem)
            if self.context.smallest_over_ranks(int(problem is None)) == 0:
                damaged.append(v)
                log.warning("snapshot %s cannot be used (a rank found it damaged); falling back to the previous "
                            "valid version", v.name)
                continue
            module, optimizer, own = parts
            engine_state.restore(self.engine, module, optimizer, own, self.context.device)
            log.info("loaded snapshot %s (step %d) from %s", v.name, v.step, self.location)
            self.base_step = v.step
            if self.context.is_main:
                for bad in damaged:  # a later history that cannot be continued: the run rewrites those steps
                    self.store.delete(bad.name)
            self.context.barrier()
            return own["loop"]
        log.warning("no valid snapshot in %s%s: starting from scratch", self.location,
                    f" (damaged: {', '.join(v.name for v in damaged)})" if damaged else "")
        return None

    def _candidates(self, latest: bool = False) -> list[VersionInfo]:
        """The valid versions ``checkpoint.resume`` may load, oldest first (rank 0's listing, so that every rank
        tries the same)."""
        listed = self.store.versions()
        if self.context.is_main:
            for v in listed:
                if v.manifest is None and not v.problem.startswith("no manifest"):
                    log.error("snapshot %s is damaged and skipped: %s", v.name, v.problem)
        versions = [v for v in listed if v.valid]
        if self.context.world > 1:
            box = [versions]
            torch.distributed.broadcast_object_list(box, src=0)
            versions = box[0]
        target = None if latest else self.cfg.resume_version
        if target is None:
            return versions
        newer = [v.name for v in versions if v.step > target]
        if not any(v.step == target for v in versions):
            raise ConfigError(f"checkpoint.resume={self.cfg.resume}: {version_name(target)} is not a valid version "
                              f"of {self.location}; valid: {', '.join(v.name for v in versions) or 'none'}")
        if newer:
            raise ConfigError(f"checkpoint.resume={self.cfg.resume}: {self.location} holds newer versions "
                              f"({', '.join(newer)}) that continuing from {version_name(target)} would overwrite; "
                              "resume latest, or copy the run directory and delete them there")
        return [v for v in versions if v.step <= target]

    def _check_layout(self, v: VersionInfo) -> None:
        saved, now = v.manifest["layout"], self._meta()["layout"]
        if saved != now:
            def words(x):
                return (f"parallel.pp={x['pp']}, parallel.dp={x['dp']}, trainer.zero_stage={x['zero_stage']} "
                        f"({x['world']} processes)")
            raise ConfigError(f"snapshot {v.name} in {self.location} was written with {words(saved)}; this run has "
                              f"{words(now)}: resume with the same layout")

    def _read(self, v: VersionInfo) -> tuple[dict, dict, dict]:
        """(model part, optimizer part, own part) of this rank, every array checked."""
        def part(rank: int, key: str):
            skeleton = v.manifest["ranks"].get(rank_name(rank), {}).get("tree")
            if skeleton is None:
                raise CorruptSnapshot(f"{self.location} {v.name}: the manifest has no part of rank {rank}")
            sub = tree.member(skeleton, key)
            _, arrays = self.store.read_rank(v, rank_name(rank), tree.array_names(sub))
            return tree.join(sub, arrays)

        role = self.role
        own = part(self.context.rank, "lr_scheduler,counters,loop")
        module = part(role["model_from"], "module,weights")
        optimizer = part(role["optimizer_from"], "optimizer")
        return module, optimizer, own

RUN_FILES = ("config.yaml", "train.log", "metrics.jsonl", "chunks.jsonl", "summary.json", "state.zarr", "final",
             "tensorboard")
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
    """A run starts in an empty (or new) directory, or resumes one that holds a run: nothing of an earlier run is
    overwritten unless resumed.  A resume of a run without a snapshot yet (its first attempt died before one) starts
    from scratch there.  The refusal says what the directory holds, and suggests ``checkpoint.resume`` only where
    there is a snapshot."""
    if resume and checkpointer.exists():
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
                          "checkpoint.resume=latest, or choose a new checkpoint.dir")
    if any(p.name in RUN_FILES for p in entries):
        if resume:
            return  # an earlier attempt that died before its first snapshot: the run starts from scratch
        raise ConfigError(f"checkpoint.dir={str(run_dir)!r} already holds an earlier run ({_names(entries)}) with "
                          "no training checkpoint to resume; nothing is overwritten: choose a new checkpoint.dir or "
                          "move that run away")
    raise ConfigError(f"checkpoint.dir={str(run_dir)!r} holds {_describe(entries)} and no run: choose an empty or "
                      "new checkpoint.dir")
