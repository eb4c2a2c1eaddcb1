"""Snapshots taken to host memory at once and persisted in the background while training goes on.

``HostCopy`` copies a snapshot's tensors into host buffers it keeps from one snapshot to the next (pinned for GPU
tensors, so the copy runs at PCIe speed and the GPU is blocked only for it).  ``BackgroundWriter`` runs one
persist job at a time on a thread; a new snapshot waits for the previous job (so at most one snapshot is in host
memory, and a store slower than training shows as waiting, which is reported), and an error of a job is raised
in the training thread at the next ``check``, ``submit`` or ``wait``.  What a job returns (a line to log) is
handed to the training thread too (``finished``), so that log lines never come from the writer's thread.
"""
from __future__ import annotations

import threading
import time
from typing import Callable

import torch


class HostCopy:
    """Host copies of tensors, in buffers reused across snapshots (keyed by name)."""

    def __init__(self):
        self._buffers: dict[str, torch.Tensor] = {}

    def __call__(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out, cuda = {}, False
        for name, t in tensors.items():
            cuda |= t.device.type == "cuda"
            out[name] = self._buffer(name, t).copy_(t.detach(), non_blocking=t.device.type == "cuda")
        for name in set(self._buffers) - set(tensors):
            del self._buffers[name]
        if cuda:
            torch.cuda.synchronize()
        return out

    def reserve(self, tensors: dict[str, torch.Tensor]) -> None:
        """Allocates the buffers ``tensors`` need (pinning host memory takes seconds: at set-up, not mid-run)."""
        for name, t in tensors.items():
            self._buffer(name, t)

    def _buffer(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """The buffer kept for ``name``, (re)allocated to ``t``'s shape and dtype (pinned for GPU tensors)."""
        buf = self._buffers.get(name)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = self._buffers[name] = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.device.type == "cuda")
        return buf

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())


class BackgroundWriter:
    """One persist job at a time, on a daemon thread."""

    def __init__(self, name: str = "snapshot-writer", background: bool = True):
        self.name, self.background = name, background
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._finished: list = []
        self._lock = threading.Lock()

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def finished(self) -> list:
        """What the jobs finished since the last call returned (oldest first)."""
        with self._lock:
            out, self._finished = self._finished, []
        return out

    def _done(self, result) -> None:
        with self._lock:  # the list is swapped by ``finished``: append to the current one, after the job
            self._finished.append(result)

    def check(self) -> None:
        """Raises the error of a finished job, once."""
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def wait(self) -> float:
        """Waits for the running job; returns the seconds waited.  Raises its error."""
        t0 = time.perf_counter()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        waited = time.perf_counter() - t0
        self.check()
        return waited

    def submit(self, job: Callable[[], object]) -> None:
        """Runs ``job`` (in the background, or here when ``background`` is off) after the previous one."""
        self.wait()
        if not self.background:
            self._done(job())
            return

        def run():
            try:
                self._done(job())
            except BaseException as err:  # handed to the training thread
                self._error = err
        self._thread = threading.Thread(target=run, name=self.name, daemon=True)
        self._thread.start()
