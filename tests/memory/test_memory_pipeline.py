"""Memory mode across pipeline stages on CPU (gloo).

1. Unit level (two processes, float64): the pipeline memory rollout's gradients equal plain autograd through the
   whole graph (``MemoryModel.forward`` of the untrimmed model), with dropout live (masks keyed by the global layer),
   for the loss weightings (importance with a keyword), truncated BPTT and ablation; its chunk records equal the
   reference's; a fill-only pass gives the reference's logits; names are the whole model's.
2. Training (torchrun, the real entry point): pp=2 trains like one process (losses, final HF weights and memory,
   chunk records), also with importance weighting; the pp=2 export loads with ``MemoryModel.from_pretrained``.
"""
import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from rollout_dist import MemoryConfig, MemoryModel, with_memory
from rollout_dist.engine.streams import StreamKey
from rollout_dist.engine.weighting import ImportanceWeights
from rollout_dist.model import stage_state_dict, trim_to_stage
from rollout_dist.model.stage import global_name
from rollout_dist.parallel import PipelineMemoryRollout, RankLayout
from rollout_dist.train.planner import memory_activation_bytes_per_token
from tests.helpers import VOCAB, Started, child_env, launcher_command, tiny_model, write_word_docs

REPO = Path(__file__).resolve().parents[2]
TRAIN = REPO / "launch" / "train.py"
WORDS = "the of chunk rollout model layer state memory gradient token slot document gate decay stage".split()

KEY = StreamKey(seed=3, step=2, document=5)
LENGTH, CHUNK = 23, 4  # six chunks, the last one short
CASES = {  # name: (MemoryModel.forward / rollout arguments)
    "tokens": dict(loss_weighting="tokens"),
    "chunks_bptt2": dict(loss_weighting="chunks", bptt_chunks=2),
    "importance": dict(loss_weighting="importance"),
    "ablated": dict(loss_weighting="tokens", ablate_state=True),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _live_memory_model():
    """A float64 memory model of 4 layers with dropout, its zero-initialised gates given random values (so the
    memory and the chunk-index track contribute)."""
    model = with_memory(tiny_model("llama", num_hidden_layers=4, attention_dropout=0.25),
                        MemoryConfig(slots=3, write_dim=8))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for mem in model.memory:
            for p in (mem.inject, mem.value.weight, mem.gate_input, mem.gate_state):
                p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64))
        model.chunk_gate.copy_(torch.randn(model.chunk_gate.shape, generator=g, dtype=torch.float64))
    model.train()
    return model


def _inputs():
    ids = torch.randint(0, VOCAB, (2, LENGTH), generator=torch.Generator().manual_seed(11))
    labels = ids.clone()
    labels[:, 9:13] = -100
    importance = ImportanceWeights(keyword=2.0, shift=0.5, loss=1.0, keywords=((int(ids[0, 14]), int(ids[0, 15])),))
    return ids, labels, importance


