"""The snapshot store: the state codec (bf16 as 2-byte words, JSON skeleton, pickled leaves), the commit protocol
(a version counts only through its manifest), checksums on every read, object stores through fsspec, retention,
and what ``checkpoint.resume`` accepts."""
import enum
import json
import os
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from rollout_dist.checkpoint import tree
from rollout_dist.checkpoint.__main__ import module_state
from rollout_dist.checkpoint.store import CorruptSnapshot, SnapshotError, SnapshotStore
from rollout_dist.config import CheckpointConfig, ConfigError
from tests.test_trainer import make_trainer

Fragment = namedtuple("Fragment", "numel start")


class Stage(enum.Enum):
    OPTIMIZER = 1


def nested_state():
    return {"module": {"w": torch.randn(3, 5).to(torch.bfloat16), "b": torch.arange(4, dtype=torch.int64)},
            "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(7)}, 1: {"step": torch.tensor(1.0)}},
            "groups": [{"lr": 1e-3, "betas": (0.9, 0.95), "params": [0, 1], "fused": None, "amsgrad": False}],
            "shape": torch.Size([2, 3]), "scale": float("inf"), "name": "x", "dtype": torch.bfloat16,
            "mapping": {"w": Fragment(15, 0)}, "stage": Stage.OPTIMIZER, "empty": torch.zeros(0, 4)}


def assert_same(a, b):
    assert type(a) is type(b) or (isinstance(a, tuple) and isinstance(b, tuple)), (a, b)
    if torch.is_tensor(a):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


def test_state_round_trips_through_the_store_with_dtypes_and_python_leaves(tmp_path):
    state = nested_state()
    skeleton, arrays = tree.split(state)
    json.dumps(skeleton)  # the skeleton is plain JSON
    store = SnapshotStore(str(tmp_path / "s.zarr"))
    store.ensure_root()
    store.write_rank(5, 0, skeleton, arrays, role={})
    store.commit(5, world=1, meta={"layout": {}})
    (v,) = store.valid_versions()
    skel, read = store.read_rank(v, "r00000")
    assert_same(tree.join(skel, read), state)
    w = zarr.open_array(str(tmp_path / "s.zarr" / "v000005" / "r00000" / "module" / "w"), mode="r")
    assert w.dtype == np.uint16 and w.attrs["torch_dtype"] == "bfloat16"  # Zarr v3 has no core bfloat16
    assert store.verify(v) == []


def test_a_version_counts_only_once_every_rank_and_then_rank_0_published(tmp_path):
    store = SnapshotStore(str(tmp_path / "s.zarr"))
    store.ensure_root()
    skeleton, arrays = tree.split({"x": torch.ones(3)})
    store.write_rank(1, 0, skeleton, arrays, role={})
    with pytest.raises(SnapshotError, match=r"v000001: rank 1 did not finish writing its part within 0 s"):
        store.commit(1, world=2, meta={}, timeout_s=0.2)
    assert store.valid_versions() == [] and [v.problem for v in store.versions()] == ["no manifest (half-written)"]
    store.write_rank(1, 1, skeleton, arrays, role={})
    assert store.valid_versions() == []  # every rank's part is there, but rank 0 has not published
    body = store.commit(1, world=2, meta={})
    assert sorted(body["ranks"]) == ["r00000", "r00001"] and body["nbytes"] == 24
    store.write_rank(2, 0, skeleton, arrays, role={})  # a half-written later version
    assert [v.name for v in store.valid_versions()] == ["v000001"]
    assert store.remove_incomplete() == ["v000002"]
    assert [v.name for v in store.versions()] == ["v000001"]
    assert not [p for p in (tmp_path / "s.zarr").rglob("*.tmp*")]  # published by rename, nothing left behind


def _chunk_files(path):
    return sorted(p for p in path.rglob("*") if p.is_file() and "/c/" in str(p))


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damaged_arrays_are_named_on_read(tmp_path, damage):
    store = SnapshotStore(str(tmp_path / "s.zarr"))
    store.ensure_root()
    skeleton, arrays = tree.split({"module": {"w": torch.randn(64, 8)}})
    store.write_rank(3, 0, skeleton, arrays, role={})
    store.commit(3, world=1, meta={})
    (chunk,) = _chunk_files(tmp_path / "s.zarr" / "v000003")
    data = bytearray(chunk.read_bytes())
    if damage == "flip":
        data[100] ^= 0xFF
        chunk.write_bytes(bytes(data))
    elif damage == "truncate":
        chunk.write_bytes(bytes(data[:50]))
    else:
        chunk.unlink()
    (v,) = store.valid_versions()
    with pytest.raises(CorruptSnapshot, match=r"v000003: array r00000/module/w"):
        store.read_rank(v, "r00000")
    assert len(store.verify(v)) == 1


def test_a_damaged_manifest_makes_the_version_invalid(tmp_path):
    store = SnapshotStore(str(tmp_path / "s.zarr"))
    store.ensure_root()
    skeleton, arrays = tree.split({"x": torch.ones(3)})
    store.write_rank(1, 0, skeleton, arrays, role={})
    store.commit(1, world=1, meta={"layout": {"dp": 1}})
    manifest = tmp_path / "s.zarr" / "v000001" / "manifest" / "zarr.json"
    manifest.write_text(manifest.read_text().replace('"dp": 1', '"dp": 2'))
    (v,) = store.versions()
    assert not v.valid and "checksum does not match" in v.problem
    assert store.remove_incomplete() == []  # a damaged version is not half-written: it stays for inspection


