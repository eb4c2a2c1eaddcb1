"""Memory mode's rollout: backpropagation through every chunk of a document with one chunk's activations.

A ``MemoryModel`` (rollout_dist.model.memory) carries a bounded per-layer state from chunk to chunk.  Training
it exactly means backpropagating through that state across all chunks (cutting it, as RMT's and ARMT's users
found, stops the memory from learning anything).  ``MemoryRollout`` does so in constant activation memory:

1. forward every chunk without autograd, storing only the carried state at each chunk boundary (layers x m x
   hidden per row: kilobytes to megabytes per chunk, whatever the chunk's length);
2. backward from the last chunk to the first: recompute chunk t from its stored input state (a leaf that
   requires grad) under the same random stream, and run backward on ``f_t * CE_t + <S_t, dS_t>``, where dS_t
   is the gradient the later chunks handed back for the state chunk t produced; the input state's ``.grad`` is
   handed on to chunk t - 1.

Parameters accumulate exactly the gradient of the whole-graph reference (``MemoryModel.forward``; tested in
float64 within 1e-9).  ``bptt_chunks=k`` cuts the handed-back gradient every k chunks (truncated BPTT, the same
cut the reference makes).  Chunk loss factors come from rollout_dist.engine.weighting, before any backward.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..model.carried_state import LAYOUT_VERSION, Boundary, CarriedState
from .loss import IGNORE_INDEX, cross_entropy_sum, head_cross_entropy_sum, shift_targets
from .rollout import BackwardFn, ChunkEvent, ChunkHook, ProgressFn, Rollout, RolloutResult, check_token_ids
from .streams import StreamKey
from .weighting import ChunkPlan, ImportanceWeights, chunk_factors, keyword_hit, plan_chunks


@dataclass
class MemoryDocument:
    """A (B, T) batch checked for memory mode: tokens on the model's device, targets, chunks, stream, weighting."""

    input_ids: torch.Tensor
    targets: torch.Tensor
    chunks: list[ChunkPlan]
    counts: list[int]
    stream: StreamKey
    weighting: str = "tokens"
    importance: ImportanceWeights | None = None
    boundary_scores: Sequence[float] | None = None
    scale: float = 1.0
    random: bool = True
    """Whether the model draws random numbers (dropout live in training mode)."""

    @property
    def batch(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_tokens(self) -> int:
        return sum(self.counts)

    def chunk_targets(self, t: int) -> torch.Tensor:
        """Chunk t's targets: those of the tokens it owns (re-read overlap tokens are context, -100)."""
        c = self.chunks[t]
        targets = self.targets[:, c.start:c.end]
        if c.own > c.start:
            targets = targets.clone()
            targets[:, :c.own - c.start] = IGNORE_INDEX
        return targets

    def chunk_ce(self, t: int, logits: torch.Tensor) -> torch.Tensor:
        return cross_entropy_sum(logits, self.chunk_targets(t))

    def scope(self, t: int):
        """Chunk t's random stream per layer (dropout draws equal on recompute); None when nothing is drawn (no
        dropout is live), which saves seeding the generators for every layer of every chunk."""
        if not self.random:
            return None
        device = self.input_ids.device
        return lambda layer: self.stream.scope(t, layer, device)

    def chunk_means(self, ces: Sequence[torch.Tensor]) -> list[float]:
        return [float(ce) / n if n else float("nan") for ce, n in zip(ces, self.counts)]

    def factors(self, ces: Sequence[torch.Tensor] | None, shifts: Sequence[torch.Tensor]) -> tuple[list, list]:
        """(f_t, w_t) for the chunks (rollout_dist.engine.weighting), from the forward pass's signals."""
        losses = None if ces is None else [float(ce) / n if n else 0.0 for ce, n in zip(ces, self.counts)]
        shift = [float(s.mean()) if torch.is_tensor(s) else float(s) for s in shifts]
        if self.boundary_scores is not None:
            shift = [max(a, float(b)) for a, b in zip(shift, self.boundary_scores)]
        keywords = None
        if self.importance is not None and self.importance.keywords:
            rows = self.input_ids.tolist()
            keywords = [any(keyword_hit(r[c.own:c.end], self.importance.keywords) for r in rows)
                        for c in self.chunks]
        return chunk_factors(self.weighting, self.counts, losses=losses, shifts=shift, keywords=keywords,
                             importance=self.importance, scale=self.scale)


def prepare_document(model, input_ids: torch.Tensor, labels: torch.Tensor | None, chunk_size: int | None,
                     spans: Sequence[tuple[int, int]] | None, stream: StreamKey | None, weighting: str = "tokens",
                     importance: ImportanceWeights | None = None, boundary_scores: Sequence[float] | None = None,
                     scale: float = 1.0) -> MemoryDocument:
    """Checks a memory-mode batch and cuts it into chunks (``chunk_size`` tokens, or planned ``spans``)."""
    ad = model.adapter
    if input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must be (batch, tokens) with at least 2 tokens; got {tuple(input_ids.shape)}")
    if labels is not None and labels.shape != input_ids.shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} differs from input_ids {tuple(input_ids.shape)}")
    check_token_ids(input_ids, ad.vocab_size)
    input_ids = input_ids.to(ad.device)
    targets = shift_targets(input_ids if labels is None else labels.to(ad.device))
    chunks = plan_chunks(input_ids.shape[1], chunk_size, spans)
    if boundary_scores is not None and len(boundary_scores) != len(chunks):
        raise ValueError(f"{len(boundary_scores)} boundary scores for {len(chunks)} chunks")
    ends = torch.nn.functional.pad((targets != IGNORE_INDEX).sum(0).cumsum(0), (1, 0)).tolist()  # one transfer
    counts = [ends[c.end] - ends[c.own] for c in chunks]
    if stream is None:
        stream = StreamKey.from_default_generator()
    random = model.training and any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules()) or (
        model.training and float(getattr(model.config, "attention_dropout", 0.0) or 0.0) > 0)
    return MemoryDocument(input_ids, targets, chunks, counts, stream, weighting, importance, boundary_scores, scale,
                          random)


