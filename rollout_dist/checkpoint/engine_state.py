"""What of a DeepSpeed engine a snapshot holds, taken from the same sources DeepSpeed's own ``save_checkpoint``
uses (the module's ``state_dict``, the optimizer's, the LR scheduler's, the step counters) and put back as its
``load_checkpoint`` does, without DeepSpeed's files.

Which rank holds what (``roles``): the model of a pipeline stage is written by that stage's data-parallel rank 0
(every replica holds the same weights); the optimizer by that rank too at ZeRO 0 (replicated), and by every rank
at ZeRO 1/2, whose optimizer state is this rank's flat partition (``single_partition_of_fp32_groups``,
``base_optimizer_state``), stored as the partition it is, with ``param_slice_mappings`` and ``param_shapes``
(parameter name -> shape, in flat order) to map it back to parameters.  A stage's module state keeps the
stage's own (local) layer names; ``stage`` records which global decoder layers they are (rollout_dist.model.stage
``global_name`` maps them).  Every rank writes its own loop state.
"""
from __future__ import annotations

import torch

from ..parallel import RankLayout


def roles(layout: RankLayout, zero_stage: int) -> dict:
    """What this rank writes, and from which rank each part of its state is read back."""
    model_rank = layout.pipeline_ranks(0)[layout.stage] if layout.pp > 1 else layout.stage
    return {"model": layout.dp_rank == 0, "optimizer": zero_stage > 0 or layout.dp_rank == 0,
            "model_from": model_rank, "optimizer_from": layout.rank if zero_stage > 0 else model_rank}


def capture(engine, role: dict) -> dict:
    """This rank's share of the engine's state (live tensors: copy them before training goes on)."""
    state = {"lr_scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None,
             "counters": {"global_steps": engine.global_steps, "global_samples": engine.global_samples,
                          "skipped_steps": engine.skipped_steps}}
    if role["model"]:
        state["module"] = engine.module.state_dict()  # a pipeline stage's names are local: see "stage"
        info = getattr(engine.module, "rollout_stage", None)
        state["stage"] = None if info is None else {
            "stage": info.stage, "num_stages": info.num_stages, "first_layer": info.first_layer,
            "num_layers": info.num_layers, "total_layers": info.total_layers}
    if role["optimizer"]:
        state["optimizer"] = engine.optimizer.state_dict()
        if engine.zero_optimization():
            state["param_shapes"] = engine._get_zero_param_shapes()
    return state


def restore(engine, module_state: dict, optimizer_state: dict, own: dict, device: torch.device) -> None:
    """Puts the engine where the snapshot was: weights, optimizer (ZeRO: this rank's partition, fp32 master
    weights included), LR schedule, step counters."""
    engine.module.load_state_dict({k: v.to(device) for k, v in module_state["module"].items()}, strict=True)
    opt = optimizer_state["optimizer"]
    if engine.zero_optimization():
        dp = engine.optimizer.partition_count[0] if hasattr(engine.optimizer, "partition_count") else 1
        rank = torch.distributed.get_rank(group=engine.optimizer.dp_process_group)
        parts = [None] * dp
        parts[rank] = opt
        engine.optimizer.load_state_dict(parts, load_optimizer_states=True, load_from_fp32_weights=True)
    else:
        engine.optimizer.load_state_dict(opt)
    if engine.lr_scheduler is not None and own.get("lr_scheduler") is not None:
        engine.lr_scheduler.load_state_dict(own["lr_scheduler"])
    for key, value in own["counters"].items():
        setattr(engine, key, value)
