"""Chunk-wise forward/backward engines."""
from .exact import ExactRollout, RolloutResult, chunked_forward_backward

__all__ = ["ExactRollout", "RolloutResult", "chunked_forward_backward"]
