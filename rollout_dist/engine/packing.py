"""Packed documents: several short documents in one row, kept apart.

``segment_ids`` (B, T) numbers the documents of each row (equal ids are one document, occupying a contiguous
run of positions).  Positions restart at 0 in every document, attention never crosses a document boundary, and
the last token of a document has no target (it would otherwise predict the next document's first token), so a
packed row trains exactly like its documents one by one (tests/test_packing.py).
"""
from __future__ import annotations

import torch

from .loss import IGNORE_INDEX


def validate_segments(segment_ids: torch.Tensor, input_ids: torch.Tensor) -> None:
    if segment_ids.shape != input_ids.shape:
        raise ValueError(f"segment_ids shape {tuple(segment_ids.shape)} differs from input_ids "
                         f"{tuple(input_ids.shape)}")
    changes = segment_ids[:, 1:] != segment_ids[:, :-1]
    starts = changes.sum(dim=1) + 1
    distinct = torch.tensor([int(row.unique().numel()) for row in segment_ids])
    if bool((starts.cpu() != distinct).any()):
        raise ValueError("segment_ids must give each packed document one contiguous run of positions")


def packed_positions(segment_ids: torch.Tensor) -> torch.Tensor:
    """Position of every token inside its own document: 0, 1, ... restarting where the segment id changes."""
    B, T = segment_ids.shape
    idx = torch.arange(T, device=segment_ids.device).expand(B, T)
    new_doc = torch.ones_like(segment_ids, dtype=torch.bool)
    new_doc[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    doc_start = torch.where(new_doc, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - doc_start


def mask_cross_document_targets(targets: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
    """Drops the targets that would cross into the next packed document."""
    targets = targets.clone()
    crossing = segment_ids[:, 1:] != segment_ids[:, :-1]
    targets[:, :-1][crossing] = IGNORE_INDEX
    return targets
