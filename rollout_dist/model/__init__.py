"""Model adapters over HF causal LMs; no torch.distributed here."""
from .adapter import SUPPORTED_MODEL_TYPES, CausalLMAdapter
from .kv_state import KVState
from .stage import StageInfo, partition_layers, stage_layer_counts, stage_state_dict, trim_to_stage

__all__ = ["CausalLMAdapter", "KVState", "SUPPORTED_MODEL_TYPES", "StageInfo", "partition_layers",
           "stage_layer_counts", "stage_state_dict", "trim_to_stage"]
