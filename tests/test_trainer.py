"""Trainer: gradient accumulation normalised by the window's tokens, DeepSpeed steps, run directory safety."""
import copy
import shutil

import pytest
import torch
import torch.nn.functional as F

from rollout_dist import ExactRollout, chunked_forward_backward
from rollout_dist.config import (CheckpointConfig, ConfigError, DataConfig, ModelConfig, RolloutConfig,
                                 TrainConfig, TrainerConfig)
from rollout_dist.model import CausalLMAdapter
from rollout_dist.trainer import Trainer
from tests.helpers import grads_of, worst_rel_error


def make_trainer(tmp_path, *, dtype="float32", zero_stage=0, grad_accum=2, chunk=7, texts=None, checkpoint_every=0,
                 resume=False, offload="none", keep_attention=False, step_hooks=(), attention_dropout=0.0,
                 **trainer_kw):
    data_dir = tmp_path / "docs"
    data_dir.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(texts or ["The first document, somewhat longer than the second one is.",
                                       "A second, shorter document."]):
        (data_dir / f"{i}.txt").write_text(text)
    cfg = TrainConfig(
        model=ModelConfig(dtype=dtype, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                          num_kv_heads=2, attention_dropout=attention_dropout),
        data=DataConfig(path=str(data_dir), shuffle=False),
        rollout=RolloutConfig(chunk_size=chunk, offload=offload, keep_attention=keep_attention),
        trainer=TrainerConfig(max_steps=trainer_kw.pop("max_steps", 2), grad_accum=grad_accum,
                              zero_stage=zero_stage, device="cpu",
                              warmup_steps=0, tensorboard=False, **trainer_kw),
        checkpoint=CheckpointConfig(dir=str(tmp_path / "run"), every=checkpoint_every, resume=resume))
    return Trainer(cfg, step_hooks=step_hooks)


def hf_window_grads(model, docs):
    """Reference: one full-sequence forward per document, sum of token CEs / tokens of the whole window."""
    model = copy.deepcopy(model)
    model.zero_grad(set_to_none=True)
    total, tokens = 0.0, sum(len(d.input_ids) - 1 for d in docs)
    for d in docs:
        ids = torch.tensor([d.input_ids])
        logits = model(ids).logits[0, :-1]
        loss = F.cross_entropy(logits.float(), ids[0, 1:], reduction="sum") / tokens
        loss.backward()
        total += loss.item()
    return total, grads_of(model)


def test_accumulating_documents_equals_one_batch_normalised_by_window_tokens(tmp_path):
    trainer = make_trainer(tmp_path)
    ref_loss, ref = hf_window_grads(trainer.model, trainer.docs)
    assert len(trainer.docs[0].input_ids) != len(trainer.docs[1].input_ids)
    trainer.setup()
    loss_sum, tokens, chunks = trainer.accumulate(trainer.docs)
    assert tokens == sum(len(d.input_ids) - 1 for d in trainer.docs)
    assert abs(loss_sum / tokens - ref_loss) <= 1e-6 * ref_loss
    worst, name = worst_rel_error(grads_of(trainer.engine.module), ref)
    assert worst <= 1e-5, (name, worst)
    # the normalisation is by the window: per-document means would differ by far more than the tolerance
    per_doc = [len(d.input_ids) - 1 for d in trainer.docs]
    assert abs(per_doc[0] - per_doc[1]) / sum(per_doc) > 0.1


def test_accumulation_equals_a_batch_of_equal_length_documents(tmp_path):
    texts = ["abcdefghijklmnopqrstuvwxyz0123", "The quick brown fox jumps over"]
    trainer = make_trainer(tmp_path, texts=texts)
    batch = torch.tensor([d.input_ids for d in trainer.docs])
    model = copy.deepcopy(trainer.model)
    batch_result = chunked_forward_backward(model, batch, chunk_size=5)
    trainer.setup()
    loss_sum, tokens, _ = trainer.accumulate(trainer.docs)
    assert tokens == batch_result.num_tokens
    assert abs(loss_sum / tokens - batch_result.loss) <= 1e-6 * batch_result.loss
    worst, name = worst_rel_error(grads_of(trainer.engine.module), grads_of(model))
    assert worst <= 1e-5, (name, worst)


