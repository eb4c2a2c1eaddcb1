"""The ``Rollout`` interface: how a document runs through a model chunk by chunk, and what every rollout shares.

Implementations: ``ExactRollout`` (one process, engine/exact.py), ``PipelineRollout`` (one pipeline stage,
parallel/pipeline.py); memory mode will be the third.  ``make_rollout`` (engine/factory.py) picks one from the
config.  A rollout carries a ``CarriedState`` (rollout_dist.model.carried_state) from chunk to chunk; the caller
may create it (``new_state``), pass it to ``run`` or ``fill``, stop at a chunk boundary (``stop_at``), save it
(``state_dict``), load it into a fresh state and continue: the result equals the uninterrupted one bit for bit.

Each chunk's random draws come from ``stream`` (rollout_dist.engine.streams), keyed by (seed, step, document,
chunk, layer), so the recompute in the backward pass, a resumed run, replicas and pipeline stages all draw the same
dropout masks.  ``hooks`` are called after every chunk with a ``ChunkEvent`` (the coordinator's digests, progress
bars); a trainer's per-step hooks live in rollout_dist.train.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..model import CausalLMAdapter
from ..model.attention import KERNELS, ChunkKernel, SegmentMask
from ..model.carried_state import Boundary, CarriedState
from .loss import IGNORE_INDEX, shift_targets
from .packing import mask_cross_document_targets, packed_positions, validate_segments
from .streams import StreamKey

BackwardFn = Callable[[torch.Tensor], None]
ProgressFn = Callable[[str, int, int], None]
"""Called after each chunk with (phase, chunks done in that phase, chunks in that phase); phase is "fill" or
"backward"."""


@dataclass
class RolloutResult:
    """Outcome of one document (batch) rollout."""

    loss: float
    """Mean token cross-entropy, as ``model(input_ids, labels=labels).loss`` in HF (NaN off the last stage)."""
    num_tokens: int
    """Positions that counted in the loss (targets not equal to -100)."""
    loss_sum: float
    """Sum of token cross-entropies (``loss * num_tokens``); of the chunks run backward so far if not complete."""
    num_chunks: int
    state_bytes: int
    """Bytes held by the carried K/V and dK/dV buffers."""
    complete: bool = True
    """False when the rollout stopped at ``stop_at`` before its last backward chunk."""


@dataclass(frozen=True)
class ChunkEvent:
    """What a hook learns after each chunk: the phase ("fill" or "backward"), the chunk's index and token span,
    and the carried state as it stands now (its ``boundary`` is the one after this chunk)."""

    phase: str
    chunk: int
    start: int
    end: int
    state: CarriedState


ChunkHook = Callable[[ChunkEvent], None]


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
    check_token_ids(input_ids, vocab_size)
    if labels is not None:
        bad = labels[(labels != -100) & ((labels < 0) | (labels >= vocab_size))]
        if bad.numel():
            raise ValueError(f"label {int(bad[0])} is neither -100 (ignored) nor a token id of the model's "
                             f"vocabulary [0, {vocab_size})")


def check_token_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"token id {hi if hi >= vocab_size else lo} is outside the model's vocabulary "
                         f"[0, {vocab_size}); check that the tokenizer matches the model")


def fixed_spans(length: int, chunk_size: int, start: int = 0) -> list[tuple[int, int]]:
    """Chunks of ``chunk_size`` tokens covering [start, length)."""
    return [(s, min(s + chunk_size, length)) for s in range(start, length, chunk_size)]


def check_spans(spans, length: int) -> list[tuple[int, int]]:
    """Planned chunks must tile [0, length) in order, without gaps or overlaps."""
    spans = [(int(s), int(e)) for s, e in spans]
    ends = [0] + [e for _, e in spans]
    if not spans or any(s != prev or e <= s for (s, e), prev in zip(spans, ends)) or spans[-1][1] != length:
        raise ValueError(f"planned chunks {spans[:4]}... do not tile the document's {length} tokens in order; "
                         "was the chunk index written for these documents and this tokenizer?")
    return spans


@dataclass
class PreparedDocument:
    """A (B, T) batch checked and moved to the model's device, with its targets, chunks and packing."""

    input_ids: torch.Tensor
    targets: torch.Tensor
    spans: list[tuple[int, int]]
    num_tokens: int
    positions: torch.Tensor | None = None
    segment_ids: torch.Tensor | None = None

    @property
    def batch(self) -> int:
        return self.input_ids.shape[0]

    @property
    def length(self) -> int:
        return self.input_ids.shape[1]

    def chunk_args(self, s: int, e: int) -> dict:
        """Keyword arguments of the adapter's forward for chunk [s, e): packed positions and segments."""
        if self.segment_ids is None:
            return {}
        return {"positions": self.positions[:, s:e],
                "segments": SegmentMask(query=self.segment_ids[:, s:e], key=self.segment_ids[:, :e])}


