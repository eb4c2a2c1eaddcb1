"""Checkpointing behind the ``Checkpointer`` interface: the snapshot checkpointer's round trip of a real engine;
the run directory checks; and a second store plugged into the trainer through the same interface."""
import copy

import pytest
import torch

from rollout_dist.config import ConfigError
from rollout_dist.config import CheckpointConfig
from rollout_dist.train.checkpointing import Checkpointer, SnapshotCheckpointer, check_run_dir
from tests.test_trainer import make_trainer


def test_snapshot_round_trip_of_engine_and_client_state(tmp_path):
    """A real engine: the snapshot restores weights, optimizer state and the loop's state that training changed
    afterwards."""
    trainer = make_trainer(tmp_path, grad_accum=1, lr=1e-2)
    trainer.setup()
    trainer.train_step()
    saved = {n: p.detach().clone() for n, p in trainer.engine.module.named_parameters()}
    moments = copy.deepcopy(trainer.engine.optimizer.state_dict()["state"])
    trainer.save_checkpoint()
    client = copy.deepcopy(trainer.state_dict())
    trainer.train_step()
    assert any(not torch.equal(p, saved[n]) for n, p in trainer.engine.module.named_parameters())
    loaded = trainer.checkpointer.load()
    assert loaded["step"] == client["step"] == 1 and loaded["order"] == client["order"]
    assert torch.equal(loaded["cpu_rng"], client["cpu_rng"])
    for n, p in trainer.engine.module.named_parameters():
        assert torch.equal(p, saved[n]), n
    after = trainer.engine.optimizer.state_dict()["state"]
    for i, st in moments.items():
        assert torch.equal(after[i]["exp_avg"], st["exp_avg"]) and torch.equal(after[i]["step"], st["step"])
    assert trainer.engine.global_steps == 1
    assert trainer.checkpointer.location.endswith("run/state.zarr")


def test_run_directory_checks(tmp_path):
    run = tmp_path / "run"
    ckpt = SnapshotCheckpointer(CheckpointConfig(dir=str(run)), run, zero_stage=0)
    check_run_dir(run, resume=False, checkpointer=ckpt)  # new: fine
    run.mkdir()
    check_run_dir(run, resume=False, checkpointer=ckpt)  # empty: fine
    check_run_dir(run, resume=True, checkpointer=ckpt)  # nothing to resume yet: starts from scratch
    (run / "train.log").write_text("x")
    with pytest.raises(ConfigError, match="already holds an earlier run"):
        check_run_dir(run, resume=False, checkpointer=ckpt)
    check_run_dir(run, resume=True, checkpointer=ckpt)  # an attempt that died before its first snapshot
    store = ckpt.store
    store.ensure_root()
    store.write_rank(1, 0, {"M": {}}, {}, role={})
    assert not ckpt.exists()  # written, not committed
    store.commit(1, world=1, meta={})
    assert ckpt.exists()
    check_run_dir(run, resume=True, checkpointer=ckpt)
    with pytest.raises(ConfigError, match="already holds an earlier run with a training checkpoint .* continue it "
                                          "with checkpoint.resume=latest"):
        check_run_dir(run, resume=False, checkpointer=ckpt)


def test_a_directory_without_a_run_is_named_and_resume_is_not_suggested(tmp_path):
    """A non-empty checkpoint.dir holding no run (notes, data) is not "an earlier run": the refusal says what is
    there, and does not suggest checkpoint.resume, which would fail."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("x")
    ckpt = SnapshotCheckpointer(CheckpointConfig(dir=str(run)), run, zero_stage=0)
    with pytest.raises(ConfigError) as err:
        check_run_dir(run, resume=False, checkpointer=ckpt)
    assert str(err.value) == (f"checkpoint.dir={str(run)!r} holds 1 file (notes.txt) and no run: choose an empty or "
                              "new checkpoint.dir")
    for name in ("a.txt", "b.txt", "c.txt"):
        (run / name).write_text("x")
    (run / "data").mkdir()
    with pytest.raises(ConfigError, match=r"holds 4 files and 1 folder \(a.txt, b.txt, c.txt, ... 2 more\) and no "
                                          "run") as err:
        check_run_dir(run, resume=False, checkpointer=ckpt)
    assert "resume" not in str(err.value)
    (run / "train.log").write_text("x")  # a finished run without training checkpoints: nothing to resume either
    with pytest.raises(ConfigError, match="already holds an earlier run .* with no training checkpoint") as err:
        check_run_dir(run, resume=False, checkpointer=ckpt)
    assert "checkpoint.resume" not in str(err.value)
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        check_run_dir(afile, resume=False, checkpointer=ckpt)


class MemoryCheckpointer(Checkpointer):
    """A second store: client states in a dict (what a Zarr store will implement on disk)."""

    def __init__(self):
        self.saved = {}

    @property
    def location(self):
        return "memory"

    def exists(self):
        return bool(self.saved)

    def save(self, step, client_state):
        self.saved[step] = copy.deepcopy(client_state)

    def load(self):
        return self.saved[max(self.saved)] if self.saved else None


def test_the_loop_saves_through_any_checkpointer(tmp_path):
    trainer = make_trainer(tmp_path, grad_accum=1, max_steps=3, checkpoint_every=2)
    trainer.checkpointer = store = MemoryCheckpointer()
    history = trainer.fit()
    assert sorted(store.saved) == [2, 3]  # every 2 steps, and at the end
    for step, state in store.saved.items():
        assert state["step"] == step and len(state["history"]) == step
        assert state["history"][-1]["loss"] == history[step - 1].loss
        assert state["order"]["position"] + 2 * state["order"]["epoch"] == step  # two documents per epoch
    assert not (tmp_path / "run" / "checkpoints").exists()
