"""Adapter over an HF causal LM of the Llama family: runs one chunk through the decoder with carried state.

It uses the model's own modules (embedding, decoder layers, rotary embedding, final norm, LM head), so any
checkpoint of a supported architecture behaves exactly as in HF; only the attention kernel is swapped for
chunk attention (see ``attention.py``) while a rollout runs.  Positions are global (chunk start + offset), so
RoPE scaling from the config (linear, yarn, llama3) is honoured.  No distributed code lives here.
"""
from __future__ import annotations

import inspect
from contextlib import contextmanager, nullcontext
from typing import Callable, ContextManager

import torch

from .attention import ATTN_NAME, ChunkContext, ChunkKernel, SegmentMask
from .kv_state import KVState
from .offload import HostPool, OffloadedKVState

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# RoPE variants whose frequencies depend on the current sequence length cannot be evaluated chunk by chunk
# with the same result as a full-sequence forward.
_LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


CACHE_ARGUMENTS = ("cache", "past_key_values")
"""What HF decoder layers call the cache argument: ``cache`` from transformers 5.24 on (``past_key_values`` is
deprecated there, to be removed in 5.40), ``past_key_values`` before (where an unknown ``cache`` would vanish into
``**kwargs``: no K/V carried, wrong results, no error)."""


def cache_argument(layer_cls: type) -> str:
    """The name under which ``layer_cls.forward`` takes the cache, read from its signature."""
    params = inspect.signature(layer_cls.forward).parameters
    for name in CACHE_ARGUMENTS:
        if name in params:
            return name
    raise TypeError(f"{layer_cls.__name__}.forward takes none of {CACHE_ARGUMENTS}: this transformers version is "
                    "not supported (see pyproject.toml for the versions tested)")


def _rope_type(config) -> str:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if isinstance(params, dict):
        return str(params.get("rope_type", params.get("type", "default")))
    return "default"


class CausalLMAdapter:
    """Chunk-wise view of ``model`` (an HF ``*ForCausalLM``).  Holds no state of its own."""

    def __init__(self, model: torch.nn.Module):
        config = getattr(model, "config", None)
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise TypeError(f"rollout_dist supports HF causal LMs of model_type {SUPPORTED_MODEL_TYPES}; got "
                            f"{type(model).__name__} with model_type={model_type!r}")
        rope = _rope_type(config)
        if any(k in rope for k in _LENGTH_DEPENDENT_ROPE):
            raise NotImplementedError(f"rope_type={rope!r} changes frequencies with the sequence length, so a "
                                      "chunked rollout cannot reproduce it; use default, linear, yarn or llama3")
        self.model = model
        self.config = config
        self.decoder = model.model
        self.stage = getattr(model, "rollout_stage", None)
        """``StageInfo`` when the model was trimmed to one pipeline stage (rollout_dist.model.stage), else None."""
        self.layers = list(self.decoder.layers)
        self.cache_argument = cache_argument(type(self.layers[0]))
        self.layer_offset = self.stage.first_layer if self.stage else 0
        self.num_layers = len(self.layers)
        self.has_embedding = self.stage is None or self.stage.is_first
        self.has_head = self.stage is None or self.stage.is_last
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.vocab_size = config.vocab_size
        self.hidden_size = config.hidden_size

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def new_state(self, batch: int, length: int, offload: str = "none", offload_layers: int = 0,
                  pool: HostPool | None = None) -> KVState:
        """Carried K/V for a (batch, length) document: on the device, or (``offload`` kv/all) in host memory
        staged layer by layer (rollout_dist.model.offload), for the first ``offload_layers`` layers (0: all), in
        buffers from ``pool`` (None: the state's own)."""
        if offload == "none":
            return KVState.allocate(self.num_layers, batch, self.kv_heads, length, self.head_dim, self.dtype,
                                    self.device, layer_offset=self.layer_offset)
        return OffloadedKVState(self.num_layers, batch, self.kv_heads, length, self.head_dim, self.dtype,
                                self.device, layer_offset=self.layer_offset, mode=offload, layers=offload_layers,
                                pool=pool)

    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V per token (all layers), in the model's dtype; dK/dV double it during backward."""
        return 2 * self.num_layers * self.kv_heads * self.head_dim * torch.finfo(self.dtype).bits // 8

    @contextmanager
    def chunk_attention(self):
        """Routes the model's attention modules to chunk attention for the duration of a rollout (the kernel goes
        with each chunk: ``forward_layers(kernel=...)``)."""
        previous = self.config._attn_implementation
        self.config._attn_implementation = ATTN_NAME
        try:
            yield
        finally:
            self.config._attn_implementation = previous

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.decoder.embed_tokens(input_ids)

    def forward_layers(self, hidden: torch.Tensor, start: int, state: KVState, phase: str,
                       positions: torch.Tensor | None = None, segments: SegmentMask | None = None,
                       kernel: ChunkKernel | None = None,
                       layer_scope: Callable[[int], ContextManager] | None = None) -> torch.Tensor:
        """Runs this model's (or stage's) decoder layers on the chunk at [start, start + c) of the document.

        ``positions`` (B, c) override the global positions (packed documents restart at 0); ``segments`` keeps
        attention inside each packed document; ``kernel`` picks the attention kernel (default: auto).
        ``layer_scope(global layer index)`` is entered around each layer: the caller's random stream for that
        layer's dropout (rollout_dist.engine.streams), so the draws do not depend on which process holds it."""
        state.begin_chunk(start, phase)
        if positions is None:
            positions = torch.arange(start, start + hidden.shape[1], device=hidden.device)[None]
        rope = self.decoder.rotary_emb(hidden, positions)
        context = ChunkContext(state=state, segments=segments, kernel=kernel or ChunkKernel("auto"))
        for i, layer in enumerate(self.layers):
            with layer_scope(self.layer_offset + i) if layer_scope is not None else nullcontext():
                out = layer(hidden, attention_mask=context, position_ids=positions, use_cache=True,
                            position_embeddings=rope, **{self.cache_argument: state})
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    def forward_chunk(self, input_ids: torch.Tensor, start: int, state: KVState, phase: str,
                      positions: torch.Tensor | None = None, segments: SegmentMask | None = None,
                      kernel: ChunkKernel | None = None,
                      layer_scope: Callable[[int], ContextManager] | None = None) -> torch.Tensor:
        """Hidden states after the final norm for ``input_ids`` (B, c) at [start, start + c) of the document."""
        return self.final_norm(self.forward_layers(self.embed(input_ids), start, state, phase, positions, segments,
                                                   kernel, layer_scope))

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder.norm(hidden)

    @property
    def head(self) -> torch.nn.Linear:
        return self.model.lm_head

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(hidden)
