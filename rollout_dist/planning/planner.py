"""Chunk planning: a document's units and boundary scores -> chunks of at most ``max_chunk_tokens`` tokens.

Greedy, left to right.  From a chunk's start, every unit boundary between ``min_chunk_tokens`` and
``max_chunk_tokens`` tokens further is a candidate end, valued

    weight[kind] + topic_weight * topic_shift + fill_weight * chunk_tokens / max_chunk_tokens

(a cut right after a heading is worth 0).  The best candidate wins, preferring candidates that leave at least
``min_chunk_tokens`` for the rest of the document; a document's remainder that fits in one chunk becomes its
last chunk.  With no candidate in [min, max] the best boundary below ``min`` is taken; with no boundary at all
within ``max`` tokens (one sentence longer than a chunk) the chunk is cut at ``max`` tokens and the next chunk's
boundary kind is ``token_cut:sentence_over_max``.  In exact mode the chunks tile the document: every token and
character lies in exactly one chunk.  In memory mode each chunk after the first also names an overlap start:
at least ``memory_overlap_tokens`` before its own start, moved back to the start of a unit (sentence), never
before the previous chunk's start; those tokens are context for the memory state, not a second training target.

Per chunk the planner also records a label (the heading of the section the chunk starts in, else a functional
label), key entities and the link strength to the previous chunk (see ``entities`` and ``link strength`` below).
"""
from __future__ import annotations

import bisect
import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from .config import PlannerConfig
from .tokens import ByteTokenMap
from .segment import HEADING_BODY, KIND_NAMES, TOKEN_CUT, TermBag, segment, topic_shifts

PLANNER_VERSION = "1"
MODES = ("exact", "memory")

# --- key entities -------------------------------------------------------------------------------------------
# Simple, documented patterns; each found string is counted in the chunk and the most frequent are kept:
#   term:   a defined term: a quoted phrase starting with a capital ("Licensed Work", “Licensor”), or up to 16
#           CJK characters in 「」 or “”
#   name:   two or more capitalised words in a row (Free Software Foundation, Bank of China), a leading
#           The/This/Any/... dropped
#   number: money ($1,200.50, €3), percentages (4.5%), ISO dates (2024-05-01), years (1900-2099), numbers with
#           thousands separators (12,000)
_TERM_ENTITY = re.compile(r"[\"“「]([A-Z][\w\-]*(?:[ \-][\w\-]+){0,5}|[\u4e00-\u9fff]{1,16})[\"”」]")
_NAME_ENTITY = re.compile(r"[A-Z](?<![A-Za-z][A-Z])[a-z]+(?: (?:of|and|for|the|&))?(?: [A-Z][a-z]+)+")
_NUMBER_ENTITY = re.compile(
    r"[$€£¥0-9](?<![\w.,][$€£¥0-9])(?:(?<=[$€£¥]) ?\d[\d,]*(?:\.\d+)?|(?<=\d)(?:\d*(?:\.\d+)? ?%"
    r"|\d{3}-\d\d-\d\d(?!\d)|\d{0,2}(?:,\d{3})+(?:\.\d+)?(?![\d,])|(?<=1)9\d\d(?![\d.,])|(?<=2)0\d\d(?![\d.,])))")
_ENTITY_KINDS = (("term", _TERM_ENTITY), ("name", _NAME_ENTITY), ("number", _NUMBER_ENTITY))
_LEADING = frozenset("The This That These Those Any Each All An In If For Such Our Your Its Their".split())

# --- functional labels (chunks before the first heading): a phrase in the lower-cased first 400 characters --
_FUNCTIONAL = (
    ("definitions", ("definition", '" means', "” means", "shall mean", "定义", "释义")),
    ("recitals", ("whereas", "recital")),
    ("signatures", ("in witness whereof", "signed by", "signature")),
    ("contents", ("table of contents", "目录")),
)


class PlanError(ValueError):
    """A document or setting the planner cannot use; the message names it and says what to do."""


