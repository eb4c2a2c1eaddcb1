"""What fits where, for one run's rollout: host memory checked up front, chunk size and kept attention outputs
sized from GPU memory, and the predicted peak logged with what to change if it does not fit.

The byte counts are engine/budget.py's (GPU) and model/offload.py's (host); this module decides with them.
Every rank takes the smallest of all ranks' picks (``RunContext.smallest_over_ranks``), so that all stages and
replicas cut documents alike.

Memory mode (``rollout.mode=memory``) keeps no K/V: its peak is the fixed part, one chunk's activations and
logits (counted on a probe chunk that reads the memory), and the small states stored at every chunk boundary.
Its chunk size is part of the model, so it is never picked from memory (TrainConfig refuses
``rollout.chunk_size=0`` there without a chunk index) and there are no kept attention outputs to size.
"""
from __future__ import annotations

import functools
import logging
import os

import torch

from ..config import ConfigError, TrainConfig
from ..engine import Rollout
from ..engine.budget import (GiB, PeakEstimate, SavedBytes, activation_bytes_per_token, estimate_peak, fit_advice,
                             fit_keep_tokens, logits_bytes_per_token, pending_gradient_bytes, pick_chunk_size)
from ..model import CausalLMAdapter
from ..model.offload import check_host_memory, host_bytes_needed, local_ranks_on_host, offloaded_layers
from ..model.stage import stage_layer_counts
from .context import RunContext
from .data_pipeline import DataPipeline

log = logging.getLogger("rollout_dist")


