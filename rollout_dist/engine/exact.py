"""Exact chunk-wise rollout: full-sequence gradients with one chunk's activations alive at a time.

Forward (no grad): chunks 0..C-2 run in order; each layer writes the chunk's K/V into the carried state.
Backward: chunks C-1..0 run in reverse; each is recomputed with grad against the stored prefix K/V (same random
stream as its first forward), its loss is backpropagated, the prefix part of dK/dV is added into the carried
gradient buffers, and the chunk's own K/V receive what later chunks sent them.  Summed over chunks this is
exactly the chain rule of the full-sequence graph (docs/design.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..model import CausalLMAdapter, KVState
from ..model.attention import KERNELS, SegmentMask
from ..model.offload import OFFLOAD_MODES
from .loss import IGNORE_INDEX, head_cross_entropy_sum, shift_targets
from .packing import mask_cross_document_targets, packed_positions, validate_segments

BackwardFn = Callable[[torch.Tensor], None]
ProgressFn = Callable[[str, int, int], None]
"""Called after each chunk with (phase, chunks done in that phase, chunks in that phase); phase is "fill" or
"backward"."""


@dataclass
class RolloutResult:
    """Outcome of one document (batch) rollout."""

    loss: float
    """Mean token cross-entropy, as ``model(input_ids, labels=labels).loss`` in HF."""
    num_tokens: int
    """Positions that counted in the loss (targets not equal to -100)."""
    loss_sum: float
    """Sum of token cross-entropies (``loss * num_tokens``)."""
    num_chunks: int
    state_bytes: int
    """Bytes held by the carried K/V and dK/dV buffers."""


def _capture_rng(device: torch.device):
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


class _RestoredRng:
    """Replays a captured random state (CPU and the model's CUDA device) and leaves the outer stream as it was."""

    def __init__(self, state, device: torch.device):
        self.state, self.device = state, device
        self._fork = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])

    def __enter__(self):
        self._fork.__enter__()
        cpu, cuda = self.state
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, self.device)

    def __exit__(self, *exc):
        return self._fork.__exit__(*exc)


def validate_inputs(input_ids: torch.Tensor, labels: torch.Tensor | None, chunk_size: int, vocab_size: int,
                    ) -> None:
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, tokens); got shape {tuple(input_ids.shape)}")
    if input_ids.shape[1] < 2:
        raise ValueError(f"a document needs at least 2 tokens to have a next-token target; got {input_ids.shape[1]}")
    if labels is not None and labels.shape != input_ids.shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} differs from input_ids {tuple(input_ids.shape)}")
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"token id {hi if hi >= vocab_size else lo} is outside the model's vocabulary "
                         f"[0, {vocab_size}); check that the tokenizer matches the model")
    if labels is not None:
        bad = labels[(labels != -100) & ((labels < 0) | (labels >= vocab_size))]
        if bad.numel():
            raise ValueError(f"label {int(bad[0])} is neither -100 (ignored) nor a token id of the model's "
                             f"vocabulary [0, {vocab_size})")


def fixed_spans(length: int, chunk_size: int) -> list[tuple[int, int]]:
    return [(s, min(s + chunk_size, length)) for s in range(0, length, chunk_size)]


def check_spans(spans, length: int) -> list[tuple[int, int]]:
    """Planned chunks must tile [0, length) in order, without gaps or overlaps."""
    spans = [(int(s), int(e)) for s, e in spans]
    ends = [0] + [e for _, e in spans]
    if not spans or any(s != prev or e <= s for (s, e), prev in zip(spans, ends)) or spans[-1][1] != length:
        raise ValueError(f"planned chunks {spans[:4]}... do not tile the document's {length} tokens in order; "
                         "was the chunk index written for these documents and this tokenizer?")
    return spans


