"""The DeepSpeed engine of a run, and the fixes its defaults need for steps of many backward calls."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..config import TrainConfig
from ..ds_config import deepspeed_config, group_lrs
from ..parallel import RankLayout
from .model_setup import model_dtype

log = logging.getLogger("rollout_dist")


def initialize_engine(cfg: TrainConfig, model: torch.nn.Module, layout: RankLayout, run_dir: Path,
                      device: torch.device):
    """``deepspeed.initialize`` with the run's DeepSpeed config (ds_config.py) and parameter groups
    (``parameter_groups``), placed at step 0: the LR schedule at iteration 0 and Adam's step counts at 0."""
    import deepspeed

    dtype = model_dtype(model)
    if dtype == torch.bfloat16 and cfg.trainer.zero_stage == 0:
        log.warning("bf16 with trainer.zero_stage=0: DeepSpeed adds the gradients of all chunks in bf16; "
                    "trainer.zero_stage=2 adds them in fp32")
    if layout.pp > 1:
        for p in model.parameters():
            p.model_parallel = True  # unique to this stage: DeepSpeed sums its grad norm over stages
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=parameter_groups(cfg, model),
                                           config=deepspeed_config(cfg, dtype, run_dir, device),
                                           mpu=layout if layout.pp > 1 else None)
    # DeepSpeed's schedulers start at iteration -1, i.e. lr 0, so the first step would not learn; place them
    # at iteration 0 (engine.step() advances them after every optimizer step)
    engine.lr_scheduler.step(0)
    restart_step_counts(engine.optimizer)
    return engine


def parameter_groups(cfg: TrainConfig, model: torch.nn.Module) -> list[dict]:
    """The optimizer's parameter groups: the model's parameters (``trainer.lr``, ``trainer.weight_decay``), and
    in memory mode the memory's (``MemoryModel.memory_parameters()``: gates, decays, projections, the
    chunk-index track) in a group of their own with ``memory.lr`` (0: ``trainer.lr``) and
    ``memory.weight_decay``.  The LR schedule scales each group's rate by the same factor (ds_config.py)."""
    lrs = group_lrs(cfg)
    memory = {id(p) for p in model.memory_parameters()} if cfg.rollout.mode == "memory" else set()
    groups = [{"params": [p for p in model.parameters() if id(p) not in memory], "lr": lrs[0],
               "weight_decay": cfg.trainer.weight_decay}]
    if memory:
        groups.append({"params": [p for p in model.parameters() if id(p) in memory], "lr": lrs[1],
                       "weight_decay": cfg.memory.weight_decay})
        log.info("optimizer: %d memory parameters (%.3fM values) in their own group, lr %.2e, weight decay %g",
                 len(groups[1]["params"]), sum(p.numel() for p in groups[1]["params"]) / 1e6, lrs[1],
                 cfg.memory.weight_decay)
    return groups


def restart_step_counts(optimizer) -> None:
    """DeepSpeed's fp16/bf16 wrappers for ZeRO-0 (FP16_Optimizer, FP16_UnfusedOptimizer) create the inner
    optimizer's states by stepping it once on zero gradients.  Adam's moments stay zero, but its step count starts
    at 1, so the first real step is bias-corrected as step 2: updates of about 0.7x AdamW's for the first tens of
    steps.  Set the counts back to 0, as a fresh optimizer has them (a resumed run loads its own afterwards)."""
    if type(optimizer).__name__ not in ("FP16_Optimizer", "FP16_UnfusedOptimizer"):
        return
    inner = optimizer.optimizer
    for group in inner.param_groups:
        if "step" in group:
            group["step"] = 0
    for state in inner.state.values():
        if "step" in state:
            state["step"] = torch.zeros_like(state["step"]) if torch.is_tensor(state["step"]) else 0
