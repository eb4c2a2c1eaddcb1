"""Fault injection for tests of the coordinator's checks (config section ``fault``; off by default).

Each fault fires once, on one rank (``fault.rank``), in one step (``fault.step``, 1-based as logs count):

* ``param_bitflip``: before the step's first forward, one bit of one element of a parameter (``fault.tensor``,
  default the first decoder-layer weight) flips: a weight corrupted at rest in device memory.
* ``optimizer_bitflip``: the same in this rank's optimizer state (its partition under ZeRO 1/2; default tensor
  ``exp_avg``, the first one whose name contains ``fault.tensor``); needs ``fault.step >= 2`` (the state exists
  after the first step).
* ``state_bitflip``: in the carried K of layer ``fault.layer`` for chunk ``fault.chunk``, right after the fill
  pass wrote them (at rest); with ``fault.persistent=true`` instead every computation of those K from the
  backward recompute on is wrong (a unit that stays broken), so a replay repeats the bad value.
* ``p2p_corrupt``: hidden states this rank (a stage after the first) receives for chunk ``fault.chunk`` in the
  fill pass arrive with one bit flipped.
* ``coordinator_kill`` / ``coordinator_stall`` (``fault.rank`` is ignored: the coordinator runs on rank 0): at
  this step's batch the coordinator closes its links and ends, or stops answering with its links open.

``fault.bit`` picks the bit of the element's word (0: least significant, of the same width as its dtype),
``fault.index`` the flat element.
"""
from __future__ import annotations

import logging

import torch

from ..config import FaultConfig

log = logging.getLogger("rollout_dist")

_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def flip_bit(t: torch.Tensor, index: int, bit: int) -> None:
    """Flips ``bit`` of flat element ``index`` (row-major) of ``t`` in place, through an integer view of the same
    storage (any strides)."""
    words = t.detach().view(_INT[t.element_size()])
    at = tuple(int(i) for i in torch.unravel_index(torch.tensor(index % t.numel()), t.shape))
    width = 8 * t.element_size()
    mask = 1 << (bit % width)
    if mask >= 1 << (width - 1):  # the sign bit of the signed integer view
        mask -= 1 << width
    with torch.no_grad():
        words[at] = words[at] ^ mask


class FaultInjector:
    """Fires the configured fault once at its place; every other call is a no-op."""

    def __init__(self, cfg: FaultConfig, rank: int):
        self.cfg, self.rank = cfg, rank
        self.fired = False
        self.mine = cfg.kind != "none" and (rank == cfg.rank or cfg.kind.startswith("coordinator_"))

    def _due(self, kind: str, step: int) -> bool:
        return self.mine and not self.fired and self.cfg.kind == kind and step == self.cfg.step

    def _fire(self, what: str) -> None:
        self.fired = True
        log.warning("fault injection: %s (rank %d, step %d)", what, self.rank, self.cfg.step)

    def before_step(self, step: int, params: list[tuple[str, torch.Tensor]],
                    optimizer: list[tuple[str, torch.Tensor]]) -> None:
        """At the start of ``step`` (1-based), before its first forward."""
        for kind, tensors, default in (("param_bitflip", params, ".layers."), ("optimizer_bitflip", optimizer,
                                                                                  "exp_avg")):
            if not self._due(kind, step):
                continue
            want = self.cfg.tensor or default
            named = [(n, t) for n, t in tensors if want in n and t.numel() > 0] or [(n, t) for n, t in tensors
                                                                                    if t.numel() > 0]
            if not named:
                raise ValueError(f"fault.kind={kind}: this rank has no such tensor at step {step}")
            name, t = named[0]
            flip_bit(t, self.cfg.index, self.cfg.bit)
            self._fire(f"{kind}: bit {self.cfg.bit} of element {self.cfg.index} of {name} flipped")

    def on_chunk_kv(self, step: int, phase: str, layer: int, chunk: int, key: torch.Tensor,
                    stored_key: torch.Tensor | None) -> None:
        """Inside the rollout, after ``layer``'s K/V of ``chunk`` were written (fill) or recomputed."""
        c = self.cfg
        if not (self.mine and c.kind == "state_bitflip" and step == c.step and layer == c.layer and chunk == c.chunk):
            return
        if not c.persistent and phase == "fill" and not self.fired:
            flip_bit(key, c.index, c.bit)  # the state's own buffer: corrupted at rest
            self._fire(f"state_bitflip: bit {c.bit} of the stored K of layer {layer}, chunk {chunk}")
        elif c.persistent and phase in ("recompute", "replay"):
            flip_bit(key, c.index, c.bit)  # this computation's result, every time
            if not self.fired:
                self._fire(f"state_bitflip (persistent): the K of layer {layer}, chunk {chunk} come out wrong "
                           "from the recompute on")

    def on_receive(self, step: int, tag: tuple, tensor: torch.Tensor) -> None:
        phase, chunk = (tag + ("", -1))[:2]
        if self._due("p2p_corrupt", step) and phase == "fill" and chunk == self.cfg.chunk:
            flip_bit(tensor, self.cfg.index, self.cfg.bit)
            self._fire(f"p2p_corrupt: a bit of the hidden states received for chunk {chunk}")

    def coordinator_fault(self) -> tuple[int | None, int | None]:
        """(stall_at, kill_at) for the coordinator thread."""
        k = self.cfg.kind
        return (self.cfg.step if k == "coordinator_stall" else None,
                self.cfg.step if k == "coordinator_kill" else None)