def test_fit_steps_and_updates_weights_and_saves_hf_model(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    trainer = make_trainer(tmp_path, lr=1e-2)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    history = trainer.fit()
    assert [s.step for s in history] == [1, 2] and all(s.chunks >= 2 for s in history)
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert len(changed) == len(before)
    final = tmp_path / "run" / "final"
    reloaded = AutoModelForCausalLM.from_pretrained(final)
    tok = AutoTokenizer.from_pretrained(final)
    assert tok("hi")["input_ids"] == list(b"hi")
    for n, p in reloaded.named_parameters():
        assert torch.equal(p, dict(trainer.model.named_parameters())[n].detach())
    assert (tmp_path / "run" / "summary.json").is_file() and (tmp_path / "run" / "train.log").is_file()


@pytest.mark.parametrize("stage,offload", [(1, "none"), (1, "cpu"), (2, "none"), (2, "cpu")])
def test_zero_stages_give_the_same_update_as_stage_0(tmp_path, stage, offload):
    """ZeRO 1/2, and ZeRO-Offload of the optimizer (fp32 master and Adam state on the host), change nothing."""
    results = {}
    for st, off in ((0, "none"), (stage, offload)):
        trainer = make_trainer(tmp_path / f"z{st}{off}", zero_stage=st, offload_optimizer=off)
        trainer.fit()
        assert trainer.engine.zero_cpu_offload() == (off == "cpu")
        results[st] = {n: p.detach().clone() for n, p in trainer.engine.module.named_parameters()}
    worst = max(((results[stage][n] - p).norm() / p.norm()).item() for n, p in results[0].items())
    assert worst <= 1e-6, worst


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_bf16_gradient_of_a_step_of_many_chunks_is_the_full_sequence_one(tmp_path, stage):
    """A bf16 step of two documents in chunks of 7 tokens (a dozen backward calls): the gradient DeepSpeed steps
    with has the norm of the full-sequence float32 one, at every ZeRO stage.  (ZeRO-1 with DeepSpeed's fp32
    gradient accumulator gave 4.8x that norm; ds_config.py no longer asks for it there.)"""
    trainer = make_trainer(tmp_path, dtype="bfloat16", zero_stage=stage, max_steps=1, grad_clip=0.0)
    _, grads = hf_window_grads(copy.deepcopy(trainer.model).float(), trainer.docs)
    want = torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values())).item()
    trainer.fit()
    got = float(trainer.engine.get_global_grad_norm())
    assert abs(got - want) <= 0.01 * want, (got, want)


@pytest.mark.parametrize("stage", [0, 1])
def test_first_step_of_a_bf16_model_is_adamw_first_update(tmp_path, stage):
    """bf16 without offload: the first step moves each weight by AdamW's first update -lr·g/(|g| + eps) of the
    full-sequence gradient.  At ZeRO-0 DeepSpeed's bf16 wrapper steps Adam once on zero gradients at set-up,
    which made this step about 0.7x (43% off) until the trainer reset the step count."""
    trainer = make_trainer(tmp_path, dtype="bfloat16", zero_stage=stage, max_steps=1, lr=0.5, grad_clip=0.0)
    start = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    _, grads = hf_window_grads(copy.deepcopy(trainer.model).float(), trainer.docs)
    eps = torch.cat([g.abs().flatten() for g in grads.values()]).median().item()
    trainer.cfg.trainer.eps = eps
    trainer.fit()
    moved = {n: p.detach().float() - start[n].float() for n, p in trainer.engine.module.named_parameters()}
    worst, name = worst_rel_error(moved, {n: -0.5 * g / (g.abs() + eps) for n, g in grads.items()})
    assert worst <= 0.03, (name, worst)


@pytest.mark.parametrize("optimizer_dtype", ["fp32", pytest.param("bf16", marks=pytest.mark.skipif(
    not (shutil.which("c++") or shutil.which("g++")), reason="bf16 moments on the host need DeepSpeed's CPU Adam, "
    "which compiles at first use: no C++ compiler here"))])
