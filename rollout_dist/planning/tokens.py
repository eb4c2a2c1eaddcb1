"""Token positions of character offsets, for the planner: which token a boundary falls on, where a token-level
cut may go, and a fingerprint that names the tokenizer in the chunk index.

Token offsets always index the tokenization of the *whole* document.  Two maps:

- ``ByteTokenMap``: the built-in byte tokenizer (``rollout_dist.tokenizer.byte_tokenizer``), where token i is
  byte i of the UTF-8 encoding.  Computed from ``str.encode`` without calling the HF tokenizer (which does the
  same, about 1 MB/s); ``tests/planning`` checks the two agree.
- ``OffsetTokenMap``: any HF fast tokenizer, from its offset mapping.  A boundary at character p falls on the
  first token that ends after p; the chunk's character offset is that token's start, so chunks tile the text.
"""
from __future__ import annotations

import bisect

import numpy as np
import xxhash

from .segment import utf8_offsets


class TokenizerError(ValueError):
    """A tokenizer the planner cannot use, or text it cannot tokenize; the message says what to do."""


def tokenizer_fingerprint(tokenizer) -> str:
    """xxh3-64 of the tokenizer's full JSON (vocabulary, merges, normalizer, pre-tokenizer, added tokens)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TokenizerError(f"{type(tokenizer).__name__} is not an HF fast tokenizer; the planner needs one "
                             "(offsets) -- save it with tokenizer.json or use --tokenizer byte")
    return xxhash.xxh3_64_hexdigest(backend.to_str().encode("utf-8"))


def encode_utf8(text: str, where: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise TokenizerError(f"{where}: character {err.start} is a lone surrogate ({text[err.start]!r}), which "
                             "is not text; remove it or read with invalid_utf8=replace") from None


class ByteTokenMap:
    """Token i is byte i of the document's UTF-8 encoding."""

    def __init__(self, text: str, where: str = "document"):
        self.text = text
        self.ascii = text.isascii()
        self.n_tokens = len(text) if self.ascii else len(encode_utf8(text, where))

    def units(self, starts: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """(token, char) where each unit starting at character ``starts[i]`` (increasing) begins."""
        chars = np.asarray(starts, dtype=np.int64)
        if self.ascii:
            return chars.copy(), chars
        return utf8_offsets(self.text, starts), chars

    def cut(self, start_tok: int, start_char: int, limit_tok: int) -> tuple[int, int]:
        """The last place at or before ``limit_tok`` (and after ``start_tok``) where a token cut keeps whole
        characters, as (token, char); one character past ``start_tok`` when none fits."""
        if self.ascii:
            return limit_tok, start_char + (limit_tok - start_tok)
        budget = limit_tok - start_tok
        piece = self.text[start_char:start_char + budget].encode("utf-8")[:budget]
        n_chars = len(piece.decode("utf-8", "ignore"))
        n_chars = max(n_chars, 1)
        return start_tok + len(self.text[start_char:start_char + n_chars].encode("utf-8")), start_char + n_chars


class OffsetTokenMap:
    """Token positions from an HF fast tokenizer's offset mapping of the whole document."""

    def __init__(self, text: str, tokenizer, where: str = "document"):
        try:
            enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        except NotImplementedError:
            raise TokenizerError("the tokenizer gives no offsets (not a fast tokenizer); save a tokenizer.json "
                                 "with it or use --tokenizer byte") from None
        offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
        self.n_tokens = len(offsets)
        self.text_len = len(text)
        self.tok_starts = np.maximum.accumulate(offsets[:, 0]) if len(offsets) else offsets[:, 0]
        self.tok_ends = np.maximum.accumulate(offsets[:, 1]) if len(offsets) else offsets[:, 1]

    def char_of(self, toks: np.ndarray) -> np.ndarray:
        toks = np.asarray(toks, dtype=np.int64)
        out = np.full(toks.shape, self.text_len, dtype=np.int64)
        inside = toks < self.n_tokens
        out[inside] = self.tok_starts[toks[inside]]
        return out

    def units(self, starts: list[int]) -> tuple[np.ndarray, np.ndarray]:
        toks = np.searchsorted(self.tok_ends, np.asarray(starts, dtype=np.int64), side="right").astype(np.int64)
        chars = self.char_of(toks)
        if len(starts):
            toks[0], chars[0] = 0, 0
        return toks, chars

    def cut(self, start_tok: int, start_char: int, limit_tok: int) -> tuple[int, int]:
        starts = self.tok_starts
        t = limit_tok
        while t > start_tok + 1 and (t >= self.n_tokens or starts[t] <= starts[t - 1]):
            t -= 1
        if t == start_tok + 1 and t < self.n_tokens and starts[t] <= max(start_char, starts[t - 1]):
            # no character boundary before the limit: go forward to the next one
            t = bisect.bisect_right(starts, starts[start_tok], lo=start_tok + 1)
            t = min(t, self.n_tokens)
        return t, int(self.char_of(np.array([t]))[0]) if t < self.n_tokens else self.text_len