def test_an_object_store_finds_versions_through_manifests_only():
    """fsspec's memory:// stands for an object store: no rename; the manifest object is written last."""
    url = f"memory://bucket/run{os.getpid()}/state.zarr"
    store = SnapshotStore(url)
    assert not store.loc.posix
    store.ensure_root()
    skeleton, arrays = tree.split({"w": torch.randn(4, 4).to(torch.bfloat16)})
    store.write_rank(7, 0, skeleton, arrays, role={})
    assert store.valid_versions() == []
    store.commit(7, world=1, meta={})
    (v,) = store.valid_versions()
    skel, read = store.read_rank(v, "r00000")
    assert torch.equal(tree.join(skel, read)["w"], tree.join(skeleton, arrays)["w"])
    store.delete(v.name)
    assert store.versions() == []


def test_retention_keeps_the_newest_and_every_kth(tmp_path):
    trainer = make_trainer(tmp_path, grad_accum=1, max_steps=7, checkpoint_every=1)
    trainer.cfg.checkpoint.keep, trainer.cfg.checkpoint.keep_every = 2, 3
    trainer.fit()
    assert [v.name for v in trainer.checkpointer.store.valid_versions()] == ["v000003", "v000006", "v000007"]


@pytest.mark.parametrize("dtype,zero", [("float32", 2), ("bfloat16", 1)])
def test_resume_is_bit_identical_with_zero_partitions_and_bf16(tmp_path, dtype, zero):
    straight = make_trainer(tmp_path / "a", grad_accum=1, max_steps=4, dtype=dtype, zero_stage=zero,
                            attention_dropout=0.1)
    straight.fit()
    first = make_trainer(tmp_path / "b", grad_accum=1, max_steps=4, dtype=dtype, zero_stage=zero,
                         attention_dropout=0.1, checkpoint_every=2)
    first.setup()
    for _ in range(2):
        first.history.append(first.train_step())
    first.save_checkpoint()
    first.checkpointer.close()
    resumed = make_trainer(tmp_path / "b", grad_accum=1, max_steps=4, dtype=dtype, zero_stage=zero,
                           attention_dropout=0.1, checkpoint_every=2, resume="latest")
    resumed.fit()
    for (name, p), (_, q) in zip(straight.engine.module.named_parameters(), resumed.engine.module.named_parameters()):
        assert p.dtype == q.dtype and torch.equal(p, q), name
    if zero:
        ours, ref = (t.engine.optimizer.single_partition_of_fp32_groups[0] for t in (resumed, straight))
        assert torch.equal(ours, ref)  # the fp32 master weights, not rebuilt from the bf16 ones
        # the snapshot holds the masters only; the model's weights rebuilt from them (as export does) are the model's
        store = resumed.checkpointer.store
        latest = store.valid_versions()[-1]
        assert "module/model.norm.weight" not in latest.manifest["ranks"]["r00000"]["arrays"]
        rebuilt = module_state(store, latest)
        for name, p in resumed.engine.module.named_parameters():
            assert torch.equal(rebuilt[name].to(p.dtype), p), name


def test_resume_of_an_older_version_or_an_unknown_one_is_refused(tmp_path):
    make_trainer(tmp_path, grad_accum=1, max_steps=3, checkpoint_every=1).fit()
    with pytest.raises(ConfigError, match=r"holds newer versions \(v000003\) that continuing from v000002 would "
                                          "overwrite"):
        make_trainer(tmp_path, grad_accum=1, max_steps=3, checkpoint_every=1, resume="v000002").setup()
    with pytest.raises(ConfigError, match=r"v000009 is not a valid version of .*; valid: v000002, v000003"):
        make_trainer(tmp_path, grad_accum=1, max_steps=3, checkpoint_every=1, resume=9).setup()


@pytest.mark.parametrize("value,version,resuming", [(False, None, False), ("false", None, False),
                                                     (True, None, True), ("latest", None, True),
                                                     ("v000042", 42, True), (42, 42, True), ("7", 7, True)])
def test_resume_values(value, version, resuming):
    cfg = CheckpointConfig(resume=value)
    assert cfg.resume_version == version and cfg.resuming == resuming


def test_a_bad_resume_value_is_refused():
    with pytest.raises(ConfigError, match="checkpoint.resume='newest': use false, latest"):
        CheckpointConfig(resume="newest")


def test_resume_with_another_seed_is_refused(tmp_path):
    """The random streams (dropout masks) are keyed by trainer.seed: a snapshot continues only the run it was of."""
    make_trainer(tmp_path, grad_accum=1, max_steps=2, checkpoint_every=1, seed=1).fit()
    with pytest.raises(ConfigError, match=r"trainer.seed=2, but the snapshot's run used trainer.seed=1"):
        make_trainer(tmp_path, grad_accum=1, max_steps=3, checkpoint_every=1, seed=2, resume="latest").setup()


def test_a_store_that_cannot_be_created_is_named(tmp_path):
    """checkpoint.store under a file: one line naming the store, in train.log and on the console; exit 1."""
    import subprocess
    import sys

    from tests.helpers import child_env
    (tmp_path / "afile").write_text("x")
    store = tmp_path / "afile" / "state.zarr"
    proc = subprocess.run([sys.executable, "launch/train.py", f"checkpoint.dir={tmp_path / 'run'}",
                           f"checkpoint.store={store}", "checkpoint.every=1", "trainer.max_steps=1",
                           "trainer.device=cpu"], cwd=Path(__file__).resolve().parents[2],
                          env=child_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    line = f"checkpoint store {store}: cannot be prepared: [Errno 20] Not a directory"
    assert line in proc.stderr.strip().splitlines()[-1]
    assert line in (tmp_path / "run" / "train.log").read_text()
