"""Point-to-point transfers between neighbouring pipeline stages.

Sends are non-blocking (``isend``) and kept alive until they complete, so two stages sending to each other at
the same moment (activations forward, gradients back) cannot deadlock; receives block.  No device synchronise
after each transfer: the collective library orders them on its own stream.
"""
from __future__ import annotations

from collections import deque

import torch
import torch.distributed as dist


class P2P:
    """``watch`` (optional) is called as ``watch(direction, tag, peer, tensor)`` with every tensor sent
    (direction "sent", before the send) and received ("received", after it), ``tag`` being the caller's label of
    the transfer (phase, chunk, what): digests of what crossed between stages, fault tests."""

    def __init__(self, max_in_flight: int = 4, watch=None):
        self._pending: deque = deque()
        self.max_in_flight = max_in_flight
        self.watch = watch

    def send(self, tensor: torch.Tensor, dst: int, tag: tuple = ()) -> None:
        tensor = tensor.detach().contiguous()
        if self.watch is not None:
            self.watch("sent", tag, dst, tensor)
        self._pending.append((dist.isend(tensor, dst), tensor))
        while len(self._pending) > self.max_in_flight:
            self._pending.popleft()[0].wait()

    def recv(self, shape, dtype: torch.dtype, device: torch.device, src: int, tag: tuple = ()) -> torch.Tensor:
        buf = torch.empty(shape, dtype=dtype, device=device)
        dist.recv(buf, src)
        if self.watch is not None:
            self.watch("received", tag, src, buf)
        return buf

    def drain(self) -> None:
        while self._pending:
            self._pending.popleft()[0].wait()
