"""Chunk planning: coverage, limits, boundary preference, token-level cuts, overlap, token maps, profiles."""
from pathlib import Path

import pytest

from rollout_dist.config import ConfigError
from rollout_dist.planning.config import PlannerConfig, load_profile
from rollout_dist.planning.planner import PlanError, extract_entities, plan_document
from rollout_dist.planning.tokens import ByteTokenMap, OffsetTokenMap
from rollout_dist.tokenizer import byte_tokenizer

CORPUS = Path(__file__).resolve().parents[2] / "rollout_dist" / "assets" / "corpus"
PROFILES = Path(__file__).resolve().parents[2] / "hydra_conf" / "planner"


def cfg(max_tokens=200, min_tokens=50, **kw):
    return PlannerConfig(max_chunk_tokens=max_tokens, min_chunk_tokens=min_tokens, **kw)


def plan(text, c, mode="exact"):
    return plan_document(text, ByteTokenMap(text), c, mode=mode)


def assert_tiles(text, p, c):
    raw = text.encode("utf-8")
    assert p.chunks[0].token_start == 0 and p.chunks[0].char_start == 0
    assert p.chunks[-1].token_end == len(raw) and p.chunks[-1].char_end == len(text)
    for a, b in zip(p.chunks, p.chunks[1:]):
        assert a.token_end == b.token_start and a.char_end == b.char_start  # no gap, no overlap
    for ch in p.chunks:
        assert 0 < ch.token_count <= c.max_chunk_tokens
        # the offsets map back to the source: the chunk's tokens are exactly its characters' bytes
        assert raw[ch.token_start:ch.token_end] == text[ch.char_start:ch.char_end].encode("utf-8")


def test_gpl_is_tiled_exactly_once_within_limits():
    text = (CORPUS / "GPL-3.txt").read_text()
    c = cfg(1024, 256)
    p = plan(text, c)
    assert_tiles(text, p, c)
    assert p.token_cuts == 0
    assert all(ch.overlap_token_start == ch.token_start for ch in p.chunks)  # exact mode: no overlap
    # the GPL has numbered sections: most cuts land on section or paragraph boundaries, none mid-sentence
    kinds = [ch.boundary_kind for ch in p.chunks[1:]]
    assert set(kinds) <= {"section", "paragraph", "list_item", "sentence"}
    assert sum(k in ("section", "paragraph") for k in kinds) >= 0.8 * len(kinds)
    assert sum(ch.token_count < c.min_chunk_tokens for ch in p.chunks[:-1]) == 0


def test_exact_offsets_and_section_preference():
    text = ("Intro sentence one. Intro sentence two.\n\n"
            "Article 1 Scope\nThis applies to all. It is binding.\n\n"
            "Article 2 Fees\nFees are due monthly. Late fees apply.")
    p = plan(text, cfg(80, 20))
    a1, a2 = text.index("Article 1"), text.index("Article 2")
    assert (a1, a2) == (41, 94)
    assert [(ch.char_start, ch.char_end, ch.boundary_kind, ch.label) for ch in p.chunks] == [
        (0, 41, "document", "preamble"),
        (41, 94, "section", "Article 1 Scope"),
        (94, len(text), "section", "Article 2 Fees"),
    ]


def test_sentences_are_never_cut_unless_longer_than_a_chunk():
    sentence = "This sentence has exactly some words in it. "
    text = sentence * 40
    c = cfg(100, 30)
    p = plan(text, c)
    assert_tiles(text, p, c)
    assert all(text[ch.char_start:].startswith("This") for ch in p.chunks)
    assert {ch.boundary_kind for ch in p.chunks[1:]} == {"sentence"}


def test_over_long_sentence_is_cut_at_token_level_and_says_why():
    text = "Short one. " + "word " * 100 + "end. Next short one."
    c = cfg(64, 16)
    p = plan(text, c)
    assert_tiles(text, p, c)
    cut = [ch for ch in p.chunks if ch.boundary_kind == "token_cut:sentence_over_max"]
    assert p.token_cuts == len(cut) >= 2
    assert all(ch.link_prev == 1.0 for ch in cut)  # a cut sentence continues: fully linked
    assert max(ch.token_count for ch in p.chunks) == 64


def test_multibyte_token_cut_keeps_whole_characters():
    text = "数" * 100  # 3 bytes each, no sentence end
    c = cfg(64, 16)
    p = plan(text, c)
    assert_tiles(text, p, c)
    assert [ch.token_count for ch in p.chunks[:-1]] == [63] * (len(p.chunks) - 1)


