"""Documents: finding and reading files, tokenizing, and the per-rank document order (resumable).

``data.path`` names a ``.txt`` file (one document), a ``.jsonl`` file (one document per line, text in
``data.text_field``), a directory holding such files, or a glob.  Problems are reported with the file (and
line) they concern; nothing is dropped silently: skipped documents are counted and reported.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

log = logging.getLogger(__name__)

BUNDLED_CORPUS = Path(__file__).parent / "assets" / "corpus"
BUNDLED_MAX_DOC_TOKENS = 4096
PROGRESS_DELAY_S = 2.0
"""The tokenizing bar appears only once tokenizing has taken this long: a corpus read in a moment shows none."""
SUFFIXES = (".txt", ".jsonl")


class DataError(ValueError):
    """Bad or missing training data; the message names the file and what to do."""


@dataclass
class Document:
    id: str
    """Where it came from: ``file`` or ``file:line`` (plus ``#piece`` when split by max_doc_tokens)."""
    input_ids: list[int]


@dataclass
class LoadReport:
    files: int = 0
    documents: int = 0
    tokens: int = 0
    skipped_short: list[str] = field(default_factory=list)
    replaced_utf8: dict[str, int] = field(default_factory=dict)
    pieces_from_splits: int = 0


def find_files(path: str | None) -> list[Path]:
    """The document files ``data.path`` names (sorted), the bundled corpus when it is None."""
    if path is None:
        return sorted(p for p in BUNDLED_CORPUS.iterdir() if p.suffix in SUFFIXES)
    expanded = os.path.expanduser(path)
    if any(ch in expanded for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(expanded, recursive=True) if Path(p).is_file())
        where = f"data.path={path!r} (a glob)"
    elif os.path.isdir(expanded):
        files = sorted(p for p in Path(expanded).rglob("*") if p.is_file() and p.suffix in SUFFIXES)
        where = f"data.path={path!r} (a directory)"
    elif os.path.exists(expanded):
        files, where = [Path(expanded)], f"data.path={path!r}"
    else:
        raise DataError(f"data.path={path!r}: no such file or directory. Point it at a .txt/.jsonl file, a "
                        "directory of them, or a glob such as 'corpus/**/*.txt'")
    if not files:
        raise DataError(f"{where} holds no documents: expected files ending in {' or '.join(SUFFIXES)}")
    unknown = [str(p) for p in files if p.suffix not in SUFFIXES]
    if unknown:
        raise DataError(f"{where} includes files that are neither .txt nor .jsonl: {unknown[:3]}; narrow the glob")
    return files


def _decode(raw: bytes, where: str, invalid_utf8: str, report: LoadReport) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        if invalid_utf8 == "error":
            raise DataError(f"{where}: invalid UTF-8 at byte {err.start}; fix the file or set "
                            "data.invalid_utf8=replace") from None
        text = raw.decode("utf-8", errors="replace")
        report.replaced_utf8[where] = text.count("\ufffd") - raw.decode("utf-8", "ignore").count("\ufffd")
        return text


def read_texts(files: list[Path], text_field: str, invalid_utf8: str, report: LoadReport):
    """Yields (document id, text) for every document in ``files``."""
    for path in files:
        try:
            raw = path.read_bytes()
        except OSError as err:
            raise DataError(f"cannot read {path}: {err.strerror}; check the path and its permissions") from None
        report.files += 1
        if path.suffix == ".txt":
            yield str(path), _decode(raw, str(path), invalid_utf8, report)
            continue
        for lineno, line in enumerate(raw.split(b"\n"), start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(_decode(line, where, invalid_utf8, report))
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(record, dict) or text_field not in record:
                raise DataError(f"{where}: the record has no {text_field!r} field; every JSONL line needs one "
                                "(or set data.text_field to the field that holds the text)")
            if not isinstance(record[text_field], str):
                raise DataError(f"{where}: field {text_field!r} is {type(record[text_field]).__name__}, not text")
            yield where, record[text_field]


def load_documents(path: str | None, tokenizer, vocab_size: int, *, text_field: str = "text",
                   max_doc_tokens: int | None = None, invalid_utf8: str = "replace", progress: bool = True,
                   ) -> tuple[list[Document], LoadReport]:
    """Reads and tokenizes every document; splits those longer than ``max_doc_tokens`` into pieces."""
    files = find_files(path)
    if max_doc_tokens is None and path is None:
        max_doc_tokens = BUNDLED_MAX_DOC_TOKENS
    report = LoadReport()
    docs: list[Document] = []
    texts = read_texts(files, text_field, invalid_utf8, report)
    for doc_id, text in tqdm(texts, desc="tokenizing", unit="doc", disable=not progress, leave=False,
                             delay=PROGRESS_DELAY_S):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        if len(ids) < 2:
            report.skipped_short.append(doc_id)
            log.warning("skipping %s: %d token(s), a document needs at least 2", doc_id, len(ids))
            continue
        bad = next((t for t in ids if t >= vocab_size or t < 0), None)
        if bad is not None:
            raise DataError(f"{doc_id}: token id {bad} is outside the model's vocabulary (size {vocab_size}); the "
                            "tokenizer does not match the model (use the tokenizer saved with model.path)")
        pieces = [ids] if not max_doc_tokens else [ids[i:i + max_doc_tokens]
                                                   for i in range(0, len(ids), max_doc_tokens)]
        pieces = [p for p in pieces if len(p) >= 2]
        report.pieces_from_splits += len(pieces) - 1 if len(pieces) > 1 else 0
        for k, piece in enumerate(pieces):
            docs.append(Document(doc_id if len(pieces) == 1 else f"{doc_id}#{k}", piece))
            report.tokens += len(piece)
    report.documents = len(docs)
    if report.skipped_short:
        log.warning("skipped %d document(s) shorter than 2 tokens (first: %s)", len(report.skipped_short),
                    report.skipped_short[0])
    for where, n in report.replaced_utf8.items():
        log.warning("%s: %d invalid UTF-8 sequence(s) replaced with U+FFFD", where, n)
    if not docs:
        raise DataError(f"no usable documents in data.path={path!r}: {report.files} file(s) read, "
                        f"{len(report.skipped_short)} document(s) skipped as empty or shorter than 2 tokens")
    return docs, report


class EpochCursor:
    """A rank's place in a per-epoch document order: ``next()`` walks ``_epoch_order()`` and starts the next
    epoch at its end; ``epoch`` and ``position`` are what a checkpoint keeps."""

    epoch: int
    position: int

    def _epoch_order(self) -> list[int]:
        raise NotImplementedError

    def next(self) -> int:
        order = self._epoch_order()
        if self.position >= len(order):
            self.epoch, self.position = self.epoch + 1, 0
            order = self._epoch_order()
        index = order[self.position]
        self.position += 1
        return index


class DocumentOrder(EpochCursor):
    """Which document a data-parallel rank trains on next: a seeded shuffle per epoch, rank-strided.

    ``state_dict`` holds the epoch and position, so a resumed run continues with the same documents.
    """

    def __init__(self, num_docs: int, *, seed: int, rank: int = 0, world: int = 1, shuffle: bool = True):
        if num_docs < world:
            raise DataError(f"{num_docs} document(s) cannot feed {world} data-parallel ranks; add documents")
        self.num_docs, self.seed, self.rank, self.world, self.shuffle = num_docs, seed, rank, world, shuffle
        self.epoch, self.position = 0, 0

    def _epoch_order(self) -> list[int]:
        order = list(range(self.num_docs))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        usable = len(order) - len(order) % self.world  # every rank gets the same number of documents
        return order[self.rank:usable:self.world]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "num_docs": self.num_docs}

    def load_state_dict(self, state: dict) -> None:
        if state["num_docs"] != self.num_docs or state["seed"] != self.seed:
            raise DataError(f"the saved data position is for {state['num_docs']} documents with seed "
                            f"{state['seed']}; this run has {self.num_docs} with seed {self.seed}")
        self.epoch, self.position = state["epoch"], state["position"]
