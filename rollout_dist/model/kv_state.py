"""Carried K/V state of the exact rollout: the keys and values of every layer for a whole document.

The state is an explicit object passed into and out of the model adapter (never a module buffer), so the
engine can backpropagate through it, hash it and checkpoint it.  Buffers are preallocated for the document
length and filled in place chunk by chunk; the gradient buffers (dK, dV) are filled in place as backward runs
through the chunks in reverse order.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from .carried_state import LAYOUT_VERSION, CarriedState


class _CarriedKV(torch.autograd.Function):
    """The K (or V) one chunk attends to during the backward recompute: the carried prefix plus its own.

    ``chunk`` is (B, heads, c, D) as HF's attention makes it; ``buf`` is (B, T, heads, D), the flash-attention
    layout, so the prefix view handed to attention is contiguous for B = 1 and never copied.
    forward: makes sure ``buf[:, start:end]`` holds the chunk's fresh values (bit-identical to what the fill
    phase stored) and returns the view ``buf[:, :end]`` as (B, heads, end, D).
    backward: the prefix part of the incoming gradient is added in place into the state's gradient buffer
    ``[:, :start]`` (dK/dV handed back to earlier chunks); the chunk part gets ``[:, start:end]`` of it added,
    which holds what later chunks (already run backward) sent to this chunk's keys.
    """

    @staticmethod
    def forward(ctx, chunk: torch.Tensor, buf: torch.Tensor, state: KVState, layer: int, kind: str,
                start: int, filled: int):
        end = start + chunk.shape[2]
        ctx.state, ctx.layer, ctx.kind, ctx.start, ctx.end = state, layer, kind, start, end
        if end > filled:
            buf[:, start:end].copy_(chunk.transpose(1, 2))
        return buf.detach()[:, :end].transpose(1, 2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        s, e = ctx.start, ctx.end
        gbuf = ctx.state.grad_buffer(ctx.layer, ctx.kind, e)
        if s > 0:
            gbuf[:, :s].add_(grad[:, :, :s].transpose(1, 2))
        out = grad[:, :, s:] + gbuf[:, s:e].transpose(1, 2)
        ctx.state.grad_accumulated(ctx.layer, ctx.kind, s, e)
        return out, None, None, None, None, None, None


@dataclass
class KVState(CarriedState):
    """Per-layer K/V of one document (batch), shape (B, T, kv_heads, head_dim) each, in the model's dtype.

    ``phase`` is ``"fill"`` during a no-grad forward, where each chunk's K/V are written into the buffers, and
    ``"recompute"`` during the reverse pass, where the chunk's K/V come fresh from the graph and gradients for the
    prefix are accumulated into ``dkeys``/``dvalues``.  The rollout records where the document stands
    (``boundary``: chunks filled, chunks run backward) so that a state can be saved (``state_dict``, layout in
    rollout_dist.model.carried_state), loaded into a fresh one and continued.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    dkeys: list[torch.Tensor] = field(default_factory=list)
    dvalues: list[torch.Tensor] = field(default_factory=list)
    start: int = 0
    phase: str = "fill"
    filled: int = 0  # positions [0, filled) hold K/V written by the fill phase
    layer_offset: int = 0  # global index of this state's first layer (a pipeline stage holds a slice)
    length: int = 0  # tokens allocated for
    keep_attention: bool = False
    keep_from: int = 0  # with keep_attention: only chunks starting at or after this position keep their outputs
    # (layer, chunk start) -> (attention output, log-sum-exp, kernel parts) kept by the fill pass, consumed
    # (popped) by that chunk's recompute when ``keep_attention`` is on
    attention_cache: dict = field(default_factory=dict)
    # filled when ``verify_recompute`` is on: max |recomputed - stored| over layers, per chunk (debug aid)
    verify_recompute: bool = False
    recompute_mismatch: list[float] = field(default_factory=list)
    # told of every chunk's K/V as they are written (fill) or recomputed (``observe_kv``): digests, fault tests
    observer: object | None = None
    # where the document stands (the rollout advances these after each chunk)
    fill_chunks: int = 0
    backward_chunks: int = 0
    in_backward: bool = False
    grad_end: int = 0  # in the backward phase: dK/dV (and the K/V still needed) are live on [0, grad_end)
    loss_sum: torch.Tensor | None = None  # float64, the backward chunks' token losses so far
    stream_key: tuple[int, int, int] | None = None  # (seed, step, document) the document runs under
    position_ids: torch.Tensor | None = None  # (B, >= filled) positions the tokens ran at; None: 0, 1, 2, ...

    @classmethod
    def allocate(cls, num_layers: int, batch: int, kv_heads: int, length: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, layer_offset: int = 0) -> KVState:
        shape = (batch, length, kv_heads, head_dim)
        return cls(keys=[torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)],
                   values=[torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)],
                   layer_offset=layer_offset, length=length)

    # CarriedState ------------------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return self.length

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @property
    def batch(self) -> int:
        return self._layer_tensor("k", self.num_layers - 1).shape[0]

    @property
    def grads_allocated(self) -> bool:
        return bool(self.dkeys)

    def _layer_tensor(self, kind: str, layer: int) -> torch.Tensor:
        """The whole (B, T, heads, D) tensor of ``kind`` (k, v, dk, dv) for local ``layer``, wherever it lives."""
        return {"k": self.keys, "v": self.values, "dk": self.dkeys, "dv": self.dvalues}[kind][layer]

    def _settle(self) -> None:
        """Waits for copies still in flight into the tensors ``_layer_tensor`` returns (none here)."""

    def state_dict(self, since: int = 0) -> dict[str, torch.Tensor]:
        self._settle()
        b = self.boundary
        n, batch = b.position, self.batch
        if since and (self.in_backward or not 0 <= since <= n):
            raise ValueError(f"state_dict(since={since}) needs a fill-phase state holding at least that many tokens "
                             f"(this one: {b})")
        if self.position_ids is None:
            positions = torch.arange(since, n, dtype=torch.int64)[None].expand(batch, n - since)
        else:
            positions = self.position_ids[:, since:n].to("cpu", torch.int64)
        out = {"version": torch.tensor(LAYOUT_VERSION), "phase": torch.tensor(int(b.phase == "backward")),
               "chunks": torch.tensor(b.chunks), "position": torch.tensor(n), "positions": positions.clone(),
               "layers": torch.arange(self.layer_offset, self.layer_offset + self.num_layers),
               "stream": torch.tensor(self.stream_key if self.stream_key is not None else (-1, -1, -1))}
        kinds = (("k", "key"), ("v", "value")) + ((("dk", "dkey"), ("dv", "dvalue")) if self.in_backward else ())
        for i in range(self.num_layers):
            for kind, name in kinds:
                out[f"layer.{self.layer_offset + i}.{name}"] = self._layer_tensor(kind, i)[:, since:n].to("cpu",
                                                                                                        copy=True)
        if self.in_backward:
            out["loss_sum"] = (self.loss_sum.detach().to("cpu", torch.float64).clone() if self.loss_sum is not None
                               else torch.zeros((), dtype=torch.float64))
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        version = int(state.get("version", -1))
        if version != LAYOUT_VERSION:
            raise ValueError(f"carried-state layout version {version} cannot be loaded (this code reads "
                             f"version {LAYOUT_VERSION})")
        layers = [int(x) for x in state["layers"]]
        mine = list(range(self.layer_offset, self.layer_offset + self.num_layers))
        if layers != mine:
            raise ValueError(f"the saved state holds decoder layers {layers}, this one {mine}: load it into a state "
                             "of the same model and pipeline stage")
        n, backward = int(state["position"]), bool(int(state["phase"]))
        if n > self.capacity:
            raise ValueError(f"the saved state holds {n} tokens, more than this state's {self.capacity}")
        kinds = (("k", "key"), ("v", "value")) + ((("dk", "dkey"), ("dv", "dvalue")) if backward else ())
        if backward and not self.grads_allocated:
            self.allocate_grads()
        for i in range(self.num_layers):
            for kind, name in kinds:
                src, dst = state[f"layer.{self.layer_offset + i}.{name}"], self._layer_tensor(kind, i)
                if src.shape[0] != dst.shape[0] or src.shape[2:] != dst.shape[2:] or src.shape[1] != n:
                    raise ValueError(f"layer.{self.layer_offset + i}.{name} has shape {tuple(src.shape)}; this "
                                     f"state needs ({dst.shape[0]}, {n}, {dst.shape[2]}, {dst.shape[3]})")
                if src.dtype != dst.dtype:
                    raise ValueError(f"layer.{self.layer_offset + i}.{name} is {src.dtype}, this state {dst.dtype}")
                dst[:, :n].copy_(src)
        self.filled, self.in_backward = n, backward
        chunks = int(state["chunks"])
        self.fill_chunks, self.backward_chunks = (0, chunks) if backward else (chunks, 0)
        self.grad_end = n if backward else 0
        self.loss_sum = state["loss_sum"].clone() if backward else None
        key = tuple(int(x) for x in state["stream"])
        self.stream_key = None if key == (-1, -1, -1) else key
        self.position_ids = state["positions"].clone()
        self.attention_cache.clear()

    @property
    def nbytes(self) -> int:
        kept = sum(t.numel() * t.element_size() for out, lse, _ in self.attention_cache.values() for t in (out, lse))
        return kept + sum(t.numel() * t.element_size()
                          for t in (*self.keys, *self.values, *self.dkeys, *self.dvalues) if t is not None)

    def keep_outputs(self, keep: bool, last_tokens: int, length: int) -> None:
        """``keep_attention`` for the chunks starting within the last ``last_tokens`` of the document's ``length``
        tokens (0: every chunk)."""
        self.keep_attention = keep
        self.keep_from = max(0, length - last_tokens) if last_tokens else 0

    def keeps_attention(self) -> bool:
        """Whether the current chunk keeps (fill) or finds (recompute) its attention outputs."""
        return self.keep_attention and self.start >= self.keep_from

    def allocate_grads(self) -> None:
        self.dkeys = [torch.zeros_like(k) for k in self.keys]
        self.dvalues = [torch.zeros_like(v) for v in self.values]

    def begin_chunk(self, start: int, phase: str) -> None:
        if phase not in ("fill", "recompute"):
            raise ValueError(f"unknown KVState phase {phase!r}")
        self.start, self.phase = start, phase

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Called by the HF attention module (the Cache protocol): returns the K/V the chunk attends to."""
        layer_idx -= self.layer_offset
        s, e = self.start, self.start + key.shape[2]
        kbuf, vbuf = self.keys[layer_idx], self.values[layer_idx]
        if self.phase == "fill":
            kbuf[:, s:e].copy_(key.transpose(1, 2))
            vbuf[:, s:e].copy_(value.transpose(1, 2))
            if layer_idx == len(self.keys) - 1:
                self.filled = max(self.filled, e)
            self.observe_kv(layer_idx, s, e, kbuf[:, s:e], vbuf[:, s:e])
            return kbuf[:, :e].transpose(1, 2), vbuf[:, :e].transpose(1, 2)
        self.observe_kv(layer_idx, s, e, key.detach().transpose(1, 2), value.detach().transpose(1, 2),
                        *((kbuf[:, s:e], vbuf[:, s:e]) if e <= self.filled else ()))
        if self.verify_recompute and e <= self.filled:
            diff = max((key.detach().transpose(1, 2) - kbuf[:, s:e]).abs().max().item(),
                       (value.detach().transpose(1, 2) - vbuf[:, s:e]).abs().max().item())
            self.recompute_mismatch.append(diff)
        return (_CarriedKV.apply(key, kbuf, self, layer_idx, "k", s, self.filled),
                _CarriedKV.apply(value, vbuf, self, layer_idx, "v", s, self.filled))

    def observe_kv(self, layer: int, start: int, end: int, key: torch.Tensor, value: torch.Tensor,
                   stored_key: torch.Tensor | None = None, stored_value: torch.Tensor | None = None) -> None:
        """Hands the observer (if any) local ``layer``'s K/V of the chunk [start, end) in the canonical layout
        (B, c, kv_heads, head_dim): as the fill pass wrote them, or as the recompute made them, with what the
        state holds for the chunk (``stored_*``, None for the last chunk, which the fill pass never stores)."""
        if self.observer is not None:
            self.observer.on_chunk_kv(self.phase, self.layer_offset + layer, start, end, key, value, stored_key,
                                      stored_value)

    def grad_buffer(self, layer: int, kind: str, end: int) -> torch.Tensor:
        """dK (kind "k") or dV ("v") of ``layer``, valid on [0, end); written in place by the backward pass."""
        return (self.dkeys if kind == "k" else self.dvalues)[layer]

    def grad_accumulated(self, layer: int, kind: str, start: int, end: int) -> None:
        """Called once the chunk [start, end) has added its share into ``grad_buffer``: [0, start) stays live."""

    def autograd_hooks(self):
        """Context for the recompute pass (forward and backward): none for buffers on the device."""
        return contextlib.nullcontext()

    def close(self) -> None:
        """Waits for outstanding transfers (none here)."""
