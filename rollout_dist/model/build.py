"""Building the HF causal LM and its tokenizer that a run trains, from ``model.*`` of the config."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..config import ConfigError, ModelConfig
from ..tokenizer import byte_tokenizer

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def build_model(cfg: ModelConfig, device: torch.device, dtype: torch.dtype | None = None):
    """(model, tokenizer): from ``cfg.path`` (local HF directory) or built from the shape in ``cfg``, in ``dtype``
    (default: ``cfg.dtype``, where auto is bf16 on a GPU and fp32 on the CPU)."""
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
    else:
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
            attn_implementation="sdpa", **extra)
        if device.type == "cuda":
            # initialise on the GPU in the training dtype: in fp32 on the CPU an 8B model takes minutes and 32 GB
            with torch.device(device):
                model = model_cls._from_config(hf_config, dtype=dtype)
        else:
            model = model_cls(hf_config)
    model.config.use_cache = False
    return model.to(device=device, dtype=dtype), tokenizer
