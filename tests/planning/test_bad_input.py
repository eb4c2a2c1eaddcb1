"""Bad input: invalid UTF-8, lone surrogates, empty files, JSONL without text, a 50 MB single line."""
import json
import time

import pytest

from rollout_dist.data import DataError
from rollout_dist.plan import format_summary, load_planner_profile, main, plan_corpus
from rollout_dist.planning.index import ChunkIndex


def test_invalid_utf8_is_replaced_and_counted_or_refused(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"Valid start. \xff\xfe broken \xc3 bytes. End.")
    out = tmp_path / "ix"
    _, summary = plan_corpus(str(bad), str(out), load_planner_profile("default"), progress=False)
    assert summary["replaced_utf8"] == {str(bad): 3}
    assert ChunkIndex.open(out).attrs["problems"]["replaced_utf8"] == {str(bad): 3}
    assert "3 invalid UTF-8 sequence(s) replaced" in format_summary(summary)
    with pytest.raises(DataError, match=r"bad.txt: invalid UTF-8 at byte 13"):
        plan_corpus(str(bad), str(out), load_planner_profile("default"), invalid_utf8="error", progress=False)


def test_lone_surrogate_in_jsonl_is_replaced_and_counted_or_refused(tmp_path):
    src = tmp_path / "s.jsonl"
    src.write_text('{"text": "abc \\ud800 def"}\n')
    _, summary = plan_corpus(str(src), str(tmp_path / "ix"), load_planner_profile("default"), progress=False)
    assert summary["replaced_utf8"] == {f"{src}:1": 1} and summary["tokens"] == len("abc \ufffd def".encode())
    with pytest.raises(DataError, match="s.jsonl:1: character 4 is a lone surrogate"):
        plan_corpus(str(src), str(tmp_path / "ix"), load_planner_profile("default"), invalid_utf8="error",
                    progress=False)


def test_empty_files_are_kept_with_no_chunks_and_reported(tmp_path, capsys):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "empty.txt").write_bytes(b"")
    (tmp_path / "d" / "full.txt").write_text("Some text. More text.")
    out = tmp_path / "ix"
    assert main(["--data", str(tmp_path / "d"), "--out", str(out), "--no-progress"]) == 0
    assert "1 empty document(s), kept with 0 chunks" in capsys.readouterr().out
    ix = ChunkIndex.open(out)
    assert [(d.doc_id.rsplit("/", 1)[-1], d.num_chunks) for d in ix.documents] == [("empty.txt", 0), ("full.txt", 1)]
    assert ix.attrs["problems"]["empty_documents"] == [str(tmp_path / "d" / "empty.txt")]


def test_jsonl_line_without_text_is_an_error_naming_the_line(tmp_path, capsys):
    src = tmp_path / "x.jsonl"
    src.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "no text"}) + "\n")
    assert main(["--data", str(src), "--out", str(tmp_path / "ix"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{src}:2: the record has no 'text' field" in err
    assert main(["--data", str(src), "--out", str(tmp_path / "ix"), "--text-field", "body", "--no-progress"]) == 2
    assert f"{src}:1: the record has no 'body' field" in capsys.readouterr().err
    assert not (tmp_path / "ix").exists() or not list((tmp_path / "ix").glob("v*"))  # nothing written


def test_a_50mb_single_line_is_planned_with_token_cuts(tmp_path):
    src = tmp_path / "line.txt"
    line = "lorem ipsum dolor sit amet consectetur " * (50_000_000 // 39 + 1)
    src.write_text(line)
    start = time.perf_counter()
    _, summary = plan_corpus(str(src), str(tmp_path / "ix"), load_planner_profile("legal"), progress=False)
    seconds = time.perf_counter() - start
    n = len(line)
    assert n >= 50_000_000 and summary["tokens"] == n
    assert summary["chunks"] == -(-n // 4096) and summary["token_cuts"] == summary["chunks"] - 1
    assert "cut at token level" in format_summary(summary)
    ix = ChunkIndex.open(tmp_path / "ix")
    assert ix.chunks["token_start"][-1] == (summary["chunks"] - 1) * 4096 and ix.chunks["token_end"][-1] == n
    assert set(ix.chunks["boundary_kind"][1:].tolist()) == {"token_cut:sentence_over_max"}
    assert seconds < 40, f"50 MB took {seconds:.1f} s"
