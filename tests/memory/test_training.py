"""Memory mode in the trainer (CPU, float32, DeepSpeed): the step's gradient against plain autograd through every
chunk, learning, resume, the memory's optimizer group and its schedule, the curriculum, planned overlapping chunks,
per-chunk records, export, and the config refusals."""
import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from rollout_dist import MemoryModel
from rollout_dist.config import (CheckpointConfig, ConfigError, DataConfig, MemoryConfig, ModelConfig, RolloutConfig,
                                 TrainConfig, TrainerConfig, to_train_config)
from rollout_dist.engine.factory import keyword_tokens
from rollout_dist.engine.memory import MemoryRollout
from rollout_dist.engine.streams import RandomStreams
from rollout_dist.planning.config import PlannerConfig
from rollout_dist.tokenizer import byte_tokenizer
from rollout_dist.train.data_pipeline import Curriculum
from rollout_dist.trainer import Trainer
from tests.helpers import child_env, grads_of

REPO = Path(__file__).resolve().parents[2]
TEXTS = ["The first document, somewhat longer than the second one is.", "A second, shorter document."]


def make_trainer(tmp_path, *, texts=None, chunk=7, grad_accum=2, max_steps=2, checkpoint_every=0, resume=False,
                 memory=None, rollout=None, data=None, step_hooks=(), **trainer_kw):
    data_dir = tmp_path / "docs"
    data_dir.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(texts or TEXTS):
        (data_dir / f"{i}.txt").write_text(text)
    cfg = TrainConfig(
        model=ModelConfig(dtype="float32", hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                          num_kv_heads=2),
        data=DataConfig(path=str(data_dir), shuffle=False, **(data or {})),
        rollout=RolloutConfig(mode="memory", chunk_size=chunk, **(rollout or {})),
        memory=MemoryConfig(slots=4, write_dim=8, **(memory or {})),
        trainer=TrainerConfig(max_steps=max_steps, grad_accum=grad_accum, zero_stage=trainer_kw.pop("zero_stage", 0),
                              device="cpu", warmup_steps=trainer_kw.pop("warmup_steps", 0), tensorboard=False,
                              **trainer_kw),
        checkpoint=CheckpointConfig(dir=str(tmp_path / "run"), every=checkpoint_every, resume=resume))
    return Trainer(cfg, step_hooks=step_hooks)


