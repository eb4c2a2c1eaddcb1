"""Memory mode with data parallelism on CPU (gloo, torchrun, the real entry point) trains exactly like one process
(the reference runs in this process, from the same Hydra overrides, to save an interpreter's start-up).

Four documents whose lengths do not divide by the chunk size; a step is a window of two documents (one process:
grad_accum=2; dp=2: one document per replica, dealt round-robin).  Gradient clipping is low enough to act, so the
global gradient norm over replicas is checked too; the memory's learning rate is high enough that its values (zero
at initialisation) move in the first step, so later steps carry gradient through the state.  Losses, the final HF
weights and the memory's weights are compared in float32, and the per-chunk records of both replicas reach rank 0's
chunks.jsonl.
"""
import json
import subprocess
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

from tests.helpers import child_env, launcher_command, write_word_docs

REPO = Path(__file__).resolve().parents[2]
TRAIN = REPO / "launch" / "train.py"
WORDS = "the of chunk rollout model layer state memory gradient token slot document gate decay".split()


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    return write_word_docs(tmp_path_factory.mktemp("docs"), WORDS)


def common(run_dir, docs) -> list[str]:
    return [f"data.path={docs}", "rollout.mode=memory", "rollout.chunk_size=48", "memory.slots=4",
              "memory.write_dim=16", "memory.lr=0.05", "trainer.max_steps=3", "trainer.warmup_steps=0",
              "trainer.grad_clip=0.05", "trainer.device=cpu", "trainer.log_every=1", "trainer.tensorboard=false",
              f"checkpoint.dir={run_dir}"]


def train(run_dir, docs, nproc, *overrides):
    """A run of launch/train.py under torchrun (``nproc`` processes), or in this process for ``nproc=1``."""
    if nproc == 1:
        from rollout_dist.config import to_train_config
        from rollout_dist.trainer import Trainer
        with initialize_config_dir(config_dir=str(REPO / "hydra_conf"), version_base="1.3"):
            cfg = to_train_config(compose(config_name="config", overrides=[*common(run_dir, docs), *overrides]))
        Trainer(cfg).fit()
    else:
        proc = subprocess.run([*launcher_command(nproc), str(TRAIN), *common(run_dir, docs), *overrides],
                              cwd=run_dir.parent, env=child_env(OMP_NUM_THREADS="1"), capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    weights = {**load_file(run_dir / "final" / "model.safetensors"), **{
        f"memory:{k}": v for k, v in load_file(run_dir / "final" / "memory.safetensors").items()}}
    rows = [json.loads(line) for line in (run_dir / "chunks.jsonl").read_text().splitlines()]
    return summary, weights, rows


def test_data_parallel_memory_mode_trains_like_one_process(tmp_path, docs):
    ref_summary, ref_weights, ref_rows = train(tmp_path / "ref", docs, 1, "trainer.grad_accum=2")
    summary, weights, rows = train(tmp_path / "dp2", docs, 2, "parallel.dp=2", "trainer.grad_accum=1",
                                   "data.balance=false")
    for ours, ref in zip(summary["losses"], ref_summary["losses"]):
        assert abs(ours - ref) <= 1e-6 * abs(ref), (summary["losses"], ref_summary["losses"])
    assert summary["tokens"] == ref_summary["tokens"]
    assert weights.keys() == ref_weights.keys() and any(k.startswith("memory:") for k in weights)
    # float32 sums in another order: all weights together agree to 1e-6; a tensor alone to 1e-4, as parameters
    # that start at zero (decay rates, the memory's values) hold only their updates, whose gradients cancel in
    # sums that reduce in another order across replicas (1.3e-5 seen on one of them)
    num = sum(((weights[k].double() - ref.double()) ** 2).sum() for k, ref in ref_weights.items())
    den = sum((ref.double() ** 2).sum() for ref in ref_weights.values())
    assert (num / den).sqrt().item() <= 1e-6
    for key, ref in ref_weights.items():
        err = ((weights[key].double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()
        assert err <= 1e-4, f"{key} differs by {err:.2e}"
    # the memory learned: its values (zero at initialisation) moved, so later steps read the state
    assert ref_weights["memory:memory.0.value.weight"].abs().max() > 0
    # every replica's chunk records, on rank 0: the same chunks and weights as one process
    assert {r["rank"] for r in rows} == {0, 1}

    def key(r):
        return r["step"], r["document"], r["chunk"]
    mine, theirs = sorted(rows, key=key), sorted(ref_rows, key=key)
    assert [key(r) for r in mine] == [key(r) for r in theirs]
    assert [(r["start"], r["end"], r["tokens"]) for r in mine] == [(r["start"], r["end"], r["tokens"]) for r in theirs]
    assert [r["weight"] for r in mine] == pytest.approx([r["weight"] for r in theirs], rel=1e-6)
