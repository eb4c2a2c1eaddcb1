"""Planned chunk boundaries for the trainer, read from a chunk index and checked against the loaded documents."""
from __future__ import annotations

import logging
import os

from ..config import ConfigError
from ..data import Document

log = logging.getLogger("rollout_dist")


def _doc_key(doc_id: str) -> str:
    """A document id made independent of how data.path was written: absolute file path [+ ':line']."""
    path, sep, line = doc_id.rpartition(":")
    if sep and path.endswith(".jsonl") and line.isdigit():
        return f"{os.path.abspath(path)}:{line}"
    return os.path.abspath(doc_id)


def load_planned_spans(store: str, docs: list[Document], tokenizer) -> dict[str, list[tuple[int, int]]]:
    """Planned chunk boundaries of every training document, from a chunk index, checked against the data."""
    from .index import ChunkIndex, ChunkIndexError
    from .tokens import tokenizer_fingerprint

    try:
        index = ChunkIndex.open(store)
    except (ChunkIndexError, FileNotFoundError) as err:
        raise ConfigError(f"data.chunk_index={store!r}: {err}") from None
    if index.attrs.get("mode") != "exact":
        raise ConfigError(f"data.chunk_index={store!r} was planned for {index.attrs.get('mode')} mode (with "
                          "overlaps); re-plan with --mode exact for rollout.mode=exact")
    if index.attrs["tokenizer"]["fingerprint"] != tokenizer_fingerprint(tokenizer):
        raise ConfigError(f"data.chunk_index={store!r} was planned with another tokenizer "
                          f"({index.attrs['tokenizer']['name']}); re-plan with this model's tokenizer")
    changed = index.verify_sources()
    if changed:
        raise ConfigError(f"data.chunk_index={store!r}: source files changed since planning: {changed[:3]}; re-plan")
    planned = {}
    for entry in index.documents:
        # the index names the source file absolutely; a JSONL document adds its line to the id
        _, sep, line = entry.doc_id.rpartition(":")
        key = _doc_key(entry.source + (f":{line}" if sep and line.isdigit() else ""))
        planned[key] = [(c.token_start, c.token_end) for c in index.chunks_of(entry.index)]
    spans = {}
    for doc in docs:
        key = _doc_key(doc.id)
        if key not in planned:
            raise ConfigError(f"data.chunk_index={store!r} has no plan for {doc.id}; plan the same data.path")
        if planned[key][-1][1] != len(doc.input_ids):
            raise ConfigError(f"data.chunk_index={store!r}: {doc.id} has {len(doc.input_ids)} tokens but was "
                              f"planned with {planned[key][-1][1]}; re-plan")
        spans[doc.id] = planned[key]
    log.info("chunk plan: %s (version %d), %d chunks for %d documents", store, index.version,
             sum(len(v) for v in spans.values()), len(spans))
    return spans
