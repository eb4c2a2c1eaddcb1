"""Random streams keyed by position in the training run, never by process layout or by what ran before.

Dropout draws from PyTorch's default generators (CPU and the model's CUDA device), which have no per-call
argument.  A rollout therefore runs each chunk's layer inside ``StreamKey.scope(chunk, layer)``: the default
generators are seeded from xxhash64 of (seed, step, document, chunk, global layer index) and restored to what they
were when the scope ends, so

- the fill pass and the backward recompute of a chunk draw the same masks (the stored K/V equal the recomputed
  ones bit for bit);
- two documents, or one document at two steps, draw different masks;
- a pipeline stage holding layers 12..21 draws what one process holding all layers draws for them;
- a resumed run draws at step k what an uninterrupted one draws: nothing depends on earlier draws;
- nothing leaks past the scope: a rollout leaves the caller's generators exactly as it found them.

``RandomStreams(seed).document(step, doc_id)`` is the key the trainer hands a rollout; callers of the plain API
who pass none get ``StreamKey.from_default_generator()``, which takes one draw from the default CPU generator
(so repeated calls differ, as repeated HF forwards with dropout do, and ``torch.manual_seed`` fixes them).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..seeding import MASK63, derive_seed, seeded


@dataclass(frozen=True)
class StreamKey:
    """Which document of which step a rollout runs: (seed, step, document).  Chunks and layers extend it."""

    seed: int
    step: int = 0
    document: int = 0

    @classmethod
    def from_default_generator(cls) -> StreamKey:
        """A fresh key drawn from the default CPU generator (one draw): for API calls that pass none."""
        return cls(seed=int(torch.randint(0, MASK63, (), dtype=torch.int64)), step=0, document=0)

    def seed_for(self, chunk: int, layer: int = -1) -> int:
        """The generator seed of ``chunk``'s draws in global decoder layer ``layer`` (-1: outside the layers)."""
        return derive_seed(self.seed, self.step, self.document, chunk, layer)

    def scope(self, chunk: int, layer: int = -1, device: torch.device | None = None):
        """Seeds the default CPU generator (and ``device``'s, if CUDA) for (chunk, layer); restores both after."""
        return seeded(self.seed_for(chunk, layer), device)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "step": self.step, "document": self.document}

    @classmethod
    def from_state_dict(cls, state: dict) -> StreamKey:
        return cls(**{k: int(state[k]) for k in ("seed", "step", "document")})


@dataclass(frozen=True)
class RandomStreams:
    """The run's random streams: one seed, from which every (step, document, chunk, layer) stream is derived."""

    seed: int

    def document(self, step: int, document: int) -> StreamKey:
        """The key of ``document`` (its id in the corpus) at optimizer step ``step`` (0-based)."""
        return StreamKey(seed=self.seed, step=step, document=document)

    def state_dict(self) -> dict:
        return {"seed": self.seed}
