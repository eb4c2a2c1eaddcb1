"""Chunk-wise rollouts: the Rollout interface, the exact rollout, the factory, random streams, loss, byte budget."""
from .exact import ExactRollout, chunked_forward_backward
from .factory import make_rollout
from .rollout import ChunkEvent, Rollout, RolloutResult
from .streams import RandomStreams, StreamKey

__all__ = ["ChunkEvent", "ExactRollout", "RandomStreams", "Rollout", "RolloutResult", "StreamKey",
           "chunked_forward_backward", "make_rollout"]
