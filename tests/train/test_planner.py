"""MemoryPlanner on its own (no DeepSpeed engine): host memory refused up front, chunk size and kept outputs
sized from a given capacity, the predicted peak and its warning."""
import pytest

from rollout_dist.config import (ConfigError, DataConfig, ModelConfig, RolloutConfig, TrainConfig,
                                 TrainerConfig)
from rollout_dist.engine import make_rollout
from rollout_dist.engine.budget import estimate_peak
from rollout_dist.model import CausalLMAdapter
from rollout_dist.parallel import RankLayout
from rollout_dist.train.context import RunContext
from rollout_dist.train.data_pipeline import DataPipeline
from rollout_dist.train.model_setup import build_trainable_model
from rollout_dist.train.planner import MemoryPlanner, check_host_fits


def setup(tmp_path, *, chunk=4, keep_attention=False, zero_stage=0, texts=("x" * 60, "y" * 30), **rollout_kw):
    docs = tmp_path / "docs"
    docs.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(texts):
        (docs / f"{i}.txt").write_text(text)
    cfg = TrainConfig(model=ModelConfig(dtype="float32", hidden_size=32, intermediate_size=48, num_layers=2,
                                        num_heads=4, num_kv_heads=2),
                      data=DataConfig(path=str(docs)),
                      rollout=RolloutConfig(chunk_size=chunk, keep_attention=keep_attention, **rollout_kw),
                      trainer=TrainerConfig(device="cpu", zero_stage=zero_stage))
    context = RunContext("cpu")
    model, tokenizer = build_trainable_model(cfg, context.device)
    data = DataPipeline(cfg.data, tokenizer, model.config.vocab_size, seed=0, progress=False)
    data.start(RankLayout(1, 1, rank=0, world=1))
    rollout = make_rollout(cfg.rollout)
    return cfg, model, MemoryPlanner(cfg, rollout, model, data, context)


def test_host_memory_is_refused_with_the_figures(tmp_path, monkeypatch):
    cfg, model, planner = setup(tmp_path, offload="kv")
    seen = []
    monkeypatch.setattr("rollout_dist.train.planner.check_host_memory", lambda n, what, **kw: seen.append((n, what)))
    check_host_fits(cfg, model, 60)
    ad = CausalLMAdapter(model)
    assert seen == [(2 * ad.num_layers * 60 * ad.kv_heads * ad.head_dim * 4,
                     "rollout.offload=kv of 2 layers for the longest document (60 tokens) 0.0 GiB")]
    monkeypatch.undo()
    monkeypatch.setattr("rollout_dist.model.offload.available_host_bytes", lambda: 4096)
    with pytest.raises(ConfigError, match=r"rollout.offload=kv of 2 layers for the longest document \(60 tokens\)"):
        check_host_fits(cfg, model, 60)


def test_host_memory_counts_the_largest_stage_times_the_local_processes(tmp_path, monkeypatch):
    """With pipeline stages each process offloads its stage's layers: the largest stage's share (the same on
    every rank) times the processes on this host."""
    cfg, model, _ = setup(tmp_path, offload="kv")
    cfg.parallel.pp = 2
    seen = []
    monkeypatch.setattr("rollout_dist.train.planner.check_host_memory",
                        lambda n, what, local_ranks=None: seen.append((n, what, local_ranks)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    check_host_fits(cfg, model, 60)
    ad = CausalLMAdapter(model)
    assert seen == [(2 * 1 * 60 * ad.kv_heads * ad.head_dim * 4, "rollout.offload=kv of 1 layers of the largest "
                     "pipeline stage for the longest document (60 tokens) 0.0 GiB", 2)]


def test_fixed_bytes_count_the_gradients_zero_2_does_not_add(tmp_path):
    params = None
    for stage in (0, 2):
        _, model, planner = setup(tmp_path / str(stage), zero_stage=stage)
        params = sum(p.numel() * p.element_size() for p in model.parameters())
        assert planner.fixed_bytes() == (params if stage == 0 else 0)  # nothing allocated on the CPU device
    assert params > 0


def test_chunk_size_is_picked_from_capacity(tmp_path):
    _, _, planner = setup(tmp_path, chunk=0)
    assert planner.rollout.chunk_size == 512  # rollout.chunk_size=0 on CPU until picked
    planner.plan()
    assert planner.rollout.chunk_size == 512  # no GPU to size it by
    planner.pick_chunk_size(capacity=1 << 40)
    assert planner.rollout.chunk_size == 60  # the whole longest document
    planner.pick_chunk_size(capacity=1 << 10)
    assert planner.rollout.chunk_size == 60  # the smallest candidate (128), capped by the document


def test_kept_outputs_are_sized_to_capacity(tmp_path, caplog):
    _, model, planner = setup(tmp_path, keep_attention=True)
    adapter = CausalLMAdapter(model)

    def peak(keep, keep_tokens=0):
        return estimate_peak(adapter, 60, 4, keep_attention=keep, keep_tokens=keep_tokens,
                             activation_per_token=planner.activation_per_token, fixed=planner.fixed_bytes()).total
    planner.fit_kept_outputs(capacity=1 << 40)
    assert planner.rollout.keep_attention and planner.rollout.keep_tokens == 0  # all of them
    half = int((peak(False) + peak(True)) / 2 / 0.9)
    planner.fit_kept_outputs(capacity=half)
    keep = planner.rollout.keep_tokens
    assert 0 < keep < 60 and keep % 4 == 0 and peak(True, keep) <= 0.9 * half < peak(True, keep + 4)
    assert planner.predicted_peak().total == peak(True, keep)
    with caplog.at_level("WARNING", logger="rollout_dist"):
        planner.fit_kept_outputs(capacity=1 << 10)
    assert not planner.rollout.keep_attention and "no room for kept attention outputs" in caplog.text


def test_check_warns_only_when_the_peak_does_not_fit(tmp_path, caplog):
    _, _, planner = setup(tmp_path, chunk=16)
    with caplog.at_level("INFO", logger="rollout_dist"):
        planner.check(capacity=1 << 40)
        assert "predicted peak for the longest document" in caplog.text
        assert not [r for r in caplog.records if r.levelname == "WARNING"]
        planner.check(capacity=1 << 16)
    warning = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warning and "rollout.offload=kv" in warning[-1]


def test_a_pipeline_stage_plans_its_own_part(tmp_path, caplog):
    """On a GPU every stage of pp > 1 checks its predicted peak at set-up; the probe of activations needed the
    whole model's embedding and final norm and failed on every stage."""
    from rollout_dist.model import trim_to_stage

    for stage in (0, 1):
        cfg, model, planner = setup(tmp_path / str(stage), chunk=0)
        trim_to_stage(model, stage, [1, 1])
        planner.pick_chunk_size(capacity=1 << 40)
        assert planner.rollout.chunk_size == 60  # the longest document, in one chunk
        with caplog.at_level("INFO", logger="rollout_dist"):
            planner.check(capacity=1 << 40)
        assert "predicted peak for the longest document" in caplog.text
