"""What of a DeepSpeed engine a snapshot holds, taken from the same sources DeepSpeed's own ``save_checkpoint``
uses (the module's ``state_dict``, the optimizer's, the LR scheduler's, the step counters) and put back as its
``load_checkpoint`` does, without DeepSpeed's files.

Which rank holds what (``roles``): the model of a pipeline stage is written by that stage's data-parallel rank 0
(every replica holds the same weights); the optimizer by that rank too at ZeRO 0 (replicated), and by every rank
at ZeRO 1/2, whose optimizer state is this rank's flat partition (``single_partition_of_fp32_groups``,
``base_optimizer_state``), stored as the partition it is, with ``param_slice_mappings`` and ``param_shapes``
(parameter name -> shape, in flat order) to map it back to parameters (``weights_from_partitions``).  At ZeRO 1/2
the model's weights are the masters rounded, so a snapshot keeps the masters only (``weights: optimizer``; the
module part then holds buffers) and a resume rebuilds the weights from them, as a step does.  A stage's module
state keeps the stage's own (local) layer names; ``stage`` records which global decoder layers they are
(rollout_dist.model.stage ``global_name`` maps them).  Every rank writes its own loop state.
"""
from __future__ import annotations

import torch

from ..parallel import RankLayout


def roles(layout: RankLayout, zero_stage: int) -> dict:
    """What this rank writes, and from which rank each part of its state is read back."""
    model_rank = layout.pipeline_ranks(0)[layout.stage]  # the stage's data-parallel rank 0
    return {"model": layout.dp_rank == 0, "optimizer": zero_stage > 0 or layout.dp_rank == 0,
            "model_from": model_rank, "optimizer_from": layout.rank if zero_stage > 0 else model_rank}


def capture(engine, role: dict) -> dict:
    """This rank's share of the engine's state (live tensors: copy them before training goes on)."""
    state = {"lr_scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None,
             "counters": {"global_steps": engine.global_steps, "global_samples": engine.global_samples,
                          "skipped_steps": engine.skipped_steps}}
    if role["model"]:
        module = engine.module.state_dict()  # a pipeline stage's names are local: see "stage"
        if masters_hold_weights(engine):  # the parameters are the optimizer's fp32 masters, rounded: not twice
            params = {n for n, _ in engine.module.named_parameters(remove_duplicate=False)}
            module = {k: v for k, v in module.items() if k not in params}
            state["weights"] = "optimizer"
        state["module"] = module
        info = getattr(engine.module, "rollout_stage", None)
        state["stage"] = None if info is None else {
            "stage": info.stage, "num_stages": info.num_stages, "first_layer": info.first_layer,
            "num_layers": info.num_layers, "total_layers": info.total_layers}
    if role["optimizer"]:
        state["optimizer"] = engine.optimizer.state_dict()
        if engine.zero_optimization():
            state["param_shapes"] = engine._get_zero_param_shapes()
    return state


def masters_hold_weights(engine) -> bool:
    """ZeRO 1/2 keeps fp32 (or bf16) master weights of every trainable parameter, which the model's weights are a
    rounding of: a snapshot stores the masters only and rebuilds the model's weights from them."""
    opt = engine.optimizer
    return (engine.zero_optimization() and hasattr(opt, "single_partition_of_fp32_groups")
            and hasattr(opt, "update_lp_params")
            and all(p.requires_grad for p in engine.module.parameters()))


def restore(engine, module_state: dict, optimizer_state: dict, own: dict, device: torch.device) -> None:
    """Puts the engine where the snapshot was: weights, optimizer (ZeRO: this rank's partition, fp32 master
    weights included), LR schedule, step counters."""
    from_masters = module_state.get("weights") == "optimizer"
    missing, unexpected = engine.module.load_state_dict({k: v.to(device) for k, v in module_state["module"].items()},
                                                        strict=not from_masters)
    params = {n for n, _ in engine.module.named_parameters(remove_duplicate=False)}
    if from_masters and (unexpected or set(missing) - params):
        raise ValueError(f"the snapshot's model state does not fit this model (missing {sorted(missing)[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]})")
    opt = optimizer_state["optimizer"]
    if engine.zero_optimization():
        dp = engine.optimizer.partition_count[0] if hasattr(engine.optimizer, "partition_count") else 1
        rank = torch.distributed.get_rank(group=engine.optimizer.dp_process_group)
        parts = [None] * dp
        parts[rank] = opt
        engine.optimizer.load_state_dict(parts, load_optimizer_states=True, load_from_fp32_weights=True)
        if from_masters:
            engine.optimizer.update_lp_params()  # the model's weights from the masters, as after a step
    else:
        engine.optimizer.load_state_dict(opt)
    if engine.lr_scheduler is not None and own.get("lr_scheduler") is not None:
        engine.lr_scheduler.load_state_dict(own["lr_scheduler"])
    for key, value in own["counters"].items():
        setattr(engine, key, value)


def weights_from_partitions(optimizer_states: list[dict], param_shapes: list[dict]) -> dict[str, torch.Tensor]:
    """A stage's parameters (fp32 masters) from its data-parallel ranks' ZeRO partitions, in rank order: each
    group's flat vector is the ranks' partitions end to end, holding the parameters in ``param_shapes`` order
    (each followed by its alignment padding, then the group's padding)."""
    out = {}
    for g, shapes in enumerate(param_shapes):
        flat = torch.cat([st["single_partition_of_fp32_groups"][g].reshape(-1) for st in optimizer_states])
        paddings = optimizer_states[0].get("param_alignment_paddings", [[]] * len(param_shapes))[g]
        offset = 0
        for i, (name, shape) in enumerate(shapes.items()):
            numel = torch.Size(shape).numel()
            out[name] = flat[offset:offset + numel].view(tuple(shape)).clone()
            offset += numel + (paddings[i] if i < len(paddings) else 0)
    return out
