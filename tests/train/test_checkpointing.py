"""Checkpointing behind the ``Checkpointer`` interface: DeepSpeed's layout, rotation and round trip; the run
directory checks; and a second store plugged into the trainer through the same interface."""
import copy
from pathlib import Path

import pytest
import torch

from rollout_dist.config import ConfigError
from rollout_dist.train.checkpointing import Checkpointer, DeepSpeedCheckpointer, check_run_dir
from rollout_dist.train.context import RunContext
from tests.test_trainer import make_trainer


class FakeEngine:
    """What DeepSpeed's engine does on disk that the checkpointer relies on: a directory per tag from every rank,
    ``latest`` written once the checkpoint is complete; ``load_checkpoint`` follows ``latest``."""

    def __init__(self):
        self.loaded = None

    def save_checkpoint(self, directory, tag, client_state):
        (Path(directory) / tag).mkdir(parents=True)
        torch.save(client_state, Path(directory) / tag / "client.pt")
        (Path(directory) / "latest").write_text(tag)

    def load_checkpoint(self, directory):
        latest = Path(directory) / "latest"
        if not latest.is_file():
            return None, None
        path = Path(directory) / latest.read_text()
        self.loaded = path.name
        return str(path), torch.load(path / "client.pt")


def test_deepspeed_layout_rotation_and_load(tmp_path):
    ckpt = DeepSpeedCheckpointer(tmp_path / "checkpoints", keep=2)
    ckpt.bind(FakeEngine(), RunContext("cpu"))
    assert not ckpt.exists()
    for step in (3, 6, 9):
        ckpt.save(step, {"step": step, "order": {"position": step}})
    assert ckpt.exists()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step00000006", "step00000009"]
    assert ckpt.load() == {"step": 9, "order": {"position": 9}}
    assert ckpt.engine.loaded == "step00000009"


def test_deepspeed_round_trip_of_engine_and_client_state(tmp_path):
    """A real engine: the checkpoint restores weights and optimizer state that training changed afterwards."""
    trainer = make_trainer(tmp_path, grad_accum=1, lr=1e-2)
    trainer.setup()
    trainer.train_step()
    saved = {n: p.detach().clone() for n, p in trainer.engine.module.named_parameters()}
    trainer.save_checkpoint()
    client = copy.deepcopy(trainer.state_dict())
    trainer.train_step()
    assert any(not torch.equal(p, saved[n]) for n, p in trainer.engine.module.named_parameters())
    loaded = trainer.checkpointer.load()
    assert loaded["step"] == client["step"] == 1 and loaded["order"] == client["order"]
    assert torch.equal(loaded["cpu_rng"], client["cpu_rng"])
    for n, p in trainer.engine.module.named_parameters():
        assert torch.equal(p, saved[n]), n
    assert trainer.checkpointer.location.endswith("run/checkpoints")


def test_run_directory_checks(tmp_path):
    run = tmp_path / "run"
    ckpt = DeepSpeedCheckpointer(run / "checkpoints", keep=1)
    check_run_dir(run, resume=False, checkpointer=ckpt)  # new: fine
    run.mkdir()
    check_run_dir(run, resume=False, checkpointer=ckpt)  # empty: fine
    with pytest.raises(ConfigError, match="holds no training checkpoint"):
        check_run_dir(run, resume=True, checkpointer=ckpt)
    (run / "train.log").write_text("x")
    with pytest.raises(ConfigError, match="already holds an earlier run"):
        check_run_dir(run, resume=False, checkpointer=ckpt)
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "latest").write_text("step00000001")
    check_run_dir(run, resume=True, checkpointer=ckpt)
    with pytest.raises(ConfigError, match="already holds an earlier run with a training checkpoint .* continue it "
                                          "with checkpoint.resume=true"):
        check_run_dir(run, resume=False, checkpointer=ckpt)


def test_a_directory_without_a_run_is_named_and_resume_is_not_suggested(tmp_path):
    """A non-empty checkpoint.dir holding no run (notes, data) is not "an earlier run": the refusal says what is
    there, and does not suggest checkpoint.resume, which would fail."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("x")
    ckpt = DeepSpeedCheckpointer(run / "checkpoints", keep=1)
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
