"""DataPipeline: loading at construction, windows in each rank's order, the data position's round trip,
chunks and stream keys of documents."""
import pytest

from rollout_dist.config import DataConfig, RolloutConfig
from rollout_dist.data import DataError, Document
from rollout_dist.engine import make_rollout
from rollout_dist.parallel import RankLayout
from rollout_dist.tokenizer import byte_tokenizer
from rollout_dist.train.data_pipeline import DataPipeline

LENGTHS = [30, 12, 50, 21, 8]


@pytest.fixture
def corpus(tmp_path):
    d = tmp_path / "docs"
    d.mkdir()
    for i, n in enumerate(LENGTHS):
        (d / f"{i}.txt").write_text(chr(ord("a") + i) * n)
    return d


def pipeline(path, *, shuffle=True, balance=True, dp=1, dp_rank=0, seed=3):
    data = DataPipeline(DataConfig(path=str(path), shuffle=shuffle, balance=balance), byte_tokenizer(), 320,
                        seed=seed, progress=False)
    data.start(RankLayout(1, dp, rank=dp_rank, world=dp))
    return data


def ids(window):
    return [int(doc.id.rsplit("/", 1)[1].split(".")[0]) for doc in window]


def test_documents_load_and_windows_follow_the_order(corpus):
    data = pipeline(corpus, shuffle=False)
    assert [len(d.input_ids) for d in data.docs] == LENGTHS and data.longest_doc == 50
    assert ids(data.next_window(2)) == [0, 1]
    assert ids(data.next_window(2)) == [2, 3]
    assert ids(data.next_window(2)) == [4, 0]  # the next epoch starts where this one ends
    assert data.state_dict()["epoch"] == 1 and not data.balanced


def test_bad_data_is_refused_at_construction(tmp_path):
    with pytest.raises(DataError, match="no such file or directory"):
        DataPipeline(DataConfig(path=str(tmp_path / "missing")), byte_tokenizer(), 320, seed=0, progress=False)


def test_data_position_round_trip(corpus):
    """A pipeline that loads another's position continues with the same windows (shuffled order, epoch 2)."""
    first = pipeline(corpus)
    seen = [ids(first.next_window(3)) for _ in range(3)]
    assert sorted(seen[0] + seen[1][:2]) == [0, 1, 2, 3, 4]  # one epoch is every document once
    state = first.state_dict()
    resumed = pipeline(corpus)
    resumed.load_state_dict(state)
    assert [ids(resumed.next_window(3)) for _ in range(4)] == [ids(first.next_window(3)) for _ in range(4)]
    other_seed = pipeline(corpus, seed=4)
    with pytest.raises(DataError, match="seed"):
        other_seed.load_state_dict(state)


@pytest.mark.parametrize("balance", [True, False])
def test_data_parallel_ranks_share_out_each_epoch(corpus, balance):
    ranks = [pipeline(corpus, balance=balance, dp=2, dp_rank=r) for r in range(2)]
    assert all(r.balanced == balance for r in ranks)
    windows = [ids(r.next_window(2)) for r in ranks]
    assert not set(windows[0]) & set(windows[1])  # no document on both replicas in one epoch


def test_chunks_and_stream_keys(corpus):
    data = pipeline(corpus, shuffle=False)
    rollout = make_rollout(RolloutConfig(chunk_size=16))
    doc = data.docs[2]
    assert data.spans_for(doc, rollout) == [(0, 16), (16, 32), (32, 48), (48, 50)]
    assert data.largest_chunk(16) == 16  # no chunk index: the rollout's chunk size
    assert [data.stream_id(d) for d in data.docs] == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="not a document of this run's data"):
        data.stream_id(Document("elsewhere.txt", [1, 2, 3]))