class ExactRollout:
    """Runs the exact chunk-wise forward/backward of a Llama-family HF model.

    ``attention`` picks the chunk-attention kernel (rollout_dist.model.attention.attention_kernel): ``auto`` uses
    cuDNN's fused attention on CUDA in fp16/bf16 and PyTorch SDPA elsewhere.  ``keep_attention`` keeps the
    fill pass's attention outputs so the backward pass skips the attention forward (more memory); with
    ``keep_tokens`` > 0 only for the chunks starting within the last ``keep_tokens`` tokens of the document.
    ``offload`` (none, kv, all) keeps the carried K/V, or K/V and dK/dV, in pinned host memory and stages them
    into the device layer by layer on a side stream (rollout_dist.model.offload); ``offload_layers`` > 0 only
    for the first that many decoder layers, the others' stays on the device.  ``vocab_tile`` > 0 computes
    the LM head and loss in vocabulary tiles (rollout_dist.engine.loss.head_cross_entropy_sum).
    ``verify_recompute`` records, per recomputed chunk and layer, the largest difference between the recomputed
    K/V and those stored by the first forward (they must be bit-identical, dropout included).
    """

    def __init__(self, chunk_size: int, verify_recompute: bool = False, attention: str = "auto",
                 keep_attention: bool = False, offload: str = "none", vocab_tile: int = 0, keep_tokens: int = 0,
                 offload_layers: int = 0):
        if not isinstance(chunk_size, int) or chunk_size <= 0:
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        if attention not in KERNELS:
            raise ValueError(f"attention={attention!r} is not one of {KERNELS}")
        if offload not in OFFLOAD_MODES:
            raise ValueError(f"offload={offload!r} is not one of {OFFLOAD_MODES}")
        if not isinstance(offload_layers, int) or offload_layers < 0:
            raise ValueError(f"offload_layers must be 0 (every layer) or a positive count, got {offload_layers!r}")
        self.attention, self.offload, self.vocab_tile = attention, offload, vocab_tile
        self.offload_layers = offload_layers
        if not isinstance(keep_tokens, int) or keep_tokens < 0:
            raise ValueError(f"keep_tokens must be 0 (every chunk) or a positive number of tokens, got {keep_tokens!r}")
        self.keep_attention, self.keep_tokens = keep_attention, keep_tokens
        self.chunk_size = chunk_size
        self.verify_recompute = verify_recompute
        self.last_state: KVState | None = None

    def spans(self, length: int) -> list[tuple[int, int]]:
        return fixed_spans(length, self.chunk_size)

    def run(self, model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor | None = None, *,
            loss_normalizer: float | None = None, backward: BackwardFn | None = None,
            segment_ids: torch.Tensor | None = None, spans: list[tuple[int, int]] | None = None,
            progress: ProgressFn | None = None) -> RolloutResult:
        """Forward and backward of one (B, T) batch; parameter ``.grad`` accumulates d(loss_sum / normalizer).

        ``loss_normalizer`` defaults to the number of target tokens of this batch (HF's mean); a trainer that
        accumulates several documents passes the token count of the whole accumulation window.  ``backward``
        receives each chunk's scalar loss (a DeepSpeed engine's ``backward``, say); default ``Tensor.backward``.
        ``segment_ids`` packs several documents into each row (rollout_dist.engine.packing); ``spans`` replaces
        the fixed chunking by planned chunk boundaries (a chunk index), [(start, end), ...] covering [0, T).
        ``progress`` is told after every chunk (a document of millions of tokens takes an hour per step).
        """
        adapter = CausalLMAdapter(model)
        validate_inputs(input_ids, labels, self.chunk_size, adapter.vocab_size)
        input_ids = input_ids.to(adapter.device)
        targets = shift_targets(input_ids if labels is None else labels.to(adapter.device))
        positions = None
        if segment_ids is not None:
            validate_segments(segment_ids, input_ids)
            segment_ids = segment_ids.to(adapter.device)
            targets = mask_cross_document_targets(targets, segment_ids)
            positions = packed_positions(segment_ids)

        def chunk_args(s, e):
            if segment_ids is None:
                return {}
            return {"positions": positions[:, s:e],
                    "segments": SegmentMask(query=segment_ids[:, s:e], key=segment_ids[:, :e])}

        num_tokens = int((targets != IGNORE_INDEX).sum())
        if num_tokens == 0:
            raise ValueError("no position has a target (all labels are -100): the loss is undefined")
        normalizer = float(num_tokens if loss_normalizer is None else loss_normalizer)
        backward = backward or torch.Tensor.backward
        batch, length = input_ids.shape
        spans = self.spans(length) if spans is None else check_spans(spans, length)

        state = adapter.new_state(batch, length, offload=self.offload, offload_layers=self.offload_layers)
        state.verify_recompute = self.verify_recompute
        state.keep_outputs(self.keep_attention, self.keep_tokens, length)
        try:
            loss_sum = self._rollout(adapter, state, input_ids, targets, spans, chunk_args, normalizer, backward,
                                     progress or (lambda *_: None))
        finally:
            state.close()
        self.last_state = state if self.verify_recompute else None
        total = float(loss_sum)
        return RolloutResult(loss=total / num_tokens, num_tokens=num_tokens, loss_sum=total,
                             num_chunks=len(spans), state_bytes=state.nbytes)

    def _rollout(self, adapter, state, input_ids, targets, spans, chunk_args, normalizer, backward, progress):
        rng = []
        # dK/dV first: a document whose carried state does not fit fails now, not after the whole fill pass
        state.allocate_grads()
        with adapter.chunk_attention(self.attention):
            with torch.no_grad():
                for i, (s, e) in enumerate(spans[:-1]):  # the last chunk's K/V are needed by no later chunk
                    rng.append(_capture_rng(adapter.device))
                    adapter.forward_chunk(input_ids[:, s:e], s, state, phase="fill", **chunk_args(s, e))
                    progress("fill", i + 1, len(spans) - 1)
            rng.append(_capture_rng(adapter.device))
            loss_sum = torch.zeros((), dtype=torch.float64, device=adapter.device)
            for i, ((s, e), rng_state) in enumerate(zip(reversed(spans), reversed(rng))):
                with _RestoredRng(rng_state, adapter.device), torch.enable_grad(), state.autograd_hooks():
                    hidden = adapter.forward_chunk(input_ids[:, s:e], s, state, phase="recompute",
                                                   **chunk_args(s, e))
                    ce = head_cross_entropy_sum(hidden, adapter.head, targets[:, s:e], self.vocab_tile)
                    backward(ce / normalizer)
                loss_sum += ce.detach().to(torch.float64)
                progress("backward", i + 1, len(spans))
        return loss_sum


def chunked_forward_backward(model: torch.nn.Module, input_ids: torch.Tensor, *, chunk_size: int,
                             labels: torch.Tensor | None = None, loss_normalizer: float | None = None,
                             backward: BackwardFn | None = None, attention: str = "auto",
                             segment_ids: torch.Tensor | None = None, keep_attention: bool = False,
                             offload: str = "none", vocab_tile: int = 0, keep_tokens: int = 0,
                             offload_layers: int = 0) -> RolloutResult:
    """Exact chunk-wise forward and backward of ``model`` on ``input_ids`` (B, T); see ``ExactRollout.run``.

    Returns ``.loss`` (HF's mean token cross-entropy, labels shifted inside, -100 ignored; ``labels=None`` means
    ``labels=input_ids``) and ``.num_tokens``; every parameter's ``.grad`` accumulates the gradient of that loss.
    """
    rollout = ExactRollout(chunk_size, attention=attention, keep_attention=keep_attention, offload=offload,
                           vocab_tile=vocab_tile, keep_tokens=keep_tokens, offload_layers=offload_layers)
    return rollout.run(model, input_ids, labels, loss_normalizer=loss_normalizer, backward=backward,
                       segment_ids=segment_ids)