@dataclass
class Chunk:
    index: int
    """Position of the chunk within its document (0, 1, ...)."""
    token_start: int
    token_end: int
    char_start: int
    char_end: int
    overlap_token_start: int
    """Memory mode: where the context re-read before this chunk starts (== token_start without overlap)."""
    overlap_char_start: int
    boundary_kind: str
    """How the chunk's start was chosen: document, section, paragraph, list_item, sentence, heading_body or
    token_cut:sentence_over_max (a sentence longer than max_chunk_tokens was cut at token level)."""
    boundary_score: float
    topic_shift: float
    label: str
    entities: list = field(default_factory=list)
    """[[text, kind, count], ...] most frequent first."""
    link_prev: float = 0.0
    """TF-IDF cosine similarity with the previous chunk's text, in [0, 1]; 0 for a document's first chunk."""

    @property
    def token_count(self) -> int:
        return self.token_end - self.token_start


@dataclass
class DocumentPlan:
    doc_id: str
    n_tokens: int
    n_chars: int
    chunks: list[Chunk]
    token_cuts: int = 0
    """Chunks that start with a token-level cut inside an over-long sentence."""


def plan_document(text: str, token_map, cfg: PlannerConfig, *, mode: str = "exact", doc_id: str = "document",
                  ) -> DocumentPlan:
    """Chunks of one document. ``token_map`` is a ``ByteTokenMap`` or ``OffsetTokenMap`` of ``text``."""
    if mode not in MODES:
        raise PlanError(f"mode={mode!r}: choose exact or memory")
    n_tok = token_map.n_tokens
    if n_tok == 0:
        return DocumentPlan(doc_id, 0, len(text), [])
    seg = segment(text)
    toks, chars = token_map.units(seg.starts)
    bag = TermBag(text, seg.starts, toks if isinstance(token_map, ByteTokenMap) else None)
    idf = topic_shifts(seg, bag)
    weights = cfg.boundary_weights
    base = np.array([0.0, weights["section"], weights["paragraph"], weights["list_item"], weights["sentence"],
                     0.0, 0.0])
    kinds = np.asarray(seg.kinds, dtype=np.int64)
    shifts = np.asarray(seg.shifts, dtype=np.float64)
    scores = np.round(base[kinds] + cfg.topic_weight * shifts, 6)
    scores[kinds == HEADING_BODY] = 0.0
    unit_chars = np.asarray(seg.starts, dtype=np.int64)  # where each unit starts in the text itself
    # a boundary that falls inside the token of the boundary before it cannot be cut at
    keep = np.ones(len(toks), dtype=bool)
    keep[1:] = toks[1:] > toks[:-1]
    keep &= toks < n_tok
    keep[0] = True
    toks, chars, kinds, shifts, scores, unit_chars = (a[keep] for a in (toks, chars, kinds, shifts, scores,
                                                                        unit_chars))

    lo_len, hi_len, fill = cfg.min_chunk_tokens, cfg.max_chunk_tokens, cfg.fill_weight
    starts = [(0, 0, 0, 0.0, 0.0, 0)]  # per chunk: token, char, kind, score, shift, unit char (the anchor)
    cur_tok, cur_char = 0, 0
    while n_tok - cur_tok > hi_len:
        j0 = bisect.bisect_right(toks, cur_tok)
        j1 = bisect.bisect_right(toks, cur_tok + hi_len)
        pick = None
        if j1 > j0:
            lengths = toks[j0:j1] - cur_tok
            values = scores[j0:j1] + fill * lengths / hi_len
            long_enough = lengths >= lo_len
            for mask in (long_enough & (n_tok - toks[j0:j1] >= lo_len), long_enough):
                if mask.any():
                    pick = j0 + int(np.argmax(np.where(mask, values, -np.inf)))
                    break
            else:
                pick = j0 + int(np.argmax(values))
        if pick is not None:
            cur_tok, cur_char = int(toks[pick]), int(chars[pick])
            starts.append((cur_tok, cur_char, int(kinds[pick]), float(scores[pick]), float(shifts[pick]),
                           int(unit_chars[pick])))
        else:  # no boundary within max_chunk_tokens: one sentence is longer than a chunk
            cur_tok, cur_char = token_map.cut(cur_tok, cur_char, cur_tok + hi_len)
            starts.append((cur_tok, cur_char, TOKEN_CUT, 0.0, 0.0, cur_char))

    bounds = [s[0] for s in starts] + [n_tok]
    char_bounds = [s[1] for s in starts] + [len(text)]
    heading_units = sorted(seg.headings)
    heading_chars = [seg.starts[i] for i in heading_units]
    chunks = []
    for k, (t0, c0, kind, score, shift, anchor) in enumerate(starts):
        ov_tok, ov_char = t0, c0
        if mode == "memory" and k > 0 and cfg.memory_overlap_tokens:
            prev_tok, prev_char = bounds[k - 1], char_bounds[k - 1]
            target = t0 - cfg.memory_overlap_tokens
            j = bisect.bisect_right(toks, target) - 1  # the last unit start at or before the target
            if target <= prev_tok or j < 0 or toks[j] <= prev_tok:
                ov_tok, ov_char = prev_tok, prev_char
            else:
                ov_tok, ov_char = int(toks[j]), int(chars[j])
        # the section the chunk starts in (a chunk starting at a heading belongs to that heading)
        h = bisect.bisect_right(heading_chars, anchor) - 1
        label = seg.headings[heading_units[h]] if h >= 0 else _functional_label(text, c0, char_bounds[k + 1])
        chunk = Chunk(k, t0, bounds[k + 1], c0, char_bounds[k + 1], ov_tok, ov_char, KIND_NAMES[kind],
                      round(score, 6), round(shift, 6), label)
        chunk.entities = extract_entities(text[chunk.char_start:chunk.char_end], cfg.max_entities)
        chunks.append(chunk)
    _link_strength(chunks, seg.starts, bag, idf, [s[5] for s in starts])
    return DocumentPlan(doc_id, n_tok, len(text), chunks,
                        token_cuts=sum(c.boundary_kind == KIND_NAMES[TOKEN_CUT] for c in chunks))