def liven(model: MemoryModel, seed: int = 7) -> None:
    """Random values for the weights that are zero at initialisation (the memory's values, the gates), so the
    memory and the chunk-index track contribute to the loss (at initialisation they contribute nothing, and the
    write path gets no gradient)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mem in model.memory:
            mem.inject.copy_(torch.randn(mem.inject.shape, generator=g))
            mem.value.weight.copy_(0.3 * torch.randn(mem.value.weight.shape, generator=g))
            mem.gate_input.copy_(0.3 * torch.randn(mem.gate_input.shape, generator=g))
        model.chunk_gate.copy_(torch.randn(model.chunk_gate.shape, generator=g))


def chunk_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "chunks.jsonl").read_text().splitlines()]


def test_first_step_gradient_equals_plain_autograd_through_every_chunk(tmp_path):
    """The DeepSpeed engine's gradient after a window of two documents (every chunk's backward through
    engine.backward) equals MemoryModel.forward's plain-autograd loss, each document weighed by its tokens."""
    trainer = make_trainer(tmp_path)
    liven(trainer.model)
    reference = copy.deepcopy(trainer.model)
    docs = trainer.docs
    tokens = sum(len(d.input_ids) - 1 for d in docs)
    streams = RandomStreams(trainer.cfg.trainer.seed)
    ref_loss = 0.0
    for i, doc in enumerate(docs):
        out = reference(torch.tensor([doc.input_ids]), chunk_size=7, stream=streams.document(0, i),
                        return_logits=False)
        (out.loss * out.num_tokens / tokens).backward()
        ref_loss += out.loss.item() * out.num_tokens / tokens
    ref = grads_of(reference)
    assert ref["memory.0.write_key.weight"].abs().sum() > 0  # the state carries gradient between chunks
    trainer.setup()
    loss_sum, got_tokens, chunks = trainer.accumulate(trainer.data.next_window(2))
    assert got_tokens == tokens and chunks == sum(-(-len(d.input_ids) // 7) for d in docs)
    assert abs(loss_sum / tokens - ref_loss) <= 1e-5 * ref_loss
    grads = grads_of(trainer.engine.module)
    assert grads.keys() == ref.keys()
    for name, g in ref.items():
        err = ((grads[name].double() - g.double()).norm() / g.double().norm().clamp_min(1e-12)).item()
        assert err <= 2e-5 or (grads[name] - g).abs().max().item() <= 1e-7, (name, err)


@pytest.mark.parametrize("schedule,zero_stage", [("cosine", 0), ("linear", 0), ("constant", 0), ("cosine", 1),
                                                 ("linear", 2)])
def test_memory_parameters_have_their_own_group_and_the_schedule_keeps_its_ratio(tmp_path, schedule, zero_stage):
    """memory.lr and memory.weight_decay apply to exactly the memory's parameters; after every step the
    memory group's rate is memory.lr times the factor the schedule gives the model's rate (trainer.lr): DeepSpeed's
    WarmupCosineLR scales each group's own rate, WarmupLR and WarmupDecayLR get one rate per group."""
    seen = []
    trainer = make_trainer(tmp_path, max_steps=3, warmup_steps=2, schedule=schedule, lr=2e-3, min_lr=2e-4,
                           weight_decay=0.1, memory={"lr": 5e-3, "weight_decay": 0.0}, zero_stage=zero_stage,
                           step_hooks=[lambda s: seen.append([g["lr"] for g in trainer.engine.optimizer.param_groups])])
    trainer.fit()
    groups = trainer.engine.optimizer.param_groups
    assert len(groups) == 2 and groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    if zero_stage == 0:  # (ZeRO's groups hold flat partitions)
        memory = {id(p) for p in trainer.engine.module.memory_parameters()}
        assert {id(p) for p in groups[1]["params"]} == memory and not memory & {id(p) for p in groups[0]["params"]}
    assert len(seen) == 3 and len({round(m, 12) for m, _ in seen}) > 1  # the schedule moved the rate
    for model_lr, memory_lr in seen:
        factor = model_lr / 2e-3
        assert memory_lr == pytest.approx(5e-3 * factor, rel=1e-9), (schedule, seen)
    assert [s.lr for s in trainer.history][1:] == pytest.approx([m for m, _ in seen][:-1], rel=1e-9)


def test_zero_stages_give_the_same_update_as_stage_0(tmp_path):
    """The memory's parameter group through ZeRO 1 and 2 (partitioned per group) trains as at ZeRO 0."""
    results = {}
    for stage in (0, 1, 2):
        trainer = make_trainer(tmp_path / f"z{stage}", zero_stage=stage, memory={"lr": 5e-3})
        liven(trainer.model)
        trainer.fit()
        results[stage] = {n: p.detach().clone() for n, p in trainer.engine.module.named_parameters()}
    # float32 sums in another order (ZeRO's flat partitions): all parameters together agree to 1e-7; a tensor
    # alone to 1e-5, as parameters that start at zero hold only their updates (3.7e-6 seen on one of them)
    for stage in (1, 2):
        num = sum(((results[stage][n].double() - p.double()) ** 2).sum() for n, p in results[0].items())
        den = sum((p.double() ** 2).sum() for p in results[0].values())
        assert (num / den).sqrt().item() <= 1e-7, stage
        worst = max(((results[stage][n] - p).norm() / p.norm().clamp_min(1e-12)).item()
                    for n, p in results[0].items())
        assert worst <= 1e-5, (stage, worst)


def test_memory_lr_zero_is_the_model_lr(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=1, memory={"lr": 0.0})
    trainer.setup()
    assert [g["lr"] for g in trainer.engine.optimizer.param_groups] == [3e-3, 3e-3]


def test_loss_decreases_and_the_final_model_loads_with_and_without_memory(tmp_path, caplog):
    from transformers import AutoModelForCausalLM
    with caplog.at_level("INFO", logger="rollout_dist"):
        trainer = make_trainer(tmp_path, max_steps=8, lr=1e-2, log_every=4)
        history = trainer.fit()
    losses = [s.loss for s in history]
    assert losses[-1] < 0.8 * losses[0], losses
    assert "chunk K/V checks (fill pass against the backward recompute, replay) are skipped" in caplog.text
    run = tmp_path / "run"
    final = run / "final"
    trained = trainer.engine.module
    plain = AutoModelForCausalLM.from_pretrained(final)  # transformers alone: the HF weights
    for name, p in plain.named_parameters():
        assert torch.equal(p, trained.model.get_parameter(name).detach()), name
    reloaded = MemoryModel.from_pretrained(final)
    for (name, p), (_, q) in zip(trained.named_parameters(), reloaded.named_parameters()):
        assert torch.equal(p.detach(), q.detach()), name
    # one record per chunk of every document of every step; the train.log summary on the steps that log
    rows = chunk_rows(run)
    per_step = sum(-(-len(d.input_ids) // 7) for d in trainer.docs)
    assert len(rows) == 8 * per_step and [r["step"] for r in rows] == sorted(r["step"] for r in rows)
    for step in range(1, 9):
        for doc in (0, 1):
            mine = [r for r in rows if r["step"] == step and r["document"] == doc]
            assert sum(r["weight"] for r in mine) == pytest.approx(1.0)
            assert sum(r["tokens"] for r in mine) == len(trainer.docs[doc].input_ids) - 1
            assert all(0.0 <= r["damping"] <= 1.0 and r["topic_shift"] >= 0.0 for r in mine)
    summaries = [line for line in (run / "train.log").read_text().splitlines() if "memory:" in line]
    assert len(summaries) == 3 and all("chunks in 2 documents" in line for line in summaries)  # steps 1, 4, 8


def test_resume_is_bit_identical_and_continues_the_curriculum(tmp_path, caplog):
    """4 steps straight == 2 steps, a snapshot, a new trainer resuming to step 4: weights (the memory's included),
    losses, the curriculum stage (a function of the step), and chunks.jsonl without a step twice."""
    kw = dict(grad_accum=1, max_steps=4, memory={"curriculum": [1, 2], "curriculum_steps": 2})
    straight = make_trainer(tmp_path / "a", **kw)
    liven(straight.model)
    straight_hist = straight.fit()
    assert [s.chunks for s in straight_hist] == [1, 1, 2, 2]  # documents cut to 1 chunk, then 2
    first = make_trainer(tmp_path / "b", checkpoint_every=2, **kw)
    liven(first.model)
    first.setup()  # the same run, "killed" after its snapshot at step 2 (and after a step 3 never snapshotted)
    for _ in range(3):
        first.history.append(first.train_step())
        if first.step == 2:
            first.save_checkpoint()
    first.checkpointer.close()
    with caplog.at_level("INFO", logger="rollout_dist"):
        resumed = make_trainer(tmp_path / "b", checkpoint_every=2, resume=True, **kw)
        hist = resumed.fit()
    assert "curriculum stage 2 of 2 from step 3 to the end: documents cut to their first 2 chunks" in caplog.text
    assert [s.step for s in hist] == [1, 2, 3, 4]
    assert [s.loss for s in hist] == [s.loss for s in straight_hist]
    names = [n for n, _ in straight.engine.module.named_parameters()]
    assert any(n.startswith("memory.") for n in names)
    for (name, p), (_, q) in zip(straight.engine.module.named_parameters(), resumed.engine.module.named_parameters()):
        assert torch.equal(p, q), name  # bit for bit on the CPU
    rows = chunk_rows(tmp_path / "b" / "run")
    assert [r["step"] for r in rows] == [1, 2, 3, 3, 4, 4]  # step 3 of the killed attempt dropped, then rewritten
    # the snapshot CLI exports a memory-mode snapshot as the final model is saved: HF files plus the memory's
    from omegaconf import OmegaConf

    from rollout_dist.checkpoint.__main__ import main as checkpoint_cli
    config = tmp_path / "config.yaml"
    config.write_text(OmegaConf.to_yaml(OmegaConf.structured(resumed.cfg)))
    out = tmp_path / "export"
    assert checkpoint_cli(["export", str(tmp_path / "b" / "run" / "state.zarr"), str(out), "--config",
                           str(config)]) == 0
    exported = MemoryModel.from_pretrained(out)
    for (name, p), (_, q) in zip(resumed.engine.module.named_parameters(), exported.named_parameters()):
        assert torch.equal(p.detach(), q.detach()), name


def test_a_flipped_weight_bit_is_caught_in_memory_mode(tmp_path):
    """The coordinator's step-level checks run in memory mode: a weight of the model corrupted at rest stops the
    run at that step (the chunk K/V checks are the ones skipped)."""
    from rollout_dist.config import FaultConfig
    from rollout_dist.trainer import DivergenceError
    trainer = make_trainer(tmp_path, max_steps=3, grad_accum=1)
    trainer.cfg.fault = FaultConfig(kind="param_bitflip", step=2, bit=20)
    with pytest.raises(DivergenceError, match=r"step 2 did not agree") as err:
        trainer.fit()
    assert "model.model.layers.0." in str(err.value) and "changed at rest" in str(err.value)


def test_the_gpu_digest_reads_a_parameter_two_bytes_off_a_word():
    """DeepSpeed's bf16 optimizers put the parameters into one flat buffer; after the memory's one-element topic
    strength the next parameter starts 2 bytes off a 4-byte word, which the coordinator's block checksum (its
    digest of device tensors) must read like any other."""
    from rollout_dist.coordinator.digest import block_checksum
    flat = torch.randn(21).to(torch.bfloat16)
    view = flat[1:9]
    assert view.storage_offset() * view.element_size() % 4 == 2
    assert torch.equal(block_checksum(view), block_checksum(view.clone()))


def test_curriculum_cuts_documents_to_the_stage_count(tmp_path, caplog):
    curriculum = Curriculum([2, 4, 8], 3)
    assert [curriculum.chunks(s) for s in range(11)] == [2, 2, 2, 4, 4, 4, 8, 8, 8, 8, 8]
    trainer = make_trainer(tmp_path, chunk=5, memory={"curriculum": [2, 4], "curriculum_steps": 1})
    trainer.setup()
    long_doc = trainer.docs[0]  # 61 tokens: 13 chunks of 5
    with caplog.at_level("INFO", logger="rollout_dist"):
        first = trainer.data.chunked(long_doc, trainer.rollout, 0)
        again = trainer.data.chunked(long_doc, trainer.rollout, 0)
        later = trainer.data.chunked(long_doc, trainer.rollout, 5)
    assert first.spans == again.spans == [(0, 5), (5, 10)] and first.input_ids == long_doc.input_ids[:10]
    assert later.spans == [(0, 5), (5, 10), (10, 15), (15, 20)] and later.targets == 19
    assert caplog.text.count("curriculum stage") == 2  # logged when the stage changes, not per document
    short = trainer.data.chunked(trainer.docs[1], trainer.rollout, 5)  # 27 tokens: 6 chunks, cut to 4
    assert short.spans[-1] == (15, 20)
    stats = trainer.train_step()
    assert stats.chunks == 4 and stats.tokens == 2 * 9  # step 1: two chunks of each document


def _plan(tmp_path, data_dir, mode):
    from rollout_dist.plan import plan_corpus
    cfg = PlannerConfig(max_chunk_tokens=200, min_chunk_tokens=64, memory_overlap_tokens=128)
    out = tmp_path / f"index-{mode}"
    plan_corpus(str(data_dir), str(out), cfg, mode=mode, progress=False)
    return out


SENTENCES = ["Section {i}. The licensee may copy the work.", "Each copy keeps this notice intact.",
             "Changes must be marked as changes.", "The licensor gives no warranty at all.",
             "Disputes go to the courts of the licensor."]


def test_memory_mode_chunk_index_with_overlaps_trains_each_target_once(tmp_path):
    texts = [" ".join(s.format(i=i) for i in range(k) for s in SENTENCES) for k in (4, 3)]
    trainer0 = make_trainer(tmp_path / "probe", texts=texts, max_steps=1)  # writes the documents only
    data_dir = tmp_path / "probe" / "docs"
    memory_index, exact_index = _plan(tmp_path, data_dir, "memory"), _plan(tmp_path, data_dir, "exact")
    del trainer0
    trainer = make_trainer(tmp_path / "probe", texts=texts, max_steps=1, data={"chunk_index": str(memory_index)},
                           chunk=0)
    spans = [trainer.planned_spans[d.id] for d in trainer.docs]
    assert all(len(s) >= 3 for s in spans)
    assert sum(b[0] < a[1] for s in spans for a, b in zip(s, s[1:])) >= 3  # chunks re-read the previous one's end
    model = copy.deepcopy(trainer.model)
    tokens = sum(len(d.input_ids) - 1 for d in trainer.docs)
    ref = sum(model(torch.tensor([d.input_ids]), spans=s, return_logits=False).loss.item() * (len(d.input_ids) - 1)
              for d, s in zip(trainer.docs, spans)) / tokens
    history = trainer.fit()
    assert history[0].tokens == tokens  # overlapped tokens are context: no target counted twice
    assert history[0].loss == pytest.approx(ref, rel=1e-5)
    assert history[0].chunks == sum(len(s) for s in spans)
    rows = chunk_rows(tmp_path / "probe" / "run")
    for d, s in zip(trainer.docs, spans):
        mine = [r for r in rows if r["document"] == trainer.data.stream_id(d)]
        assert [(r["start"], r["end"]) for r in mine] == s
        assert sum(r["tokens"] for r in mine) == len(d.input_ids) - 1
    # exact mode refuses a memory-mode index; memory mode takes an exact one (chunks that tile the document)
    from rollout_dist.train.data_pipeline import DataPipeline
    with pytest.raises(ConfigError, match="planned for memory mode"):
        DataPipeline(DataConfig(path=str(data_dir), chunk_index=str(memory_index)), byte_tokenizer(), 320, seed=0,
                     progress=False, mode="exact")
    exact = DataPipeline(DataConfig(path=str(data_dir), chunk_index=str(exact_index)), byte_tokenizer(), 320, seed=0,
                         progress=False, mode="memory")
    for d in exact.docs:
        tiling = exact.planned_spans[d.id]
        assert all(b[0] == a[1] for a, b in zip(tiling, tiling[1:])) and exact.planned_scores == {}


def test_importance_weighting_gets_keywords_as_tokens_and_the_planned_boundary_scores(tmp_path, monkeypatch):
    tok = byte_tokenizer()
    assert keyword_tokens(["notice", "notice"], tok) == (tuple(b"notice"), tuple(b" notice"))
    texts = [" ".join(s.format(i=i) for i in range(2) for s in SENTENCES)]
    make_trainer(tmp_path / "p", texts=texts)
    index = _plan(tmp_path, tmp_path / "p" / "docs", "memory")
    seen = []
    real = MemoryRollout.run

    def run(self, *args, **kwargs):
        seen.append(kwargs.get("boundary_scores"))
        return real(self, *args, **kwargs)
    monkeypatch.setattr(MemoryRollout, "run", run)
    trainer = make_trainer(tmp_path / "p", texts=texts, grad_accum=1, max_steps=1, data={"chunk_index": str(index)},
                           rollout={"loss_weighting": "importance", "importance_keywords": ["notice"]})
    assert trainer.rollout.importance.keywords == (tuple(b"notice"), tuple(b" notice"))
    trainer.fit()
    planned = trainer.data.planned_scores[trainer.docs[0].id]
    assert seen == [planned] and planned[0] == 0.0 and max(planned) > 0
    weights = [r["weight"] for r in chunk_rows(tmp_path / "p" / "run")]
    assert sum(weights) == pytest.approx(1.0) and len(set(weights)) > 1


def test_memory_mode_peak_estimate_and_advice(tmp_path, caplog):
    """No K/V: the predicted peak holds one chunk's activations and the small states stored at every chunk
    boundary; the advice names what memory mode can change."""
    trainer = make_trainer(tmp_path, texts=["x" * 400, "y" * 40])
    trainer.setup()
    est = trainer.memory.predicted_peak()
    assert est.chunk == 7 and est.chunk_activations > 0 and est.transient == 0
    one_state = 2 * 4 * 32 * 4  # layers x slots x hidden x float32
    assert est.state == (-(-400 // 7) + 3) * one_state
    caplog.clear()
    with caplog.at_level("INFO", logger="rollout_dist"):
        trainer.memory.check(capacity=1 << 40)
        assert "predicted peak for the longest document" in caplog.text
        assert not [r for r in caplog.records if r.levelname == "WARNING" and r.name == "rollout_dist"]
        trainer.memory.check(capacity=1 << 12)
    assert "does not grow with the document: try a smaller rollout.chunk_size" in caplog.text


CONF = REPO / "hydra_conf"


def load(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return to_train_config(compose(config_name="config", overrides=list(overrides)))


@pytest.mark.parametrize("overrides,names", [
    (["rollout=memory", "parallel.pp=2", "fault.kind=p2p_corrupt", "coordinator.enabled=true"],
     ["fault.kind=p2p_corrupt"]),
    (["rollout.mode=memory", "rollout.chunk_size=0"], ["rollout.chunk_size=0", "data.chunk_index"]),
    (["rollout=memory", "rollout.offload=kv"], ["rollout.offload=kv"]),
    (["rollout=memory", "rollout.keep_attention=true"], ["rollout.keep_attention"]),
    (["rollout=memory", "rollout.attention=flash"], ["rollout.attention=flash"]),
    (["rollout=memory", "fault.kind=state_bitflip"], ["fault.kind=state_bitflip"]),
    (["rollout=memory", "checkpoint.chunk_every=2"], ["checkpoint.chunk_every=2"]),
    (["memory.curriculum=[2,4]"], ["memory.curriculum", "rollout.mode=exact"]),
    (["rollout=memory", "memory.curriculum=[2,0]"], ["memory.curriculum"]),
    (["rollout=memory", "memory.curriculum_steps=0"], ["memory.curriculum_steps"]),
    (["rollout=memory", "memory.lr=-1"], ["memory.lr"]),
    (["rollout=memory", "rollout.loss_weighting=focal"], ["rollout.loss_weighting"]),
    (["rollout=memory", "rollout.bptt_chunks=-1"], ["rollout.bptt_chunks"]),
])
def test_bad_memory_mode_values_are_one_line_errors_naming_the_keys(overrides, names):
    with pytest.raises(ConfigError) as err:
        load(*overrides)
    message = str(err.value)
    assert "\n" not in message and all(n in message for n in names), message


def test_memory_mode_configs_that_work():
    assert load("rollout=memory").rollout.mode == "memory"
    cfg = load("rollout.mode=memory", "rollout.chunk_size=0", "data.chunk_index=plans/x")  # chunks planned
    assert cfg.rollout.chunk_size == 0
    assert load("rollout=memory", "memory.curriculum=[2,4]", "parallel.dp=2").memory.curriculum == [2, 4]
    assert load("rollout=memory", "parallel.pp=2").parallel.pp == 2  # tests/memory/test_memory_pipeline.py


def test_entry_point_refuses_in_one_line_before_writing(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), "rollout.mode=memory", "parallel.pp=2",
                           "rollout.keep_attention=true", f"checkpoint.dir={tmp_path / 'run'}"], cwd=tmp_path,
                          env=child_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "rollout.keep_attention" in errors[0], proc.stderr[-2000:]
    assert not (tmp_path / "run").exists()
