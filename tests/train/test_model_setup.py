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


def _shape(**kw):
    return ModelConfig(hidden_size=32, intermediate_size=48, num_layers=4, num_heads=4, num_kv_heads=2,
                       dtype="float32", **kw)


def test_a_stage_is_materialized_alone_with_the_weights_of_the_whole_model():
    """Pipeline ranks build on the meta device, trim to their stage, then initialise only that: each module from
    the stream of (seed, its name in the full model), so a stage's weights equal one process's, bit for bit."""
    from rollout_dist.model import stage_state_dict, trim_to_stage
    from rollout_dist.model.build import materialize

    cpu = torch.device("cpu")
    whole, _ = build_model(_shape(), cpu, seed=5)
    reference = whole.state_dict()
    before = torch.get_rng_state()
    for stage, counts in ((0, [1, 3]), (1, [1, 3]), (1, [2, 1, 1])):
        model, _ = build_model(_shape(), cpu, seed=5, materialized=False)
        assert all(p.is_meta for p in model.parameters())  # nothing allocated before the trim
        trim_to_stage(model, stage, counts)
        materialize(model, cpu)
        got = stage_state_dict(model)
        assert got and all(torch.equal(t, reference[name]) for name, t in got.items()), (stage, counts)
        assert sum(t.numel() for t in got.values()) < sum(t.numel() for t in reference.values())
    assert torch.equal(torch.get_rng_state(), before)  # initialisation leaves the caller's generator alone
    other, _ = build_model(_shape(), cpu, seed=6)
    assert not torch.equal(other.lm_head.weight, whole.lm_head.weight)


def test_a_built_model_is_the_hf_model_of_its_weights():
    """Materialised on the device (rotary buffers computed again, weights initialised in place), the model
    computes what HF's own model with the same weights computes."""
    from transformers import LlamaForCausalLM

    model, _ = build_model(_shape(), torch.device("cpu"), seed=1)
    reference = LlamaForCausalLM(model.config)
    reference.load_state_dict(model.state_dict())
    ids = torch.randint(0, 100, (1, 24), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference.eval()(ids).logits, rtol=0, atol=0)
