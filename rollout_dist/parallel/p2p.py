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
    def __init__(self, max_in_flight: int = 4):
        self._pending: deque = deque()
        self.max_in_flight = max_in_flight

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        tensor = tensor.detach().contiguous()
        self._pending.append((dist.isend(tensor, dst), tensor))
        while len(self._pending) > self.max_in_flight:
            self._pending.popleft()[0].wait()

    def recv(self, shape, dtype: torch.dtype, device: torch.device, src: int) -> torch.Tensor:
        buf = torch.empty(shape, dtype=dtype, device=device)
        dist.recv(buf, src)
        return buf

    def drain(self) -> None:
        while self._pending:
            self._pending.popleft()[0].wait()
