"""rollout_dist: chunk-wise rollout training of causal LMs on documents longer than one GPU holds."""
from .engine import ExactRollout, RolloutResult, chunked_forward_backward

__version__ = "0.1.0"
__all__ = ["ExactRollout", "RolloutResult", "chunked_forward_backward", "__version__"]
