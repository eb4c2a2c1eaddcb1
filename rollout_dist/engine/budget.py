"""Byte budget of an exact rollout step: its peak GPU memory, predicted before it runs (the memory model of
docs/performance.md).  Named "budget" because "memory" is memory mode (a carried, bounded state).

    peak = fixed (weights, gradients, optimizer states: what is allocated now)
         + carried state per token · T          (K/V, dK/dV, kept attention outputs, offload slots)
         + one chunk's saved activations and logits per chunk token · chunk_size
         + transient copies of one layer's prefix K/V and dK/dV in the attention backward

The carried state is exact arithmetic on the model shape.  A chunk's activations are counted, not guessed: a
short probe chunk runs through the model with saved-tensor hooks that add up what autograd keeps per token.
The step's peak is reached at its first backward chunk, after the whole fill pass, so checking it up front saves
the time a too-long document would spend before running out of memory.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model import CausalLMAdapter
from ..model.attention import ChunkKernel
from ..model.offload import offloaded_layers

GiB = 2 ** 30


def state_bytes_per_token(adapter: CausalLMAdapter, offload: str = "none", keep_attention: bool = False,
                          offload_layers: int = 0) -> int:
    """Device bytes per document token held by the carried state during backward (with ``offload``, for the
    first ``offload_layers`` layers only, 0: all)."""
    kv = adapter.kv_bytes_per_token()  # K and V of every layer
    one_layer_kind = kv // (2 * adapter.num_layers)  # K (or V) of one layer: one offload slot per token
    resident = adapter.num_layers - offloaded_layers(adapter.num_layers, offload_layers)
    per_token = {"none": 2 * kv,  # K/V and dK/dV
                 # dK/dV, two slots each for K and V, the K/V of the layers kept on the device
                 "kv": kv + 2 * 2 * one_layer_kind + 2 * resident * one_layer_kind,
                 # two slots each for K, V, dK and dV, and all four of the layers kept on the device
                 "all": 4 * 2 * one_layer_kind + 4 * resident * one_layer_kind}[offload]
    if keep_attention:
        per_token += kept_bytes_per_token(adapter)
    return per_token


def pending_gradient_bytes(module: torch.nn.Module) -> int:
    """Bytes of the gradients the next backward creates: every trainable parameter's that has none yet."""
    return sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad and p.grad is None)


def kept_bytes_per_token(adapter: CausalLMAdapter) -> int:
    """``keep_attention``: each layer's attention output (model dtype) and fp32 log-sum-exp per query head."""
    itemsize = torch.finfo(adapter.dtype).bits // 8
    return adapter.num_layers * (adapter.hidden_size * itemsize + 4 * adapter.model.config.num_attention_heads)


def logits_bytes_per_token(adapter: CausalLMAdapter, vocab_tile: int = 0) -> int:
    """Per chunk token: logits in the model dtype, their fp32 copy, the fp32 log-softmax and the gradient back in
    the model dtype, over the whole vocabulary or one tile of it."""
    vocab = adapter.vocab_size if not 0 < vocab_tile < adapter.vocab_size else vocab_tile
    itemsize = torch.finfo(adapter.dtype).bits // 8
    return vocab * (2 * itemsize + 8)


def activation_bytes_per_token(adapter: CausalLMAdapter, probe_tokens: int = 32, layers_only: bool = False) -> int:
    """Bytes autograd keeps per chunk token through the embedding, all decoder layers and the final norm during a
    recompute (of a pipeline stage: what the stage holds of them, its input received from the stage before),
    counted on a probe chunk (after a probe prefix of the same length) on the model's own device; weights and the
    carried buffers are not counted, nor the logits (``logits_bytes_per_token``).  With ``layers_only`` the
    decoder layers alone (the chunk's input still requires grad, as in training)."""
    with torch.random.fork_rng(devices=[adapter.device] if adapter.device.type == "cuda" else []):
        return _count_saved_bytes(adapter, probe_tokens, layers_only)