def test_memory_overlap_reaches_back_to_a_sentence_start():
    text = (CORPUS / "Apache-2.0.txt").read_text()
    c = cfg(1024, 256, memory_overlap_tokens=128)
    exact, memory = plan(text, c, "exact"), plan(text, c, "memory")
    assert [(ch.token_start, ch.token_end) for ch in exact.chunks] == \
        [(ch.token_start, ch.token_end) for ch in memory.chunks]
    assert memory.chunks[0].overlap_token_start == 0
    for prev, ch in zip(memory.chunks, memory.chunks[1:]):
        span = ch.token_start - ch.overlap_token_start
        assert span >= 128 or ch.overlap_token_start == prev.token_start
        assert prev.token_start <= ch.overlap_token_start < ch.token_start
        head = text[ch.overlap_char_start:ch.char_start]
        assert head and not head[0].isspace()  # starts at a unit (sentence or stronger) start
        assert text.encode()[ch.overlap_token_start:ch.token_start] == head.encode()


def test_hf_offset_path_gives_the_same_plan_as_the_byte_path():
    tok = byte_tokenizer()
    text = "Título: ñandú.\n\n# Sección 1\nEl ñandú corre. 数据很好。Fin!\n\n" * 3
    assert tok(text, add_special_tokens=False)["input_ids"] == list(text.encode())  # token i == byte i
    c = cfg(60, 10)
    a = plan_document(text, ByteTokenMap(text), c)
    b = plan_document(text, OffsetTokenMap(text, tok), c)
    assert [(x.token_start, x.token_end, x.char_start, x.char_end, x.boundary_kind) for x in a.chunks] == \
        [(x.token_start, x.token_end, x.char_start, x.char_end, x.boundary_kind) for x in b.chunks]
    assert_tiles(text, a, c)
    long = "ab数" * 50 + " done. Next."  # token-level cuts on character boundaries, both paths
    a = plan_document(long, ByteTokenMap(long), cfg(64, 16))
    b = plan_document(long, OffsetTokenMap(long, tok), cfg(64, 16))
    assert [(x.token_start, x.char_start, x.boundary_kind) for x in a.chunks][:3] == \
        [(0, 0, "document"), (62, 38, "token_cut:sentence_over_max"), (126, 76, "token_cut:sentence_over_max")]
    assert [(x.token_start, x.char_start) for x in a.chunks] == [(x.token_start, x.char_start) for x in b.chunks]


def test_plans_are_deterministic_and_empty_text_has_no_chunks():
    text = (CORPUS / "MPL-2.0.txt").read_text()
    c = cfg(512, 128)
    assert plan(text, c) == plan(text, c)
    assert plan("", c).chunks == []
    with pytest.raises(PlanError, match="mode"):
        plan("x", c, mode="fast")


def test_entities_and_labels():
    got = extract_entities('The "Licensed Work" means $1,200.50 paid by Free Software Foundation in 2024; '
                           'the Licensed Work is 4.5% of 12,000 units. Free Software Foundation agrees. 「保密信息」',
                           8)
    values = {v: k for v, k, _ in got}
    assert values["Licensed Work"] == "term" and values["Free Software Foundation"] == "name"
    assert {"$1,200.50", "2024", "4.5%", "12,000"} <= {v for v, k in values.items() if k == "number"}
    assert values["保密信息"] == "term"
    assert got[0][:2] == ["Licensed Work", "term"] and got[0][2] == 2  # most frequent first


def test_profiles_match_their_names_and_bad_values_are_named():
    profiles = {p.stem: load_profile(p) for p in PROFILES.glob("*.yaml")}
    assert set(profiles) == {"default", "legal", "medical", "finance"}
    assert profiles["legal"].max_chunk_tokens == 4096 and profiles["medical"].max_chunk_tokens == 2048
    for name, p in profiles.items():
        assert p.profile == name and p.min_chunk_tokens <= p.max_chunk_tokens
        assert p.memory_overlap_tokens == 0 or p.memory_overlap_tokens >= 128
    with pytest.raises(ConfigError, match="memory_overlap_tokens"):
        PlannerConfig(memory_overlap_tokens=64)
    with pytest.raises(ConfigError, match="min_chunk_tokens"):
        PlannerConfig(max_chunk_tokens=100, min_chunk_tokens=200)
    with pytest.raises(ConfigError, match="max_chunk_tokens"):
        PlannerConfig(max_chunk_tokens=0)
    with pytest.raises(ConfigError, match="boundary_weights"):
        PlannerConfig(boundary_weights={"section": 1.0})
