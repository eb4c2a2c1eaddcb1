"""Parallelism: the rank layout (data x pipeline), point-to-point transfers, the pipeline rollout schedules (exact
and memory mode)."""
from .layout import RankLayout
from .memory_pipeline import PipelineMemoryRollout
from .pipeline import PipelineRollout

__all__ = ["PipelineMemoryRollout", "PipelineRollout", "RankLayout"]