class MemoryState(CarriedState):
    """Memory mode's carried state of one document (batch): the current ``MemoryCarry`` (fill phase) and, once a
    training rollout has run its forward pass, the carries stored at every chunk boundary.

    ``state_dict`` (canonical layout, version 1): version, phase, chunks, position, layers (n,), stream (3,),
    ``layer.{L}.slots`` (B, m, hidden) in the state dtype, ``topic`` (B, hidden) float32 (absent before the first
    chunk).  A pipeline stage's state holds its own layers under their global indices L (``layers`` lists them),
    and the topic on the first stage only (rollout_dist.parallel.memory_pipeline).  Only the fill phase is saved:
    a training rollout's backward phase is not snapshotted (memory mode has no chunk snapshots; a resume restarts
    the document, whose state is small)."""

    def __init__(self, model, batch: int, capacity: int):
        self._batch, self._capacity = batch, capacity
        self.num_layers, self.layer_offset = model.adapter.num_layers, model.adapter.layer_offset
        self.carry = model.initial_carry(batch)
        self.stored: list = []
        self.filled, self.fill_chunks, self.backward_chunks, self.in_backward, self.grad_end = 0, 0, 0, False, 0
        self.loss_sum, self.stream_key, self.position_ids = None, None, None
        self.observer = None

    batch = property(lambda self: self._batch)
    capacity = property(lambda self: self._capacity)
    grads_allocated = property(lambda self: True)

    @property
    def nbytes(self) -> int:
        carries = [self.carry, *self.stored]
        return sum(s.numel() * s.element_size() for c in carries for s in c.slots)

    def allocate_grads(self) -> None:
        return None

    def state_dict(self, since: int = 0) -> dict[str, torch.Tensor]:
        if self.in_backward:
            raise NotImplementedError("a memory-mode state is saved in its fill phase only (between documents or "
                                      "after fill); its backward phase is not snapshotted")
        out = {"version": torch.tensor(LAYOUT_VERSION), "phase": torch.tensor(0),
               "chunks": torch.tensor(self.fill_chunks), "position": torch.tensor(self.filled),
               "layers": torch.arange(self.layer_offset, self.layer_offset + self.num_layers),
               "stream": torch.tensor(list(self.stream_key or (0, 0, 0)), dtype=torch.int64)}
        for i, s in enumerate(self.carry.slots):
            out[f"layer.{self.layer_offset + i}.slots"] = s.detach().cpu().clone()
        if self.carry.topic is not None:
            out["topic"] = self.carry.topic.detach().cpu().clone()
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        from ..model.memory import MemoryCarry

        if int(state["phase"]) != 0:
            raise ValueError("only a fill-phase memory state can be loaded")
        slots = []
        for i, s in enumerate(self.carry.slots):
            name = f"layer.{self.layer_offset + i}.slots"
            if name not in state:
                raise ValueError(f"the memory state holds no {name}: it was saved by another pipeline stage "
                                 f"(layers {state['layers'].tolist()})")
            got = state[name]
            if got.shape != s.shape:
                raise ValueError(f"{name} has shape {tuple(got.shape)}; this state holds {tuple(s.shape)}")
            slots.append(got.to(device=s.device, dtype=s.dtype))
        topic = state.get("topic")
        device = self.carry.slots[0].device
        self.carry = MemoryCarry(tuple(slots), None if topic is None else topic.to(device), int(state["chunks"]))
        self.fill_chunks, self.filled = int(state["chunks"]), int(state["position"])
        self.stream_key = tuple(int(v) for v in state["stream"])

    def close(self) -> None:
        self.stored = []


