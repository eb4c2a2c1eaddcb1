"""Parallelism: the rank layout (data x pipeline), point-to-point transfers, the pipeline rollout schedule."""
from .layout import RankLayout
from .pipeline import PipelineRollout

__all__ = ["PipelineRollout", "RankLayout"]
