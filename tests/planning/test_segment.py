"""Segmentation: exact unit boundaries and kinds for English and Chinese, abbreviations, headings, lists."""
from rollout_dist.planning.segment import KIND_NAMES, TermBag, segment, topic_shifts


def units(text):
    seg = segment(text)
    ends = seg.starts[1:] + [len(text)]
    return [(KIND_NAMES[k], text[a:b]) for k, a, b in zip(seg.kinds, seg.starts, ends)], seg


def test_english_sentences_respect_abbreviations():
    text = ("Mr. J. Smith of Acme Inc. met Dr. Brown, e.g. at 5 p.m. on Jan. 3. They agreed. "
            "Was it 3.5 per cent? Yes! The U.S. Government signed.")
    got, _ = units(text)
    assert got == [
        ("document", "Mr. J. Smith of Acme Inc. met Dr. Brown, e.g. at 5 p.m. on Jan. 3. "),
        ("sentence", "They agreed. "),
        ("sentence", "Was it 3.5 per cent? "),
        ("sentence", "Yes! "),
        ("sentence", "The U.S. Government signed."),
    ]


def test_chinese_sentences_and_clauses():
    text = "第一条 总则\n双方应当保密。违约方应当赔偿！是否同意？同意。\n第二条 期限\n本合同有效期一年。"
    got, seg = units(text)
    assert got == [
        ("document", "第一条 总则\n"),
        ("heading_body", "双方应当保密。"),
        ("sentence", "违约方应当赔偿！"),
        ("sentence", "是否同意？"),
        ("sentence", "同意。\n"),
        ("section", "第二条 期限\n"),
        ("heading_body", "本合同有效期一年。"),
    ]
    assert seg.headings == {0: "第一条 总则", 5: "第二条 期限"}


def test_headings_paragraphs_and_lists():
    text = ("# Agreement\n\nIntro text here.\n\nArticle 5 Confidentiality\nKeep it secret.\n\n"
            "Section 2.1 Payment\n1. Pay monthly.\n2. Pay on time.\n- a bullet\n(a) first\n\n"
            "1.2.3 Deep clause\nText.\n\nTERMS AND CONDITIONS\n\n  7. Additional Terms.\n\nMore text.")
    got, seg = units(text)
    assert [k for k, _ in got] == [
        "document", "heading_body", "section", "heading_body", "section", "heading_body", "list_item",
        "list_item", "list_item", "section", "heading_body", "section", "heading_body", "heading_body"]
    assert got[4] == ("section", "Section 2.1 Payment\n")
    assert got[6] == ("list_item", "2. Pay on time.\n")
    # a heading right after a heading is no place to cut: both stay with the text that follows
    assert got[12] == ("heading_body", "7. Additional Terms.\n\n")
    assert list(seg.headings.values()) == ["Agreement", "Article 5 Confidentiality", "Section 2.1 Payment",
                                           "1.2.3 Deep clause", "TERMS AND CONDITIONS", "7. Additional Terms."]


def test_wrapped_prose_is_not_a_heading():
    text = ("The licensee may not do this, according to the rules\nSection 3 of the license which is long and "
            "continues here with more words,\nand so on until the end.")
    got, _ = units(text)
    assert [k for k, _ in got] == ["document"]


def test_units_tile_the_text():
    text = "Alpha beta. Gamma delta!\n\nNew para here? Yes.\n第一条 测试。好的。"
    seg = segment(text)
    assert seg.starts[0] == 0 and seg.starts == sorted(set(seg.starts))
    assert all(not text[p].isspace() for p in seg.starts[1:])


def test_topic_shift_is_high_between_unrelated_paragraphs_and_low_between_related():
    same = "The cat sat on the mat with another cat."
    text = (f"{same}\n\nThe cat and the mat and the cat again.\n\n"
            "Quantum chromodynamics describes gluons binding quarks.")
    seg = segment(text)
    bag = TermBag(text, seg.starts)
    topic_shifts(seg, bag)
    assert seg.kinds[1:] == [2, 2]  # paragraph, paragraph
    related, unrelated = seg.shifts[1], seg.shifts[2]
    assert unrelated == 1.0 and related < 0.8


def test_term_hashes_identify_words_deterministically():
    text = "alpha beta alpha gamma BETA"
    bag = TermBag(text, [0])
    assert bag.ids.tolist()[0] == bag.ids.tolist()[2] and bag.ids.tolist()[1] == bag.ids.tolist()[4]
    assert len(set(bag.ids.tolist())) == 3
