"""The chunk index: a plan persisted in Zarr (v3), versioned, with a reader for the trainer and inference.

Layout of a store directory::

    STORE/zarr.json           root group; attrs say what this is
    STORE/v0001/              one group per version, never modified once written
        zarr.json             attrs: format, planner_version, version, created, profile, mode, tokenizer
                              {kind, name, fingerprint, vocab_size}, sources [{path, xxh3_64, bytes}],
                              totals {documents, chunks, tokens, chars}, problems {empty_documents,
                              replaced_utf8, token_cuts, chunks_below_min}
        chunks/<column>       one row per chunk, documents in order, chunks in document order
        documents/<column>    one row per document

A version is written under a temporary name beside the others and renamed into place, so a reader never
sees half of one; the rename fails rather than replace an existing version (two writers get two versions).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import zarr

from .planner import PLANNER_VERSION, Chunk, DocumentPlan

FORMAT = "rollout_dist.chunk_index"
_VERSION_DIR = re.compile(r"^v(\d{4,})$")
_ROWS_PER_ZARR_CHUNK = 1 << 16

CHUNK_COLUMNS = {  # name -> numpy dtype ("str": variable-length UTF-8)
    "doc": np.int64, "index_in_doc": np.int32, "token_start": np.int64, "token_end": np.int64,
    "char_start": np.int64, "char_end": np.int64, "token_count": np.int64, "overlap_token_start": np.int64,
    "overlap_char_start": np.int64, "boundary_kind": "str", "boundary_score": np.float64,
    "topic_shift": np.float64, "label": "str", "entities": "str", "link_prev": np.float64,
}
DOCUMENT_COLUMNS = {
    "doc_id": "str", "source": np.int32, "token_count": np.int64, "char_count": np.int64,
    "first_chunk": np.int64, "num_chunks": np.int64, "token_cuts": np.int64,
}


class ChunkIndexError(ValueError):
    """A chunk index that is missing or of another format; the message says what to do."""


def list_versions(store: str | Path) -> list[int]:
    """Versions present in ``store``, ascending (empty when the store does not exist)."""
    root = Path(store)
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for p in root.iterdir() if (m := _VERSION_DIR.match(p.name)) and p.is_dir())


def _column(values: list, dtype) -> np.ndarray:
    if dtype == "str":
        return np.array(values, dtype=object) if values else np.zeros(0, dtype=object)
    return np.asarray(values, dtype=dtype)


def _write_columns(group, name: str, columns: dict, spec: dict) -> None:
    sub = group.create_group(name)
    for key, dtype in spec.items():
        data = _column(columns[key], dtype)
        rows = max(1, min(len(data), _ROWS_PER_ZARR_CHUNK))
        array = sub.create_array(key, shape=(len(data),), dtype=str if dtype == "str" else dtype, chunks=(rows,))
        if len(data):
            array[:] = data


def write_index(store: str | Path, plans: list[DocumentPlan], *, sources: list[dict], doc_sources: list[int],
                profile: dict, mode: str, tokenizer: dict, problems: dict | None = None) -> Path:
    """Writes ``plans`` as a new version of ``store``; returns the version's directory.

    ``sources``: [{path, xxh3_64, bytes}] of every file read; ``doc_sources[i]``: the source of ``plans[i]``."""
    if len(doc_sources) != len(plans):
        raise ValueError(f"{len(plans)} plans but {len(doc_sources)} doc_sources")
    root = Path(store)
    if root.exists() and not root.is_dir():
        raise ChunkIndexError(f"{root} is a file; the chunk index is a directory: choose another --out")
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "zarr.json").exists():
        tmp_root = root / f".tmp-root-{uuid.uuid4().hex}"
        zarr.open_group(str(tmp_root), mode="w", zarr_format=3).attrs.update(
            {"format": FORMAT, "layout": "one group per version: v0001, v0002, ... (see rollout_dist/planning)"})
        os.replace(tmp_root / "zarr.json", root / "zarr.json")
        shutil.rmtree(tmp_root, ignore_errors=True)
    elif zarr.open_group(str(root), mode="r").attrs.get("format") != FORMAT:
        raise ChunkIndexError(f"{root} is a Zarr store but not a chunk index; choose another --out")

    chunk_cols: dict = {key: [] for key in CHUNK_COLUMNS}
    doc_cols: dict = {key: [] for key in DOCUMENT_COLUMNS}
    below_min = 0
    for d, plan in enumerate(plans):
        doc_cols["doc_id"].append(plan.doc_id)
        doc_cols["source"].append(doc_sources[d])
        doc_cols["token_count"].append(plan.n_tokens)
        doc_cols["char_count"].append(plan.n_chars)
        doc_cols["first_chunk"].append(len(chunk_cols["doc"]))
        doc_cols["num_chunks"].append(len(plan.chunks))
        doc_cols["token_cuts"].append(plan.token_cuts)
        for c in plan.chunks:
            row = {"doc": d, "index_in_doc": c.index, "token_start": c.token_start, "token_end": c.token_end,
                   "char_start": c.char_start, "char_end": c.char_end, "token_count": c.token_count,
                   "overlap_token_start": c.overlap_token_start, "overlap_char_start": c.overlap_char_start,
                   "boundary_kind": c.boundary_kind, "boundary_score": c.boundary_score,
                   "topic_shift": c.topic_shift, "label": c.label,
                   "entities": json.dumps(c.entities, ensure_ascii=False), "link_prev": c.link_prev}
            for key, value in row.items():
                chunk_cols[key].append(value)
        below_min += sum(c.token_count < profile["min_chunk_tokens"] for c in plan.chunks[:-1])
    problems = dict(problems or {})
    problems.setdefault("empty_documents", [p.doc_id for p in plans if not p.chunks])
    problems.setdefault("replaced_utf8", {})
    problems["token_cuts"] = sum(p.token_cuts for p in plans)
    problems["chunks_below_min"] = int(below_min)
    attrs = {
        "format": FORMAT, "planner_version": PLANNER_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "profile": profile, "mode": mode, "tokenizer": tokenizer, "sources": sources,
        "totals": {"documents": len(plans), "chunks": len(chunk_cols["doc"]),
                   "tokens": int(sum(p.n_tokens for p in plans)), "chars": int(sum(p.n_chars for p in plans))},
        "problems": problems,
    }
    tmp = root / f".tmp-{uuid.uuid4().hex}"
    try:
        group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        _write_columns(group, "chunks", chunk_cols, CHUNK_COLUMNS)
        _write_columns(group, "documents", doc_cols, DOCUMENT_COLUMNS)
        version = (list_versions(root) or [0])[-1] + 1
        while True:
            attrs["version"] = version
            group.attrs.update(attrs)
            final = root / f"v{version:04d}"
            if final.exists():
                version += 1
                continue
            try:
                os.rename(tmp, final)  # fails when the name exists (another writer got there first)
                return final
            except OSError:
                if not final.exists():
                    raise
                version += 1
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@dataclass
class DocumentEntry:
    index: int
    doc_id: str
    source: str
    token_count: int
    char_count: int
    first_chunk: int
    num_chunks: int


class ChunkIndex:
    """Read side of the chunk index: ``ChunkIndex.open(store)`` (latest version) or ``version=N``.

    ``chunks`` holds the chunk columns as numpy arrays (``entities`` decoded to lists); ``documents`` the
    per-document rows; ``chunks_of(doc)`` the ``Chunk`` records of one document."""

    def __init__(self, path: Path, group):
        self.path = path
        self.attrs = dict(group.attrs)
        self.version = int(self.attrs["version"])
        self.chunks = {key: group["chunks"][key][:] for key in CHUNK_COLUMNS}
        self.chunks["entities"] = [json.loads(e) for e in self.chunks["entities"]]
        self._docs = {key: group["documents"][key][:] for key in DOCUMENT_COLUMNS}
        paths = [s["path"] for s in self.attrs["sources"]]
        self.documents = [
            DocumentEntry(i, str(self._docs["doc_id"][i]), paths[int(self._docs["source"][i])],
                          int(self._docs["token_count"][i]), int(self._docs["char_count"][i]),
                          int(self._docs["first_chunk"][i]), int(self._docs["num_chunks"][i]))
            for i in range(len(self._docs["doc_id"]))]

    @classmethod
    def open(cls, store: str | Path, version: int | None = None) -> "ChunkIndex":
        versions = list_versions(store)
        if not versions:
            raise ChunkIndexError(f"{store}: no chunk index here; write one with python -m rollout_dist.plan "
                                  f"--data PATH --out {store}")
        if version is None:
            version = versions[-1]
        elif version not in versions:
            raise ChunkIndexError(f"{store}: no version {version}; present: {versions}")
        path = Path(store) / f"v{version:04d}"
        group = zarr.open_group(str(path), mode="r")
        if group.attrs.get("format") != FORMAT:
            raise ChunkIndexError(f"{path} is not a chunk index (format {group.attrs.get('format')!r})")
        return cls(path, group)

    @property
    def num_chunks(self) -> int:
        return len(self.chunks["doc"])

    def chunks_of(self, doc: int) -> list[Chunk]:
        entry = self.documents[doc]
        c = self.chunks
        return [Chunk(int(c["index_in_doc"][i]), int(c["token_start"][i]), int(c["token_end"][i]),
                      int(c["char_start"][i]), int(c["char_end"][i]), int(c["overlap_token_start"][i]),
                      int(c["overlap_char_start"][i]), str(c["boundary_kind"][i]), float(c["boundary_score"][i]),
                      float(c["topic_shift"][i]), str(c["label"][i]), c["entities"][i], float(c["link_prev"][i]))
                for i in range(entry.first_chunk, entry.first_chunk + entry.num_chunks)]

    def token_counts(self) -> np.ndarray:
        """Tokens per document (the input of ``sharding.BalancedSharder``)."""
        return np.asarray(self._docs["token_count"], dtype=np.int64)

    def verify_sources(self) -> list[str]:
        """Source files whose content no longer matches the recorded xxh3-64 (or that are gone)."""
        import xxhash
        changed = []
        for s in self.attrs["sources"]:
            try:
                digest = xxhash.xxh3_64_hexdigest(Path(s["path"]).read_bytes())
            except OSError:
                digest = None
            if digest != s["xxh3_64"]:
                changed.append(s["path"])
        return changed
