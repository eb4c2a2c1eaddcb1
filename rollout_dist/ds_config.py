"""The DeepSpeed config of a run, from ``trainer.*``: optimizer, precision, clipping, ZeRO, LR schedule, TensorBoard."""
from __future__ import annotations

from pathlib import Path

import torch

from .config import TrainConfig

# warm-up starts at this fraction of trainer.lr (DeepSpeed's schedulers start at their minimum on step 0)
_WARMUP_START = 0.1


def group_lrs(cfg: TrainConfig) -> list[float]:
    """The peak learning rate of each optimizer parameter group, in the order train/engine_setup.py builds them:
    the model's (``trainer.lr``), and in memory mode the memory's (``memory.lr``, 0: ``trainer.lr``)."""
    lrs = [cfg.trainer.lr]
    if cfg.rollout.mode == "memory":
        lrs.append(cfg.memory.lr or cfg.trainer.lr)
    return lrs


def deepspeed_config(cfg: TrainConfig, dtype: torch.dtype, run_dir: Path, device: torch.device) -> dict:
    """The DeepSpeed config for this run: optimizer, precision, clipping, ZeRO stage, LR schedule, TensorBoard.

    The schedule scales every parameter group's own peak rate (``group_lrs``) by the same factor: WarmupCosineLR
    multiplies each group's initial lr by its ratio; WarmupLR and WarmupDecayLR are given one min/max per group
    (a single number would set every group to it)."""
    t = cfg.trainer
    lrs = group_lrs(cfg)
    # DeepSpeed's schedulers need >= 1 warm-up step and start it at their minimum: no warm-up = start at lr
    warmup = max(1, t.warmup_steps)
    start = _WARMUP_START if t.warmup_steps else 1.0
    if t.schedule == "cosine":
        scheduler = {"type": "WarmupCosineLR", "params": {
            "total_num_steps": t.max_steps, "warmup_num_steps": warmup, "warmup_type": "linear",
            "warmup_min_ratio": start, "cos_min_ratio": t.min_lr / t.lr}}
    elif t.schedule == "linear":
        scheduler = {"type": "WarmupDecayLR", "params": {
            "total_num_steps": t.max_steps, "warmup_num_steps": warmup, "warmup_type": "linear",
            "warmup_min_lr": _per_group([start * lr for lr in lrs]), "warmup_max_lr": _per_group(lrs)}}
    else:
        scheduler = {"type": "WarmupLR", "params": {
            "warmup_num_steps": warmup, "warmup_type": "linear",
            "warmup_min_lr": _per_group([start * lr for lr in lrs]), "warmup_max_lr": _per_group(lrs)}}
    low_precision = t.optimizer_dtype == "bf16"  # the trainer has checked that the model is bf16
    zero = {"stage": t.zero_stage}
    if t.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": t.offload_optimizer, "pin_memory": device.type == "cuda"}
    ds = {
        # the rollout marks accumulation boundaries itself (set_gradient_accumulation_boundary), so DeepSpeed
        # sees one micro-batch per step and never rescales the loss
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        "optimizer": {"type": "AdamW", "params": {
            "lr": t.lr, "betas": list(t.betas), "eps": t.eps, "weight_decay": t.weight_decay,
            # on CPU runs torch's AdamW, except where DeepSpeed needs its CPU Adam (bf16 moments on the host)
            "torch_adam": device.type != "cuda" and not (low_precision and t.offload_optimizer != "none")}},
        "scheduler": scheduler,
        "steps_per_print": 1 << 30,
        "tensorboard": {"enabled": t.tensorboard, "output_path": str(run_dir / "tensorboard"),
                        "job_name": "train"},
    }
    if dtype == torch.bfloat16:
        ds["bf16"] = {"enabled": True}
        if low_precision:
            # master weights, gradients (also their sum over chunks) and Adam moments in bf16
            ds["bf16"].update(bf16_master_weights_and_grads=True, bf16_optimizer_states=True)
        elif t.zero_stage >= 2:
            # chunk gradients add up in fp32 rather than bf16.  Not with ZeRO-1: DeepSpeed 0.19's ZeRO-1 with an
            # fp32 accumulator got the gradient of a step with several backward calls (one per chunk) wrong, its
            # norm 4.8x the true one (tests/test_trainer.py checks each stage against full-sequence HF); ZeRO-1
            # adds them in bf16 in the gradients of the weights, as ZeRO-0 and HF do
            ds["data_types"] = {"grad_accum_dtype": "fp32"}
    return ds


def _per_group(values: list[float]):
    """One value for a single group (as before memory mode: the config reads as it always did), else a list."""
    return values[0] if len(values) == 1 else list(values)