def _grads(model):
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def _stage(rank: int, port: int, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model = _live_memory_model()
        ids, labels, importance = _inputs()
        references = {}
        for name, kw in CASES.items():  # the whole graph, one process, the untrimmed model
            out = model(ids, chunk_size=CHUNK, labels=labels, stream=KEY, importance=importance, **kw)
            out.loss.backward()
            references[name] = (out, _grads(model))
        model.eval()
        with torch.no_grad():
            ref_logits = model(ids, chunk_size=CHUNK).logits[:, 20:]  # the last chunk: [20, 23)
            whole_memory = {k: v.clone() for k, v in model.memory_state_dict().items()}
            whole = {k: v.clone() for k, v in model.state_dict().items()}
        model.train()

        layout = RankLayout(pp=2, rank=rank, world=2).build_groups()
        info = trim_to_stage(model, layout.stage, [2, 2])
        names = stage_state_dict(model)
        out = {"names_global": all(torch.equal(t, whole[n]) for n, t in names.items()),
               "memory_names": sorted(model.memory_state_dict()),
               "memory_equal": all(torch.equal(t.cpu(), whole_memory[n]) for n, t in model.memory_state_dict().items()),
               "first_layer": info.first_layer}
        for name, kw in CASES.items():
            ref, ref_grads = references[name]
            rollout = PipelineMemoryRollout(CHUNK, layout, bptt_chunks=kw.get("bptt_chunks", 0),
                                            loss_weighting=kw["loss_weighting"], ablate=kw.get("ablate_state", False),
                                            importance=importance)
            result = rollout.run(model, ids, labels, stream=KEY)
            grads = {global_name(n, info): g for n, g in _grads(model).items()}
            errors = {n: ((g - ref_grads[n]).norm() / ref_grads[n].norm().clamp_min(1e-300)).item()
                      for n, g in grads.items()}
            out[name] = {"worst": max(errors.items(), key=lambda kv: kv[1]),
                         "missing": sorted(set(ref_grads) & set(names) - set(grads)),
                         "loss": (result.loss_sum, ref.chunk_losses, result.loss),
                         "rows": rollout.last_chunks, "ref_rows": (ref.chunk_weights, ref.topic_shift, ref.damping)}
        out["probe_bytes"] = memory_activation_bytes_per_token(model)  # the planner's probe, on a stage
        model.eval()
        rollout = PipelineMemoryRollout(CHUNK, layout)
        state = rollout.new_state(model, 2, LENGTH)
        rollout.fill(model, ids[:, :12], state)
        logits = rollout.fill(model, ids[:, 12:], state, stream=StreamKey(0))
        out["fill_error"] = None if logits is None else (logits[:, -3:] - ref_logits).abs().max().item()
        saved = state.state_dict()
        out["state_layers"] = saved["layers"].tolist()
        out["state_keys"] = sorted(k for k in saved if k.startswith("layer.") or k == "topic")
        results[rank] = out
    finally:
        dist.destroy_process_group()


def test_pipeline_memory_rollout_gradients_equal_the_whole_graph():
    results = mp.Manager().dict()
    mp.spawn(_stage, args=(_free_port(), results), nprocs=2, join=True)
    first, last = results[0], results[1]
    for r in (first, last):
        assert r["names_global"] and r["memory_equal"] and r["probe_bytes"] > 0, r
        for name in CASES:
            case = r[name]
            assert case["worst"][1] <= 1e-9, (name, case["worst"])
            assert not case["missing"], (name, case["missing"])
    assert first["memory_names"][:2] == ["chunk_gate", "chunk_index.weight"]
    assert {n.split(".")[1] for n in first["memory_names"][2:]} == {"0", "1"}
    assert {n.split(".")[1] for n in last["memory_names"]} == {"2", "3"}
    assert first["first_layer"] == 0 and last["first_layer"] == 2
    for name in CASES:
        ours, chunk_means, mean = last[name]["loss"]
        rows, (weights, shifts, damping) = last[name]["rows"], last[name]["ref_rows"]
        ref = sum(m * r["tokens"] for m, r in zip(chunk_means, rows) if r["tokens"])  # the reference's CE sum
        assert ours == pytest.approx(ref, rel=1e-12) and mean == pytest.approx(ref / 36, rel=1e-12)
        assert first[name]["loss"][0] == 0.0 and first[name]["loss"][2] != first[name]["loss"][2]  # NaN
        assert [r["weight"] for r in rows] == pytest.approx(weights, rel=1e-12)
        assert [r["topic_shift"] for r in rows] == pytest.approx(shifts, rel=1e-6, abs=1e-7)
        assert [r["damping"] for r in rows] == pytest.approx(damping, rel=1e-6)
        assert first[name]["rows"] == []
    assert len(set(last["importance"]["rows"][t]["weight"] for t in range(6))) > 1  # importance weighs chunks
    assert first["fill_error"] is None and last["fill_error"] <= 1e-12
    assert first["state_layers"] == [0, 1] and last["state_layers"] == [2, 3]
    assert first["state_keys"] == ["layer.0.slots", "layer.1.slots", "topic"]
    assert last["state_keys"] == ["layer.2.slots", "layer.3.slots"]


# ---- training through launch/train.py: pp=2 against one process ------------------------------------------------
RUNS = {  # name: (processes, overrides); a step is two documents, as one window of two on both layouts
    "pp1": (1, []),
    "pp2": (2, ["parallel.pp=2"]),
    "pp1_importance": (1, ["rollout.loss_weighting=importance", "rollout.importance_keywords=[memory]"]),
    "pp2_importance": (2, ["parallel.pp=2", "rollout.loss_weighting=importance",
                           "rollout.importance_keywords=[memory]"]),
}


def _command(run_dir, docs, nproc, overrides) -> list[str]:
    common = [f"data.path={docs}", "model.num_layers=4", "rollout.mode=memory", "rollout.chunk_size=48",
              "memory.slots=4", "memory.write_dim=16", "memory.lr=0.05", "trainer.max_steps=3",
              "trainer.warmup_steps=0", "trainer.grad_accum=2", "trainer.grad_clip=0.05", "trainer.device=cpu",
              "trainer.log_every=1", "trainer.tensorboard=false", "checkpoint.every=3", f"checkpoint.dir={run_dir}"]
    return [*launcher_command(nproc), str(TRAIN), *common, *overrides]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every run of RUNS, started together (the one-process runs leave a core idle); each one's summary, final
    weights (HF and memory) and chunk records."""
    docs = write_word_docs(tmp_path_factory.mktemp("docs"), WORDS)
    dirs = {name: tmp_path_factory.mktemp(name) / "run" for name in RUNS}
    started = {name: Started(_command(dirs[name], docs, *RUNS[name]), cwd=dirs[name].parent,
                             env=child_env(OMP_NUM_THREADS="1"), timeout=600) for name in RUNS}
    ended = {name: started[name].result() for name in RUNS}  # all of them, before any check fails
    out = {}
    for name, proc in ended.items():
        assert proc.returncode == 0, name + ": " + proc.stdout[-3000:] + proc.stderr[-3000:]
        run = dirs[name]
        out[name] = {"dir": run, "log": proc.stdout + proc.stderr,
                     "summary": json.loads((run / "summary.json").read_text()), "weights": _weights(run / "final"),
                     "rows": [json.loads(line) for line in (run / "chunks.jsonl").read_text().splitlines()]}
    return out


def _weights(directory: Path) -> dict:
    return {**load_file(directory / "model.safetensors"),
            **{f"memory:{k}": v for k, v in load_file(directory / "memory.safetensors").items()}}


def _assert_close(weights, ref_weights, what):
    assert weights.keys() == ref_weights.keys() and any(k.startswith("memory:") for k in weights), what
    num = sum(((weights[k].double() - ref.double()) ** 2).sum() for k, ref in ref_weights.items())
    den = sum((ref.double() ** 2).sum() for ref in ref_weights.values())
    assert (num / den).sqrt().item() <= 1e-6, what
    for key, ref in ref_weights.items():  # per tensor: the zero-initialised memory values hold only their updates
        err = ((weights[key].double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()
        assert err <= 1e-4, f"{what}: {key} differs by {err:.2e}"


@pytest.mark.parametrize("name", ["pp2", "pp2_importance"])
def test_pipeline_memory_mode_trains_like_one_process(runs, name):
    ours, ref = runs[name], runs[name.replace("pp2", "pp1")]
    assert "decoder layers per stage [2, 2]" in ours["log"]
    for a, b in zip(ours["summary"]["losses"], ref["summary"]["losses"]):
        assert abs(a - b) <= 1e-6 * abs(b), (ours["summary"]["losses"], ref["summary"]["losses"])
    assert ours["summary"]["tokens"] == ref["summary"]["tokens"]
    _assert_close(ours["weights"], ref["weights"], name)
    assert ref["weights"]["memory:memory.3.value.weight"].abs().max() > 0  # the last stage's memory learned

    def key(r):
        return r["step"], r["document"], r["chunk"]
    mine, theirs = sorted(ours["rows"], key=key), sorted(ref["rows"], key=key)  # once per chunk: the last stage's
    assert [(key(r), r["start"], r["end"], r["tokens"]) for r in mine] == \
        [(key(r), r["start"], r["end"], r["tokens"]) for r in theirs]
    for field in ("weight", "topic_shift", "damping"):
        assert [r[field] for r in mine] == pytest.approx([r[field] for r in theirs], rel=1e-5, abs=1e-6), field
    if "importance" in name:
        assert len({round(r["weight"], 6) for r in mine if r["tokens"]}) > 2  # the weights do differ by chunk


def test_pipeline_memory_export_and_checkpoint_export_equal_one_process(runs, tmp_path):
    """The pp=2 run's final model (its stages joined) loads with ``MemoryModel.from_pretrained``, and it and the
    ``checkpoint export`` of its last snapshot hold the files and tensors of the one-process run's."""
    one, two = runs["pp1"]["dir"], runs["pp2"]["dir"]
    assert sorted(p.name for p in (two / "final").iterdir()) == sorted(p.name for p in (one / "final").iterdir())
    loaded = MemoryModel.from_pretrained(two / "final")
    assert len(loaded.memory) == 4 and loaded.rollout_stage is None
    exports = {}
    procs = {name: Started([*launcher_command(1), "-m", "rollout_dist.checkpoint", "export", str(run / "state.zarr"),
                            str(tmp_path / name)], cwd=REPO, env=child_env(OMP_NUM_THREADS="1"), timeout=300)
             for name, run in (("one", one), ("two", two))}
    for name, started in procs.items():
        proc = started.result()
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        exports[name] = _weights(tmp_path / name)
        assert ("2 pipeline stages joined" in proc.stdout) == (name == "two"), proc.stdout
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    _assert_close(exports["two"], exports["one"], "checkpoint export")
    for key, value in exports["two"].items():  # a snapshot's weights are the final model's
        assert torch.equal(value, runs["pp2"]["weights"][key]), key
