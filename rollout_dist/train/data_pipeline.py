"""The documents a run trains on, in which order each data-parallel rank takes them, and how they are chunked.

Loading happens at construction, before anything is written, so that bad data is refused (``DataError``,
``ConfigError`` for a chunk index of other data) with nothing on disk.  The order depends on the rank layout and
is built by ``start`` once the process group exists.  ``state_dict`` is the data position a checkpoint keeps.

``chunked(doc, rollout, step)`` is what a step trains of a document: its tokens and chunks (planned by
``data.chunk_index``, overlapping in memory mode, else every ``rollout.chunk_size`` tokens), cut to the first
chunks of the memory curriculum's stage at that step (``memory.curriculum``, RMT/ARMT's segment-count
curriculum).  The stage is a function of the step, so a resumed run continues it.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

from ..config import DataConfig
from ..data import Document, DocumentOrder, load_documents
from ..engine import Rollout
from ..parallel import RankLayout
from ..planning.sharding import BalancedSharder
from ..planning.spans import load_planned_chunks

log = logging.getLogger("rollout_dist")

Order = DocumentOrder | BalancedSharder


class Curriculum:
    """``memory.curriculum``: documents are cut to their first ``counts[k]`` chunks in stage k, which holds for
    ``steps`` optimizer steps; the last stage holds until the end.  Steps are 0-based here (the step being
    computed), so stage k covers steps k * steps + 1 ... (k + 1) * steps as the logs count them."""

    def __init__(self, counts: list[int], steps: int):
        if not counts or any(int(n) <= 0 for n in counts) or steps <= 0:
            raise ValueError(f"a curriculum needs positive segment counts and steps per stage, got {counts}, {steps}")
        self.counts, self.steps = [int(n) for n in counts], int(steps)

    def stage(self, step: int) -> int:
        return min(step // self.steps, len(self.counts) - 1)

    def chunks(self, step: int) -> int:
        """Chunks a document keeps at (0-based) ``step``."""
        return self.counts[self.stage(step)]

    def describe(self, step: int) -> str:
        k = self.stage(step)
        until = "the end" if k == len(self.counts) - 1 else f"step {(k + 1) * self.steps}"
        return (f"curriculum stage {k + 1} of {len(self.counts)} from step {step + 1} to {until}: documents cut to "
                f"their first {self.counts[k]} chunks (memory.curriculum={self.counts}, "
                f"memory.curriculum_steps={self.steps})")


@dataclass
class ChunkedDocument:
    """What one step trains of a document: its tokens (the curriculum may have cut them), chunks, the planner's
    boundary score at each chunk's start (memory-mode chunk index only) and its key among the random streams."""

    doc: Document
    input_ids: list[int]
    spans: list[tuple[int, int]]
    boundary_scores: list[float] | None
    stream_id: int

    @property
    def targets(self) -> int:
        """Target tokens (each position but the last predicts the next token; overlaps are not counted twice)."""
        return len(self.input_ids) - 1


class DataPipeline:
    """Documents, their planned chunks (``data.chunk_index``) and this rank's resumable document order."""

    def __init__(self, cfg: DataConfig, tokenizer, vocab_size: int, *, seed: int, progress: bool = True,
                 mode: str = "exact", curriculum: Curriculum | None = None):
        self.cfg, self.seed, self.curriculum = cfg, seed, curriculum
        self.docs, self.report = load_documents(
            cfg.path, tokenizer, vocab_size, text_field=cfg.text_field,
            # a chunk index plans whole documents: never split them (0 = no limit, also for the bundled sample)
            max_doc_tokens=0 if cfg.chunk_index else cfg.max_doc_tokens,
            invalid_utf8=cfg.invalid_utf8, progress=progress)
        planned = load_planned_chunks(cfg.chunk_index, self.docs, tokenizer, mode) if cfg.chunk_index else None
        self.planned_spans: dict[str, list[tuple[int, int]]] | None = planned.spans if planned else None
        self.planned_scores: dict[str, list[float]] = planned.scores if planned else {}
        """Memory-mode chunk index: the planner's boundary score at each planned chunk's start."""
        self._index = {doc.id: i for i, doc in enumerate(self.docs)}
        self.order: Order | None = None
        self._stage: int | None = None  # the curriculum stage last logged

    def start(self, layout: RankLayout) -> None:
        """Builds this rank's order: balanced by tokens and T^2 over data-parallel ranks (``data.balance``), or a
        seeded, rank-strided shuffle (also with one replica, where there is nothing to balance)."""
        if layout.dp > 1 and self.cfg.balance:
            self.order = BalancedSharder([len(d.input_ids) for d in self.docs], seed=self.seed, rank=layout.dp_rank,
                                         world=layout.dp)
        else:
            self.order = DocumentOrder(len(self.docs), seed=self.seed, rank=layout.dp_rank, world=layout.dp,
                                       shuffle=self.cfg.shuffle)

    @property
    def balanced(self) -> bool:
        return isinstance(self.order, BalancedSharder)

    def next_window(self, size: int) -> list[Document]:
        """The next ``size`` documents of this rank: one optimizer step's accumulation window."""
        if self.order is None:
            raise RuntimeError("DataPipeline.start(layout) builds the document order; call it first")
        return [self.docs[self.order.next()] for _ in range(size)]

    def stream_id(self, doc: Document) -> int:
        """The document's index in the corpus: its key among the run's random streams (``Document.id`` is a
        path, which would make the streams depend on where the data lies)."""
        try:
            return self._index[doc.id]
        except KeyError:
            raise ValueError(f"{doc.id} is not a document of this run's data (data.path)") from None

    def spans_for(self, doc: Document, rollout: Rollout) -> list[tuple[int, int]]:
        """The document's chunks: planned by the chunk index, else the rollout's fixed chunk size."""
        if self.planned_spans:
            return self.planned_spans[doc.id]
        return rollout.spans(len(doc.input_ids))

    def chunked(self, doc: Document, rollout: Rollout, step: int) -> ChunkedDocument:
        """What (0-based) step ``step`` trains of ``doc`` (module docstring); the first call in a curriculum
        stage logs the stage."""
        spans = self.spans_for(doc, rollout)
        scores = self.planned_scores.get(doc.id)
        ids = doc.input_ids
        if self.curriculum is not None:
            self._log_stage(step)
            keep = self.curriculum.chunks(step)
            if keep < len(spans):
                spans = spans[:keep]
                ids = ids[:spans[-1][1]]
                scores = scores[:keep] if scores is not None else None
        return ChunkedDocument(doc, ids, spans, scores, self.stream_id(doc))

    def _log_stage(self, step: int) -> None:
        stage = self.curriculum.stage(step)
        if stage != self._stage:
            self._stage = stage
            log.info("%s", self.curriculum.describe(step))

    @functools.cached_property
    def longest_doc(self) -> int:
        """Tokens of the longest training document: what memory is sized for."""
        return max(len(d.input_ids) for d in self.docs)

    def largest_chunk(self, default: int) -> int:
        """The longest planned chunk, or ``default`` (the rollout's chunk size) without a chunk index."""
        if not self.planned_spans:
            return default
        return max((e - s for spans in self.planned_spans.values() for s, e in spans), default=default)

    def describe(self) -> str:
        r = self.report
        return (f"{r.documents} documents ({r.tokens} tokens) from {r.files} file(s); {len(r.skipped_short)} "
                f"skipped as too short; {r.pieces_from_splits} extra pieces from splitting long documents")

    # the data position ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The order's position (epoch, place in it) and what the order depends on, checked on load."""
        return self.order.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.order.load_state_dict(state)
