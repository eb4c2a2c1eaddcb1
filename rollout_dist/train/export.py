"""The end of a run: the final model as an HF directory (``<run_dir>/final``, with the tokenizer) and
``summary.json``, both written by global rank 0 once every rank is done.

With pipeline stages each rank holds only its stage's layers: the stages of replica 0 send theirs to rank 0,
which loads them into a freshly built full model (on the CPU, in the training dtype) before saving it.

A memory-mode model (``MemoryModel``; with stages, joined as above: its memory's names carry global layer
indices too) is saved by its own ``save_pretrained``: the HF weights and
config exactly as plain transformers writes them (``AutoModelForCausalLM.from_pretrained`` loads them, without
the memory), and beside them ``memory.safetensors`` and ``memory_config.json`` (``MemoryModel.from_pretrained``
loads all of it).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ..config import MemoryConfig, ModelConfig, TrainConfig
from ..model import stage_state_dict
from ..model.build import build_model, materialize
from .context import RunContext
from .metrics import StepStats

log = logging.getLogger("rollout_dist")


def gather_full_state(module: torch.nn.Module, context: RunContext) -> dict | None:
    """The whole model's state dict on global rank 0 when the model is split over pipeline stages (the stages
    of replica 0 send theirs); None elsewhere, and None with one stage (the module is the whole model)."""
    layout = context.layout
    if layout.pp == 1:
        return None
    shards = [None] * layout.pp if context.is_main else None
    if layout.dp_rank == 0:
        torch.distributed.gather_object(stage_state_dict(module), shards, dst=0, group=layout.pipeline_group())
    if not context.is_main:
        return None
    return {k: v for shard in shards for k, v in shard.items()}


def full_model(model_cfg: ModelConfig, state: dict[str, torch.Tensor], dtype: torch.dtype,
               memory: MemoryConfig | None = None):
    """(model, tokenizer): the whole model of ``model_cfg`` (built on the meta device, or read from
    ``model.path``) in ``dtype``, holding ``state`` (every tensor, under the full model's names), on the CPU.
    With ``memory`` (a memory-mode run's ``MemoryConfig``) it is the ``MemoryModel`` wrapping that model, and
    ``state`` holds the wrapper's names (``model.*`` and the memory's)."""
    model, tokenizer = build_model(model_cfg, torch.device("cpu"), dtype=dtype, materialized=False)
    hf_state = state if memory is None else {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    model.load_state_dict(hf_state, strict=True, assign=True)
    materialize(model, torch.device("cpu"))
    if memory is not None:
        from ..model.memory import with_memory
        model = with_memory(model, memory)
        model.load_state_dict(state, strict=True)
    return model, tokenizer


def save_model_dir(model: torch.nn.Module, tokenizer, out: Path) -> None:
    """An HF directory: ``save_pretrained`` of the model (a ``MemoryModel``'s: the HF files plus its memory's)
    and of its tokenizer."""
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if getattr(model, "is_memory_model", False):
        log.info("final model: HF weights in %s (loadable by transformers alone), the memory's beside them "
                 "(memory.safetensors, memory_config.json: rollout_dist.MemoryModel.from_pretrained)", out)


def summarize(history: list[StepStats]) -> dict:
    """The run in figures: steps, first and last loss, every step's loss, tokens, seconds, peak memory."""
    return {"steps": len(history), "first_loss": history[0].loss, "last_loss": history[-1].loss,
            "losses": [s.loss for s in history],
            "tokens": sum(s.tokens for s in history), "seconds": sum(s.seconds for s in history),
            "peak_mem_gib": max(s.peak_mem_gib for s in history)}


def export_final(cfg: TrainConfig, run_dir: Path, module: torch.nn.Module, tokenizer, history: list[StepStats],
                 context: RunContext) -> dict | None:
    """Writes ``final/`` (if checkpoint.save_final) and ``summary.json``; collective, every rank calls it.
    Returns the summary on rank 0, None elsewhere."""
    context.barrier()
    full_state = gather_full_state(module, context) if cfg.checkpoint.save_final else None
    if not context.is_main:
        return None
    summary = summarize(history)
    if cfg.checkpoint.save_final:
        final = run_dir / "final"
        model = module
        if full_state is not None:
            # in the dtype it trained in: model.dtype=auto means bf16 on the GPUs but fp32 on this CPU
            model, _ = full_model(cfg.model, full_state, next(module.parameters()).dtype,
                                  memory=cfg.memory if cfg.rollout.mode == "memory" else None)
        save_model_dir(model, tokenizer, final)
        summary["final_model"] = str(final)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log.info("done: %d steps, loss %.4f -> %.4f; %s", summary["steps"], summary["first_loss"],
             summary["last_loss"], f"model saved to {summary['final_model']}" if "final_model" in summary
             else "final model not saved (checkpoint.save_final=false)")
    return summary
