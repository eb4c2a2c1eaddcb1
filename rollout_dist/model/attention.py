"""Chunk attention: queries of one chunk against the keys of the prefix and the chunk itself.

Registered in HF's ``AttentionInterface`` under ``ATTN_NAME`` so the model's own attention modules (projections,
RoPE, q/k norms, biases) run unchanged and only the score/softmax step is ours.  The queries are the last
``q_len`` positions of the ``kv_len`` keys, so causality is aligned lower-right: query i (global position
kv_len - q_len + i) sees keys j <= that position, and with a sliding window only keys j > position - window
(HF's ``sliding_window_overlay``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right
from transformers import AttentionInterface

from .split_attention import BACKENDS, SplitKernel, split_chunk_attention, split_forward

ATTN_NAME = "rollout_chunk"
KERNELS = ("auto", "sdpa") + BACKENDS


class ChunkKernel:
    """Which chunk-attention kernel a rollout uses, passed to the attention with each chunk (``ChunkContext``):
    ``sdpa`` (PyTorch SDPA with a lower-right causal bias; any device and dtype), ``cudnn`` or ``flash`` (split
    prefix/diagonal kernels merged by log-sum-exp; CUDA, fp16/bf16, no dropout, no sliding window: other cases use
    sdpa), ``math`` (the same split in plain torch, any device: a reference for tests), or ``auto`` (cudnn where it
    applies).  What a split backend learns (a refusal of grouped K/V heads) stays in this object."""

    def __init__(self, name: str = "auto"):
        if name not in KERNELS:
            raise ValueError(f"unknown attention kernel {name!r}; choose one of {KERNELS}")
        self.name = name
        self.split = SplitKernel("cudnn" if name in ("auto", "sdpa") else name)

    def split_applies(self, query, windowed: bool, dropout: float) -> bool:
        if windowed or dropout != 0.0 or self.name == "sdpa":
            return False
        return self.name == "math" or (query.is_cuda and query.dtype in (torch.float16, torch.bfloat16))


def chunk_mask(q_len: int, kv_len: int, sliding_window: int | None, device) -> torch.Tensor:
    """Boolean (q_len, kv_len) mask, True where a query may attend."""
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    k_pos = torch.arange(kv_len, device=device)[None, :]
    allowed = k_pos <= q_pos
    if sliding_window is not None:
        allowed &= k_pos > q_pos - sliding_window
    return allowed


@dataclass(frozen=True)
class SegmentMask:
    """Packed documents: query and key segment ids, (B, q) and (B, kv); attention stays inside a segment."""

    query: torch.Tensor
    key: torch.Tensor


@dataclass(frozen=True)
class ChunkContext:
    """What the adapter hands the attention through the layers' ``attention_mask`` argument (HF passes it on
    untouched): the carried state (phase, chunk start, stored attention outputs), packed-document segments and
    the kernel."""

    state: object = None
    segments: SegmentMask | None = None
    kernel: ChunkKernel = field(default_factory=lambda: ChunkKernel("sdpa"))


def chunk_attention_forward(module, query, key, value, attention_mask=None, dropout: float = 0.0,
                            scaling: float | None = None, sliding_window: int | None = None, **kwargs):
    """HF attention-interface function: (B, Hq, q, D) x (B, Hkv, kv, D) -> (B, q, Hq, D), weights None.

    ``attention_mask`` is None or a ``ChunkContext``, never an HF padding mask."""
    if attention_mask is not None and not isinstance(attention_mask, ChunkContext):
        raise ValueError("rollout chunk attention builds its own causal mask; padding masks are not supported "
                         "(mark ignored positions with label -100 instead)")
    context = attention_mask or ChunkContext()
    q_len, kv_len = query.shape[2], key.shape[2]
    kernel = context.kernel
    windowed = sliding_window is not None and sliding_window < kv_len
    if context.segments is not None:
        allowed = chunk_mask(q_len, kv_len, sliding_window if windowed else None, query.device)[None]
        allowed = allowed & (context.segments.query[:, :, None] == context.segments.key[:, None, :])
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=allowed[:, None], dropout_p=dropout,
                                             scale=scaling, enable_gqa=query.shape[1] != key.shape[1])
        return out.transpose(1, 2).contiguous(), None
    if kernel.split_applies(query, windowed, dropout):
        backend = kernel.split
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        state = context.state
        if state is not None and state.keeps_attention():
            layer = module.layer_idx - state.layer_offset
            if state.phase == "fill":  # no autograd here: keep the output for the backward pass
                out, lse, parts = split_forward(query, key, value, scale, backend)
                state.attention_cache[(layer, state.start)] = (out, lse, parts)
                return out.transpose(1, 2).contiguous(), None
            cached = state.attention_cache.pop((layer, state.start), None)
            out = split_chunk_attention(query, key, value, scale, backend, cached)
        else:
            out = split_chunk_attention(query, key, value, scale, backend)
        return out.transpose(1, 2).contiguous(), None
    gqa = query.shape[1] != key.shape[1]
    if windowed:
        mask = chunk_mask(q_len, kv_len, sliding_window, query.device)
    else:
        # lower-right causal bias: flash attention on CUDA (no mask tensor), a materialised mask elsewhere
        mask = causal_lower_right(q_len, kv_len)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling,
                                         enable_gqa=gqa)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTN_NAME, chunk_attention_forward)
