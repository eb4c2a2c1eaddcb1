"""The documents a run trains on, in which order each data-parallel rank takes them, and how they are chunked.

Loading happens at construction, before anything is written, so that bad data is refused (``DataError``,
``ConfigError`` for a chunk index of other data) with nothing on disk.  The order depends on the rank layout and
is built by ``start`` once the process group exists.  ``state_dict`` is the data position a checkpoint keeps.
"""
from __future__ import annotations

import functools

from ..config import DataConfig
from ..data import Document, DocumentOrder, load_documents
from ..engine import Rollout
from ..parallel import RankLayout
from ..planning.sharding import BalancedSharder
from ..planning.spans import load_planned_spans

Order = DocumentOrder | BalancedSharder


class DataPipeline:
    """Documents, their planned chunks (``data.chunk_index``) and this rank's resumable document order."""

    def __init__(self, cfg: DataConfig, tokenizer, vocab_size: int, *, seed: int, progress: bool = True):
        self.cfg, self.seed = cfg, seed
        self.docs, self.report = load_documents(
            cfg.path, tokenizer, vocab_size, text_field=cfg.text_field,
            # a chunk index plans whole documents: never split them (0 = no limit, also for the bundled sample)
            max_doc_tokens=0 if cfg.chunk_index else cfg.max_doc_tokens,
            invalid_utf8=cfg.invalid_utf8, progress=progress)
        self.planned_spans: dict[str, list[tuple[int, int]]] | None = (
            load_planned_spans(cfg.chunk_index, self.docs, tokenizer) if cfg.chunk_index else None)
        self._index = {doc.id: i for i, doc in enumerate(self.docs)}
        self.order: Order | None = None

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
