"""rollout_dist: chunk-wise rollout training of causal LMs on documents longer than one GPU holds."""
from .engine import (ExactRollout, RandomStreams, Rollout, RolloutResult, StreamKey, chunked_forward_backward,
                     make_rollout)
from .config import MemoryConfig
from .model.carried_state import Boundary, CarriedState
from .model.memory import MemoryModel, with_memory

__version__ = "0.1.0"
__all__ = ["Boundary", "CarriedState", "ExactRollout", "MemoryConfig", "MemoryModel", "RandomStreams", "Rollout",
           "RolloutResult", "StreamKey", "chunked_forward_backward", "make_rollout", "with_memory", "__version__"]
