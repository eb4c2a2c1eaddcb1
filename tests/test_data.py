"""Finding, reading and tokenizing documents; bad input is named; the document order is resumable."""
import json

import pytest

from rollout_dist.data import BUNDLED_CORPUS, DataError, DocumentOrder, find_files, load_documents
from rollout_dist.tokenizer import byte_tokenizer

TOK = byte_tokenizer()


def load(path, **kw):
    kw.setdefault("progress", False)
    return load_documents(str(path), TOK, 320, **kw)


def test_bundled_corpus_has_sources_and_long_documents():
    files = find_files(None)
    assert len(files) >= 5 and (BUNDLED_CORPUS / "SOURCES.md").is_file()
    for f in files:
        assert f.name in (BUNDLED_CORPUS / "SOURCES.md").read_text(), f"{f.name} has no source/licence entry"
    docs, report = load_documents(None, TOK, 320, progress=False)
    assert report.files == len(files) and max(len(d.input_ids) for d in docs) == 4096  # split for the demo
    whole, _ = load_documents(None, TOK, 320, max_doc_tokens=10 ** 9, progress=False)
    assert max(len(d.input_ids) for d in whole) > 30000


def test_txt_jsonl_dir_and_glob(tmp_path):
    (tmp_path / "a.txt").write_text("first document text")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "second"}) + "\n\n" + json.dumps({"text": "third"}) + "\n")
    docs, report = load(tmp_path)
    assert [d.id.split("/")[-1] for d in docs] == ["a.txt", "b.jsonl:1", "b.jsonl:3"]
    assert docs[0].input_ids == list(b"first document text")
    assert report.files == 2 and report.tokens == len("first document text") + 6 + 5
    assert len(load(tmp_path / "*.jsonl")[0]) == 2
    assert len(load(tmp_path / "a.txt")[0]) == 1


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match=r"data.path=.*nope.*no such file"):
        load(tmp_path / "nope")


def test_directory_without_documents(tmp_path):
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(DataError, match="holds no documents"):
        load(tmp_path)


def test_unreadable_file(tmp_path, monkeypatch):
    f = tmp_path / "locked.txt"
    f.write_text("secret")
    real = type(f).read_bytes

    def deny(self):  # chmod 0 does not stop root, so simulate the OS refusing the read
        if self.name == "locked.txt":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(type(f), "read_bytes", deny)
    with pytest.raises(DataError, match="cannot read .*locked.txt: Permission denied"):
        load(f)


def test_empty_and_short_documents_are_skipped_and_counted(tmp_path, caplog):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "one.txt").write_text("x")
    (tmp_path / "good.txt").write_text("enough text")
    docs, report = load(tmp_path)
    assert [d.id for d in docs] == [str(tmp_path / "good.txt")]
    assert sorted(report.skipped_short) == [str(tmp_path / "empty.txt"), str(tmp_path / "one.txt")]
    assert "skipping" in caplog.text and "empty.txt" in caplog.text


def test_nothing_left_is_an_error(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="no usable documents.*1 document\\(s\\) skipped"):
        load(tmp_path)


def test_token_id_beyond_vocabulary_names_the_document(tmp_path):
    (tmp_path / "wide.txt").write_text("é is two bytes, both above 150")
    with pytest.raises(DataError, match=r"wide.txt: token id 195 is outside the model's vocabulary \(size 150\)"):
        load_documents(str(tmp_path), TOK, 150, progress=False)


def test_jsonl_without_text_field_names_file_and_line(tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DataError, match=r"d.jsonl:2: the record has no 'text' field"):
        load(tmp_path)


def test_jsonl_bad_json(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(DataError, match=r"d.jsonl:2: not valid JSON"):
        load(tmp_path)


def test_invalid_utf8_replaced_and_counted_or_refused(tmp_path, caplog):
    (tmp_path / "bad.txt").write_bytes(b"good \xff\xfe bytes")
    docs, report = load(tmp_path)
    assert report.replaced_utf8 == {str(tmp_path / "bad.txt"): 2}
    assert "invalid UTF-8" in caplog.text
    with pytest.raises(DataError, match=r"bad.txt: invalid UTF-8 at byte 5"):
        load(tmp_path, invalid_utf8="error")


def test_long_documents_split_into_pieces(tmp_path):
    (tmp_path / "long.txt").write_text("a" * 25)
    docs, report = load(tmp_path, max_doc_tokens=10)
    assert [len(d.input_ids) for d in docs] == [10, 10, 5] and report.pieces_from_splits == 2
    assert docs[2].id.endswith("#2")


def test_document_order_deterministic_sharded_and_resumable():
    a = DocumentOrder(10, seed=3, rank=0, world=2)
    b = DocumentOrder(10, seed=3, rank=1, world=2)
    first_a = [a.next() for _ in range(5)]
    first_b = [b.next() for _ in range(5)]
    assert sorted(first_a + first_b) == list(range(10))  # one epoch covers every document once
    state = a.state_dict()
    rest = [a.next() for _ in range(7)]
    c = DocumentOrder(10, seed=3, rank=0, world=2)
    c.load_state_dict(state)
    assert [c.next() for _ in range(7)] == rest
    s3, s4 = DocumentOrder(10, seed=3), DocumentOrder(10, seed=4)
    assert [s3.next() for _ in range(10)] != [s4.next() for _ in range(10)]
    with pytest.raises(DataError, match="seed"):
        DocumentOrder(10, seed=5).load_state_dict(state)


def test_tokenizing_bar_only_when_tokenizing_takes_a_while(tmp_path, capsys, monkeypatch):
    """A corpus tokenized in a moment shows no bar (it used to print an empty "tokenizing: 0doc"); a slow one
    does, once data.PROGRESS_DELAY_S has passed."""
    import time

    import rollout_dist.data as data
    for i in range(3):
        (tmp_path / f"{i}.txt").write_text(f"document number {i}")
    load(tmp_path, progress=True)
    assert "tokenizing" not in capsys.readouterr().err

    def slow(text, **kw):
        time.sleep(0.05)
        return TOK(text, **kw)
    monkeypatch.setattr(data, "PROGRESS_DELAY_S", 0.01)
    load_documents(str(tmp_path), slow, 320, progress=True)
    assert "tokenizing" in capsys.readouterr().err
