"""Planned documents over data-parallel ranks, balanced by tokens and by attention cost (∝ T²).

Every rank trains the same number of documents per epoch (data-parallel steps are synchronous), so the
balancing keeps counts equal.  Per epoch:

1. The trainable documents (>= 2 tokens) are shuffled with ``seed`` and ``epoch``; when their number is not a
   multiple of ``world`` the last ``n % world`` of that shuffle sit the epoch out (a different set each epoch;
   ``epoch_plan`` names them and a warning counts them).
2. The rest go, costliest first (by tokens, ties by the shuffled position), each to the rank with the
   smallest load ``max(tokens / (total tokens / world), T² / (total T² / world))`` that still has room for
   its share of ``n // world`` documents (greedy longest-processing-time with equal counts).
3. Each rank's documents are sorted costliest first and step i gives every rank its i-th document, so the
   documents of one step have similar sizes across ranks; the steps run in a seeded order (the same on all
   ranks), so no rank sees its documents sorted by size.

``state_dict`` holds (epoch, position) plus what the order depends on (seed, world, a digest of the token
counts); ``load_state_dict`` refuses a position saved for other documents or another world size.
"""
from __future__ import annotations

import heapq
import logging
import random

import numpy as np
import xxhash

from ..data import EpochCursor

log = logging.getLogger(__name__)


class ShardingError(ValueError):
    """Documents that cannot be sharded as asked, or a saved position for other documents."""


def _digest(tokens: np.ndarray) -> str:
    return xxhash.xxh3_64_hexdigest(np.ascontiguousarray(tokens, dtype=np.int64).tobytes())


def imbalance(assignment: list[list[int]], tokens: np.ndarray) -> dict:
    """max / mean over ranks of the tokens and of the attention cost (sum of T²); 1.0 is perfect balance."""
    tok = np.array([tokens[a].sum() if len(a) else 0 for a in assignment], dtype=np.float64)
    att = np.array([(tokens[a].astype(np.float64) ** 2).sum() if len(a) else 0 for a in assignment])
    return {"tokens": float(tok.max() / tok.mean()) if tok.mean() else 1.0,
            "attention": float(att.max() / att.mean()) if att.mean() else 1.0}


class BalancedSharder(EpochCursor):
    """Which document a data-parallel rank trains on next, balanced as described in the module docstring.

    ``tokens[i]``: tokens of document i (``ChunkIndex.token_counts()``); ``next()`` returns a document index.
    """

    def __init__(self, tokens, *, seed: int, rank: int = 0, world: int = 1):
        self.tokens = np.asarray(tokens, dtype=np.int64)
        if world < 1 or not 0 <= rank < world:
            raise ShardingError(f"rank {rank} is not within a world of {world}")
        self.trainable = np.flatnonzero(self.tokens >= 2)
        skipped = len(self.tokens) - len(self.trainable)
        if skipped:
            log.warning("%d document(s) shorter than 2 tokens are not sharded (nothing to train on)", skipped)
        if len(self.trainable) < world:
            raise ShardingError(f"{len(self.trainable)} trainable document(s) cannot feed {world} data-parallel "
                                "ranks; add documents or use fewer ranks")
        self.seed, self.rank, self.world = seed, rank, world
        self.digest = _digest(self.tokens)
        self.epoch, self.position = 0, 0
        self._cache: tuple[int, list[list[int]]] | None = None

    def epoch_plan(self, epoch: int) -> tuple[list[list[int]], list[int]]:
        """(documents of every rank in training order, documents sitting this epoch out)."""
        rng = random.Random(self.seed * 1_000_003 + epoch)
        docs = [int(d) for d in self.trainable]
        rng.shuffle(docs)
        usable = len(docs) - len(docs) % self.world
        docs, left_out = docs[:usable], sorted(docs[usable:])
        order = {d: i for i, d in enumerate(docs)}
        tok = self.tokens.astype(np.float64)
        mean_tok = max(tok[docs].sum() / self.world, 1.0)
        mean_att = max((tok[docs] ** 2).sum() / self.world, 1.0)
        docs.sort(key=lambda d: (-self.tokens[d], order[d]))  # T² sorts like T
        capacity = len(docs) // self.world
        per_rank: list[list[int]] = [[] for _ in range(self.world)]
        load_tok = [0.0] * self.world
        load_att = [0.0] * self.world
        heap = [(0.0, k) for k in range(self.world)]  # (load, rank): least loaded first, ties to the lower rank
        for d in docs:
            _, k = heapq.heappop(heap)
            per_rank[k].append(d)
            load_tok[k] += tok[d]
            load_att[k] += tok[d] ** 2
            if len(per_rank[k]) < capacity:
                heapq.heappush(heap, (max(load_tok[k] / mean_tok, load_att[k] / mean_att), k))
        # step i gives every rank its i-th costliest document; the steps run in a seeded order
        steps = list(range(capacity))
        rng.shuffle(steps)
        return [[mine[i] for i in steps] for mine in per_rank], left_out

    def _epoch_order(self) -> list[int]:
        if self._cache is None or self._cache[0] != self.epoch:
            per_rank, left_out = self.epoch_plan(self.epoch)
            if left_out and self.rank == 0:
                log.warning("epoch %d: %d document(s) sit out so that every rank trains %d (a different set "
                            "each epoch)", self.epoch, len(left_out), len(per_rank[0]))
            self._cache = (self.epoch, per_rank[self.rank])
        return self._cache[1]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "world": self.world,
                "num_docs": len(self.tokens), "tokens_xxh3": self.digest}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("seed", "world", "num_docs", "tokens_xxh3"):
            if state.get(key) != mine[key]:
                raise ShardingError(f"the saved data position has {key}={state.get(key)!r}, this run {mine[key]!r}: "
                                    "resume with the same chunk index, seed and data-parallel size")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def naive_split(tokens, *, seed: int, world: int) -> list[list[int]]:
    """The baseline the tests compare against: a seeded shuffle dealt round-robin (as ``data.DocumentOrder``)."""
    docs = [int(d) for d in np.flatnonzero(np.asarray(tokens) >= 2)]
    random.Random(seed * 1_000_003).shuffle(docs)
    usable = len(docs) - len(docs) % world
    return [docs[k:usable:world] for k in range(world)]
