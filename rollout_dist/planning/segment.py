"""Segmentation of English and Chinese text into units (sentences, headings, list items) and the boundary
between each unit and the one before it, with a topic-shift signal at paragraph and section boundaries.

A *unit* is the span from one boundary to the next; the planner cuts only between units (except inside a
unit longer than a whole chunk).  Boundary kinds, strongest first:

- ``section``: a heading line starts here: markdown ``#``, ``Article 5``/``Section 2.1``/``Chapter IV``/``§ 3``
  (at the start of a line), ``第五条``/``第二章``, a multi-level number ``1.2``/``1.2.3``, a short numbered
  title followed by a blank line (``7. Additional Terms.``), or a short line in capitals (``TERMS AND
  CONDITIONS``).
- ``paragraph``: after a blank line (or, in Chinese, a line ending in 。！？).
- ``list_item``: a line starting with ``-``/``*``/``•``, ``1.``/``(a)``/``iv)``, ``（一）``/``一、``.
- ``sentence``: after ``.``/``!``/``?`` followed by white space, or after ``。``/``！``/``？`` (closing quotes and
  brackets stay with their sentence).  A ``.`` does not end a sentence after a known abbreviation (``Mr.``,
  ``e.g.``, ``Art.``, ``Inc.`` ...), a single capital (``J. Smith``), a dotted abbreviation (``U.S.``), a list
  marker (``1.`` at the start of a line) or when the next word starts lower-case or with a digit.
- ``heading_body``: right after a heading line.  It scores 0 so that a heading stays with its text.

The *topic shift* at a boundary that starts a block (section, paragraph, list item) is the TF-IDF cosine
distance between the block before and the block after (0 when either has no weighted term).  Terms are
lower-cased runs of ASCII letters and single CJK characters; the IDF counts blocks of the same document,
``log((1 + N) / (1 + df))``, so words found in every block weigh nothing (with fewer than 2 blocks every term
weighs 1).  Sentence and heading_body boundaries (inside a block) get 0.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import numpy as np

DOCUMENT, SECTION, PARAGRAPH, LIST_ITEM, SENTENCE, HEADING_BODY, TOKEN_CUT = range(7)
KIND_NAMES = ("document", "section", "paragraph", "list_item", "sentence", "heading_body",
              "token_cut:sentence_over_max")
# which kind a position keeps when several boundaries fall on it: no cut right after a heading, then section ...
_PRIORITY = {HEADING_BODY: 5, SECTION: 4, PARAGRAPH: 3, LIST_ITEM: 2, SENTENCE: 1}
BLOCK_KINDS = (DOCUMENT, SECTION, PARAGRAPH, LIST_ITEM)

_CN_NUM = "一二三四五六七八九十百千零〇两0-9０-９"
_HEADING = (  # after the indentation
    r"(?:\#{1,6}[ \t]+\S"
    r"|(?:Article|ARTICLE|Section|SECTION|Chapter|CHAPTER|Part|PART|Schedule|SCHEDULE|Appendix|APPENDIX"
    r"|Annex|ANNEX|Exhibit|EXHIBIT|Clause|CLAUSE|§)[ \t]*(?:[0-9]+[A-Za-z]?|[IVXLC]+)(?:\.[0-9]+)*(?![\w.])"
    rf"|第[{_CN_NUM}]+[条條章节節款编編部篇]"
    r"|[0-9]{1,3}(?:\.[0-9]{1,3})+\.?[ \t]+\S"
    r"|[0-9]{1,3}\.[ \t]+[A-Z][^\n.!?]{0,60}\.?[ \t]*(?=\n[ \t]*\n)"
    r"|[A-Z][A-Z0-9 ,;:'&()/\-]{3,78}$"
    r")[^\n]*")
_ITEM = (r"(?:[-*•+·‣▪][ \t]+|\(?(?:[0-9]{1,3}|[a-zA-Z]|[ivxIVX]{2,4})[.)][ \t]+"
         rf"|[（(][{_CN_NUM}]+[）)]|[{_CN_NUM}]+、)")
_INDENT = r"[ \t\u3000]*"
# every structural boundary follows a newline; the leading \n lets the regex engine skip ahead fast
_STRUCT = re.compile(rf"\n{_INDENT}(?:(?P<blank>(?=\n))|(?=[#A-Z§第0-9])(?P<heading>{_HEADING})|(?P<item>{_ITEM})"
                     r"|(?<=[。！？”」』]\n)(?P<cjkpara>))", re.M)
_FIRST_LINE = re.compile(rf"{_INDENT}(?:(?P<heading>{_HEADING})|(?P<item>{_ITEM}))", re.M)
# a sentence end and the white space after it; an ASCII end needs white space and then no lower-case or digit
_SENTENCE = re.compile(r"[.!?。！？](?:(?<=[.!?])[.!?]*[\"'”’)\]]*\s+(?=[^\sa-z0-9])"
                       r"|(?<=[。！？])[。！？]*[”’」』）)]*[\s\u3000]*)")
_NONSPACE = re.compile(r"[^\s\u3000]")
_ASCII_WORDS = bytes(b | 0x20 if chr(b).isascii() and chr(b).isalpha() else 0x20 for b in range(256))
_HAS_CJK = re.compile(r"[\u4e00-\u9fff]")

ABBREVIATIONS = frozenset("""
mr mrs ms dr prof sr jr st mt inc ltd co corp llc plc bros no nos art arts sec secs para paras fig figs vol vols
ch chap p pp pg e.g i.e cf vs viz al approx dept est ca gov jan feb mar apr jun jul aug sep sept oct nov dec
u.s u.k u.n a.m p.m ph.d m.d b.a m.a rev gen col lt sgt capt cmdr adm hon ref refs eq eqs ed eds op cit ibid
""".split())


@dataclass
class Segmentation:
    starts: list[int]
    """Character offset where each unit starts; unit i spans [starts[i], starts[i+1]) (the last to the end)."""
    kinds: list[int]
    """Boundary kind at each start (an index into KIND_NAMES); ``document`` for unit 0."""
    shifts: list[float]
    """Topic shift at each start, in [0, 1]; 0 inside blocks and at unit 0."""
    headings: dict[int, str]
    """Unit index -> heading text, for units that are heading lines."""


def _heading_ok(line: str) -> bool:
    """Rejects a line that looks like wrapped prose that happens to start like a heading."""
    stripped = line.strip()
    if len(stripped) > 100:
        return False
    if stripped[:1] == "#" or stripped.startswith("第"):
        return True
    return len(stripped) <= 60 or not (stripped[-1].islower() or stripped[-1] in ",;")


def _period_ends_sentence(text: str, s: int) -> bool:
    """Whether the '.' at ``s`` (followed by white space and a capital or symbol) ends a sentence."""
    tail = text[max(0, s - 12):s].rsplit(None, 1)
    word = tail[-1].lstrip("\"'“‘([") if tail else ""
    if not word:
        return True
    if len(word) == 1 and word.isupper():
        return False  # an initial: "J. Smith"
    if word.lower() in ABBREVIATIONS or ("." in word and word.replace(".", "").isalpha()):
        return False
    if len(word) <= 4 and (word.isdigit() or word.isalpha()):
        line_start = text.rfind("\n", 0, s) + 1
        if not text[line_start:s - len(word)].strip(" \t([\u3000"):
            return False  # a list marker at the start of a line: "12." "iv." "a."
    return True


def segment(text: str) -> Segmentation:
    """Units, boundary kinds and headings of ``text`` (see the module docstring); shifts are left at 0 (the
    planner fills them with ``topic_shifts``)."""
    n = len(text)
    marks: dict[int, int] = {}
    headings_at: dict[int, str] = {}
    heading_spans: list[tuple[int, int]] = []
    nonspace = _NONSPACE.search

    memo = [0, -1]  # text[memo[0]:memo[1]] is white space and text[memo[1]] is not (-1: none after)

    def mark(pos: int, kind: int) -> None:
        if pos >= n:
            return
        if text[pos].isspace():  # move to the next non-space (memo: runs of blank lines are scanned once)
            if not memo[0] <= pos <= memo[1]:
                nxt = nonspace(text, pos)
                memo[0], memo[1] = pos, (nxt.start() if nxt else n)
            pos = memo[1]
            if pos >= n:
                return
        old = marks.get(pos)
        if old is None or _PRIORITY[kind] > _PRIORITY[old]:
            marks[pos] = kind

    first = _FIRST_LINE.match(text)
    for m in ([first] if first else []) + list(_STRUCT.finditer(text)):
        group = m.lastgroup
        if group in ("blank", "cjkpara"):
            mark(m.end(), PARAGRAPH)
        elif group == "heading":
            line = m.group("heading")
            if not _heading_ok(line):
                continue
            start = m.start("heading")
            mark(start, SECTION)
            headings_at[start] = line.strip().lstrip("#").strip()[:200]
            heading_spans.append((start, m.end()))
            if m.end() < n:
                mark(m.end(), HEADING_BODY)
        elif group == "item":
            mark(m.start("item"), LIST_ITEM)

    span_i, n_spans = 0, len(heading_spans)
    for m in _SENTENCE.finditer(text):
        s, pos = m.start(), m.end()
        if pos >= n:
            continue
        while span_i < n_spans and heading_spans[span_i][1] <= s:
            span_i += 1
        if span_i < n_spans and heading_spans[span_i][0] <= s:
            continue  # inside a heading line ("Section 2. Payment.")
        if text[s] == "." and not _period_ends_sentence(text, s):
            continue
        if text[pos].isspace():
            mark(pos, SENTENCE)
        elif marks.get(pos) is None:
            marks[pos] = SENTENCE

    marks.pop(0, None)
    starts = [0] + sorted(marks)
    kinds = [DOCUMENT] + [marks[p] for p in starts[1:]]
    headings = {i: headings_at[p] for i, p in enumerate(starts) if p in headings_at}
    first_char = nonspace(text)
    if 0 not in headings and first_char is not None and first_char.start() in headings_at \
            and first_char.start() not in marks:
        headings[0] = headings_at[first_char.start()]
    return Segmentation(starts, kinds, [0.0] * len(starts), headings)


class TermBag:
    """The terms of a document by unit, as integer ids: the input of the TF-IDF cosines.

    Terms: lower-cased runs of ASCII letters (any other character separates them) and single CJK characters.
    Found with numpy over the UTF-8 bytes (and, for CJK, the code points); a word is identified by a 64-bit
    polynomial hash of its bytes (deterministic; a collision would merge two terms, odds about n^2 / 2^64)."""

    def __init__(self, text: str, starts: list[int], unit_bytes: np.ndarray | None = None):
        """``unit_bytes``: the UTF-8 byte offsets of ``starts`` when the caller has them."""
        raw = text.encode("utf-8", "surrogatepass")
        if unit_bytes is None:
            unit_bytes = np.asarray(starts, dtype=np.int64) if len(raw) == len(text) else utf8_offsets(text, starts)
        letters = raw.translate(_ASCII_WORDS)
        word_starts, hashes = [], []
        lo = 0
        while lo < len(letters):
            hi = min(lo + _HASH_BLOCK, len(letters))
            if hi < len(letters):  # end the block between words
                space = letters.rfind(b" ", lo, hi)
                hi = space + 1 if space > lo else hi
            ws, h = _word_hashes(letters, lo, hi)
            word_starts.append(ws + lo)
            hashes.append(h)
            lo = hi
        units = [np.searchsorted(unit_bytes, np.concatenate(word_starts), side="right") - 1] if hashes else []
        if not text.isascii() and _HAS_CJK.search(text):
            points = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
            where = np.flatnonzero((points >= 0x4E00) & (points <= 0x9FFF))
            units.append(np.searchsorted(np.asarray(starts, dtype=np.int64), where, side="right") - 1)
            hashes.append(points[where].astype(np.uint64) | np.uint64(1 << 63))  # apart from word hashes
        if hashes:
            uniq, ids = np.unique(np.concatenate(hashes), return_inverse=True)
            self.ids, self.unit = ids.astype(np.int64).reshape(-1), np.concatenate(units).astype(np.int64)
        else:
            uniq, self.ids, self.unit = [], np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        self.stride = max(len(uniq), 1)

    def neighbour_cosine(self, group_of_unit: np.ndarray, n_groups: int, idf: np.ndarray | None = None
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(cos, has_terms, idf) over groups of consecutive units: the TF-IDF cosine between group g-1 and g
        (cos[0] = 0), which groups hold a weighted term, and the IDF used. ``idf=None``: computed over these
        groups, log((1 + N) / (1 + df)), or 1 for every term when N < 2."""
        cos = np.zeros(n_groups)
        if not len(self.ids) or n_groups == 0:
            return cos, np.zeros(n_groups, dtype=bool), np.ones(self.stride) if idf is None else idf
        keys, tf = np.unique(group_of_unit[self.unit] * self.stride + self.ids, return_counts=True)
        group, term = keys // self.stride, keys % self.stride
        if idf is None:
            if n_groups < 2:
                idf = np.ones(self.stride)
            else:
                idf = np.log((1.0 + n_groups) / (1.0 + np.bincount(term, minlength=self.stride)))
        w = tf * idf[term]
        norm = np.sqrt(np.bincount(group, w * w, minlength=n_groups))
        prev = keys - self.stride  # the same term in the group before
        pos = np.minimum(np.searchsorted(keys, prev), len(keys) - 1)
        found = (keys[pos] == prev) & (group > 0)
        dot = np.bincount(group[found], w[found] * w[pos[found]], minlength=n_groups)
        denom = norm[:-1] * norm[1:]
        ok = denom > 0
        cos[1:][ok] = np.clip(dot[1:][ok] / denom[ok], 0.0, 1.0)
        return cos, norm > 0, idf


