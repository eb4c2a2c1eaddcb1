"""Memory probes shared by the benchmarks: stop a rollout after the backward of its last few chunks.

The fill pass over every chunk, then the backward of the last K chunks: the memory then held (all carried state,
weights, optimizer, one chunk's activations) is the step's peak, which the remaining chunks do not exceed.  For
lengths whose whole step outlasts a device call.
"""
from __future__ import annotations

import time

import torch


class ProbeDone(Exception):
    """Raised out of the rollout once the probe has seen enough backward chunks."""


class BackwardStopper:
    """Wraps a chunk backward: waits for the GPU, times each call, raises ``ProbeDone`` after ``chunks`` calls."""

    def __init__(self, backward, chunks: int):
        self.backward, self.chunks = backward, chunks
        self.times: list[float] = []
        self.start = time.perf_counter()

    def __call__(self, loss, *args, **kwargs):
        out = self.backward(loss, *args, **kwargs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        if len(self.times) == self.chunks:
            raise ProbeDone
        return out

    def summary(self) -> dict:
        times = self.times
        return {"backward_chunks": len(times), "fits": len(times) == self.chunks,
                "fill_and_first_backward_s": round(times[0] - self.start, 1) if times else None,
                "backward_chunk_s": [round(b - a, 2) for a, b in zip(times, times[1:])]}