def test_offloaded_optimizer_step_of_a_bf16_model(tmp_path, optimizer_dtype):
    """ZeRO-Offload of a bf16 model, fp32 or bf16 (trainer.optimizer_dtype) master weights, gradients and Adam
    moments on the host: one step moves each weight by AdamW's first update, -lr·g/(|g| + eps), of the window's
    full-sequence gradient g (HF, float32).  eps is the median |g|, so the update is neither sign(g) nor 0 and
    its error follows the gradient's; lr is large enough that bf16 weights resolve it."""
    trainer = make_trainer(tmp_path, dtype="bfloat16", zero_stage=1, offload_optimizer="cpu",
                           optimizer_dtype=optimizer_dtype, max_steps=1, lr=0.5, grad_clip=0.0)
    start = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    _, grads = hf_window_grads(copy.deepcopy(trainer.model).float(), trainer.docs)
    eps = torch.cat([g.abs().flatten() for g in grads.values()]).median().item()
    trainer.cfg.trainer.eps = eps
    trainer.fit()
    opt = trainer.engine.optimizer
    master = opt.single_partition_of_fp32_groups[0]
    want = torch.bfloat16 if optimizer_dtype == "bf16" else torch.float32
    assert master.device.type == "cpu" and master.dtype == master.grad.dtype == want
    moments = opt.optimizer.state[master]
    assert moments["exp_avg"].dtype == moments["exp_avg_sq"].dtype == want
    moved = {n: p.detach().float() - start[n].float() for n, p in trainer.engine.module.named_parameters()}
    expected = {n: -0.5 * g / (g.abs() + eps) for n, g in grads.items()}
    worst, name = worst_rel_error(moved, expected)
    assert worst <= 0.03, (name, worst)


def test_bf16_optimizer_states_need_a_bf16_model(tmp_path):
    with pytest.raises(ConfigError, match="optimizer_dtype=bf16 needs a bf16 model"):
        make_trainer(tmp_path, dtype="float32", zero_stage=1, optimizer_dtype="bf16")
    assert not (tmp_path / "run").exists()  # refused at construction: nothing written


def test_offloaded_kv_trains_like_device_kv(tmp_path):
    results = {}
    for mode in ("none", "all"):
        trainer = make_trainer(tmp_path / mode, offload=mode)
        assert trainer.rollout.offload == mode
        trainer.fit()
        results[mode] = {n: p.detach().clone() for n, p in trainer.engine.module.named_parameters()}
    worst = max(((results["all"][n] - p).norm() / p.norm()).item() for n, p in results["none"].items())
    assert worst <= 1e-6, worst


def test_float64_training_is_refused_with_a_reason(tmp_path):
    with pytest.raises(ConfigError, match="model.dtype=float64"):
        make_trainer(tmp_path, dtype="float64")


def test_existing_run_directory_is_refused_untouched(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "train.log").write_text("earlier run")
    with pytest.raises(ConfigError, match="already holds an earlier run"):
        make_trainer(tmp_path)
    assert (run / "train.log").read_text() == "earlier run"


def test_resume_from_a_training_checkpoint_continues_the_same_run(tmp_path):
    """4 steps straight == 2 steps, a checkpoint, a new process resuming to step 4 (weights, losses, data order)."""
    straight = make_trainer(tmp_path / "a", grad_accum=1, max_steps=4)
    straight_hist = straight.fit()
    first = make_trainer(tmp_path / "b", grad_accum=1, max_steps=4, checkpoint_every=2)
    first.setup()  # the same run, "killed" after its checkpoint at step 2
    for _ in range(2):
        first.history.append(first.train_step())
    first.save_checkpoint()
    first.checkpointer.close()
    assert [v.name for v in first.checkpointer.store.valid_versions()] == ["v000002"]
    resumed = make_trainer(tmp_path / "b", grad_accum=1, max_steps=4, checkpoint_every=2, resume=True)
    hist = resumed.fit()
    assert [s.step for s in hist] == [1, 2, 3, 4]
    assert [s.loss for s in hist] == pytest.approx([s.loss for s in straight_hist], rel=1e-6)
    for (name, p), (_, q) in zip(straight.engine.module.named_parameters(), resumed.engine.module.named_parameters()):
        assert torch.equal(p, q), name  # bit for bit on the CPU
    assert [v.name for v in resumed.checkpointer.store.valid_versions()] == ["v000002", "v000004"]


