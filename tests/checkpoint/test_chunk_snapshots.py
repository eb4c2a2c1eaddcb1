"""Chunk snapshots inside a long document (checkpoint.chunk_every): a run that dies inside a document's fill or
backward pass resumes at the document's last chunk snapshot, and the result equals the uninterrupted run bit for
bit (CPU, dropout on, so the random streams matter)."""
import pytest
import torch

from rollout_dist.checkpoint.store import SnapshotStore
from tests.test_trainer import make_trainer

LONG = ["A long document that runs through many chunks of the rollout, so that its fill pass has somewhere to stop. "
        * 2, "Another document, shorter than the first but still several chunks long, for the next step."]


class Crash(RuntimeError):
    pass


def crash_at(phase: str, chunk: int, step: int, trainer):
    """A chunk hook that fails after ``chunk`` of ``phase`` in the step whose index is ``step``."""
    def hook(event):
        if trainer.step == step and event.phase == phase and event.chunk == chunk:
            raise Crash(f"killed after {phase} chunk {chunk} of step {step + 1}")
    return hook


def trainer_for(tmp_path, **kw):
    kw.setdefault("max_steps", 3)
    t = make_trainer(tmp_path, grad_accum=1, chunk=8, texts=LONG, attention_dropout=0.1, checkpoint_every=1, **kw)
    t.cfg.checkpoint.chunk_every = 2
    return t


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    t = trainer_for(tmp_path_factory.mktemp("straight"))
    t.fit()
    return {n: p.detach().clone() for n, p in t.engine.module.named_parameters()}


@pytest.mark.parametrize("phase,chunk", [("fill", 9), ("backward", 3)])
def test_a_run_killed_inside_a_document_resumes_at_its_chunk_snapshot(tmp_path, straight, phase, chunk, caplog):
    first = trainer_for(tmp_path)
    first.chunk_hooks.append(crash_at(phase, chunk, 1, first))
    with pytest.raises(Crash):
        first.fit()
    first.checkpointer.close()  # the step's starting snapshot (v000001) is committed, as before a kill -9
    store = first.checkpointer.store
    body = store.manifest("chunks/s000001/r00000")
    expected = (chunk + 1) // 2 * 2 if phase == "fill" else body["chunks"] - 1 - (body["chunks"] - 1) % 2
    assert body["state"]["chunks"] == expected and body["base_version"] == 1
    resumed = trainer_for(tmp_path, resume="latest")
    with caplog.at_level("INFO", logger="rollout_dist"):
        hist = resumed.fit()
    assert [s.step for s in hist] == [1, 2, 3]
    # the coordinator's check of the resumed state: its last chunk replayed from the loaded prefix agrees
    assert f"resumed chunk snapshot: chunk {expected - 1} of document" in caplog.text and "agree in all" in caplog.text
    assert resumed.chunk_snapshots.resumes == [(1, expected)]  # step index 1 went on after that many chunks
    for n, p in resumed.engine.module.named_parameters():
        assert torch.equal(p, straight[n]), n
    assert [v.name for v in SnapshotStore(store.url).valid_versions()][-1] == "v000003"
    assert not (tmp_path / "run" / "state.zarr" / "chunks" / "s000001").exists()  # passed by a committed version



def test_chunk_snapshots_across_pipeline_stages_are_refused_before_anything_is_written():
    from rollout_dist.config import CheckpointConfig, ConfigError, ParallelConfig, TrainConfig
    with pytest.raises(ConfigError, match="checkpoint.chunk_every=2 needs rollout.mode=exact on one pipeline stage "
                                          r"\(this run: rollout.mode=exact, parallel.pp=2\)"):
        TrainConfig(checkpoint=CheckpointConfig(chunk_every=2), parallel=ParallelConfig(pp=2))


def test_a_resumed_chunk_snapshot_that_a_replay_contradicts_stops_the_run(tmp_path, monkeypatch):
    """The snapshot's own checksums cover its bytes; the replay covers what they mean: K/V that these weights do
    not compute from the loaded prefix (here: one bit of the last chunk's keys, flipped after loading) halt."""
    from rollout_dist.checkpoint.chunks import ChunkSnapshots
    from rollout_dist.trainer import DivergenceError
    first = trainer_for(tmp_path)
    first.chunk_hooks.append(crash_at("fill", 9, 1, first))
    with pytest.raises(Crash):
        first.fit()
    first.checkpointer.close()
    load = ChunkSnapshots.load

    def flipped(self, body):
        state = load(self, body)
        key = state["layer.1.key"]
        key.view(torch.int32).view(-1)[-1] ^= 1  # the last position: the last chunk the snapshot holds
        return state
    monkeypatch.setattr(ChunkSnapshots, "load", flipped)
    resumed = trainer_for(tmp_path, resume="latest")
    with pytest.raises(DivergenceError, match=r"(?s)step 2 did not agree.*layer.1.key.*chunk 9.*layer 1"):
        resumed.fit()

