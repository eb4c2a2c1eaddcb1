"""The model a run trains: in train mode whether built from the config or loaded from model.path."""
import torch

from rollout_dist.config import ModelConfig, TrainConfig
from rollout_dist.model.build import build_model
from rollout_dist.train.model_setup import build_trainable_model


def test_a_model_loaded_from_a_directory_trains_in_train_mode(tmp_path):
    """from_pretrained returns eval mode: a loaded model's dropout was off while a built one's was on."""
    shape = dict(hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                 attention_dropout=0.3, dtype="float32")
    built, tokenizer = build_model(ModelConfig(**shape), torch.device("cpu"))
    built.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    for cfg in (TrainConfig(model=ModelConfig(**shape)), TrainConfig(model=ModelConfig(path=str(tmp_path / "m")))):
        model, _ = build_trainable_model(cfg, torch.device("cpu"))
        assert model.training and all(m.training for m in model.modules()), cfg.model.path
        assert model.config.attention_dropout == 0.3
        ids = torch.randint(0, 100, (1, 16), generator=torch.Generator().manual_seed(0))
        torch.manual_seed(1)
        a = model(ids).logits
        torch.manual_seed(2)
        assert not torch.equal(a, model(ids).logits)  # dropout acts
