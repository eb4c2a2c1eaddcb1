"""Exact chunk rollout across pipeline stages: chunks stream through the stages in order, backward in reverse.

Each process holds one stage (a model trimmed by ``rollout_dist.model.trim_to_stage``) and that stage's carried
K/V; hidden states of a chunk go to the next stage, their gradients come back; dK/dV never leave a stage.

Fill: stage s runs chunk c while stage s+1 runs chunk c-1 (sends do not wait).
Backward: chunks in reverse order under a one-forward-one-backward schedule, where "forward" is the recompute
of a chunk with autograd and "backward" its backward: stage s first recomputes ``p-1-s`` chunks ahead, then
alternates.  Backwards run in reverse chunk order on every stage, which the carried dK/dV need (chunk c-1 may
only run backward once chunk c has sent it its share).  With C chunks and p stages each stage idles for
(p-1)/(C+p-1) of the backward phase when chunk costs are equal.
"""
from __future__ import annotations

import torch

from ..engine.exact import (BackwardFn, RolloutResult, _capture_rng, _RestoredRng, check_spans, fixed_spans,
                            validate_inputs)
from ..engine.loss import IGNORE_INDEX, head_cross_entropy_sum, shift_targets
from ..model import CausalLMAdapter
from ..model.attention import KERNELS
from .layout import RankLayout
from .p2p import P2P


class PipelineRollout:
    """One stage's part of the exact rollout.  ``run`` returns the loss sum on the last stage, 0 elsewhere."""

    def __init__(self, chunk_size: int, layout: RankLayout, attention: str = "auto", keep_attention: bool = False,
                 vocab_tile: int = 0, keep_tokens: int = 0):
        if not isinstance(chunk_size, int) or chunk_size <= 0:
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        if attention not in KERNELS:
            raise ValueError(f"attention={attention!r} is not one of {KERNELS}")
        self.chunk_size, self.layout, self.attention = chunk_size, layout, attention
        self.keep_attention, self.vocab_tile, self.keep_tokens = keep_attention, vocab_tile, keep_tokens

    def spans(self, length: int) -> list[tuple[int, int]]:
        return fixed_spans(length, self.chunk_size)

    def run(self, model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor | None = None, *,
            loss_normalizer: float, backward: BackwardFn | None = None,
            spans: list[tuple[int, int]] | None = None) -> RolloutResult:
        adapter = CausalLMAdapter(model)
        lay = self.layout
        validate_inputs(input_ids, labels, self.chunk_size, adapter.vocab_size)
        device, dtype = adapter.device, adapter.dtype
        input_ids = input_ids.to(device)
        targets = shift_targets(input_ids if labels is None else labels.to(device))
        num_tokens = int((targets != IGNORE_INDEX).sum())
        backward = backward or torch.Tensor.backward
        batch, length = input_ids.shape
        spans = self.spans(length) if spans is None else check_spans(spans, length)
        state = adapter.new_state(batch, length)
        state.keep_outputs(self.keep_attention, self.keep_tokens, length)
        p2p = P2P()

        def hidden_shape(s, e):
            return (batch, e - s, adapter.hidden_size)

        def stage_input(s, e, grad: bool):
            if adapter.has_embedding:
                return adapter.embed(input_ids[:, s:e])
            h = p2p.recv(hidden_shape(s, e), dtype, device, lay.prev_rank)
            return h.requires_grad_(grad)

        rng = []
        pending: dict[int, tuple] = {}
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)

        def recompute(c):
            s, e = spans[c]
            with _RestoredRng(rng[c], device), torch.enable_grad():
                h_in = stage_input(s, e, grad=True)
                h = adapter.forward_layers(h_in, s, state, phase="recompute")
                if adapter.has_head:
                    ce = head_cross_entropy_sum(adapter.final_norm(h), adapter.head, targets[:, s:e], self.vocab_tile)
                    pending[c] = (h_in, ce)
                else:
                    p2p.send(h, lay.next_rank)
                    pending[c] = (h_in, h)

        def run_backward(c):
            nonlocal loss_sum
            s, e = spans[c]
            h_in, out = pending.pop(c)
            if adapter.has_head:
                backward(out / loss_normalizer)
                loss_sum += out.detach().to(torch.float64)
            else:
                dh = p2p.recv(hidden_shape(s, e), dtype, device, lay.next_rank)
                backward((out * dh).sum())  # d/d(out) of <out, dh> is dh: continues the chain rule
            if not adapter.has_embedding:
                p2p.send(h_in.grad, lay.prev_rank)

        state.allocate_grads()  # before the fill pass: fail fast where the carried state does not fit
        with adapter.chunk_attention(self.attention):
            with torch.no_grad():
                for s, e in spans[:-1]:
                    rng.append(_capture_rng(device))
                    h = adapter.forward_layers(stage_input(s, e, grad=False), s, state, phase="fill")
                    if not adapter.has_head:
                        p2p.send(h, lay.next_rank)
            rng.append(_capture_rng(device))
            order = list(range(len(spans) - 1, -1, -1))
            ahead = min(lay.pp - 1 - lay.stage, len(order))
            for c in order[:ahead]:
                recompute(c)
            for i, c in enumerate(order[ahead:]):
                recompute(c)
                run_backward(order[i])
            for c in order[len(order) - ahead:]:
                run_backward(c)
        p2p.drain()
        total = float(loss_sum)
        return RolloutResult(loss=total / num_tokens if adapter.has_head else float("nan"), num_tokens=num_tokens,
                             loss_sum=total, num_chunks=len(spans), state_bytes=state.nbytes)
