"""Model adapters over HF causal LMs; no torch.distributed here."""
from .adapter import SUPPORTED_MODEL_TYPES, CausalLMAdapter
from .kv_state import KVState

__all__ = ["CausalLMAdapter", "KVState", "SUPPORTED_MODEL_TYPES"]