def topic_shifts(seg: Segmentation, bag: TermBag) -> np.ndarray:
    """Per term id IDF over the blocks; fills ``seg.shifts`` at block starts (1 - cosine with the block
    before; 0 where either block has no weighted term) and returns the IDF."""
    is_block = np.isin(np.asarray(seg.kinds), BLOCK_KINDS)
    block_of_unit = np.cumsum(is_block) - 1
    n_blocks = int(block_of_unit[-1]) + 1 if len(block_of_unit) else 0
    cos, has, idf = bag.neighbour_cosine(block_of_unit, n_blocks)
    if n_blocks >= 2:
        shift = np.where(has[1:] & has[:-1], 1.0 - cos[1:], 0.0)
        block_units = np.nonzero(is_block)[0]
        values = np.zeros(len(seg.starts))
        values[block_units[1:]] = np.round(shift, 6)
        seg.shifts = values.tolist()
    return idf


_HASH_BLOCK = 1 << 20
_HASH_P = 0x9E3779B97F4A7C15  # odd, so it has an inverse modulo 2**64
@functools.cache
def _hash_tables() -> tuple[np.ndarray, np.ndarray]:
    """P**j and P**-j modulo 2**64 for j < _HASH_BLOCK (numpy's uint64 products wrap modulo 2**64): constants,
    computed once on first use (read-only)."""
    tables = []
    with np.errstate(over="ignore"):
        for base in (_HASH_P, pow(_HASH_P, -1, 1 << 64)):
            table = np.full(_HASH_BLOCK, base, dtype=np.uint64)
            table[0] = 1
            table = np.cumprod(table, dtype=np.uint64)
            table.flags.writeable = False
            tables.append(table)
    return tables[0], tables[1]


