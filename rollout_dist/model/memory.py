"""Memory mode's model: an HF causal LM whose decoder layers each carry a bounded state from chunk to chunk.

``with_memory(hf_model, MemoryConfig())`` returns a ``MemoryModel``.  Each chunk runs through the HF model's own
modules with chunk-local causal attention (RoPE positions restart at 0 on each chunk's first token), and every
decoder layer L additionally

- **reads** its state S_L (m slots of width hidden_size) as extra keys and values: the layer's query, with the
  chunk-local rotation undone, attends over the m memory keys ``W_k norm(S_L)`` with values ``W_v norm(S_L)``; the
  result is added to the layer's local attention output, scaled per head by the injection gate ``g_L`` and damped
  by the topic shift: ``o = o_local + g_L * exp(-beta_L * d_t) * o_mem``, where d_t is the cosine distance between
  this chunk's topic vector (mean token embedding) and the previous chunk's (0 on the first chunk) and beta_L a
  learned strength; consecutive chunks on one topic (d_t near 0) inject fully, a shift damps it;
- **writes** S_L after the chunk from the hidden states H that layer L produced, by a gated recurrent projection:
  each slot j pools the chunk, ``u_j = softmax(q_j . W_w norm(H) / sqrt(r)) norm(H)``, then a selective decay
  (as Mamba's time step) gates it in: ``dt_j = softplus(a . u_j + b . S_j + dt_bias_j)``,
  ``lambda_j = exp(-dt_j * exp(A_j))``, ``S_j <- lambda_j S_j + (1 - lambda_j) u_j``, with learned per-slot decay
  rates A and time-step biases dt_bias (spread over slots at init, so some slots keep for long and some renew
  often); a filler chunk can leave a slot as it was (dt near 0), a salient one overwrite it.

Positions are dual-track: the local RoPE track restarts each chunk, and a learned chunk-index embedding over
log-spaced buckets (bucket 0: chunk 0, bucket b: chunks [2^(b-1), 2^b)) is added to the token embeddings that
form every layer's queries and keys, times a gate ``p`` (per channel).

At initialisation the memory's value projection (ARMT's choice) and ``p`` are zero, so the model equals the HF model
run on each chunk alone with positions restarting at 0 (tested in float64); their gradients are not zero, so both
tracks learn.  ``g_L`` starts at 1.  The state is
normalised before it is read and is a convex combination of normalised hidden states, so it cannot grow; it is
kept in float32 for bf16 models (``memory.state_dtype``).

The state is passed explicitly (``MemoryCarry``) into and out of ``run_chunk``; nothing hides in module buffers,
so the chunked backward (rollout_dist.engine.memory) can hand its gradient back.  ``forward`` runs the chunks in
order with plain autograd: the reference, and what inference uses.  A chunk is ``embed_chunk`` (the first
pipeline stage's: embedding, chunk-index track, topic shift), ``run_layers`` (a stage's decoder layers with their
memory) and the final norm; ``trim_to_stage`` keeps one stage's part, and the rollout across stages lives in
rollout_dist.parallel.  No distributed code lives here.
"""
from __future__ import annotations

import json
import math
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, ContextManager, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface

from ..config import MemoryConfig
from .adapter import CausalLMAdapter
from .attention import chunk_mask

MEMORY_ATTN_NAME = "rollout_memory"
WEIGHTS_NAME = "memory.safetensors"
CONFIG_NAME = "memory_config.json"


def chunk_bucket(index: int, buckets: int) -> int:
    """Log-spaced bucket of chunk ``index``: 0 for chunk 0, b for chunks [2^(b-1), 2^b), capped at buckets - 1."""
    return min(int(index).bit_length(), buckets - 1)


def _rms(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), eps=1e-6)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@dataclass
class MemoryRead:
    """What a layer's attention reads from memory, handed through HF's ``attention_mask`` argument: keys and
    values (B, kv_heads, m, D), the per-head scale (B, heads), and the chunk's RoPE cos/sin (B, c, D) to undo the
    query's rotation (memory keys carry no position).  ``keys`` None: nothing to read (the first chunk)."""

    keys: torch.Tensor | None
    values: torch.Tensor | None
    scale: torch.Tensor | None
    cos: torch.Tensor
    sin: torch.Tensor