def _stage_input(adapter: CausalLMAdapter, ids: torch.Tensor) -> torch.Tensor:
    """The embedded chunk, or on a later pipeline stage the hidden states the stage before sends (with grad)."""
    if adapter.has_embedding:
        return adapter.embed(ids)
    return torch.zeros((*ids.shape, adapter.hidden_size), dtype=adapter.dtype, device=adapter.device,
                       requires_grad=torch.is_grad_enabled())


class SavedBytes:
    """Adds up the storage autograd keeps for backward inside ``with counter.hooks():`` (each storage once),
    leaving out the tensors given (weights, carried state)."""

    def __init__(self, skip):
        self.skip = {t.untyped_storage().data_ptr() for t in skip}
        self.saved: dict[int, int] = {}

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in self.skip:
            self.saved[ptr] = t.untyped_storage().nbytes()
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def per_token(self, tokens: int) -> int:
        return -(-sum(self.saved.values()) // tokens)


def _count_saved_bytes(adapter: CausalLMAdapter, probe_tokens: int, layers_only: bool) -> int:
    state = adapter.new_state(1, 2 * probe_tokens)
    state.allocate_grads()
    ids = torch.zeros((1, 2 * probe_tokens), dtype=torch.long, device=adapter.device)
    counter = SavedBytes([*state.keys, *state.values, *adapter.model.parameters()])
    kernel = ChunkKernel("math")  # the reference split kernel saves what the fused ones save
    with adapter.chunk_attention():
        with torch.no_grad():
            adapter.forward_layers(_stage_input(adapter, ids[:, :probe_tokens]), 0, state, phase="fill",
                                   kernel=kernel)
        with torch.enable_grad():
            chunk_ids = ids[:, probe_tokens:]
            hidden = _stage_input(adapter, chunk_ids) if layers_only else None
            with counter.hooks():
                if not layers_only:
                    hidden = _stage_input(adapter, chunk_ids)
                hidden = adapter.forward_layers(hidden, probe_tokens, state, phase="recompute", kernel=kernel)
                if not layers_only and adapter.has_head:
                    adapter.final_norm(hidden)
    return counter.per_token(probe_tokens)


def chunks_in_flight(adapter: CausalLMAdapter) -> int:
    """Recomputed chunk graphs a model holds at once in the backward pass: 1, or on pipeline stage s of p the
    p - 1 - s chunks the 1F1B schedule recomputes ahead plus the one running backward (parallel/pipeline.py)."""
    stage = adapter.stage
    return 1 if stage is None else stage.num_stages - stage.stage


@dataclass
class PeakEstimate:
    tokens: int
    chunk: int
    fixed: int
    state: int
    chunk_activations: int
    transient: int

    @property
    def total(self) -> int:
        return self.fixed + self.state + self.chunk_activations + self.transient

    def describe(self) -> str:
        return (f"{self.tokens} tokens, chunk {self.chunk}: carried state {self.state / GiB:.1f} GiB + one chunk's "
                f"activations and logits {self.chunk_activations / GiB:.1f} GiB + transient "
                f"{self.transient / GiB:.1f} GiB + weights/optimizer allocated now {self.fixed / GiB:.1f} GiB "
                f"= {self.total / GiB:.1f} GiB")


def estimate_peak(adapter: CausalLMAdapter, tokens: int, chunk: int, *, offload: str = "none",
                  keep_attention: bool = False, vocab_tile: int = 0, fixed: int | None = None,
                  activation_per_token: int | None = None, keep_tokens: int = 0,
                  offload_layers: int = 0) -> PeakEstimate:
    """Predicted peak device memory of one rollout of a (1, tokens) document with chunks of ``chunk`` tokens
    (on a pipeline stage: of its part, with ``chunks_in_flight`` recomputed chunks alive).

    ``keep_tokens`` > 0 (with ``keep_attention``): outputs kept for at most that many tokens.  ``fixed`` defaults
    to the bytes allocated on the model's device now (0 on CPU); optimizer states that are created at the first
    step are not in it yet."""
    device = adapter.device
    if fixed is None:
        fixed = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    if activation_per_token is None:
        activation_per_token = activation_bytes_per_token(adapter)
    chunk = min(chunk, tokens)
    one_layer_kv = adapter.kv_bytes_per_token() // adapter.num_layers  # K and V of one layer per token
    return PeakEstimate(
        tokens=tokens, chunk=chunk, fixed=fixed,
        state=tokens * state_bytes_per_token(adapter, offload, offload_layers=offload_layers)
        + (min(keep_tokens or tokens, tokens) * kept_bytes_per_token(adapter) if keep_attention else 0),
        # logits exist on the last stage only, for the chunk running backward
        chunk_activations=chunk * (chunks_in_flight(adapter) * activation_per_token
                                   + (logits_bytes_per_token(adapter, vocab_tile) if adapter.has_head else 0)),
        transient=2 * tokens * one_layer_kv)  # one layer's prefix K/V copies and its prefix dK/dV


def fit_advice(estimate: PeakEstimate, capacity: int, offload: str, keep_attention: bool,
               offload_layers: int = 0) -> str | None:
    """None if ``estimate`` fits ``capacity`` with 5% to spare, else what to change."""
    if estimate.total <= 0.95 * capacity:
        return None
    ways = []
    if keep_attention:
        ways.append("rollout.keep_attention=false (or a smaller rollout.keep_attention_tokens)")
    if offload == "none":
        ways.append("rollout.offload=kv")
    elif offload_layers:
        ways.append(f"more than rollout.offload_layers={offload_layers} (0: every layer)")
    elif offload == "kv":
        ways.append("rollout.offload=all")
    if estimate.chunk > 1024:
        ways.append(f"rollout.chunk_size={estimate.chunk // 2}")
    ways.append("data.max_doc_tokens to split the document")
    return (f"predicted peak {estimate.total / GiB:.1f} GiB exceeds the GPU's {capacity / GiB:.1f} GiB "
            f"({estimate.describe()}); try " + ", or ".join(ways))


CHUNK_CANDIDATES = (32768, 16384, 8192, 4096, 2048, 1024, 512, 256, 128)


def pick_chunk_size(adapter: CausalLMAdapter, tokens: int, capacity: int, *, offload: str = "none",
                    keep_attention: bool = False, vocab_tile: int = 0, fixed: int | None = None,
                    activation_per_token: int | None = None, headroom: float = 0.9, keep_tokens: int = 0,
                    offload_layers: int = 0) -> int:
    """The largest chunk of ``CHUNK_CANDIDATES`` whose predicted peak for a ``tokens``-token document stays
    within ``headroom`` of ``capacity`` bytes (larger chunks run faster: fewer, larger attention and matmul
    problems); the smallest candidate when none fits, and never more than the document."""
    if activation_per_token is None:
        activation_per_token = activation_bytes_per_token(adapter)
    for chunk in CHUNK_CANDIDATES:
        if chunk > tokens and chunk != CHUNK_CANDIDATES[-1]:
            continue
        est = estimate_peak(adapter, tokens, chunk, offload=offload, keep_attention=keep_attention,
                            vocab_tile=vocab_tile, fixed=fixed, activation_per_token=activation_per_token,
                            keep_tokens=keep_tokens, offload_layers=offload_layers)
        if est.total <= headroom * capacity:
            return min(chunk, tokens)
    return min(CHUNK_CANDIDATES[-1], tokens)


def fit_keep_tokens(adapter: CausalLMAdapter, tokens: int, chunk: int, capacity: int, *, offload: str = "none",
                    vocab_tile: int = 0, fixed: int | None = None, activation_per_token: int | None = None,
                    headroom: float = 0.9, offload_layers: int = 0) -> int:
    """How many of a ``tokens``-token document's last tokens ``keep_attention`` can keep outputs for within
    ``headroom`` of ``capacity`` bytes beside everything else: ``tokens`` if all of them, else whole chunks'
    worth (the chunks with the longest prefixes gain most), 0 if none."""
    base = estimate_peak(adapter, tokens, chunk, offload=offload, vocab_tile=vocab_tile, fixed=fixed,
                         activation_per_token=activation_per_token, offload_layers=offload_layers)
    room = headroom * capacity - base.total
    if room <= 0:
        return 0
    fits = int(room // kept_bytes_per_token(adapter))
    return tokens if fits >= tokens else fits // chunk * chunk
