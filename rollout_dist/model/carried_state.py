"""The ``CarriedState`` interface: what a rollout carries from chunk to chunk, in one canonical layout.

A rollout (rollout_dist.engine.rollout) runs a document chunk by chunk; everything one chunk hands to the next
lives in a ``CarriedState``: the exact rollout's K/V (and during backward dK/dV), memory mode's bounded per-layer
state.  The caller may create it (``Rollout.new_state``), hand it to ``Rollout.run`` or ``Rollout.fill``, keep it
afterwards (inference sessions, snapshots) and close it.  It stands at a chunk ``Boundary`` between calls.

Canonical layout of ``state_dict()`` (version 1): a flat ``dict[str, torch.Tensor]`` on the CPU, every value a
tensor (scalars 0-dim), so that snapshots store it as arrays and digests hash its bytes:

    version      int64 ()        1
    phase        int64 ()        0: fill (or fill-only), 1: backward
    chunks       int64 ()        chunks completed in that phase
    position     int64 ()        P: tokens whose K/V the state holds, positions [0, P) of the document
    positions    int64 (B, P)    the position ids those tokens were run at (RoPE; packed documents restart)
    layers       int64 (n,)      global indices of the decoder layers this process holds (a pipeline stage: its own)
    stream       int64 (3,)      the random-stream key (seed, step, document) the document runs under
    layer.{L}.key, layer.{L}.value           model dtype (B, P, kv_heads, head_dim), for each L in ``layers``
    backward phase only:
    loss_sum     float64 ()      sum of token losses of the chunks done so far
    layer.{L}.dkey, layer.{L}.dvalue         model dtype (B, P, kv_heads, head_dim): what later chunks handed back

In the backward phase P is the end of the next chunk to run backward (the start of the last one run): the K/V and
dK/dV of later positions were consumed.  Offloaded layers are read back from host memory.  Derived caches (kept
attention outputs) are never part of it; a state loaded without them recomputes them, with the same result.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

LAYOUT_VERSION = 1
PHASES = ("fill", "backward")


@dataclass(frozen=True)
class Boundary:
    """The chunk boundary a state stands at: ``chunks`` completed in ``phase`` ("fill" or "backward"), with
    the K/V of ``position`` tokens held."""

    phase: str
    chunks: int
    position: int = 0

    def __post_init__(self):
        if self.phase not in PHASES:
            raise ValueError(f"boundary phase {self.phase!r} is not one of {PHASES}")
        if self.chunks < 0:
            raise ValueError(f"boundary chunks must be >= 0, got {self.chunks}")


class CarriedState(ABC):
    """State carried across the chunks of one document (batch); see the module docstring for its layout.

    Besides the methods below, a rollout reads and advances these attributes (its bookkeeping of where the
    document stands, which ``boundary`` and ``state_dict`` report and ``load_state_dict`` restores)."""

    filled: int  # tokens whose forward state is held
    fill_chunks: int  # chunks run by the fill pass
    backward_chunks: int  # chunks run backward
    in_backward: bool
    grad_end: int  # backward phase: what later chunks handed back is live on [0, grad_end)
    loss_sum: torch.Tensor | None  # float64 on the device: token losses of the chunks run backward
    stream_key: tuple[int, int, int] | None  # the document's random-stream key (seed, step, document)
    position_ids: torch.Tensor | None  # (B, >= filled) positions the tokens ran at; None: 0, 1, 2, ...

    @property
    @abstractmethod
    def batch(self) -> int:
        """Rows (documents run side by side)."""

    @property
    @abstractmethod
    def grads_allocated(self) -> bool:
        """Whether ``allocate_grads`` ran (a backward pass can start)."""

    @property
    def boundary(self) -> Boundary:
        """The chunk boundary this state stands at: in the backward phase the chunks run backward and the position
        up to which what later chunks handed back is live, else the chunks filled and the tokens held."""
        if self.in_backward:
            return Boundary("backward", self.backward_chunks, self.grad_end)
        return Boundary("fill", self.fill_chunks, self.filled)

    @property
    @abstractmethod
    def capacity(self) -> int:
        """Tokens this state was allocated for."""

    @property
    @abstractmethod
    def nbytes(self) -> int:
        """Device bytes held."""

    @property
    def host_bytes(self) -> int:
        """Host bytes held (offloaded state); 0 where nothing is offloaded."""
        return 0

    @abstractmethod
    def allocate_grads(self) -> None:
        """Allocates (zeroed) what the backward pass carries; the forward-only uses of a state never call it."""

    @abstractmethod
    def state_dict(self, since: int = 0) -> dict[str, torch.Tensor]:
        """The canonical layout (module docstring), on the CPU, detached copies.  ``since`` (fill phase only):
        the per-position tensors (``positions``, ``layer.L.key/value``) hold only positions [since, P), for a
        snapshot that appends what a state gained since its previous one (``position`` stays P)."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Puts this freshly allocated state where ``state`` (from ``state_dict``) stood; checks shapes."""

    @abstractmethod
    def close(self) -> None:
        """Waits for outstanding transfers and returns host buffers; the state is unusable afterwards."""
