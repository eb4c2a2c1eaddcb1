"""Exact chunk-wise rollout: full-sequence gradients with one chunk's activations alive at a time.

Forward (no grad): chunks 0..C-2 run in order; each layer writes the chunk's K/V into the carried state.
Backward: chunks C-1..0 run in reverse; each is recomputed with grad against the stored prefix K/V (same random
stream as its first forward), its loss is backpropagated, the prefix part of dK/dV is added into the carried
gradient buffers, and the chunk's own K/V receive what later chunks sent them.  Summed over chunks this is
exactly the chain rule of the full-sequence graph (docs/design.md).
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..model import CausalLMAdapter, KVState
from ..model.carried_state import Boundary
from ..model.offload import OFFLOAD_MODES, HostPool
from .loss import head_cross_entropy_sum
from .rollout import BackwardFn, ChunkHook, ProgressFn, Rollout, RolloutResult, fixed_spans, stops_here
from .streams import StreamKey


class ExactRollout(Rollout):
    """Runs the exact chunk-wise forward/backward of a Llama-family HF model.

    ``attention`` picks the chunk-attention kernel (rollout_dist.model.attention.ChunkKernel): ``auto`` uses
    cuDNN's fused attention on CUDA in fp16/bf16 and PyTorch SDPA elsewhere.  ``keep_attention`` keeps the
    fill pass's attention outputs so the backward pass skips the attention forward (more memory); with
    ``keep_tokens`` > 0 only for the chunks starting within the last ``keep_tokens`` tokens of the document.
    ``offload`` (none, kv, all) keeps the carried K/V, or K/V and dK/dV, in pinned host memory and stages them
    into the device layer by layer on a side stream (rollout_dist.model.offload), in buffers of this rollout's
    ``host_pool`` (reused from document to document); ``offload_layers`` > 0 only for the first that many decoder
    layers, the others' stays on the device.  ``vocab_tile`` > 0 computes the LM head and loss in vocabulary tiles
    (rollout_dist.engine.loss.head_cross_entropy_sum).  ``verify_recompute`` records, per recomputed chunk and
    layer, the largest difference between the recomputed K/V and those stored by the first forward (they must be
    bit-identical, dropout included).
    """

    def __init__(self, chunk_size: int, verify_recompute: bool = False, attention: str = "auto",
                 keep_attention: bool = False, offload: str = "none", vocab_tile: int = 0, keep_tokens: int = 0,
                 offload_layers: int = 0):
        super().__init__(chunk_size, attention=attention, keep_attention=keep_attention, vocab_tile=vocab_tile,
                         keep_tokens=keep_tokens)
        if offload not in OFFLOAD_MODES:
            raise ValueError(f"offload={offload!r} is not one of {OFFLOAD_MODES}")
        if not isinstance(offload_layers, int) or offload_layers < 0:
            raise ValueError(f"offload_layers must be 0 (every layer) or a positive count, got {offload_layers!r}")
        self.offload, self.offload_layers = offload, offload_layers
        self.verify_recompute = verify_recompute
        self.host_pool = HostPool()
        self.last_state: KVState | None = None

    def new_state(self, model: torch.nn.Module, batch: int, length: int) -> KVState:
        return CausalLMAdapter(model).new_state(batch, length, offload=self.offload,
                                                offload_layers=self.offload_layers, pool=self.host_pool)

    def run(self, model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor | None = None, *,
            loss_normalizer: float | None = None, backward: BackwardFn | None = None,
            segment_ids: torch.Tensor | None = None, spans: list[tuple[int, int]] | None = None,
            progress: ProgressFn | None = None, state: KVState | None = None, stream: StreamKey | None = None,
            stop_at: Boundary | None = None, hooks: Sequence[ChunkHook] = ()) -> RolloutResult:
        """Forward and backward of one (B, T) batch; parameter ``.grad`` accumulates d(loss_sum / normalizer).

        ``loss_normalizer`` defaults to the number of target tokens of this batch (HF's mean); a trainer that
        accumulates several documents passes the token count of the whole accumulation window.  ``backward``
        receives each chunk's scalar loss (a DeepSpeed engine's ``backward``, say); default ``Tensor.backward``.
        ``segment_ids`` packs several documents into each row (rollout_dist.engine.packing); ``spans`` replaces
        the fixed chunking by planned chunk boundaries (a chunk index), [(start, end), ...] covering [0, T).
        ``progress`` is told after every chunk (a document of millions of tokens takes an hour per step).
        ``state``, ``stream``, ``stop_at``, ``hooks``: see ``Rollout.run``.
        """
        adapter = CausalLMAdapter(model)
        doc = self.prepare(adapter, input_ids, labels, segment_ids, spans)
        normalizer = float(doc.num_tokens if loss_normalizer is None else loss_normalizer)
        state, own, stream = self.attach(model, doc, state, stream, stop_at)
        state.verify_recompute = self.verify_recompute
        try:
            complete = self._rollout(adapter, state, doc, normalizer, backward or torch.Tensor.backward, stream,
                                     stop_at, hooks, progress)
        finally:
            if own:
                state.close()
        self.last_state = state if self.verify_recompute else None
        return self.result(doc, state, complete)

    def _rollout(self, adapter, state, doc, normalizer, backward, stream, stop_at, hooks, progress) -> bool:
        spans, device = doc.spans, adapter.device
        n = len(spans)

        def run_chunk(c: int, phase: str):
            s, e = spans[c]
            return adapter.forward_chunk(doc.input_ids[:, s:e], s, state, phase=phase, kernel=self.kernel,
                                         layer_scope=lambda layer: stream.scope(c, layer, device),
                                         **doc.chunk_args(s, e))

        # dK/dV first: a document whose carried state does not fit fails now, not after the whole fill pass
        if not state.grads_allocated:
            state.allocate_grads()
        with adapter.chunk_attention():
            if not state.in_backward:
                with torch.no_grad():
                    for c in range(state.fill_chunks, n - 1):  # the last chunk's K/V are needed by no later chunk
                        if stops_here(stop_at, state):
                            return False
                        run_chunk(c, "fill")
                        self.chunk_done(state, "fill", c, spans[c], hooks, progress, n - 1)
                if stops_here(stop_at, state):
                    return False
                self.begin_backward(state, device)
            for c in range(n - 1 - state.backward_chunks, -1, -1):
                if stops_here(stop_at, state):
                    return False
                s, e = spans[c]
                with torch.enable_grad(), state.autograd_hooks():
                    hidden = run_chunk(c, "recompute")
                    ce = head_cross_entropy_sum(hidden, adapter.head, doc.targets[:, s:e], self.vocab_tile)
                    backward(ce / normalizer)
                state.loss_sum += ce.detach().to(torch.float64)
                self.chunk_done(state, "backward", c, spans[c], hooks, progress, n)
        return True

    def fill(self, model: torch.nn.Module, input_ids: torch.Tensor, state: KVState, *,
             stream: StreamKey | None = None, hooks: Sequence[ChunkHook] = ()) -> torch.Tensor:
        """Forward only (no autograd) of ``input_ids`` (B, t), which continue the document at the state's
        position, in chunks of ``chunk_size``; their K/V are appended to ``state``.  Returns the last chunk's
        logits (B, c, vocab)."""
        adapter = CausalLMAdapter(model)
        input_ids, start, end, stream = self.begin_fill(adapter, input_ids, state, stream)
        hidden = None
        with adapter.chunk_attention(), torch.no_grad():
            for s, e in fixed_spans(end, self.chunk_size, start):
                c = state.fill_chunks
                hidden = adapter.forward_chunk(input_ids[:, s - start:e - start], s, state, phase="fill",
                                               kernel=self.kernel,
                                               layer_scope=lambda layer, c=c: stream.scope(c, layer, adapter.device))
                self.chunk_done(state, "fill", c, (s, e), hooks, None, 0)
            return adapter.logits(hidden)


def chunked_forward_backward(model: torch.nn.Module, input_ids: torch.Tensor, *, chunk_size: int,
                             labels: torch.Tensor | None = None, loss_normalizer: float | None = None,
                             backward: BackwardFn | None = None, attention: str = "auto",
                             segment_ids: torch.Tensor | None = None, keep_attention: bool = False,
                             offload: str = "none", vocab_tile: int = 0, keep_tokens: int = 0,
                             offload_layers: int = 0, stream: StreamKey | None = None,
                             **memory_options) -> RolloutResult:
    """Exact chunk-wise forward and backward of ``model`` on ``input_ids`` (B, T); see ``ExactRollout.run``.

    Returns ``.loss`` (HF's mean token cross-entropy, labels shifted inside, -100 ignored; ``labels=None`` means
    ``labels=input_ids``) and ``.num_tokens``; every parameter's ``.grad`` accumulates the gradient of that loss.
    Dropout draws come from ``stream`` (default: a key drawn once from the default CPU generator).

    A ``MemoryModel`` (``rollout_dist.with_memory``) is trained by memory mode's rollout instead
    (rollout_dist.engine.memory.memory_forward_backward), which also takes ``ablate_state``, ``bptt_chunks``,
    ``loss_weighting``, ``importance``, ``spans`` and ``boundary_scores``.
    """
    if getattr(model, "is_memory_model", False):
        from .memory import memory_forward_backward

        exact_only = {"attention": attention != "auto", "segment_ids": segment_ids is not None,
                      "keep_attention": keep_attention, "offload": offload != "none", "keep_tokens": keep_tokens,
                      "offload_layers": offload_layers}
        given = [k for k, v in exact_only.items() if v]
        if given:
            raise ValueError(f"{', '.join(given)} apply to exact mode only, not to a memory model")
        return memory_forward_backward(model, input_ids, chunk_size=chunk_size, labels=labels,
                                       loss_normalizer=loss_normalizer, backward=backward, vocab_tile=vocab_tile,
                                       stream=stream, **memory_options)
    if memory_options:
        raise TypeError(f"chunked_forward_backward got {sorted(memory_options)}: these apply to a memory model "
                        "(rollout_dist.with_memory) only")
    rollout = ExactRollout(chunk_size, attention=attention, keep_attention=keep_attention, offload=offload,
                           vocab_tile=vocab_tile, keep_tokens=keep_tokens, offload_layers=offload_layers)
    return rollout.run(model, input_ids, labels, loss_normalizer=loss_normalizer, backward=backward,
                       segment_ids=segment_ids, stream=stream)
