"""One place where a rollout is picked from the config: exact on one process, or one pipeline stage's part."""
from __future__ import annotations

from .rollout import Rollout

CPU_AUTO_CHUNK = 512
"""``rollout.chunk_size=0`` where there is no GPU memory to size it by (the trainer's memory planner sizes it on
a GPU once the engine exists)."""


def make_rollout(rollout_cfg, layout=None, *, chunk_size: int | None = None) -> Rollout:
    """The ``Rollout`` for ``rollout_cfg`` (a ``RolloutConfig``): ``ExactRollout`` on one process, or with a
    ``RankLayout`` of more than one pipeline stage the ``PipelineRollout`` of this rank's stage.  ``chunk_size``
    overrides the config's (0 there means "pick from memory", decided later)."""
    if rollout_cfg.mode != "exact":
        raise ValueError(f"rollout.mode={rollout_cfg.mode!r} has no rollout yet; use rollout.mode=exact")
    chunk = chunk_size or rollout_cfg.chunk_size or CPU_AUTO_CHUNK
    common = dict(attention=rollout_cfg.attention, keep_attention=rollout_cfg.keep_attention,
                  vocab_tile=rollout_cfg.vocab_tile, keep_tokens=rollout_cfg.keep_attention_tokens)
    if layout is not None and layout.pp > 1:
        from ..parallel.pipeline import PipelineRollout  # parallel builds on engine, not the other way round
        if rollout_cfg.offload != "none":
            raise ValueError(f"rollout.offload={rollout_cfg.offload} is not supported with pipeline stages yet")
        return PipelineRollout(chunk, layout, **common)
    from .exact import ExactRollout
    return ExactRollout(chunk, offload=rollout_cfg.offload, offload_layers=rollout_cfg.offload_layers, **common)
