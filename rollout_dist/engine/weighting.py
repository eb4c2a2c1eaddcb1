"""Chunk loss weighting, and the chunk plan of memory mode (overlapping chunks whose re-read tokens are context).

A document's loss is a weighted sum of its chunks' token cross-entropy sums, ``sum_t f_t * CE_t``, where ``CE_t``
sums the losses of the tokens chunk t owns (its targets) and ``f_t`` is this module's factor.  The weights are
numbers, not part of the graph: they are computed before any chunk runs backward, from signals the forward pass
already has, so the chunked backward and the whole-graph reference weigh every chunk alike.

``rollout.loss_weighting`` (docs/memory_mode.md has the formulas):

- ``tokens`` (default): ``f_t = 1 / N`` with N the document's target tokens: the plain mean, as HF's loss.
- ``chunks``: every chunk with targets counts equally: ``f_t = 1 / (n * N_t)``, n such chunks, N_t chunk t's
  target tokens (a chunk's mean loss, averaged over chunks).
- ``importance``: ``f_t = w_t / N_t`` with ``w_t = s_t / sum_u s_u`` and the score
  ``s_t = 1 + a_kw * keyword_t + a_shift * shift_t + a_loss * max(0, l_t / mean(l) - 1)``, where ``keyword_t`` is
  1 if the chunk holds one of the task's keywords (token sequences), ``shift_t`` the larger of the planner's
  boundary score at the chunk's start and the topic shift the memory measured there (cosine distance, [0, 2]), and
  ``l_t`` the chunk's mean token loss in the forward pass (hard chunks weigh more; detached).

With several documents per optimizer step a trainer passes ``scale = N / normalizer`` so documents still weigh by
their target tokens, as in exact mode.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

WEIGHTINGS = ("tokens", "chunks", "importance")


@dataclass(frozen=True)
class ImportanceWeights:
    """Coefficients of ``importance`` weighting, and the task's keywords as token-id sequences."""

    keyword: float = 1.0
    shift: float = 1.0
    loss: float = 1.0
    keywords: tuple[tuple[int, ...], ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class ChunkPlan:
    """One chunk of a memory-mode document: it runs tokens [start, end) and owns the targets of [own, end);
    tokens [start, own) re-read the end of the previous chunk (planner overlap) and are context only."""

    start: int
    end: int
    own: int


def plan_chunks(length: int, chunk_size: int | None, spans: Sequence[tuple[int, int]] | None = None,
                ) -> list[ChunkPlan]:
    """Chunks of a ``length``-token document: every ``chunk_size`` tokens, or the given ``spans``.

    Spans must end in strictly increasing order at ``length``, the first start at 0, and each start at or before
    the previous end (no gap) and after the previous start; a start before the previous end is an overlap."""
    if spans is None:
        if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size <= 0:
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        return [ChunkPlan(s, min(s + chunk_size, length), s) for s in range(0, length, chunk_size)]
    plan, prev_start, prev_end = [], -1, 0
    for i, (s, e) in enumerate((int(s), int(e)) for s, e in spans):
        if not (s <= prev_end and s > prev_start and e > prev_end) or (i == 0 and s != 0):
            raise ValueError(f"chunk {i} [{s}, {e}) does not follow the previous chunk ending at {prev_end}: chunks "
                             "must start at 0, leave no gap, and each end after the previous one (an overlap may "
                             "re-read the previous chunk's end); was the chunk index written for these documents?")
        plan.append(ChunkPlan(s, e, prev_end))
        prev_start, prev_end = s, e
    if not plan or prev_end != length:
        raise ValueError(f"the chunks end at {prev_end} but the document has {length} tokens")
    return plan


def keyword_hit(tokens: Sequence[int], keywords: Sequence[Sequence[int]]) -> bool:
    """Whether any keyword (a token-id sequence) occurs in ``tokens``."""
    seq = list(tokens)
    for kw in keywords:
        n = len(kw)
        if n and any(seq[i:i + n] == list(kw) for i in range(len(seq) - n + 1)):
            return True
    return False


def chunk_factors(mode: str, counts: Sequence[int], *, losses: Sequence[float] | None = None,
                  shifts: Sequence[float] | None = None, keywords: Sequence[bool] | None = None,
                  importance: ImportanceWeights | None = None, scale: float = 1.0) -> tuple[list[float], list[float]]:
    """(factors f_t, weights w_t) for chunks with ``counts`` target tokens each; see the module docstring.

    The weights w_t are each chunk's share of the document's loss (they sum to 1): what is logged per chunk."""
    if mode not in WEIGHTINGS:
        raise ValueError(f"loss_weighting={mode!r} is not one of {WEIGHTINGS}")
    total = sum(counts)
    if total <= 0:
        raise ValueError("no position has a target (all labels are -100): the loss is undefined")
    n = len(counts)
    if mode == "tokens":
        weights = [c / total for c in counts]
    elif mode == "chunks":
        live = sum(1 for c in counts if c > 0)
        weights = [1.0 / live if c > 0 else 0.0 for c in counts]
    else:
        imp = importance or ImportanceWeights()
        if losses is None:
            raise ValueError("importance weighting needs each chunk's forward-pass loss")
        live_losses = [lo for lo, c in zip(losses, counts) if c > 0]
        mean = sum(live_losses) / len(live_losses)
        scores = []
        for t in range(n):
            if counts[t] == 0:
                scores.append(0.0)
                continue
            s = 1.0
            if keywords is not None and keywords[t]:
                s += imp.keyword
            if shifts is not None:
                s += imp.shift * float(shifts[t])
            if mean > 0:
                s += imp.loss * max(0.0, losses[t] / mean - 1.0)
            scores.append(max(s, 0.0))
        norm = sum(scores)
        weights = [s / norm for s in scores]
    factors = [scale * (w / c if c > 0 else 0.0) for w, c in zip(weights, counts)]
    return factors, weights
