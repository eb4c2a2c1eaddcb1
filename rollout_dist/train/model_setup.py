"""The model a run trains: built with the refusals that must come before anything is written, wrapped with memory
mode's per-layer state (``rollout.mode=memory``), and trimmed to this rank's pipeline stage once the layout is
known."""
from __future__ import annotations

import torch

from ..config import ConfigError, ParallelConfig, TrainConfig
from ..model import stage_layer_counts, trim_to_stage
from ..model.build import build_model, materialize
from ..parallel import RankLayout


def build_trainable_model(cfg: TrainConfig, device: torch.device):
    """(model, tokenizer) for training (in train mode), refusing what DeepSpeed cannot train (float64 gradients)
    or what the config contradicts (bf16 optimizer states of a non-bf16 model) with the key to change.  In
    ``rollout.mode=memory`` the model is the HF model wrapped by ``with_memory(model, cfg.memory)`` (a
    ``MemoryModel``, whose memory parameters are created here, after the HF weights, from the same seed)."""
    if cfg.model.dtype == "float64":
        raise ConfigError("model.dtype=float64 is for the API's exactness checks; DeepSpeed does not reduce "
                          "float64 gradients, so train in float32 or bfloat16")
    # with pipeline stages nothing is placed on the device before the model is trimmed to this rank's stage
    model, tokenizer = build_model(cfg.model, device, seed=cfg.trainer.seed, materialized=cfg.parallel.pp == 1)
    model.train()  # from_pretrained returns a model in eval mode: its dropout would be off while a built one's is on
    if cfg.trainer.optimizer_dtype == "bf16" and model.dtype != torch.bfloat16:
        raise ConfigError(f"trainer.optimizer_dtype=bf16 needs a bf16 model; model.dtype gives "
                          f"{str(model.dtype).replace('torch.', '')} on {device}: set "
                          "model.dtype=bfloat16 or trainer.optimizer_dtype=fp32")
    if cfg.rollout.mode == "memory":
        from ..model.memory import with_memory
        try:
            # a model still on the meta device (pipeline stages) gets its memory on the device, from the generator
            # state one process has here: every stage's memory starts as one process's
            model = with_memory(model, cfg.memory, device=device if cfg.parallel.pp > 1 else None)
        except (TypeError, ValueError) as err:  # a model family memory mode does not wrap
            raise ConfigError(f"rollout.mode=memory: {err}") from None
        model.train()
    return model, tokenizer


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype a model trains in (its parameters'): an HF model's ``.dtype``, also for a ``MemoryModel``."""
    return next(model.parameters()).dtype


def trim_to_this_stage(model: torch.nn.Module, parallel: ParallelConfig, layout: RankLayout,
                       longest_doc: int, device: torch.device) -> list[int]:
    """Keeps only this rank's stage of ``model`` (in place) and only then places it on ``device`` (a built model
    is initialised there with the values one process holding all layers gets); returns the decoder layers of
    every stage, balanced by training FLOPs at the longest document's length unless parallel.stage_layers gives
    them.  A split the model does not allow is a ``ConfigError``.  A ``MemoryModel`` keeps its stage's layers'
    memory (on the device already) and, on the first stage, the chunk-index track."""
    try:
        counts = stage_layer_counts(model, layout.pp, parallel.stage_layers, tokens=longest_doc)
        trim_to_stage(model, layout.stage, counts)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    materialize(model.model if getattr(model, "is_memory_model", False) else model, device)
    return counts