def memory_attention_forward(module, query, key, value, attention_mask=None, dropout: float = 0.0,
                             scaling: float | None = None, sliding_window: int | None = None, **kwargs):
    """HF attention-interface function: chunk-local causal attention plus the gated memory read."""
    q_len = query.shape[2]
    gqa = query.shape[1] != key.shape[1]
    if sliding_window is not None and sliding_window < q_len:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=chunk_mask(q_len, q_len, sliding_window,
                                                                                      query.device),
                                             dropout_p=dropout, scale=scaling, enable_gqa=gqa)
    else:
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, dropout_p=dropout, scale=scaling,
                                             enable_gqa=gqa)
    read = attention_mask
    if isinstance(read, MemoryRead) and read.keys is not None:
        cos, sin = read.cos[:, None].to(query.dtype), read.sin[:, None].to(query.dtype)
        plain = query * cos - _rotate_half(query) * sin  # rotation by -theta undoes RoPE's +theta
        mem = F.scaled_dot_product_attention(plain, read.keys, read.values, scale=scaling,
                                             enable_gqa=plain.shape[1] != read.keys.shape[1])
        out = out + read.scale[:, :, None, None].to(out.dtype) * mem
    elif read is not None and not isinstance(read, MemoryRead):
        raise ValueError("memory-mode attention builds its own causal mask; padding masks are not supported")
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(MEMORY_ATTN_NAME, memory_attention_forward)


