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


class StageStopper(BackwardStopper):
    """``BackwardStopper`` for a pipeline stage, called as a chunk hook: it counts a backward chunk once the stage
    has sent that chunk's input gradient to the stage before (stopping inside ``backward`` would leave that
    stage waiting for it).  Every stage stops after ``chunks`` backward chunks; no stage then waits for a message
    (the stage before has sent one recomputed chunk more than this one reads, which is left unread: the process
    leaves without tearing down its process group)."""

    def __init__(self, chunks: int):
        super().__init__(None, chunks)

    def __call__(self, event):
        if event.phase != "backward":
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        if len(self.times) == self.chunks:
            raise ProbeDone


class PeakTrace:
    """Records the CUDA allocator's events (with Python stacks) while a probe runs; ``breakdown()`` names what was
    allocated at the traced peak, summed by the innermost rollout_dist / transformers / torch frame that asked."""

    def __enter__(self):
        torch.cuda.memory._record_memory_history(enabled="all", context="alloc", stacks="python",
                                                 max_entries=1_000_000)
        return self

    def __exit__(self, *exc):
        self.snapshot = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        return False

    def breakdown(self, top: int = 14) -> dict:
        return peak_breakdown(self.snapshot["device_traces"][torch.cuda.current_device()], top)


def _where(frames) -> str:
    for f in frames:  # innermost first
        name = f.get("filename", "")
        for root in ("rollout_dist/", "transformers/", "bench/", "torch/"):
            if root in name:
                return f"{root}{name.split(root, 1)[1]}:{f.get('line')} {f.get('name')}"
    return "?"


def peak_breakdown(trace: list[dict], top: int = 14) -> dict:
    """Replays allocator events (alloc / free) to the moment the most bytes were allocated since tracing began,
    and sums what was live then by where it was allocated (GiB, largest first)."""
    def replay(stop=None):
        live, total, best, best_i = {}, 0, -1, -1
        for i, ev in enumerate(trace if stop is None else trace[:stop + 1]):
            action = ev.get("action")
            if action == "alloc":
                live[ev["addr"]] = ev
                total += ev["size"]
            elif action in ("free", "free_requested", "free_completed") and ev["addr"] in live:
                total -= live.pop(ev["addr"])["size"]
            if total > best:
                best, best_i = total, i
        return live, best, best_i

    _, best, best_i = replay()
    live, _, _ = replay(best_i)
    groups: dict[str, list] = {}
    for ev in live.values():
        g = groups.setdefault(_where(ev.get("frames", [])), [0, 0])
        g[0] += ev["size"]
        g[1] += 1
    rows = sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]
    return {"traced_peak_gib": round(best / 2 ** 30, 2), "events": len(trace),
            "live_at_peak": [{"where": k, "gib": round(v[0] / 2 ** 30, 3), "tensors": v[1]} for k, v in rows]}
