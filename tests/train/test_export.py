"""Export of the final model: with pipeline stages, the model rank 0 assembles is saved in the training dtype."""
import json
from types import SimpleNamespace

import torch
from safetensors import safe_open

from rollout_dist.config import CheckpointConfig, ModelConfig, TrainConfig
from rollout_dist.model.build import build_model
from rollout_dist.train import export
from rollout_dist.train.metrics import StepStats


def test_stages_gathered_on_the_cpu_are_saved_in_the_training_dtype(tmp_path, monkeypatch):
    """model.dtype=auto trains in bf16 on GPUs; rank 0 rebuilt the full model on the CPU, where auto is fp32, and
    exported float32 weights (twice the size, not what was trained)."""
    cfg = TrainConfig(model=ModelConfig(hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                                        num_kv_heads=2, dtype="auto"),
                      checkpoint=CheckpointConfig(dir=str(tmp_path)))
    trained, tokenizer = build_model(cfg.model, torch.device("cpu"))
    trained = trained.to(torch.bfloat16)
    full = {k: v.clone() for k, v in trained.state_dict().items()}
    monkeypatch.setattr(export, "gather_full_state", lambda module, context: full)  # what two stages send
    context = SimpleNamespace(layout=SimpleNamespace(pp=2), is_main=True, barrier=lambda: None)
    stage = torch.nn.Linear(2, 2).to(torch.bfloat16)  # this rank's stage: only its dtype matters here
    history = [StepStats(step=1, loss=2.0, tokens=10, chunks=1, seconds=1.0, tokens_per_s=10.0, peak_mem_gib=0.1,
                         lr=1e-3, grad_norm=None)]
    export.export_final(cfg, tmp_path, stage, tokenizer, history, context)
    with safe_open(tmp_path / "final" / "model.safetensors", "pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
        weight = f.get_tensor("model.embed_tokens.weight")
    assert dtypes == {torch.bfloat16}
    assert torch.equal(weight, full["model.embed_tokens.weight"])
    assert json.loads((tmp_path / "summary.json").read_text())["final_model"] == str(tmp_path / "final")
