"""Every shipped Hydra config composes and passes its checks; bad values are named."""
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from rollout_dist.config import ConfigError, TrainConfig, to_train_config

CONF = Path(__file__).resolve().parents[1] / "hydra_conf"
GROUPS = {d.name: sorted(p.stem for p in d.glob("*.yaml")) for d in CONF.iterdir() if d.is_dir()}


def load(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return to_train_config(compose(config_name="config", overrides=list(overrides)))


def test_groups_are_the_documented_ones():
    assert GROUPS["model"] == ["llama3_8b", "tiny", "tinyllama_1b"]
    assert set(GROUPS) >= {"model", "data", "rollout", "trainer", "checkpoint"}


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_shipped_option_composes(group, option):
    prefix = "+" if group == "experiment" else ""  # experiments are opt-in: not in the defaults list
    cfg = load(f"{prefix}{group}={option}")
    assert isinstance(cfg, TrainConfig)


def test_defaults_are_the_embedded_tiny_run():
    cfg = load()
    assert cfg.model.name == "tiny" and cfg.model.path is None and cfg.data.path is None
    assert cfg.rollout.mode == "exact" and cfg.checkpoint.dir.startswith("runs/")


def test_model_shapes_match_their_names():
    tl = load("model=tinyllama_1b").model
    assert (tl.num_layers, tl.hidden_size, tl.intermediate_size, tl.num_heads, tl.num_kv_heads, tl.vocab_size) == \
        (22, 2048, 5632, 32, 4, 32000)
    l3 = load("model=llama3_8b").model
    assert (l3.num_layers, l3.hidden_size, l3.intermediate_size, l3.num_heads, l3.num_kv_heads, l3.vocab_size) == \
        (32, 4096, 14336, 32, 8, 128256)


@pytest.mark.parametrize("override,key", [
    ("rollout.chunk_size=-8", "rollout.chunk_size"),
    ("rollout.mode=recurrent", "rollout.mode"),
    ("rollout.attention=xformers", "rollout.attention"),
    ("trainer.zero_stage=3", "trainer.zero_stage"),
    ("trainer.offload_optimizer=nvme", "trainer.offload_optimizer"),
    ("trainer.offload_optimizer=cpu", "trainer.offload_optimizer"),  # with zero_stage 0
    ("rollout.offload=disk", "rollout.offload"),
    ("rollout.offload_layers=-2", "rollout.offload_layers"),
    ("rollout.offload_layers=20", "rollout.offload_layers"),  # with offload none
    ("trainer.optimizer_dtype=fp16", "trainer.optimizer_dtype"),
    ("trainer.optimizer_dtype=bf16", "trainer.optimizer_dtype"),  # with zero_stage 0
    ("rollout.keep_attention_tokens=-4096", "rollout.keep_attention_tokens"),
    ("trainer.grad_accum=0", "trainer.grad_accum"),
    ("trainer.schedule=step", "trainer.schedule"),
    ("model.dtype=float16", "model.dtype"),
    ("model.num_kv_heads=3", "model.num_kv_heads"),
    ("data.max_doc_tokens=1", "data.max_doc_tokens"),
])
def test_bad_values_name_their_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load(override)


def test_unknown_key_is_refused():
    with pytest.raises(Exception, match="chunk_sise"):
        load("rollout.chunk_sise=4")


def test_attention_kernel_names_agree_with_the_model_code():
    from rollout_dist.config import ATTENTION_KERNELS, OFFLOAD_MODES
    from rollout_dist.model.attention import KERNELS
    from rollout_dist.model.offload import OFFLOAD_MODES as MODEL_OFFLOAD_MODES
    assert ATTENTION_KERNELS == KERNELS
    assert OFFLOAD_MODES == MODEL_OFFLOAD_MODES


def test_offload_with_pipeline_stages_composes_except_in_memory_mode():
    cfg = load("rollout.offload=all", "rollout.offload_layers=2", "parallel.pp=4")  # each stage's own layers
    assert (cfg.rollout.offload, cfg.rollout.offload_layers, cfg.parallel.pp) == ("all", 2, 4)
    with pytest.raises(ConfigError, match="rollout.mode=memory carries a small fixed-size state"):
        load("rollout.mode=memory", "rollout.chunk_size=16", "rollout.offload=kv", "parallel.pp=2")


def test_8b_offload_recipe_composes():
    cfg = load("model=llama3_8b", "rollout.offload=kv", "trainer.zero_stage=2", "trainer.offload_optimizer=cpu")
    assert (cfg.rollout.offload, cfg.trainer.offload_optimizer, cfg.trainer.zero_stage) == ("kv", "cpu", 2)
    recipe = load("+experiment=llama3_8b_500k")  # the settings measured at 500K tokens (docs/performance.md)
    assert recipe.model.name == "llama3_8b" and recipe.model.num_layers == 32
    assert (recipe.rollout.offload, recipe.rollout.offload_layers, recipe.rollout.chunk_size) == ("kv", 20, 1024)
    assert (recipe.trainer.zero_stage, recipe.trainer.offload_optimizer, recipe.trainer.optimizer_dtype) == \
        (1, "cpu", "bf16")


def test_chunk_size_zero_means_picked_from_memory():
    assert load("rollout.chunk_size=0").rollout.chunk_size == 0


@pytest.mark.parametrize("override,message", [
    # Hydra's own error for a misspelt key suggests "+key=value", which adds the key: it must not then be ignored
    ("+rolout.chunk_size=64", "rolout.chunk_size=64: unknown key 'rolout' in the config; did you mean "
                              "rollout.chunk_size=64?"),
    ("+trainer.max_stepz=3", "trainer.max_stepz=3: unknown key 'max_stepz' in trainer; did you mean "
                             "trainer.max_steps=3?"),
    ("+experimnt=tinyllama_2m", "did you mean +experiment=tinyllama_2m?"),
    ("+rollout.zzzzz=1", "unknown key 'zzzzz' in rollout, whose keys are mode, bptt_chunks, loss_weighting"),
])
def test_keys_added_with_plus_must_exist(override, message):
    with pytest.raises(ConfigError) as err:
        load(override)
    assert message in str(err.value) and "rollout_dist/config.py" in str(err.value)


def test_free_form_fields_and_experiments_keep_working():
    from rollout_dist.config import check_keys
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        check_keys(compose(config_name="config", overrides=["+planner.boundary_weights.heading=0.9"]))  # a dict
    cfg = load("+experiment=tinyllama_2m", "planner.boundary_weights.section=0.9")
    assert cfg.planner.boundary_weights["section"] == 0.9 and cfg.rollout.offload == "kv"


def test_optional_groups_are_the_groups_outside_the_defaults_list():
    from rollout_dist.config import OPTIONAL_GROUPS
    defaults = (CONF / "config.yaml").read_text()
    assert sorted(OPTIONAL_GROUPS) == sorted(g for g in GROUPS if f"- {g}:" not in defaults)


def hydra_error(*overrides):
    with pytest.raises(Exception) as err:
        load(*overrides)
    return err.value


@pytest.mark.parametrize("override,message", [
    ("rollout.chunk_sise=64", "rollout.chunk_sise=64: unknown key 'chunk_sise' in rollout; did you mean "
                              "rollout.chunk_size=64?"),
    ("rolout.chunk_size=64", "rolout.chunk_size=64: unknown key 'rolout' in the config; did you mean "
                             "rollout.chunk_size=64?"),
    ("trainer.max_steps=abc", "trainer.max_steps=abc: trainer.max_steps takes an integer, not 'abc'"),
    ("trainer.lr=fast", "trainer.lr=fast: trainer.lr takes a number, not 'fast'"),
    ("rollout.keep_attention=maybe", "rollout.keep_attention=maybe: rollout.keep_attention takes true or false"),
    ("parallel.dp=x", "parallel.dp=x: parallel.dp takes an integer or null, not 'x'"),
    ("model=gpt5", "model=gpt5: no config 'model/gpt5' in hydra_conf/; the options of model are llama3_8b, tiny, "
                   "tinyllama_1b"),
    ("trainer.betas=[1,2", "trainer.betas=[1,2: not a valid override (no viable alternative at input '[1,2')"),
    ("experiment=tinyllama_2m", "use +experiment=tinyllama_2m"),
])
def test_hydra_errors_become_one_line_naming_key_and_value(override, message):
    from rollout_dist.cli import command_line_error
    line = command_line_error(hydra_error(override), [override])
    assert message in line and "\n" not in line


def test_other_errors_are_not_taken_for_command_line_errors():
    from rollout_dist.cli import command_line_error
    assert command_line_error(RuntimeError("a bug"), []) is None


def test_unresolvable_interpolation_is_a_config_error():
    with pytest.raises(ConfigError, match=r"trainer\.max_steps: Interpolation key 'oops' not found"):
        load("trainer.max_steps=${oops}")