class LayerMemory(nn.Module):
    """The memory of one decoder layer: write (pooling, gated decay) and read (keys, values, injection gate)."""

    def __init__(self, hidden: int, slots: int, write_dim: int, kv_heads: int, head_dim: int, heads: int,
                 topic_damping: float, write_sharpness: float = 3.0):
        super().__init__()
        # the write scores q_j . W_w norm(h) / sqrt(r) start with a standard deviation of write_sharpness: each slot
        # begins attending to a few tokens of the chunk.  At ~0.1 (q ~ N(0, 1/r)) every slot took the chunk's mean,
        # a 64-token chunk's key token reached the slot diluted 64x, and a probe task stayed at chance for 300 steps
        # where 3.0 learned it in 50 (docs/memory_mode.md)
        self.slot_queries = nn.Parameter(torch.randn(slots, write_dim) * write_sharpness)
        self.write_key = nn.Linear(hidden, write_dim, bias=False)
        self.gate_input = nn.Parameter(torch.zeros(hidden))
        self.gate_state = nn.Parameter(torch.zeros(hidden))
        # time-step biases: softplus(dt_bias) spread log-uniformly over [0.01, 1] across slots (Mamba's dt init)
        dt = torch.exp(torch.linspace(math.log(0.01), math.log(1.0), slots))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.decay_log = nn.Parameter(torch.zeros(slots))
        self.key = nn.Linear(hidden, kv_heads * head_dim, bias=False)
        self.value = nn.Linear(hidden, kv_heads * head_dim, bias=False)
        self.inject = nn.Parameter(torch.ones(heads))
        strength = float(topic_damping)
        # shape (1,), not a 0-dim tensor: DeepSpeed broadcasts every parameter as bytes, which a 0-dim one cannot be
        self.topic_strength = nn.Parameter(torch.tensor([strength + math.log(-math.expm1(-strength))
                                                         if strength > 0 else -20.0]))
        nn.init.normal_(self.write_key.weight, std=hidden ** -0.5)
        nn.init.normal_(self.key.weight, std=hidden ** -0.5)
        nn.init.zeros_(self.value.weight)  # zero at init (ARMT's choice): step 0 is the base model, and its gradient
        # is the memory read's own signal (a zero gate in front of random values would scale every gradient by ~0)
        self.kv_heads, self.head_dim = kv_heads, head_dim

    def read(self, slots: torch.Tensor, damping: torch.Tensor, dtype: torch.dtype, cos, sin) -> MemoryRead:
        b, m, _ = slots.shape
        normed = _rms(slots).to(dtype)
        keys = self.key(normed).view(b, m, self.kv_heads, self.head_dim).transpose(1, 2)
        values = self.value(normed).view(b, m, self.kv_heads, self.head_dim).transpose(1, 2)
        scale = self.inject[None, :] * torch.exp(-F.softplus(self.topic_strength) * damping)[:, None]
        return MemoryRead(keys, values, scale, cos, sin)

    def write(self, slots: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """The state after a chunk in which this layer produced ``hidden`` (B, c, H)."""
        dtype = slots.dtype
        h = _rms(hidden.to(dtype))
        keys = F.linear(h, self.write_key.weight.to(dtype))  # (B, c, r)
        scores = torch.einsum("mr,bcr->bmc", self.slot_queries.to(dtype), keys) * keys.shape[-1] ** -0.5
        pooled = torch.softmax(scores, dim=-1) @ h  # (B, m, H)
        dt = F.softplus(pooled @ self.gate_input.to(dtype) + slots @ self.gate_state.to(dtype)
                        + self.dt_bias.to(dtype))
        keep = torch.exp(-dt * torch.exp(self.decay_log.to(dtype)))[..., None]
        return keep * slots + (1 - keep) * pooled


@dataclass
class MemoryCarry:
    """What one chunk hands the next: each layer's slots (B, m, H), the previous chunk's topic vector (B, H) or
    None before the first chunk, and the index of the next chunk."""

    slots: tuple[torch.Tensor, ...]
    topic: torch.Tensor | None
    index: int = 0

    def detached(self) -> MemoryCarry:
        return MemoryCarry(tuple(s.detach() for s in self.slots),
                           None if self.topic is None else self.topic.detach(), self.index)


@dataclass
class ChunkOutput:
    """A chunk's final hidden states (after the final norm), the carry after it, and its topic signals."""

    hidden: torch.Tensor
    carry: MemoryCarry
    topic_shift: torch.Tensor  # (B,) cosine distance to the previous chunk's topic (0 on the first chunk)
    damping: torch.Tensor  # (B,) mean over layers of exp(-beta_L * shift): how much of the memory is injected


@dataclass
class MemoryOutput:
    """What ``MemoryModel.forward`` returns: the weighted loss (None without targets), the logits of every
    position (from the chunk that owns it), and per chunk the mean token loss, the loss weight, the topic shift
    and the injection damping."""

    loss: torch.Tensor | None
    logits: torch.Tensor | None
    num_tokens: int
    chunk_losses: list[float] = field(default_factory=list)
    chunk_weights: list[float] = field(default_factory=list)
    topic_shift: list[float] = field(default_factory=list)
    damping: list[float] = field(default_factory=list)
    carry: MemoryCarry | None = None


class MemoryModel(nn.Module):
    """An HF causal LM (``self.model``, llama/mistral/qwen2/qwen3) with a bounded per-layer memory (module
    docstring).  Its parameters are the HF model's plus ``self.memory``'s and the chunk-index track's."""

    is_memory_model = True

    def __init__(self, model: nn.Module, config: MemoryConfig | None = None, device: torch.device | str | None = None):
        super().__init__()
        self.memory_config = config or MemoryConfig()
        self.model = model
        ad = CausalLMAdapter(model)
        cfg = self.memory_config
        dtype = ad.dtype
        # a model still on the meta device (a pipeline stage's, before it is trimmed and placed) gets its memory on
        # ``device``: created in the order and from the generator one process holding the whole model uses
        device = torch.device(device) if device is not None else ad.device
        heads = model.config.num_attention_heads
        with torch.device(device):
            self.memory = nn.ModuleList(LayerMemory(ad.hidden_size, cfg.slots, cfg.write_dim, ad.kv_heads,
                                                    ad.head_dim, heads, cfg.topic_damping, cfg.write_sharpness)
                                        for _ in range(ad.num_layers))
            self.chunk_index = nn.Embedding(cfg.chunk_buckets, ad.hidden_size)
            nn.init.normal_(self.chunk_index.weight, std=0.02)
            self.chunk_gate = nn.Parameter(torch.zeros(ad.hidden_size))  # zero at init
        self.memory.to(dtype)
        self.chunk_index.to(dtype)
        self.chunk_gate.data = self.chunk_gate.data.to(dtype)
        if ad.stage is not None:  # a model already trimmed to a stage: the document track lives on the first
            self._drop_document_track(ad.stage)

    def trim_to_stage(self, stage: int, counts: list[int]):
        """Keeps only pipeline stage ``stage``'s part (in place; rollout_dist.model.stage): its HF layers, their
        memory, and on the first stage the chunk-index track (it is added to the embeddings).  Returns the
        ``StageInfo``.  Parameter names stay local; ``rollout_stage`` maps them to the whole model's
        (``stage_state_dict``, ``memory_state_dict``)."""
        from .stage import trim_to_stage

        info = trim_to_stage(self.model, stage, counts)
        self.memory = nn.ModuleList(list(self.memory)[info.first_layer:info.first_layer + info.num_layers])
        self._drop_document_track(info)
        return info

    def _drop_document_track(self, info) -> None:
        if not info.is_first:
            self.chunk_index = None
            self.chunk_gate = None

    @property
    def rollout_stage(self):
        """The ``StageInfo`` of the pipeline stage this model was trimmed to, else None."""
        return getattr(self.model, "rollout_stage", None)

    # ---- pieces -------------------------------------------------------------------------------------------------
    @property
    def config(self):
        return self.model.config

    @property
    def adapter(self) -> CausalLMAdapter:
        return CausalLMAdapter(self.model)

    @property
    def state_dtype(self) -> torch.dtype:
        dtype = next(self.model.parameters()).dtype
        choice = self.memory_config.state_dtype
        if choice == "float32" or (choice == "auto" and dtype in (torch.bfloat16, torch.float16)):
            return torch.float32
        return dtype

    def memory_parameters(self) -> list[nn.Parameter]:
        """The parameters memory mode adds (gates, decays, projections, chunk-index track): their own optimizer
        group."""
        track = [] if self.chunk_index is None else [*self.chunk_index.parameters(), self.chunk_gate]
        return [*self.memory.parameters(), *track]

    def initial_carry(self, batch: int, device=None) -> MemoryCarry:
        """The state before a document's first chunk: zero slots (they read as nothing)."""
        ad = self.adapter
        device = device or ad.device
        slots = tuple(torch.zeros(batch, self.memory_config.slots, ad.hidden_size, dtype=self.state_dtype,
                                  device=device) for _ in range(ad.num_layers))
        return MemoryCarry(slots, None, 0)

    @contextmanager
    def memory_attention(self):
        """Routes the model's attention modules to memory-mode attention while chunks run."""
        previous = self.model.config._attn_implementation
        self.model.config._attn_implementation = MEMORY_ATTN_NAME
        try:
            yield
        finally:
            self.model.config._attn_implementation = previous

    def run_chunk(self, input_ids: torch.Tensor, carry: MemoryCarry, *, ablate_state: bool = False,
                  layer_scope: Callable[[int], ContextManager] | None = None) -> ChunkOutput:
        """One chunk (B, c) reading ``carry``: its final hidden states and the carry after it.  ``ablate_state``
        reads zero slots (the memory contributes nothing).  ``layer_scope(layer)`` is entered around each layer
        (the rollout's random stream, so a recompute draws the dropout masks of the first run).  Call inside
        ``memory_attention()``.  The whole model's chunk: ``embed_chunk``, ``run_layers`` and the final norm,
        which a pipeline stage runs its share of."""
        hidden, topic, shift = self.embed_chunk(input_ids, carry)
        hidden, slots, damping = self.run_layers(hidden, carry.slots, shift, first=carry.topic is None,
                                                 ablate_state=ablate_state, layer_scope=layer_scope)
        damp = torch.stack(damping).mean(0) if damping else torch.ones_like(shift)
        return ChunkOutput(self.adapter.final_norm(hidden), MemoryCarry(slots, topic, carry.index + 1), shift, damp)

    def embed_chunk(self, input_ids: torch.Tensor, carry: MemoryCarry) -> tuple[torch.Tensor, torch.Tensor,
                                                                                  torch.Tensor]:
        """The first stage's part of a chunk (B, c): the hidden states entering the first decoder layer (token
        embeddings plus the gated chunk-index embedding of ``carry.index``), the chunk's topic vector (B, H)
        float32 and its topic shift (B,) from ``carry.topic`` (0 on the first chunk)."""
        ad = self.adapter
        emb = ad.embed(input_ids)
        topic = emb.detach().to(torch.float32).mean(dim=1)
        if carry.topic is None:
            shift = torch.zeros(topic.shape[0], dtype=topic.dtype, device=topic.device)
        else:
            shift = 1 - F.cosine_similarity(topic, carry.topic.to(topic.dtype), dim=-1)
        bucket = chunk_bucket(carry.index, self.memory_config.chunk_buckets)
        hidden = emb + self.chunk_gate * self.chunk_index.weight[bucket]  # a Python index: no host-to-device copy
        return hidden, topic, shift

    def run_layers(self, hidden: torch.Tensor, slots: Sequence[torch.Tensor], shift: torch.Tensor, *, first: bool,
                   ablate_state: bool = False, layer_scope: Callable[[int], ContextManager] | None = None
                   ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], list[torch.Tensor]]:
        """This model's (or stage's) decoder layers on a chunk's hidden states (B, c, H), each reading and then
        writing its slots: (hidden states after the last of them, before any final norm; the new slots; each
        layer's damping exp(-beta_L * shift) (B,), none on the ``first`` chunk, which reads nothing).
        ``shift`` is the chunk's topic shift (the first stage's ``embed_chunk``); ``layer_scope`` gets global
        layer indices."""
        ad = self.adapter
        positions = torch.arange(hidden.shape[1], device=hidden.device)[None].expand(hidden.shape[0], -1)
        cos, sin = ad.decoder.rotary_emb(hidden, positions)
        new_slots, damping = [], []
        for i, (layer, mem) in enumerate(zip(ad.layers, self.memory)):
            state = torch.zeros_like(slots[i]) if ablate_state else slots[i]
            if first:
                read = MemoryRead(None, None, None, cos, sin)
            else:
                read = mem.read(state, shift, hidden.dtype, cos, sin)
                damping.append(torch.exp(-F.softplus(mem.topic_strength.detach().float()) * shift))
            with layer_scope(ad.layer_offset + i) if layer_scope is not None else nullcontext():
                out = layer(hidden, attention_mask=read, position_ids=positions, position_embeddings=(cos, sin),
                            use_cache=False)
            hidden = out[0] if isinstance(out, tuple) else out
            new_slots.append(mem.write(state, hidden))
        return hidden, tuple(new_slots), damping

    # ---- the reference: every chunk in one autograd graph ---------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, chunk_size: int | None = None, labels: torch.Tensor | None = None, *,
                ablate_state: bool | None = None, bptt_chunks: int = 0, loss_weighting: str = "tokens",
                spans: Sequence[tuple[int, int]] | None = None, importance=None, stream=None,
                return_logits: bool = True, carry: MemoryCarry | None = None) -> MemoryOutput:
        """Runs ``input_ids`` (B, T) chunk by chunk with plain autograd (the whole graph is kept).

        ``labels`` (default: ``input_ids``; -100 ignored) are shifted inside, as HF does; ``.loss`` is the
        weighted chunk loss (rollout_dist.engine.weighting; ``tokens``: HF's mean).  ``chunk_size`` or ``spans``
        (planned chunks, which may overlap: re-read tokens are context only) cut the document.  ``bptt_chunks``
        > 0 cuts the state's gradient every that many chunks.  ``ablate_state`` (default ``memory.ablate``)
        zeroes the carried state.  ``carry`` continues a document from a previous call's ``.carry``."""
        from ..engine.memory import prepare_document  # engine builds on model, not the other way round

        ablate = self.memory_config.ablate if ablate_state is None else ablate_state
        doc = prepare_document(self, input_ids, labels, chunk_size, spans, stream, loss_weighting, importance)
        carry = carry or self.initial_carry(doc.batch)
        outputs, ces, logits = [], [], []
        with self.memory_attention():
            for t, chunk in enumerate(doc.chunks):
                if bptt_chunks and t % bptt_chunks == 0:
                    carry = carry.detached()
                out = self.run_chunk(doc.input_ids[:, chunk.start:chunk.end], carry, ablate_state=ablate,
                                     layer_scope=doc.scope(t))
                carry = out.carry
                chunk_logits = self.model.lm_head(out.hidden)
                ces.append(doc.chunk_ce(t, chunk_logits))
                if return_logits:
                    logits.append(chunk_logits[:, chunk.own - chunk.start:])
                outputs.append(out)
        signals = torch.stack([torch.stack([ce.detach().double(), o.topic_shift.mean().double(),
                                            o.damping.mean().double()]) for ce, o in zip(ces, outputs)]).tolist()
        ce_values, shifts, damping = zip(*signals)  # one transfer to the host for all chunks
        factors, weights = doc.factors(ce_values, shifts)
        loss = sum(f * ce for f, ce in zip(factors, ces))
        return MemoryOutput(loss=loss, logits=torch.cat(logits, dim=1) if return_logits else None,
                            num_tokens=doc.num_tokens, chunk_losses=doc.chunk_means(ce_values),
                            chunk_weights=weights, topic_shift=list(shifts), damping=list(damping), carry=carry)

    # ---- saving -------------------------------------------------------------------------------------------------
    def memory_state_dict(self) -> dict[str, torch.Tensor]:
        """The memory's tensors (not the HF model's), under the whole model's names: a pipeline stage's layer
        indices made global, so the stages' dicts together are one process's."""
        from .stage import global_name

        own, info = {id(p) for p in self.model.parameters()}, self.rollout_stage
        return {global_name(k, info): v for k, v in self.state_dict().items()
                if not k.startswith("model.") and id(v) not in own}

    def save_pretrained(self, directory, **kwargs) -> None:
        """The HF model as plain transformers saves it (loadable by ``AutoModelForCausalLM.from_pretrained``),
        and beside it ``memory.safetensors`` and ``memory_config.json``."""
        from safetensors.torch import save_file

        if self.rollout_stage is not None:
            raise ValueError("a pipeline stage holds part of the model: join the stages first (a training run's "
                             "export and `python -m rollout_dist.checkpoint export` do)")
        directory = Path(directory)
        self.model.save_pretrained(directory, **kwargs)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.memory_state_dict().items()},
                  str(directory / WEIGHTS_NAME))
        (directory / CONFIG_NAME).write_text(json.dumps(asdict(self.memory_config), indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, directory, **kwargs) -> MemoryModel:
        """Loads what ``save_pretrained`` wrote; ``kwargs`` go to ``AutoModelForCausalLM.from_pretrained``."""
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM

        directory = Path(directory)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory / name} is missing: {directory} was not written by "
                                        "MemoryModel.save_pretrained (a plain HF directory: use with_memory)")
        model = AutoModelForCausalLM.from_pretrained(directory, **kwargs)
        config = MemoryConfig(**json.loads((directory / CONFIG_NAME).read_text()))
        wrapped = cls(model, config)
        state = load_file(str(directory / WEIGHTS_NAME), device=str(wrapped.adapter.device))
        missing, unexpected = wrapped.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("model.")]
        if missing or unexpected:
            raise ValueError(f"{directory / WEIGHTS_NAME} does not match this memory configuration: missing "
                             f"{missing[:4]}, unexpected {unexpected[:4]}")
        return wrapped


def with_memory(hf_model: nn.Module, config: MemoryConfig | None = None,
                device: torch.device | str | None = None) -> MemoryModel:
    """``hf_model`` (an HF causal LM of the llama, mistral, qwen2 or qwen3 family) with memory mode's per-layer
    state; ``config`` defaults to ``MemoryConfig()``.  At initialisation the result equals ``hf_model`` run on
    each chunk alone (positions restarting at 0).  ``device``: where the memory is created (default: the model's;
    give it for a model on the meta device).  A model trimmed to a pipeline stage gets the memory of its layers,
    and the chunk-index track on the first stage; ``MemoryModel.trim_to_stage`` trims a whole one."""
    return MemoryModel(hf_model, config, device)
