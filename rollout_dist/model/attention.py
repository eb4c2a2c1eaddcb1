"""Chunk attention: queries of one chunk against the keys of the prefix and the chunk itself.

Registered in HF's ``AttentionInterface`` under ``ATTN_NAME`` so the model's own attention modules (projections,
RoPE, q/k norms, biases) run unchanged and only the score/softmax step is ours.  The queries are the last
``q_len`` positions of the ``kv_len`` keys, so causality is aligned lower-right: query i (global position
kv_len - q_len + i) sees keys j <= that position, and with a sliding window only keys j > position - window
(HF's ``sliding_window_overlay``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right
from transformers import AttentionInterface

ATTN_NAME = "rollout_chunk"


def chunk_mask(q_len: int, kv_len: int, sliding_window: int | None, device) -> torch.Tensor:
    """Boolean (q_len, kv_len) mask, True where a query may attend."""
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    k_pos = torch.arange(kv_len, device=device)[None, :]
    allowed = k_pos <= q_pos
    if sliding_window is not None:
        allowed &= k_pos > q_pos - sliding_window
    return allowed


def chunk_attention_forward(module, query, key, value, attention_mask=None, dropout: float = 0.0,
                            scaling: float | None = None, sliding_window: int | None = None, **kwargs):
    """HF attention-interface function: (B, Hq, q, D) x (B, Hkv, kv, D) -> (B, q, Hq, D), weights None."""
    if attention_mask is not None:
        raise ValueError("rollout chunk attention builds its own causal mask; padding masks are not supported "
                         "(mark ignored positions with label -100 instead)")
    q_len, kv_len = query.shape[2], key.shape[2]
    gqa = query.shape[1] != key.shape[1]
    if sliding_window is not None and sliding_window < kv_len:
        mask = chunk_mask(q_len, kv_len, sliding_window, query.device)
    else:
        # lower-right causal bias: flash attention on CUDA (no mask tensor), a materialised mask elsewhere
        mask = causal_lower_right(q_len, kv_len)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling,
                                         enable_gqa=gqa)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTN_NAME, chunk_attention_forward)