def test_resume_without_a_snapshot_starts_from_scratch(tmp_path, caplog):
    """A cluster's restart script passes checkpoint.resume=latest on every attempt, the first included (also one
    that died before its first snapshot, leaving train.log behind): the run starts from scratch and says so."""
    straight = make_trainer(tmp_path / "a", grad_accum=1, max_steps=2).fit()
    (tmp_path / "b" / "run").mkdir(parents=True)
    (tmp_path / "b" / "run" / "train.log").write_text("an attempt that died before its first snapshot\n")
    with caplog.at_level("WARNING", logger="rollout_dist"):
        hist = make_trainer(tmp_path / "b", grad_accum=1, max_steps=2, resume="latest").fit()
    assert "no valid snapshot" in caplog.text and "starting from scratch" in caplog.text
    assert [s.loss for s in hist] == [s.loss for s in straight]


def test_offload_beyond_host_memory_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setattr("rollout_dist.model.offload.available_host_bytes", lambda: 4096)
    with pytest.raises(ConfigError, match=r"rollout.offload=all of 2 layers for the longest document \(\d+ tokens\)"):
        make_trainer(tmp_path, offload="all")
    assert not (tmp_path / "run").exists()


def test_host_memory_check_counts_the_offloaded_optimizer(tmp_path, monkeypatch):
    """ZeRO-Offload's host bytes are 16 per parameter (fp32 master, gradient, 2 moments) or 8 in bf16; with
    offloaded K/V both are counted against the host memory available."""
    seen = []

    def check(nbytes, what, available=None, local_ranks=None):
        seen.append((nbytes, what))
    monkeypatch.setattr("rollout_dist.train.planner.check_host_memory", check)
    trainer = make_trainer(tmp_path / "a", zero_stage=1, offload_optimizer="cpu", offload="kv",
                           dtype="bfloat16", optimizer_dtype="bf16")
    n = sum(p.numel() for p in trainer.model.parameters())
    ad = CausalLMAdapter(trainer.model)
    kv = 2 * ad.num_layers * max(len(d.input_ids) for d in trainer.docs) * ad.kv_heads * ad.head_dim * 2
    assert seen[-1][0] == kv + 8 * n, (seen[-1], kv, n)
    assert "trainer.offload_optimizer=cpu (8 bytes per parameter, bf16)" in seen[-1][1]
    make_trainer(tmp_path / "b", zero_stage=2, offload_optimizer="cpu")
    assert seen[-1][0] == 16 * n and "rollout.offload" not in seen[-1][1]


def test_memory_check_warns_with_what_to_change(tmp_path, caplog):
    trainer = make_trainer(tmp_path, chunk=16)
    trainer.setup()
    caplog.clear()

    def ours(level):
        return [r.getMessage() for r in caplog.records if r.name.startswith("rollout_dist") and r.levelname == level]
    with caplog.at_level("INFO", logger="rollout_dist"):
        trainer.memory.check(capacity=1 << 40)
        assert any("predicted peak for the longest document" in m for m in ours("INFO")) and not ours("WARNING")
        trainer.memory.check(capacity=1 << 16)
    warning = ours("WARNING")
    assert warning and "rollout.offload=kv" in warning[-1] and "rollout.chunk_size" not in warning[-1]


def test_kept_outputs_are_sized_to_memory(tmp_path, caplog):
    """keep_attention with keep_attention_tokens=0: all of them when they fit, the last whole chunks' when only
    some do (the run then trains with them), none (and a warning) when there is no room."""
    from rollout_dist.engine.budget import estimate_peak
    from rollout_dist.model import CausalLMAdapter
    trainer = make_trainer(tmp_path, chunk=4, keep_attention=True, texts=["x" * 60, "y" * 30])
    trainer.setup()
    longest, adapter, memory = trainer.longest_doc, CausalLMAdapter(trainer.engine.module), trainer.memory
    # before the first backward the fixed part counts the gradients it will create (0 allocated on CPU)
    assert memory.fixed_bytes() == sum(p.numel() * p.element_size() for p in trainer.model.parameters())

    def peak(keep, keep_tokens=0):
        return estimate_peak(adapter, longest, 4, keep_attention=keep, keep_tokens=keep_tokens,
                             activation_per_token=memory.activation_per_token, fixed=memory.fixed_bytes()).total
    trainer.memory.fit_kept_outputs(capacity=1 << 40)
    assert trainer.rollout.keep_attention and trainer.rollout.keep_tokens == 0
    half = int((peak(False) + peak(True)) / 2 / 0.9)  # room for about half of the document's kept outputs
    trainer.memory.fit_kept_outputs(capacity=half)
    keep = trainer.rollout.keep_tokens
    assert 0 < keep < longest and keep % 4 == 0, keep
    assert peak(True, keep) <= 0.9 * half < peak(True, keep + 4)
    trainer.fit()
    with caplog.at_level("WARNING", logger="rollout_dist"):
        trainer.memory.fit_kept_outputs(capacity=1 << 10)
    assert not trainer.rollout.keep_attention and "no room for kept attention outputs" in caplog.text