def check_host_fits(cfg: TrainConfig, model: torch.nn.Module, longest_doc: int) -> None:
    """Refuses up front, with the figures, a run whose offloaded K/V (longest document) and ZeRO-Offload
    optimizer (16 bytes per parameter in fp32, 8 in bf16, split over the data-parallel ranks) would not fit
    the host memory available now: otherwise the kernel kills the job mid-step, after the fill pass.

    Every process of this host offloads its own share at once, so one share times the local processes is
    compared with what the host's memory cgroup (else MemAvailable) leaves (``check_host_memory``).  With
    pipeline stages a process offloads its stage's layers (the first ``rollout.offload_layers`` of them, 0:
    all); the share counted is the largest stage's, the same on every rank, so that all ranks refuse alike.

    Runs at construction, before the process group exists and before the model is trimmed to a stage, so the
    sizes come from the launcher's environment and the stage split from ``stage_layer_counts``."""
    parts = []
    if cfg.rollout.offload != "none":
        ad = CausalLMAdapter(model)
        stages = [ad.num_layers]
        if cfg.parallel.pp > 1:
            try:
                stages = stage_layer_counts(model, cfg.parallel.pp, cfg.parallel.stage_layers, tokens=longest_doc)
            except ValueError:
                pass  # a split the model does not allow is refused with its reason when the stage is trimmed
        layers = max(offloaded_layers(n, cfg.rollout.offload_layers) for n in stages)
        need = host_bytes_needed(cfg.rollout.offload, layers, longest_doc, ad.kv_heads, ad.head_dim, ad.dtype)
        of_stage = " of the largest pipeline stage" if len(stages) > 1 else ""
        parts.append((need, f"rollout.offload={cfg.rollout.offload} of {layers} layers{of_stage} for the longest "
                            f"document ({longest_doc} tokens)"))
    if cfg.trainer.offload_optimizer == "cpu":
        per_param = 8 if cfg.trainer.optimizer_dtype == "bf16" else 16
        n = sum(p.numel() for p in model.parameters() if p.requires_grad)
        par = cfg.parallel
        dp = par.dp or max(1, int(os.environ.get("WORLD_SIZE", "1")) // par.pp)  # ZeRO splits it over dp
        parts.append((n * per_param // dp, f"trainer.offload_optimizer=cpu ({per_param} bytes per parameter, "
                                           f"{cfg.trainer.optimizer_dtype})"))
    if not parts:
        return
    what = " + ".join(f"{w} {b / 2**30:.1f} GiB" for b, w in parts)
    try:
        check_host_memory(sum(b for b, _ in parts), what, local_ranks=local_ranks_on_host())
    except MemoryError as err:
        raise ConfigError(str(err)) from None


class MemoryPlanner:
    """Sizes ``rollout`` (its ``chunk_size``, ``keep_attention`` and ``keep_tokens``, changed in place) to the
    GPU memory of this rank for the longest document, and predicts that document's peak.

    ``module`` is the engine's model (this stage's layers); ``capacity`` arguments override the GPU's memory
    (tests, and runs that leave room for something else)."""

    def __init__(self, cfg: TrainConfig, rollout: Rollout, module: torch.nn.Module, data: DataPipeline,
                 context: RunContext):
        self.cfg, self.rollout, self.module, self.data, self.context = cfg, rollout, module, data, context
        self.device = context.device
        self.memory_mode = cfg.rollout.mode == "memory"

    def plan(self) -> None:
        """What set-up decides: the chunk size when ``rollout.chunk_size=0`` (and no chunk index plans the
        chunks), then on a GPU how many attention outputs to keep."""
        if self.memory_mode:
            return  # the chunk size is the config's (or the chunk index's); nothing kept to size
        if self.cfg.rollout.chunk_size == 0 and not self.data.planned_spans:
            self.pick_chunk_size()
        if self.device.type == "cuda":
            self.fit_kept_outputs()

    @functools.cached_property
    def activation_per_token(self) -> int:
        """Bytes autograd keeps per chunk token (engine/budget.py; memory mode: a probe chunk of the memory model,
        ``memory_activation_bytes_per_token``), counted once per run."""
        if self.memory_mode:
            return memory_activation_bytes_per_token(self.module)
        return activation_bytes_per_token(CausalLMAdapter(self.module))

    def fixed_bytes(self) -> int:
        """Device bytes that do not grow with the document: what is allocated now, plus the gradients the first
        backward creates (ZeRO 0 and 1 keep every parameter's in the model dtype; ZeRO 2 partitions them into
        buffers that exist already)."""
        now = torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else 0
        if self.cfg.trainer.zero_stage >= 2:
            return now
        return now + pending_gradient_bytes(self.module)

    def _capacity(self, capacity: int | None) -> int:
        return torch.cuda.get_device_properties(self.device).total_memory if capacity is None else capacity

    def _budget_args(self) -> dict:
        """What every budget.py call of this run shares."""
        ro = self.cfg.rollout
        return dict(offload=ro.offload, vocab_tile=ro.vocab_tile, activation_per_token=self.activation_per_token,
                    offload_layers=ro.offload_layers, fixed=self.fixed_bytes())

    def pick_chunk_size(self, capacity: int | None = None) -> None:
        """rollout.chunk_size=0: the largest chunk whose predicted peak for the longest document fits the GPU."""
        if self.device.type != "cuda" and capacity is None:
            log.info("rollout.chunk_size=0 on CPU: chunks of %d tokens", self.rollout.chunk_size)
            return
        ro = self.cfg.rollout
        capacity = self._capacity(capacity)
        longest = self.data.longest_doc
        # kept outputs are counted only when their amount is fixed; otherwise they get what the chunk leaves
        chunk = pick_chunk_size(CausalLMAdapter(self.module), longest, capacity,
                                keep_attention=ro.keep_attention and ro.keep_attention_tokens > 0,
                                keep_tokens=ro.keep_attention_tokens, **self._budget_args())
        chunk = self.context.smallest_over_ranks(chunk)
        self.rollout.chunk_size = chunk
        log.info("rollout.chunk_size=0: chunks of %d tokens, the largest predicted to fit %.1f GiB for the "
                 "longest document (%d tokens)", chunk, capacity / 2 ** 30, longest)

    def fit_kept_outputs(self, capacity: int | None = None) -> None:
        """rollout.keep_attention with keep_attention_tokens=0: every chunk's outputs if the longest document is
        predicted to fit with them, else those of as many last chunks as fit (none: keep_attention is dropped)."""
        ro = self.cfg.rollout
        if not ro.keep_attention or ro.keep_attention_tokens:
            return
        capacity = self._capacity(capacity)
        longest = self.data.longest_doc
        keep = self.context.smallest_over_ranks(fit_keep_tokens(
            CausalLMAdapter(self.module), longest, self.data.largest_chunk(self.rollout.chunk_size), capacity,
            **self._budget_args()))
        if keep >= longest:
            return
        if keep == 0:
            self.rollout.keep_attention = False
            log.warning("rollout.keep_attention: no room for kept attention outputs beside a %d-token document in "
                        "%.1f GiB (engine/budget.py); running without them", longest, capacity / 2 ** 30)
            return
        self.rollout.keep_tokens = keep
        log.info("rollout.keep_attention: outputs kept for the last %d of the longest document's %d tokens, as "
                 "many as are predicted to fit %.1f GiB (rollout.keep_attention_tokens sets it)", keep, longest,
                 capacity / 2 ** 30)

    def predicted_peak(self) -> PeakEstimate:
        """The memory model's peak GPU memory (engine.budget.PeakEstimate) of the longest document's step."""
        if self.memory_mode:
            return self._memory_mode_peak()
        return estimate_peak(CausalLMAdapter(self.module), self.data.longest_doc,
                             self.data.largest_chunk(self.rollout.chunk_size),
                             keep_attention=self.rollout.keep_attention, keep_tokens=self.rollout.keep_tokens,
                             **self._budget_args())

    def check(self, capacity: int | None = None) -> None:
        """Predicts the peak GPU memory of the longest document (engine/budget.py) and warns, with what to
        change, if it would not fit: the peak comes at the first backward chunk, after the whole fill pass."""
        ro = self.cfg.rollout
        est = self.predicted_peak()
        capacity = self._capacity(capacity)
        log.info("GPU memory, predicted peak for the longest document: %s of %.1f GiB", est.describe(),
                 capacity / 2 ** 30)
        if self.memory_mode:
            advice = None if est.total <= 0.95 * capacity else (
                f"predicted peak {est.total / GiB:.1f} GiB exceeds the GPU's {capacity / GiB:.1f} GiB "
                f"({est.describe()}); in rollout.mode=memory it does not grow with the document: try a smaller "
                "rollout.chunk_size, rollout.vocab_tile, or trainer.zero_stage / trainer.offload_optimizer for the "
                "weights and optimizer")
        else:
            advice = fit_advice(est, capacity, ro.offload, self.rollout.keep_attention, ro.offload_layers)
        if advice:
            log.warning("%s", advice)

    def _memory_mode_peak(self) -> PeakEstimate:
        """Memory mode: fixed part + one chunk's activations and logits + the states stored at every chunk boundary
        of the longest document (and the gradient handed back through one of them)."""
        model, longest = self.module, self.data.longest_doc
        chunk = min(self.data.largest_chunk(self.rollout.chunk_size), longest)
        ad = CausalLMAdapter(model.model)
        one_state = ad.num_layers * model.memory_config.slots * ad.hidden_size * (
            torch.finfo(model.state_dtype).bits // 8)
        boundaries = -(-longest // max(1, self.rollout.chunk_size)) + 1
        if self.data.planned_spans:
            boundaries = max(len(v) for v in self.data.planned_spans.values()) + 1
        per_token = self.activation_per_token + (logits_bytes_per_token(ad, self.cfg.rollout.vocab_tile)
                                                 if ad.has_head else 0)  # a pipeline stage: its own layers only
        return PeakEstimate(tokens=longest, chunk=chunk, fixed=self.fixed_bytes(),
                            state=(boundaries + 2) * one_state, chunk_activations=chunk * per_token, transient=0)


def memory_activation_bytes_per_token(model: torch.nn.Module, probe_tokens: int = 32) -> int:
    """Bytes autograd keeps per chunk token when a ``MemoryModel`` recomputes a chunk that reads its memory (the
    backward pass's view): a probe chunk after a probe first chunk, with saved-tensor hooks that add up what is
    kept; weights are not counted, nor the logits."""
    from ..model.memory import MemoryCarry

    device = next(model.parameters()).device
    ad = model.adapter

    def probe(ids, carry):  # this stage's part of a chunk (a later stage gets zero hidden states)
        if ad.has_embedding:
            hidden, topic, shift = model.embed_chunk(ids, carry)
        else:
            hidden = torch.zeros((*ids.shape, ad.hidden_size), dtype=ad.dtype, device=device)
            topic, shift = None, torch.zeros(ids.shape[0], device=device)
        _, slots, _ = model.run_layers(hidden, carry.slots, shift, first=carry.index == 0)
        return MemoryCarry(slots, topic, carry.index + 1)

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        ids = torch.zeros((1, probe_tokens), dtype=torch.long, device=device)
        counter = SavedBytes(model.parameters())
        with model.memory_attention():
            with torch.no_grad():
                carry = probe(ids, model.initial_carry(1, device))
            with torch.enable_grad(), counter.hooks():
                probe(ids, carry)
    return counter.per_token(probe_tokens)