class MemoryRollout(Rollout):
    """Runs documents through a ``MemoryModel`` (module docstring); ``make_rollout`` picks it for
    ``rollout.mode=memory``."""

    def __init__(self, chunk_size: int, bptt_chunks: int = 0, loss_weighting: str = "tokens", ablate: bool = False,
                 importance: ImportanceWeights | None = None, vocab_tile: int = 0):
        super().__init__(chunk_size, attention="sdpa", vocab_tile=vocab_tile)
        if not isinstance(bptt_chunks, int) or bptt_chunks < 0:
            raise ValueError(f"bptt_chunks must be 0 (every chunk) or a positive count, got {bptt_chunks!r}")
        self.bptt_chunks, self.loss_weighting, self.ablate = bptt_chunks, loss_weighting, ablate
        self.importance = importance
        self.last_chunks: list[dict] = []
        """Per chunk of the last document: start, end, mean loss, weight, topic shift, damping (logged)."""

    @staticmethod
    def _model(model):
        if not getattr(model, "is_memory_model", False):
            raise TypeError(f"rollout.mode=memory runs a MemoryModel (rollout_dist.with_memory); got "
                            f"{type(model).__name__}")
        return model

    def new_state(self, model, batch: int, length: int) -> MemoryState:
        return MemoryState(self._model(model), batch, length)

    def run(self, model, input_ids: torch.Tensor, labels: torch.Tensor | None = None, *,
            loss_normalizer: float | None = None, backward: BackwardFn | None = None,
            spans: list[tuple[int, int]] | None = None, state: MemoryState | None = None,
            stream: StreamKey | None = None, stop_at: Boundary | None = None, hooks: Sequence[ChunkHook] = (),
            progress: ProgressFn | None = None, ablate_state: bool | None = None,
            boundary_scores: Sequence[float] | None = None, segment_ids=None) -> RolloutResult:
        """Forward and backward of one (B, T) batch; parameter ``.grad`` accumulates the gradient of the document's
        weighted loss times ``num_tokens / loss_normalizer`` (1 by default: the loss itself)."""
        model = self._model(model)
        if stop_at is not None:
            raise ValueError("memory mode does not stop inside a document (no chunk snapshots)")
        if segment_ids is not None:
            raise ValueError("memory mode does not pack several documents into one row")
        if state is not None and (state.fill_chunks or state.in_backward):
            raise ValueError("memory mode trains a document from its start; pass a fresh state")
        ablate = self.ablate if ablate_state is None else ablate_state
        if stream is None and state is not None and state.stream_key is not None:
            stream = StreamKey(*state.stream_key)
        doc = prepare_document(model, input_ids, labels, self.chunk_size, spans, stream, self.loss_weighting,
                               self.importance, boundary_scores)
        if loss_normalizer is not None:
            doc.scale = doc.num_tokens / float(loss_normalizer)
        state = state or self.new_state(model, doc.batch, doc.input_ids.shape[1])
        state.stream_key = (doc.stream.seed, doc.stream.step, doc.stream.document)
        try:
            loss_sum = self._rollout(model, doc, state, backward or torch.Tensor.backward, ablate, hooks, progress)
        finally:
            state.close()
        n = doc.num_tokens
        return RolloutResult(loss=float(loss_sum) / n, num_tokens=n, loss_sum=float(loss_sum),
                             num_chunks=len(doc.chunks), state_bytes=state.nbytes)

    def _rollout(self, model, doc: MemoryDocument, state: MemoryState, backward, ablate: bool, hooks,
                 progress) -> torch.Tensor:
        n, head, k = len(doc.chunks), model.model.lm_head, self.bptt_chunks
        need_losses = self.loss_weighting == "importance"
        stored, shifts, damping, ces = [state.carry], [], [], []
        with model.memory_attention():
            with torch.no_grad():  # 1. forward: keep the state at every chunk boundary
                for t, c in enumerate(doc.chunks):
                    if t == n - 1 and not need_losses:
                        break  # the last chunk's output state feeds no later chunk
                    out = model.run_chunk(doc.input_ids[:, c.start:c.end], stored[-1], ablate_state=ablate,
                                          layer_scope=doc.scope(t))
                    stored.append(out.carry)
                    shifts.append(out.topic_shift)
                    damping.append(out.damping)
                    if need_losses:
                        ces.append(head_cross_entropy_sum(out.hidden, head, doc.chunk_targets(t), self.vocab_tile))
                    state.carry, state.fill_chunks, state.filled = out.carry, t + 1, c.end
                    self._event(state, "fill", t, c, hooks, progress, n - 1)
            state.stored = stored
            state.in_backward, state.backward_chunks, state.grad_end = True, 0, state.filled
            loss_sum = torch.zeros((), dtype=torch.float64, device=doc.input_ids.device)
            handed = None  # gradient of the state chunk t produced, from the later chunks
            factors = weights = None
            for t in range(n - 1, -1, -1):  # 2. backward, last chunk first
                c = doc.chunks[t]
                carry = stored[t]
                cut = t == 0 or ablate or (k and t % k == 0)
                if not cut:
                    carry = type(carry)(tuple(s.detach().requires_grad_() for s in carry.slots), carry.topic,
                                        carry.index)
                with torch.enable_grad():
                    out = model.run_chunk(doc.input_ids[:, c.start:c.end], carry, ablate_state=ablate,
                                          layer_scope=doc.scope(t))
                    ce = head_cross_entropy_sum(out.hidden, head, doc.chunk_targets(t), self.vocab_tile)
                    if factors is None:  # every chunk's signals are known now (the last chunk's from here)
                        if len(shifts) < n:
                            shifts.append(out.topic_shift.detach())
                            damping.append(out.damping.detach())
                        if need_losses and len(ces) < n:
                            ces.append(ce.detach())
                        factors, weights = doc.factors(ces if need_losses else None, shifts)
                    objective = ce * factors[t]
                    if handed is not None:
                        objective = objective + sum((s * g).sum() for s, g in zip(out.carry.slots, handed))
                    backward(objective)
                handed = None if cut else [s.grad for s in carry.slots]
                loss_sum += ce.detach().to(torch.float64)
                state.backward_chunks, state.grad_end = n - t, c.start
                self._event(state, "backward", t, c, hooks, progress, n)
        self.last_chunks = [{"chunk": t, "start": c.start, "end": c.end, "tokens": doc.counts[t],
                             "weight": weights[t], "topic_shift": float(shifts[t].mean()),
                             "damping": float(damping[t].mean())} for t, c in enumerate(doc.chunks)]
        return loss_sum

    @staticmethod
    def _event(state, phase, t, c, hooks, progress, total) -> None:
        event = ChunkEvent(phase, t, c.start, c.end, state)
        for hook in hooks:
            hook(event)
        if progress is not None:
            progress(phase, state.fill_chunks if phase == "fill" else state.backward_chunks, total)

    def fill(self, model, input_ids: torch.Tensor, state: MemoryState, *, stream: StreamKey | None = None,
             hooks: Sequence[ChunkHook] = ()) -> torch.Tensor:
        """Forward only of ``input_ids`` (B, t) continuing the document at the state's position, in chunks of
        ``chunk_size``; the state advances.  Returns the last chunk's logits."""
        model = self._model(model)
        if state.in_backward:
            raise ValueError("the state is in the backward pass of a training rollout")
        check_token_ids(input_ids, model.adapter.vocab_size)
        input_ids = input_ids.to(model.adapter.device)
        stream = stream or (StreamKey(*state.stream_key) if state.stream_key else StreamKey(seed=0))
        state.stream_key = (stream.seed, stream.step, stream.document)
        hidden = None
        with model.memory_attention(), torch.no_grad():
            for s in range(0, input_ids.shape[1], self.chunk_size):
                t, chunk = state.fill_chunks, input_ids[:, s:s + self.chunk_size]
                out = model.run_chunk(chunk, state.carry, ablate_state=self.ablate,
                                      layer_scope=lambda layer, t=t: stream.scope(t, layer, input_ids.device))
                start = state.filled
                state.carry, state.fill_chunks, state.filled, hidden = out.carry, t + 1, start + chunk.shape[1], \
                    out.hidden
                self._event(state, "fill", t, ChunkPlan(start, state.filled, start), hooks, None, 0)
        return model.model.lm_head(hidden)


def memory_forward_backward(model, input_ids: torch.Tensor, *, chunk_size: int | None,
                            labels: torch.Tensor | None = None,
                            ablate_state: bool | None = None, bptt_chunks: int = 0, loss_weighting: str = "tokens",
                            importance: ImportanceWeights | None = None, spans=None, boundary_scores=None,
                            loss_normalizer: float | None = None, backward: BackwardFn | None = None,
                            vocab_tile: int = 0, stream: StreamKey | None = None) -> RolloutResult:
    """Memory mode's ``chunked_forward_backward``: see ``MemoryRollout.run``; ``.loss`` is the token mean."""
    if chunk_size is None and spans:
        chunk_size = max(int(e) - int(s) for s, e in spans)
    rollout = MemoryRollout(chunk_size, bptt_chunks=bptt_chunks, loss_weighting=loss_weighting,
                            ablate=bool(model.memory_config.ablate if ablate_state is None else ablate_state),
                            importance=importance, vocab_tile=vocab_tile)
    return rollout.run(model, input_ids, labels, loss_normalizer=loss_normalizer, backward=backward, spans=spans,
                       stream=stream, boundary_scores=boundary_scores)
