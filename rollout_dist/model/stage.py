"""Pipeline stages of an HF causal LM: which layers a stage owns, and trimming a model down to them.

A stage is a contiguous run of decoder layers; the first stage also owns the embedding, the last the final norm
and LM head.  ``trim_to_stage`` removes everything else from the model in place, so the stage's parameters are
exactly ``model.parameters()``, and records a ``StageInfo`` on it that ``CausalLMAdapter`` reads.  No
distributed code here: which stage a process runs is decided by ``rollout_dist.parallel``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StageInfo:
    stage: int
    num_stages: int
    first_layer: int
    """Global index of the stage's first decoder layer."""
    num_layers: int
    """Decoder layers this stage owns."""
    total_layers: int

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.num_stages - 1


def partition_layers(layer_weights: list[float], head_weight: float, num_stages: int) -> list[int]:
    """Layers per stage, contiguous, minimising the heaviest stage's load (the LM head counts on the last).

    Weights are per-token compute (the embedding is a lookup and counts nothing).
    """
    n = len(layer_weights)
    if not 1 <= num_stages <= n:
        raise ValueError(f"cannot split {n} decoder layers into {num_stages} pipeline stages (need 1..{n})")
    prefix = [0.0]
    for w in layer_weights:
        prefix.append(prefix[-1] + w)
    inf = float("inf")
    # best[k][i]: minimal max-load placing the first i layers into k stages (none of them the last)
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    for k in range(1, num_stages + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                load = prefix[i] - prefix[j] + (head_weight if (k == num_stages and i == n) else 0.0)
                cand = max(best[k - 1][j], load)
                if cand < best[k][i]:
                    best[k][i], cut[k][i] = cand, j
    counts, i = [], n
    for k in range(num_stages, 0, -1):
        j = cut[k][i]
        counts.append(i - j)
        i = j
    return counts[::-1]


def stage_layer_counts(model: torch.nn.Module, num_stages: int, explicit: list[int] | None = None,
                       tokens: int = 0) -> list[int]:
    """Decoder layers per stage: ``explicit``, or balanced by training FLOPs per token for documents of
    ``tokens`` tokens: 6 x parameters for every layer and the LM head, plus 6 x hidden x T of causal attention
    per layer (the term that dominates long documents)."""
    model = _hf(model)
    layers = list(model.model.layers)
    if explicit is not None:
        if len(explicit) != num_stages or sum(explicit) != len(layers) or min(explicit) < 1:
            raise ValueError(f"stage layer counts {list(explicit)} must be {num_stages} positive numbers summing "
                             f"to the model's {len(layers)} decoder layers")
        return list(explicit)
    attention = float(model.config.hidden_size) * tokens
    weights = [float(sum(p.numel() for p in layer.parameters())) + attention for layer in layers]
    head = float(sum(p.numel() for m in (model.lm_head, model.model.norm) for p in m.parameters()))
    return partition_layers(weights, head, num_stages)


def _hf(model: torch.nn.Module) -> torch.nn.Module:
    """The HF causal LM of ``model``: itself, or the one a memory-mode ``MemoryModel`` wraps."""
    return model.model if getattr(model, "is_memory_model", False) else model


def trim_to_stage(model: torch.nn.Module, stage: int, counts: list[int]) -> StageInfo:
    """Keeps only stage ``stage``'s modules in ``model`` (in place) and returns its ``StageInfo``.  A
    ``MemoryModel`` trims its HF model and keeps its memory for the stage's layers only
    (``MemoryModel.trim_to_stage``)."""
    if getattr(model, "is_memory_model", False):
        return model.trim_to_stage(stage, counts)
    if getattr(model.config, "tie_word_embeddings", False) and len(counts) > 1:
        raise ValueError("tied input/output embeddings cannot be split across pipeline stages (the embedding "
                         "lives on the first stage, the LM head on the last); use parallel.pp=1")
    first = sum(counts[:stage])
    info = StageInfo(stage=stage, num_stages=len(counts), first_layer=first, num_layers=counts[stage],
                     total_layers=sum(counts))
    decoder = model.model
    decoder.layers = torch.nn.ModuleList(list(decoder.layers)[first:first + counts[stage]])
    if not info.is_first:
        decoder.embed_tokens = None
    if not info.is_last:
        decoder.norm = None
        model.lm_head = None
    model.rollout_stage = info
    return info


LAYERED_PREFIXES = ("model.layers.", "model.model.layers.", "memory.")
"""Names whose next part is a decoder layer's index: an HF model's layers, and a ``MemoryModel``'s (its HF
model's layers and its per-layer memory)."""


def global_name(name: str, info: StageInfo | None) -> str:
    """A stage's module or tensor name under the full model's naming (decoder layer indices made global)."""
    if info is None:
        return name
    for prefix in LAYERED_PREFIXES:
        if name.startswith(prefix):
            local, _, rest = name[len(prefix):].partition(".")
            return f"{prefix}{int(local) + info.first_layer}" + (f".{rest}" if rest else "")
    return name


def stage_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The stage's parameters and buffers under the full model's names (layer indices made global)."""
    info: StageInfo | None = getattr(model, "rollout_stage", None)
    return {global_name(name, info): tensor.detach().cpu() for name, tensor in model.state_dict().items()}
