"""Seeds derived from names and positions, and scopes that seed PyTorch's default generators and restore them.

Dropout (rollout_dist.engine.streams) and weight initialisation (rollout_dist.model.build) draw from the default
generators, which take no per-call argument; both need draws that depend only on *what* is drawn (a chunk's
layer, a module of the full model), not on what ran before or which process runs it.
"""
from __future__ import annotations

import struct
from contextlib import contextmanager

import torch
import xxhash

MASK63 = (1 << 63) - 1


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed: xxhash64 of the parts, integers as little-endian signed 64-bit words, strings as UTF-8."""
    data = b"".join(struct.pack("<q", p) if isinstance(p, int) else p.encode() for p in parts)
    return xxhash.xxh64_intdigest(data) & MASK63


@contextmanager
def seeded(seed: int, device: torch.device | None = None):
    """Seeds the default CPU generator (and ``device``'s, if it is a CUDA device) with ``seed`` for the scope;
    both are restored afterwards, so nothing drawn inside changes what the caller draws next."""
    generators = [torch.default_generator]
    if device is not None and device.type == "cuda":
        generators.append(torch.cuda.default_generators[device.index if device.index is not None
                                                         else torch.cuda.current_device()])
    outer = [g.get_state() for g in generators]
    for g in generators:
        g.manual_seed(seed)
    try:
        yield
    finally:
        for g, state in zip(generators, outer):
            g.set_state(state)
