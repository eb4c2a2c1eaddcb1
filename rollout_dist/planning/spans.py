"""Planned chunk boundaries for the trainer, read from a chunk index and checked against the loaded documents.

An index is planned for a mode (``python -m rollout_dist.plan --mode``, or ``launch/plan.py rollout.mode=...``).
Exact mode trains only an exact index: its chunks tile each document.  Memory mode trains either kind: from a
memory-mode index each chunk runs from its overlap start (``overlap_token_start``: tokens of the previous chunk
re-read as context, never a second target) to its end, and the planner's boundary score at its start is handed
to the rollout (``MemoryRollout.run(boundary_scores=)``, for importance weighting); an exact index is a memory
index without overlaps.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from ..config import ConfigError
from ..data import Document

log = logging.getLogger("rollout_dist")


@dataclass
class PlannedChunks:
    """Every training document's planned chunks (``spans``: [start, end) token spans, overlapping in memory
    mode) and, for a memory-mode index, the planner's boundary score at each chunk's start (else empty)."""

    spans: dict[str, list[tuple[int, int]]]
    scores: dict[str, list[float]] = field(default_factory=dict)
    overlapped: int = 0
    """Chunks that re-read the end of the previous chunk."""


def _doc_key(doc_id: str) -> str:
    """A document id made independent of how data.path was written: absolute file path [+ ':line']."""
    path, sep, line = doc_id.rpartition(":")
    if sep and path.endswith(".jsonl") and line.isdigit():
        return f"{os.path.abspath(path)}:{line}"
    return os.path.abspath(doc_id)


def load_planned_spans(store: str, docs: list[Document], tokenizer) -> dict[str, list[tuple[int, int]]]:
    """Planned chunk boundaries of every training document (exact mode), from a chunk index, checked against the
    data."""
    return load_planned_chunks(store, docs, tokenizer, "exact").spans


def load_planned_chunks(store: str, docs: list[Document], tokenizer, mode: str) -> PlannedChunks:
    """The planned chunks of every training document for ``rollout.mode`` = ``mode``, from a chunk index,
    checked against the data (module docstring: which index each mode trains)."""
    from .index import ChunkIndex, ChunkIndexError
    from .tokens import tokenizer_fingerprint

    try:
        index = ChunkIndex.open(store)
    except (ChunkIndexError, FileNotFoundError) as err:
        raise ConfigError(f"data.chunk_index={store!r}: {err}") from None
    planned_for = index.attrs.get("mode")
    if planned_for not in ("exact", "memory") or (mode == "exact" and planned_for != "exact"):
        raise ConfigError(f"data.chunk_index={store!r} was planned for {planned_for} mode (with overlaps); re-plan "
                          f"with --mode {mode} for rollout.mode={mode}")
    if index.attrs["tokenizer"]["fingerprint"] != tokenizer_fingerprint(tokenizer):
        raise ConfigError(f"data.chunk_index={store!r} was planned with another tokenizer "
                          f"({index.attrs['tokenizer']['name']}); re-plan with this model's tokenizer")
    changed = index.verify_sources()
    if changed:
        raise ConfigError(f"data.chunk_index={store!r}: source files changed since planning: {changed[:3]}; re-plan")
    overlaps = planned_for == "memory"
    planned, scores = {}, {}
    for entry in index.documents:
        # the index names the source file absolutely; a JSONL document adds its line to the id
        _, sep, line = entry.doc_id.rpartition(":")
        key = _doc_key(entry.source + (f":{line}" if sep and line.isdigit() else ""))
        chunks = index.chunks_of(entry.index)
        planned[key] = (_overlapping(chunks) if overlaps else
                        [(c.token_start, c.token_end) for c in chunks])
        scores[key] = [float(c.boundary_score) for c in chunks]
    out = PlannedChunks({})
    for doc in docs:
        key = _doc_key(doc.id)
        if key not in planned:
            raise ConfigError(f"data.chunk_index={store!r} has no plan for {doc.id}; plan the same data.path")
        if not planned[key] or planned[key][-1][1] != len(doc.input_ids):
            raise ConfigError(f"data.chunk_index={store!r}: {doc.id} has {len(doc.input_ids)} tokens but was "
                              f"planned with {planned[key][-1][1] if planned[key] else 0}; re-plan")
        out.spans[doc.id] = planned[key]
        if overlaps:
            out.scores[doc.id] = scores[key]
            out.overlapped += sum(s < e for (s, _), (_, e) in zip(planned[key][1:], planned[key]))
    log.info("chunk plan: %s (version %d, %s mode%s), %d chunks for %d documents", store, index.version,
             planned_for, f", {out.overlapped} chunks re-read the previous one's end" if overlaps else "",
             sum(len(v) for v in out.spans.values()), len(out.spans))
    return out


def _overlapping(chunks) -> list[tuple[int, int]]:
    """Memory mode's spans of one document's planned chunks: (overlap start, end).  Each span must start after
    the one before (engine/weighting.py ``plan_chunks``); the planner lets an overlap reach back to the previous
    chunk's start, which for the second chunk is the first span's start too: that overlap then re-reads all of
    the first chunk but its first token."""
    spans: list[tuple[int, int]] = []
    for c in chunks:
        start = c.overlap_token_start if spans else c.token_start
        if spans and start <= spans[-1][0]:
            start = spans[-1][0] + 1
        spans.append((int(min(start, c.token_start)), int(c.token_end)))
    return spans
