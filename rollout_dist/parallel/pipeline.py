"""Exact chunk rollout across pipeline stages: chunks stream through the stages in order, backward in reverse.

Each process holds one stage (a model trimmed by ``rollout_dist.model.trim_to_stage``) and that stage's carried
K/V; hidden states of a chunk go to the next stage, their gradients come back; dK/dV never leave a stage.
With ``offload`` (kv, all) each stage keeps its own layers' K/V (and dK/dV) in host memory, staged into the
device a layer at a time as on one process (rollout_dist.model.offload); ``offload_layers`` counts the stage's
own layers (its first N; 0: all of them).

Fill: stage s runs chunk c while stage s+1 runs chunk c-1 (sends do not wait).
Backward: chunks in reverse order under a one-forward-one-backward schedule, where "forward" is the recompute
of a chunk with autograd and "backward" its backward: stage s first recomputes ``p-1-s`` chunks ahead, then
alternates.  Backwards run in reverse chunk order on every stage, which the carried dK/dV need (chunk c-1 may
only run backward once chunk c has sent it its share).  With C chunks and p stages each stage idles for
(p-1)/(C+p-1) of the backward phase when chunk costs are equal.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..engine.loss import head_cross_entropy_sum
from ..engine.rollout import BackwardFn, ChunkHook, ProgressFn, Rollout, RolloutResult, fixed_spans, stops_here
from ..engine.streams import StreamKey
from ..model import CausalLMAdapter, KVState
from ..model.carried_state import Boundary
from ..model.offload import OFFLOAD_MODES, HostPool
from .layout import RankLayout
from .p2p import P2P


class PipelineRollout(Rollout):
    """One stage's part of the exact rollout.  ``run`` returns the loss sum on the last stage, 0 elsewhere.

    Its carried state is the stage's own layers' K/V (``KVState`` with the stage's layer offset).  A run may stop
    at a fill boundary (``stop_at=Boundary("fill", k)``) on every stage and continue from there; the 1F1B backward
    schedule keeps recomputed chunks in flight between stages, so it has no boundary to stop at.

    ``offload`` (none, kv, all) and ``offload_layers`` are ``ExactRollout``'s, applied to the stage's own layers:
    ``offload_layers=N`` offloads the first N decoder layers of each stage (0: every layer of the stage)."""

    def __init__(self, chunk_size: int, layout: RankLayout, attention: str = "auto", keep_attention: bool = False,
                 vocab_tile: int = 0, keep_tokens: int = 0, offload: str = "none", offload_layers: int = 0):
        super().__init__(chunk_size, attention=attention, keep_attention=keep_attention, vocab_tile=vocab_tile,
                         keep_tokens=keep_tokens)
        if offload not in OFFLOAD_MODES:
            raise ValueError(f"offload={offload!r} is not one of {OFFLOAD_MODES}")
        if not isinstance(offload_layers, int) or offload_layers < 0:
            raise ValueError(f"offload_layers must be 0 (every layer) or a positive count, got {offload_layers!r}")
        self.layout = layout
        self.offload, self.offload_layers = offload, offload_layers
        self.host_pool = HostPool()  # this stage's host buffers, reused from document to document
        self.p2p_watch = None
        """Called with every tensor this stage sends or receives (``P2P.watch``): digests, fault tests."""

    def new_state(self, model: torch.nn.Module, batch: int, length: int) -> KVState:
        return CausalLMAdapter(model).new_state(batch, length, offload=self.offload,
                                                offload_layers=self.offload_layers, pool=self.host_pool)

    def _stage_input(self, adapter: CausalLMAdapter, p2p: P2P, chunk_ids: torch.Tensor, grad: bool,
                     tag: tuple = ()) -> torch.Tensor:
        """A chunk's input to this stage: embedded on the first stage, else the hidden states the stage before
        sends (a leaf that requires grad in the recompute, so its gradient can be sent back)."""
        if adapter.has_embedding:
            return adapter.embed(chunk_ids)
        h = p2p.recv((*chunk_ids.shape, adapter.hidden_size), adapter.dtype, adapter.device, self.layout.prev_rank,
                     tag)
        return h.requires_grad_(grad)

    def run(self, model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor | None = None, *,
            loss_normalizer: float | None = None, backward: BackwardFn | None = None,
            spans: list[tuple[int, int]] | None = None, state: KVState | None = None,
            stream: StreamKey | None = None, stop_at: Boundary | None = None, hooks: Sequence[ChunkHook] = (),
            progress: ProgressFn | None = None) -> RolloutResult:
        if stop_at is not None and stop_at.phase != "fill":
            raise ValueError("a pipeline rollout stops only at fill boundaries (stop_at=Boundary('fill', k))")
        adapter = CausalLMAdapter(model)
        lay = self.layout
        doc = self.prepare(adapter, input_ids, labels, spans=spans)
        normalizer = float(doc.num_tokens if loss_normalizer is None else loss_normalizer)
        backward = backward or torch.Tensor.backward
        device, dtype = adapter.device, adapter.dtype
        state, own, stream = self.attach(model, doc, state, stream, stop_at)
        spans, targets, batch = doc.spans, doc.targets, doc.batch
        n = len(spans)
        p2p = P2P(watch=self.p2p_watch)

        def hidden_shape(s, e):
            return (batch, e - s, adapter.hidden_size)

        def stage_input(c, grad: bool):
            s, e = spans[c]
            return self._stage_input(adapter, p2p, doc.input_ids[:, s:e], grad, ("recompute" if grad else "fill", c,
                                                                                 "hidden"))

        def layers(c, h, phase):
            return adapter.forward_layers(h, spans[c][0], state, phase=phase, kernel=self.kernel,
                                          layer_scope=lambda layer: stream.scope(c, layer, device))

        pending: dict[int, tuple] = {}

        def recompute(c):
            s, e = spans[c]
            # an offloaded state swaps saved K/V views for tokens (backward, later under 1F1B, stages them again)
            with torch.enable_grad(), state.autograd_hooks():
                h_in = stage_input(c, grad=True)
                h = layers(c, h_in, "recompute")
                if adapter.has_head:
                    ce = head_cross_entropy_sum(adapter.final_norm(h), adapter.head, targets[:, s:e], self.vocab_tile)
                    pending[c] = (h_in, ce)
                else:
                    p2p.send(h, lay.next_rank, ("recompute", c, "hidden"))
                    pending[c] = (h_in, h)

        def run_backward(c):
            s, e = spans[c]
            h_in, out = pending.pop(c)
            if adapter.has_head:
                backward(out / normalizer)
                state.loss_sum += out.detach().to(torch.float64)
            else:
                dh = p2p.recv(hidden_shape(s, e), dtype, device, lay.next_rank, ("backward", c, "grad"))
                backward((out * dh).sum())  # d/d(out) of <out, dh> is dh: continues the chain rule
            if not adapter.has_embedding:
                p2p.send(h_in.grad, lay.prev_rank, ("backward", c, "grad"))
            self.chunk_done(state, "backward", c, spans[c], hooks, progress, n)

        if not state.grads_allocated:
            state.allocate_grads()  # before the fill pass: fail fast where the carried state does not fit
        try:
            with adapter.chunk_attention():
                with torch.no_grad():
                    for c in range(state.fill_chunks, n - 1):
                        if stops_here(stop_at, state):
                            return self.result(doc, state, False, adapter.has_head)
                        h = layers(c, stage_input(c, grad=False), "fill")
                        if not adapter.has_head:
                            p2p.send(h, lay.next_rank, ("fill", c, "hidden"))
                        self.chunk_done(state, "fill", c, spans[c], hooks, progress, n - 1)
                if stops_here(stop_at, state):
                    return self.result(doc, state, False, adapter.has_head)
                self.begin_backward(state, device)
                order = list(range(n - 1, -1, -1))
                ahead = min(lay.pp - 1 - lay.stage, len(order))
                for c in order[:ahead]:
                    recompute(c)
                for i, c in enumerate(order[ahead:]):
                    recompute(c)
                    run_backward(order[i])
                for c in order[len(order) - ahead:]:
                    run_backward(c)
            return self.result(doc, state, True, adapter.has_head)
        finally:
            p2p.drain()
            if own:
                state.close()

    def fill(self, model: torch.nn.Module, input_ids: torch.Tensor, state: KVState, *,
             stream: StreamKey | None = None, hooks: Sequence[ChunkHook] = ()) -> torch.Tensor | None:
        """This stage's part of ``Rollout.fill``: every stage is called with the same ``input_ids``; hidden
        states stream through the stages; the last stage returns the last chunk's logits, the others None."""
        adapter = CausalLMAdapter(model)
        input_ids, start, end, stream = self.begin_fill(adapter, input_ids, state, stream)
        device, lay, p2p = adapter.device, self.layout, P2P()
        h = None
        with adapter.chunk_attention(), torch.no_grad():
            for s, e in fixed_spans(end, self.chunk_size, start):
                c = state.fill_chunks
                h = self._stage_input(adapter, p2p, input_ids[:, s - start:e - start], grad=False)
                h = adapter.forward_layers(h, s, state, phase="fill", kernel=self.kernel,
                                           layer_scope=lambda layer, c=c: stream.scope(c, layer, device))
                if not adapter.has_head:
                    p2p.send(h, lay.next_rank)
                self.chunk_done(state, "fill", c, (s, e), hooks, None, 0)
        p2p.drain()
        return adapter.logits(adapter.final_norm(h)) if adapter.has_head else None
