"""Memory mode across pipeline stages: each stage carries the memory of its own decoder layers.

Each process holds one stage of a ``MemoryModel`` (``MemoryModel.trim_to_stage``): its decoder layers, their
``LayerMemory`` modules and slots, and on the first stage the embedding, the chunk-index track and the topic vector
(the mean token embedding); the last stage has the final norm and LM head.  The state never crosses stages: the
slots of layer L are read and written only by L's stage.  What crosses, per chunk:

- forward (fill, and the recompute of the backward phase): the chunk's hidden states (B, c, H), and a small
  float32 message of signals (1 + layers, B): row 0 the topic shift d_t computed on the first stage (every
  stage's memory read is damped by it), row 1 + L layer L's damping exp(-beta_L d_t), filled in by L's stage
  (only logged: the last stage takes their mean for ``chunks.jsonl``);
- backward: the gradient of the hidden states, from stage s + 1 back to s.  The state's gradient stays on its stage:
  chunk t's backward hands it to the same stage's chunk t - 1.

Schedule, as ``MemoryRollout`` on one process: a fill pass without autograd stores, on every stage, its own
layers' slots at every chunk boundary (and on the first stage the topic); then the chunks in reverse order, each
recomputed from its stored carry under the same random stream (dropout keyed by the global layer index) and run
backward on ``<out, dh> + <S_t, dS_t>`` (the last stage: ``f_t CE_t + <S_t, dS_t>``).  The backward phase is
``PipelineRollout``'s one-forward-one-backward: stage s recomputes ``p-1-s`` chunks ahead (a recompute needs only
its stored carry), then alternates recompute and backward; backwards run in reverse chunk order on every stage,
as the handed-back state gradient needs.

The loss factors f_t (rollout.loss_weighting) are the last stage's business: it holds every chunk's loss and
receives every chunk's topic shift with its hidden states; the other stages backpropagate whatever gradient it
sends.  Its chunk records (``last_chunks``) are the ones one process writes; the other stages have none.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..engine.loss import head_cross_entropy_sum
from ..engine.memory import MemoryDocument, MemoryRollout, MemoryState
from ..engine.rollout import ChunkHook, RolloutResult, check_token_ids
from ..engine.streams import StreamKey
from ..engine.weighting import ChunkPlan, ImportanceWeights
from .layout import RankLayout
from .p2p import P2P


class PipelineMemoryRollout(MemoryRollout):
    """One stage's part of memory mode's rollout (module docstring).  ``run`` returns the loss on the last stage
    (NaN elsewhere, with ``loss_sum`` 0).  Like ``MemoryRollout`` it trains a document from its start: it does not
    stop inside one (``stop_at``), and its state is saved in the fill phase only, per stage."""

    def __init__(self, chunk_size: int, layout: RankLayout, bptt_chunks: int = 0, loss_weighting: str = "tokens",
                 ablate: bool = False, importance: ImportanceWeights | None = None, vocab_tile: int = 0):
        super().__init__(chunk_size, bptt_chunks=bptt_chunks, loss_weighting=loss_weighting, ablate=ablate,
                         importance=importance, vocab_tile=vocab_tile)
        self.layout = layout
        self.p2p_watch = None
        """Called with every tensor this stage sends or receives (``P2P.watch``)."""

    def run(self, model, *args, **kwargs) -> RolloutResult:
        """This stage's part of ``MemoryRollout.run`` (same arguments; every stage of a pipeline is called with
        the same ones).  Stages other than the last hold no loss: theirs is NaN."""
        result = super().run(model, *args, **kwargs)
        if not self._model(model).adapter.has_head:
            result.loss = float("nan")
        return result

    # ---- what crosses between stages ------------------------------------------------------------------------
    @staticmethod
    def _layers_total(ad) -> int:
        return ad.stage.total_layers if ad.stage is not None else ad.num_layers

    def _stage_input(self, model, p2p: P2P, input_ids: torch.Tensor, carry, grad: bool, tag: tuple):
        """A chunk's input to this stage: (hidden states, topic vector or None, topic shift (B,), signals).  On the
        first stage embedded here, else received from the stage before (a leaf that requires grad in the
        recompute, so its gradient can be sent back)."""
        ad = model.adapter
        if ad.has_embedding:
            hidden, topic, shift = model.embed_chunk(input_ids, carry)
            signals = torch.zeros(1 + self._layers_total(ad), input_ids.shape[0], dtype=torch.float32,
                                  device=shift.device)
            signals[0] = shift
            return hidden, topic, shift, signals
        b, c = input_ids.shape
        hidden = p2p.recv((b, c, ad.hidden_size), ad.dtype, ad.device, self.layout.prev_rank, (*tag, "hidden"))
        signals = p2p.recv((1 + self._layers_total(ad), b), torch.float32, ad.device, self.layout.prev_rank,
                           (*tag, "signals"))
        return hidden.requires_grad_(grad), None, signals[0].clone(), signals

    @staticmethod
    def _signed(signals: torch.Tensor, damping: list[torch.Tensor], offset: int) -> torch.Tensor:
        """``signals`` with this stage's layers' damping filled in (a new tensor: the shift row may be saved for
        backward)."""
        if not damping:
            return signals
        signals = signals.clone()
        signals[1 + offset:1 + offset + len(damping)] = torch.stack(damping).detach()
        return signals

    def _send(self, p2p: P2P, hidden: torch.Tensor, signals: torch.Tensor, tag: tuple) -> None:
        p2p.send(hidden, self.layout.next_rank, (*tag, "hidden"))
        p2p.send(signals, self.layout.next_rank, (*tag, "signals"))

    @staticmethod
    def _damping(signals: torch.Tensor, first: bool) -> torch.Tensor:
        """The mean damping over all layers (every stage's rows), as one process computes it."""
        if first:
            return torch.ones_like(signals[0])
        return torch.stack(list(signals[1:])).mean(0)

    # ---- the schedule ---------------------------------------------------------------------------------------
    def _rollout(self, model, doc: MemoryDocument, state: MemoryState, backward, ablate: bool, hooks,
                 progress) -> torch.Tensor:
        from ..model.memory import MemoryCarry

        ad = model.adapter
        first_stage, last_stage, offset = ad.has_embedding, ad.has_head, ad.layer_offset
        lay, n, k = self.layout, len(doc.chunks), self.bptt_chunks
        head = model.model.lm_head if last_stage else None
        need_losses = self.loss_weighting == "importance"
        p2p = P2P(max_in_flight=8, watch=self.p2p_watch)  # two messages per chunk: twice the exact pipeline's
        stored = [state.carry]
        shifts, damping, ces = [], [], []  # the last stage's signals of every chunk
        loss_sum = torch.zeros((), dtype=torch.float64, device=doc.input_ids.device)
        pending: dict[int, tuple] = {}
        handed: dict[int, list] = {}  # chunk t -> gradient of the slots chunk t produced (from chunk t + 1)
        weighting: dict[str, list] = {}

        def chunk(t: int, carry, grad: bool, phase: str):
            c = doc.chunks[t]
            hidden_in, topic, shift, signals = self._stage_input(model, p2p, doc.input_ids[:, c.start:c.end], carry,
                                                                 grad, (phase, t))
            hidden, slots, damp = model.run_layers(hidden_in, carry.slots, shift, first=t == 0, ablate_state=ablate,
                                                   layer_scope=doc.scope(t))
            signals = self._signed(signals, damp, offset)
            if not last_stage:
                self._send(p2p, hidden, signals, (phase, t))
            return hidden_in, hidden, MemoryCarry(slots, topic, t + 1), signals

        def recompute(t: int) -> None:
            carry = stored[t]
            cut = t == 0 or ablate or (k and t % k == 0)
            if not cut:
                carry = MemoryCarry(tuple(s.detach().requires_grad_() for s in carry.slots), carry.topic, carry.index)
            with torch.enable_grad():
                hidden_in, hidden, out, signals = chunk(t, carry, True, "recompute")
                if last_stage:
                    hidden = head_cross_entropy_sum(ad.final_norm(hidden), head, doc.chunk_targets(t), self.vocab_tile)
                    if not weighting:  # every chunk's signals are known now (the last chunk's from here)
                        if len(shifts) < n:
                            shifts.append(signals[0])
                            damping.append(self._damping(signals, t == 0))
                        if need_losses and len(ces) < n:
                            ces.append(hidden.detach())
                        weighting["factors"], weighting["weights"] = doc.factors(ces if need_losses else None,
                                                                                 shifts)
            pending[t] = (hidden_in, carry, cut, hidden, out.slots)

        def run_backward(t: int) -> None:
            nonlocal loss_sum
            hidden_in, carry, cut, out, slots = pending.pop(t)
            c = doc.chunks[t]
            with torch.enable_grad():
                if last_stage:
                    objective = out * weighting["factors"][t]
                else:
                    dh = p2p.recv(out.shape, out.dtype, out.device, lay.next_rank, ("backward", t, "grad"))
                    objective = (out * dh).sum()  # d/d(out) of <out, dh> is dh: continues the chain rule
                grads = handed.pop(t, None)
                if grads is not None:
                    objective = objective + sum((s * g).sum() for s, g in zip(slots, grads))
                backward(objective)
            if not cut:
                handed[t - 1] = [s.grad for s in carry.slots]
            if last_stage:
                loss_sum = loss_sum + out.detach().to(torch.float64)
            if not first_stage:
                p2p.send(hidden_in.grad, lay.prev_rank, ("backward", t, "grad"))
            state.backward_chunks, state.grad_end = n - t, c.start
            self._event(state, "backward", t, c, hooks, progress, n)

        try:
            with model.memory_attention():
                with torch.no_grad():  # 1. fill: every stage keeps its layers' state at every chunk boundary
                    for t, c in enumerate(doc.chunks):
                        if t == n - 1 and not need_losses:
                            break  # the last chunk's output state feeds no later chunk
                        _, hidden, out, signals = chunk(t, stored[-1], False, "fill")
                        stored.append(out)
                        if last_stage:
                            shifts.append(signals[0])
                            damping.append(self._damping(signals, t == 0))
                            if need_losses:
                                ces.append(head_cross_entropy_sum(ad.final_norm(hidden), head, doc.chunk_targets(t),
                                                                  self.vocab_tile))
                        state.carry, state.fill_chunks, state.filled = out, t + 1, c.end
                        self._event(state, "fill", t, c, hooks, progress, n - 1)
                state.stored = stored
                state.in_backward, state.backward_chunks, state.grad_end = True, 0, state.filled
                order = list(range(n - 1, -1, -1))  # 2. backward, last chunk first, one-forward-one-backward
                ahead = min(lay.pp - 1 - lay.stage, n)
                for t in order[:ahead]:
                    recompute(t)
                for i, t in enumerate(order[ahead:]):
                    recompute(t)
                    run_backward(order[i])
                for t in order[n - ahead:]:
                    run_backward(t)
        finally:
            p2p.drain()
        if last_stage:
            weights = weighting["weights"]
            self.last_chunks = [{"chunk": t, "start": c.start, "end": c.end, "tokens": doc.counts[t],
                                 "weight": weights[t], "topic_shift": float(shifts[t].mean()),
                                 "damping": float(damping[t].mean())} for t, c in enumerate(doc.chunks)]
        else:
            self.last_chunks = []
        return loss_sum

    def fill(self, model, input_ids: torch.Tensor, state: MemoryState, *, stream: StreamKey | None = None,
             hooks: Sequence[ChunkHook] = ()) -> torch.Tensor | None:
        """This stage's part of ``MemoryRollout.fill``: every stage is called with the same ``input_ids``; hidden
        states and the topic shift stream through the stages; the last stage returns the last chunk's logits, the
        others None."""
        from ..model.memory import MemoryCarry

        model = self._model(model)
        if state.in_backward:
            raise ValueError("the state is in the backward pass of a training rollout")
        ad = model.adapter
        check_token_ids(input_ids, ad.vocab_size)
        input_ids = input_ids.to(ad.device)
        stream = stream or (StreamKey(*state.stream_key) if state.stream_key else StreamKey(seed=0))
        state.stream_key = (stream.seed, stream.step, stream.document)
        p2p, hidden = P2P(max_in_flight=8, watch=self.p2p_watch), None
        try:
            with model.memory_attention(), torch.no_grad():
                for s in range(0, input_ids.shape[1], self.chunk_size):
                    t, ids = state.fill_chunks, input_ids[:, s:s + self.chunk_size]
                    hidden, topic, shift, signals = self._stage_input(model, p2p, ids, state.carry, False,
                                                                      ("fill", t))
                    hidden, slots, damp = model.run_layers(
                        hidden, state.carry.slots, shift, first=t == 0, ablate_state=self.ablate,
                        layer_scope=lambda layer, t=t: stream.scope(t, layer, input_ids.device))
                    if not ad.has_head:
                        self._send(p2p, hidden, self._signed(signals, damp, ad.layer_offset), ("fill", t))
                    start = state.filled
                    state.carry = MemoryCarry(slots, topic, t + 1)
                    state.fill_chunks, state.filled = t + 1, start + ids.shape[1]
                    self._event(state, "fill", t, ChunkPlan(start, state.filled, start), hooks, None, 0)
        finally:
            p2p.drain()
        return model.model.lm_head(ad.final_norm(hidden)) if ad.has_head else None