def _word_hashes(letters: bytes, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """Start (relative to lo) and hash of every word in letters[lo:hi] (words: runs of bytes other than
    space); hash = sum of byte_k * P**k over the word's bytes, modulo 2**64."""
    a = np.frombuffer(letters, dtype=np.uint8, count=hi - lo, offset=lo)
    is_letter = a != 0x20
    edges = np.diff(is_letter.view(np.int8), prepend=np.int8(0), append=np.int8(0))
    starts = np.flatnonzero(edges == 1)
    ends = np.flatnonzero(edges == -1)
    if not len(starts):
        return starts, np.zeros(0, dtype=np.uint64)
    power, inverse = _hash_tables()
    with np.errstate(over="ignore"):
        prefix = np.cumsum(a.astype(np.uint64) * power[:len(a)], dtype=np.uint64)
        before = np.where(starts > 0, prefix[np.maximum(starts - 1, 0)], np.uint64(0))
        hashes = (prefix[ends - 1] - before) * inverse[starts]
    return starts, hashes


def utf8_offsets(text: str, starts: list[int]) -> np.ndarray:
    """UTF-8 byte offset of each character offset in ``starts`` (increasing)."""
    out = np.zeros(len(starts), dtype=np.int64)
    if len(starts):
        widths = [len(text[a:b].encode("utf-8", "surrogatepass")) for a, b in zip(starts[:-1], starts[1:])]
        out[0] = len(text[:starts[0]].encode("utf-8", "surrogatepass"))
        np.cumsum(widths, out=out[1:])
        out[1:] += out[0]
    return out
