"""Token cross-entropy with HF's causal-LM semantics, computed chunk by chunk."""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def shift_targets(labels: torch.Tensor) -> torch.Tensor:
    """Target of position t is ``labels[t + 1]``; the last position has none (HF shifts labels inside)."""
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    return targets


def loss_dtype(logits_dtype: torch.dtype) -> torch.dtype:
    """HF upcasts logits to float32 for the loss; float64 stays float64 (never downcast)."""
    return torch.float64 if logits_dtype == torch.float64 else torch.float32


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of token cross-entropies over positions whose target is not ``IGNORE_INDEX``."""
    logits = logits.to(loss_dtype(logits.dtype))
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")
