"""Chunk index: Zarr round trip, versions never clobbered, attrs, the CLI and its summary."""
import json
import shutil
from pathlib import Path

import pytest
import xxhash
import zarr

from rollout_dist.plan import load_planner_profile, main, plan_corpus
from rollout_dist.planning.index import ChunkIndex, ChunkIndexError, list_versions
from rollout_dist.planning.planner import plan_document
from rollout_dist.planning.tokens import ByteTokenMap

CORPUS = Path(__file__).resolve().parents[2] / "rollout_dist" / "assets" / "corpus"


@pytest.fixture()
def corpus(tmp_path):
    src = tmp_path / "docs"
    src.mkdir()
    for name in ("GPL-3.txt", "MPL-2.0.txt"):
        shutil.copy(CORPUS / name, src / name)
    (src / "notes.jsonl").write_text(json.dumps({"text": "第一条 总则\n双方应当保密。违约方应当赔偿！"}) + "\n" +
                                     json.dumps({"text": "Short note. Another one."}) + "\n")
    return src


def test_round_trip_matches_the_plans_and_the_sources(corpus, tmp_path):
    cfg = load_planner_profile("legal")
    out = tmp_path / "index"
    version_dir, summary = plan_corpus(str(corpus), str(out), cfg, progress=False)
    ix = ChunkIndex.open(out)
    assert ix.version == 1 and version_dir == out / "v0001"
    assert [d.doc_id for d in ix.documents] == [str(corpus / "GPL-3.txt"), str(corpus / "MPL-2.0.txt"),
                                                f"{corpus / 'notes.jsonl'}:1", f"{corpus / 'notes.jsonl'}:2"]
    assert summary["chunks"] == ix.num_chunks == sum(d.num_chunks for d in ix.documents)
    texts = [(corpus / "GPL-3.txt").read_text(), (corpus / "MPL-2.0.txt").read_text(),
             "第一条 总则\n双方应当保密。违约方应当赔偿！", "Short note. Another one."]
    for doc, text in zip(ix.documents, texts):
        expected = plan_document(text, ByteTokenMap(text), cfg).chunks
        assert ix.chunks_of(doc.index) == expected  # every field, entities and floats included
        assert doc.token_count == len(text.encode()) and doc.char_count == len(text)
        got = ix.chunks_of(doc.index)
        assert "".join(text[c.char_start:c.char_end] for c in got) == text  # offsets map back to the source
    attrs = ix.attrs
    assert attrs["planner_version"] == "1" and attrs["mode"] == "exact" and attrs["profile"]["profile"] == "legal"
    assert attrs["profile"]["max_chunk_tokens"] == 4096
    assert attrs["tokenizer"]["kind"] == "byte" and len(attrs["tokenizer"]["fingerprint"]) == 16
    assert {Path(s["path"]).name: s["xxh3_64"] for s in attrs["sources"]} == {
        p.name: xxhash.xxh3_64_hexdigest(p.read_bytes()) for p in corpus.iterdir()}
    assert ix.verify_sources() == []
    (corpus / "MPL-2.0.txt").write_text("changed")
    assert ix.verify_sources() == [str((corpus / "MPL-2.0.txt").resolve())]
    assert ix.token_counts().tolist() == [len(t.encode()) for t in texts]


def test_new_versions_never_clobber_old_ones(corpus, tmp_path):
    out = tmp_path / "index"
    plan_corpus(str(corpus / "GPL-3.txt"), str(out), load_planner_profile("default"), progress=False)
    first = {p.relative_to(out): p.read_bytes() for p in (out / "v0001").rglob("*") if p.is_file()}
    plan_corpus(str(corpus / "GPL-3.txt"), str(out), load_planner_profile("medical"), mode="memory",
                progress=False)
    (out / "v0004").mkdir()  # someone else's half-made directory is skipped, not overwritten
    (out / "v0004" / "junk").write_text("x")
    plan_corpus(str(corpus / "GPL-3.txt"), str(out), load_planner_profile("finance"), progress=False)
    assert list_versions(out) == [1, 2, 4, 5]
    assert {p.relative_to(out): p.read_bytes() for p in (out / "v0001").rglob("*") if p.is_file()} == first
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp")]  # nothing half-written left behind
    assert ChunkIndex.open(out).attrs["profile"]["profile"] == "finance"
    assert ChunkIndex.open(out, version=2).attrs["mode"] == "memory"
    assert zarr.open_group(str(out), mode="r").attrs["format"] == "rollout_dist.chunk_index"
    with pytest.raises(ChunkIndexError, match="no version 3"):
        ChunkIndex.open(out, version=3)
    with pytest.raises(ChunkIndexError, match="no chunk index"):
        ChunkIndex.open(tmp_path / "nothing")


def test_cli_prints_a_summary_and_names_bad_arguments(corpus, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["--data", str(corpus / "*.txt"), "--out", str(out), "--profile", "legal", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out / 'v0001'}" in printed and "2 document(s)" in printed and "profile legal" in printed
    assert "boundaries:" in printed and "chunk tokens: min" in printed
    assert main(["--data", str(corpus), "--out", str(out), "--profile", "nope", "--no-progress"]) == 2
    assert "planner profile 'nope'" in capsys.readouterr().err
    assert main(["--data", str(tmp_path / "missing"), "--out", str(out), "--no-progress"]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    assert main(["--data", str(corpus), "--out", str(out), "--tokenizer", str(tmp_path / "x"),
                 "--no-progress"]) == 2
    assert "neither 'byte' nor a directory" in capsys.readouterr().err
    assert list_versions(out) == [1]
