"""Building the HF causal LM and its tokenizer that a run trains, from ``model.*`` of the config.

A model built from its shape is initialised module by module, each module's draws from a generator seeded with
xxhash64 of (seed, the module's name in the full model), with HF's own ``_init_weights``.  So the weights do not
depend on which modules a process holds: a pipeline stage builds the whole model on the meta device (no memory),
trims it to its layers, and materialises only those (``materialize``), with the values one process holding the
whole model gets.  A model loaded from ``model.path`` is read on the CPU, trimmed, and then moved to the device.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..config import ConfigError, ModelConfig
from ..seeding import derive_seed, seeded
from ..tokenizer import byte_tokenizer
from .stage import global_name

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def build_model(cfg: ModelConfig, device: torch.device, dtype: torch.dtype | None = None, *, seed: int = 0,
                materialized: bool = True):
    """(model, tokenizer): from ``cfg.path`` (local HF directory) or built from the shape in ``cfg``, in ``dtype``
    (default: ``cfg.dtype``, where auto is bf16 on a GPU and fp32 on the CPU), initialised from ``seed``.

    ``materialized=False`` leaves the work of placing it for later (``materialize`` after trimming to a stage): a
    built model stays on the meta device, a loaded one on the CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, \
        MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    dtype = dtype or _DTYPES.get(cfg.dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if cfg.path is not None:
        path = Path(os.path.expanduser(cfg.path))
        if not path.is_dir():
            raise ConfigError(f"model.path={cfg.path!r}: no such directory; give a local HF model directory "
                              "(one written by save_pretrained, with config.json and weights)")
        if not (path / "config.json").is_file():
            raise ConfigError(f"model.path={cfg.path!r} holds no config.json, so it is not an HF model directory")
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except Exception as err:  # transformers raises several types here
            raise ConfigError(f"model.path={cfg.path!r}: could not load its tokenizer ({err}); save the "
                              "tokenizer next to the weights with tokenizer.save_pretrained") from None
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
        model.config.use_cache = False
        return (model.to(device) if materialized else model), tokenizer
    families = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
                "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
    config_cls, model_cls = families[cfg.family]
    tokenizer = byte_tokenizer()
    if cfg.vocab_size < len(tokenizer):
        raise ConfigError(f"model.vocab_size={cfg.vocab_size} is smaller than the built-in byte tokenizer's "
                          f"{len(tokenizer)} tokens")
    extra = {"sliding_window": None} if cfg.family == "mistral" else {}
    hf_config = config_cls(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, max_position_embeddings=cfg.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=cfg.tie_word_embeddings, attention_dropout=cfg.attention_dropout,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=None, pad_token_id=None,
        attn_implementation="sdpa", use_cache=False, **extra)
    with torch.device("meta"):
        model = model_cls._from_config(hf_config, dtype=dtype)
    model.rollout_init_seed = seed
    if materialized:
        materialize(model, device)
    return model, tokenizer


@torch.no_grad()
def materialize(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Places ``model`` (possibly trimmed to a pipeline stage) on ``device``.  Parameters still on the meta device
    get storage there and each module is initialised by HF's ``_init_weights`` from the generators seeded by (the
    build seed, its name in the full model), which are then restored; real weights (loaded from a directory, or
    assigned) are moved.  The rotary embedding's buffers are computed again from the config."""
    if any(p.is_meta for p in model.parameters()):
        _initialize_keyed(model, device)
    rotary = model.model.rotary_emb  # non-persistent buffers (inv_freq), meta in a model built there
    with torch.device(device):
        model.model.rotary_emb = type(rotary)(config=model.config)
    model.to(device)
    if getattr(model.config, "tie_word_embeddings", False) and model.lm_head is not None:
        model.tie_weights()
    return model


def _initialize_keyed(model: torch.nn.Module, device: torch.device) -> None:
    info = getattr(model, "rollout_stage", None)
    model.to_empty(device=device)
    for name, module in model.named_modules():
        with seeded(derive_seed(model.rollout_init_seed, global_name(name, info)), device):
            model._init_weights(module)