class Rollout(ABC):
    """Runs documents chunk by chunk through a model, carrying a ``CarriedState`` from chunk to chunk."""

    def __init__(self, chunk_size: int, attention: str = "auto", keep_attention: bool = False, vocab_tile: int = 0,
                 keep_tokens: int = 0):
        if not isinstance(chunk_size, int) or chunk_size <= 0:
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        if attention not in KERNELS:
            raise ValueError(f"attention={attention!r} is not one of {KERNELS}")
        if not isinstance(keep_tokens, int) or keep_tokens < 0:
            raise ValueError(f"keep_tokens must be 0 (every chunk) or a positive number of tokens, got {keep_tokens!r}")
        self.chunk_size, self.attention, self.vocab_tile = chunk_size, attention, vocab_tile
        self.keep_attention, self.keep_tokens = keep_attention, keep_tokens
        self.kernel = ChunkKernel(attention)
        """The attention kernel and what it learns (a backend's refusal of grouped K/V heads): this rollout's own."""
        self.state_observer = None
        """Set as the ``observer`` of every state this rollout runs (told each chunk's K/V: rollout_dist.model.
        kv_state ``observe_kv``): the coordinator's digests."""

    def spans(self, length: int) -> list[tuple[int, int]]:
        return fixed_spans(length, self.chunk_size)

    @abstractmethod
    def new_state(self, model: torch.nn.Module, batch: int, length: int) -> CarriedState:
        """A fresh carried state for a (batch, length) document of ``model`` (this process's layers)."""

    @abstractmethod
    def run(self, model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor | None = None, *,
            loss_normalizer: float | None = None, backward: BackwardFn | None = None,
            spans: list[tuple[int, int]] | None = None, state: CarriedState | None = None,
            stream: StreamKey | None = None, stop_at: Boundary | None = None, hooks: Sequence[ChunkHook] = (),
            progress: ProgressFn | None = None) -> RolloutResult:
        """Forward and backward of one (B, T) batch; parameter ``.grad`` accumulates d(loss_sum / normalizer).

        ``state``: the caller's (fresh, or standing at a boundary of this very document: the rollout continues
        from there); None: a state of the rollout's own, closed at the end.  ``stop_at``: return (incomplete)
        once the state stands at that boundary.  ``stream``: the document's random-stream key (default: the
        state's, else one drawn from the default generator)."""

    @abstractmethod
    def fill(self, model: torch.nn.Module, input_ids: torch.Tensor, state: CarriedState, *,
             stream: StreamKey | None = None, hooks: Sequence[ChunkHook] = ()) -> torch.Tensor | None:
        """Forward only, without autograd: ``input_ids`` (B, t) continue the document at the state's position;
        their K/V are appended to ``state``.  Returns the logits of the last chunk (on the last pipeline stage;
        None elsewhere).  For inference over a kept state (prefill), and for probing."""

    # shared by the implementations --------------------------------------------------------------------------
    def prepare(self, adapter: CausalLMAdapter, input_ids: torch.Tensor, labels: torch.Tensor | None,
                segment_ids: torch.Tensor | None = None, spans=None) -> PreparedDocument:
        validate_inputs(input_ids, labels, self.chunk_size, adapter.vocab_size)
        input_ids = input_ids.to(adapter.device)
        targets = shift_targets(input_ids if labels is None else labels.to(adapter.device))
        positions = None
        if segment_ids is not None:
            validate_segments(segment_ids, input_ids)
            segment_ids = segment_ids.to(adapter.device)
            targets = mask_cross_document_targets(targets, segment_ids)
            positions = packed_positions(segment_ids)
        num_tokens = int((targets != IGNORE_INDEX).sum())
        if num_tokens == 0:
            raise ValueError("no position has a target (all labels are -100): the loss is undefined")
        length = input_ids.shape[1]
        spans = self.spans(length) if spans is None else check_spans(spans, length)
        return PreparedDocument(input_ids, targets, spans, num_tokens, positions, segment_ids)

    def attach(self, model: torch.nn.Module, doc: PreparedDocument, state: CarriedState | None,
               stream: StreamKey | None, stop_at: Boundary | None) -> tuple[CarriedState, bool, StreamKey]:
        """The state the run uses (the caller's, checked against the document and the chunks, or a new one: then
        ``own`` is True) and the document's stream key, recorded in the state."""
        own = state is None
        if own:
            if stop_at is not None:
                raise ValueError("stop_at needs a state of the caller's (state=rollout.new_state(...)): a rollout's "
                                 "own state is closed when it returns")
            state = self.new_state(model, doc.batch, doc.length)
        elif state.capacity < doc.length or state.batch != doc.batch:
            raise ValueError(f"the state holds {state.batch} x {state.capacity} tokens; this document is "
                             f"{doc.batch} x {doc.length}")
        else:
            check_boundary(state.boundary, doc.spans)
        if stream is None:
            stream = (StreamKey(*state.stream_key) if state.stream_key is not None
                      else StreamKey.from_default_generator())
        state.stream_key = (stream.seed, stream.step, stream.document)
        if self.state_observer is not None:
            state.observer = self.state_observer
        state.keep_outputs(self.keep_attention, self.keep_tokens, doc.length)
        state.position_ids = doc.positions
        return state, own, stream

    @staticmethod
    def begin_fill(adapter: CausalLMAdapter, input_ids: torch.Tensor, state: CarriedState,
                   stream: StreamKey | None) -> tuple[torch.Tensor, int, int, StreamKey]:
        """Checks a fill-only call: the tokens continue the state at its position and fit it.  Returns the tokens
        on the model's device, their [start, end) in the document, and the stream (the state's by default)."""
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be (batch, tokens) with tokens > 0; got shape {tuple(input_ids.shape)}")
        if state.in_backward:
            raise ValueError("the state is in the backward pass of a training rollout; fill continues only a state "
                             "in its forward (fill) phase")
        start, batch = state.filled, input_ids.shape[0]
        end = start + input_ids.shape[1]
        if end > state.capacity or batch != state.batch:
            raise ValueError(f"the state holds {state.batch} x {state.capacity} tokens with {start} filled; "
                             f"{batch} x {input_ids.shape[1]} more do not fit")
        check_token_ids(input_ids, adapter.vocab_size)
        if stream is None:
            stream = StreamKey(*state.stream_key) if state.stream_key is not None else StreamKey(seed=0)
        state.stream_key = (stream.seed, stream.step, stream.document)
        if state.position_ids is not None:  # a loaded state: extend its recorded positions
            fresh = torch.arange(start, end, dtype=torch.int64)[None].expand(batch, -1)
            state.position_ids = torch.cat([state.position_ids[:, :start].cpu(), fresh], dim=1)
        return input_ids.to(adapter.device), start, end, stream

    @staticmethod
    def begin_backward(state: CarriedState, device: torch.device) -> None:
        if not state.in_backward:
            state.in_backward, state.backward_chunks, state.grad_end = True, 0, state.filled
            state.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        else:
            state.loss_sum = state.loss_sum.to(device)

    @staticmethod
    def chunk_done(state: CarriedState, phase: str, chunk: int, span: tuple[int, int], hooks: Sequence[ChunkHook],
                   progress: ProgressFn | None, total: int) -> None:
        if phase == "fill":
            state.fill_chunks = chunk + 1
            done = state.fill_chunks
        else:
            state.backward_chunks += 1
            state.grad_end = span[0]
            done = state.backward_chunks
        event = ChunkEvent(phase, chunk, span[0], span[1], state)
        for hook in hooks:
            hook(event)
        if progress is not None:
            progress(phase, done, total)

    @staticmethod
    def result(doc: PreparedDocument, state: CarriedState, complete: bool, has_head: bool = True) -> RolloutResult:
        total = float(state.loss_sum) if state.loss_sum is not None else 0.0
        return RolloutResult(loss=total / doc.num_tokens if has_head else float("nan"), num_tokens=doc.num_tokens,
                             loss_sum=total, num_chunks=len(doc.spans), state_bytes=state.nbytes, complete=complete)


def check_boundary(boundary: Boundary, spans: list[tuple[int, int]]) -> None:
    """A caller's state must stand at a boundary of these chunks: where ``chunks`` of them leave it."""
    n = len(spans)
    if boundary.phase == "fill":
        expected = spans[boundary.chunks - 1][1] if boundary.chunks else 0
        ok = boundary.chunks <= n - 1 and boundary.position == expected
    else:
        expected = spans[n - 1 - boundary.chunks][1] if boundary.chunks < n else 0
        ok = boundary.chunks <= n and (boundary.position == expected or
                                       (boundary.chunks == 0 and boundary.position == spans[-1][0]))
    if not ok:
        raise ValueError(f"the state stands after {boundary.chunks} {boundary.phase} chunks at position "
                         f"{boundary.position}, which is not a boundary of this document's chunks {spans[:4]}...: "
                         "continue it with the document and chunking it was started with")


def stops_here(stop_at: Boundary | None, state: CarriedState) -> bool:
    return stop_at is not None and state.boundary.phase == stop_at.phase and state.boundary.chunks == stop_at.chunks