def test_chunk_size_zero_is_picked_from_memory(tmp_path):
    trainer = make_trainer(tmp_path, chunk=0)
    trainer.setup()
    assert trainer.rollout.chunk_size == 512  # CPU: no GPU memory to size it by
    longest = max(len(d.input_ids) for d in trainer.docs)
    trainer.memory.pick_chunk_size(capacity=1 << 40)  # plenty: the whole document in one chunk
    assert trainer.rollout.chunk_size == longest
    trainer.memory.pick_chunk_size(capacity=1 << 10)  # nothing fits: the smallest candidate, capped by the document
    assert trainer.rollout.chunk_size == min(128, longest)
    trainer.fit()  # trains with the picked size


def test_long_documents_report_chunk_progress(tmp_path, monkeypatch):
    calls = []
    real = ExactRollout.run

    def run(self, *args, **kwargs):
        progress = kwargs.get("progress")
        if progress is not None:
            kwargs["progress"] = lambda *a: (calls.append(a), progress(*a))
        return real(self, *args, **kwargs)
    monkeypatch.setattr(ExactRollout, "run", run)
    monkeypatch.setattr("rollout_dist.train.metrics.CHUNK_BAR_MIN", 4)
    trainer = make_trainer(tmp_path, chunk=7, grad_accum=1, max_steps=1)
    trainer.fit()
    chunks = -(-len(trainer.docs[0].input_ids) // 7)
    assert chunks >= 4
    assert [c for c in calls if c[0] == "fill"][-1] == ("fill", chunks - 1, chunks - 1)
    assert [c for c in calls if c[0] == "backward"][-1] == ("backward", chunks, chunks)


def test_step_hooks_see_every_step_and_chunk_hooks_every_chunk_in_order(tmp_path):
    """The seam for what runs beside the loop: a step hook gets every step's stats, a chunk hook every chunk of
    every document of every step, in the order they run, each keyed (seed, step, document) as the rollout's
    random stream is (0-based step, the document's index in the corpus)."""
    steps, events = [], []
    trainer = make_trainer(tmp_path, grad_accum=2, max_steps=2, chunk=16, seed=5, step_hooks=[steps.append])
    trainer.chunk_hooks.append(lambda e: events.append((e.state.stream_key, e.phase, e.chunk, e.start, e.end)))
    history = trainer.fit()
    assert steps == history and [s.step for s in steps] == [1, 2]
    expected = []
    for step in range(2):
        for index, doc in enumerate(trainer.docs):  # no shuffle: both documents, in order, every step
            spans = trainer.rollout.spans(len(doc.input_ids))
            key = (5, step, index)
            expected += [(key, "fill", c, *spans[c]) for c in range(len(spans) - 1)]
            expected += [(key, "backward", c, *spans[c]) for c in reversed(range(len(spans)))]
    assert len(spans) >= 2 and events == expected
    assert sum(s.chunks for s in history) == sum(1 for e in events if e[1] == "backward")


def test_dropout_masks_follow_step_and_document_not_the_torch_generator(tmp_path):
    """Each document draws from the stream of (seed, step, document): reseeding torch's generators between steps
    (as a resumed run's restored or an extra draw would) changes nothing, while dropout does change the loss."""
    def losses(name, dropout, reseed):
        trainer = make_trainer(tmp_path / name, max_steps=2, attention_dropout=dropout)
        trainer.setup()
        out = []
        for _ in range(2):
            if reseed:
                torch.manual_seed(1234 + trainer.step)
            out.append(trainer.train_step().loss)
        return out
    plain = losses("plain", 0.3, reseed=False)
    assert losses("reseeded", 0.3, reseed=True) == plain
    assert losses("no_dropout", 0.0, reseed=False) != plain  # (inactive dropout would give the same losses)