def _functional_label(text: str, start: int, end: int) -> str:
    head = text[start:min(end, start + 400)].lower()
    for name, phrases in _FUNCTIONAL:
        if any(phrase in head for phrase in phrases):
            return name
    return "preamble" if start == 0 else "body"


def extract_entities(text: str, limit: int) -> list:
    """Key entities of ``text`` as [text, kind, count], most frequent first (ties: terms, names, numbers; then
    alphabetical)."""
    if limit <= 0:
        return []
    counts = {kind: Counter(pattern.findall(text)) for kind, pattern in _ENTITY_KINDS}
    names: Counter = Counter()
    for value, c in counts["name"].items():
        words = value.split()
        while words and words[0] in _LEADING:
            words.pop(0)
        if len(words) >= 2:
            names[" ".join(words)] += c
    for value in counts["term"]:  # a defined term used unquoted too: one entry, a term, counted everywhere
        counts["term"][value] = max(counts["term"][value], names.pop(value, 0))
    counts["name"] = names
    found = sorted((-c, rank, value) for rank, (kind, _) in enumerate(_ENTITY_KINDS)
                   for value, c in counts[kind].items())
    out, seen = [], set()
    for neg, rank, value in found:
        if value not in seen:
            seen.add(value)
            out.append([value, _ENTITY_KINDS[rank][0], -neg])
            if len(out) == limit:
                break
    return out


def _link_strength(chunks: list[Chunk], unit_starts: list[int], bag: TermBag, idf: np.ndarray,
                   anchors: list[int]) -> None:
    """link_prev: TF-IDF cosine similarity between a chunk's terms and the previous chunk's (IDF over the
    document's blocks); 1 for a chunk that continues a sentence cut at token level, 0 for the first chunk.
    Terms are counted per unit, in the chunk where the unit starts."""
    if len(chunks) < 2:
        return
    chunk_of_unit = np.searchsorted(np.asarray(anchors), np.asarray(unit_starts), side="right") - 1
    cos, _, _ = bag.neighbour_cosine(chunk_of_unit, len(chunks), idf)
    for k in range(1, len(chunks)):
        cut = chunks[k].boundary_kind == KIND_NAMES[TOKEN_CUT]
        chunks[k].link_prev = 1.0 if cut else round(float(cos[k]), 6)
