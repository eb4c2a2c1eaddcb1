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


class _VocabTiledCrossEntropy(torch.autograd.Function):
    """Sum of token cross-entropies of ``hidden @ weight.T (+ bias)`` computed in vocabulary tiles.

    The (tokens x vocab) logits never exist at once: forward keeps a running log-sum-exp over the tiles and the
    target logits; backward recomputes each tile's logits (one extra head matmul) and turns them into that tile's
    softmax gradient. Each tile's weight gradient is one matmul over all tokens, as in the untiled head, and the
    hidden-state gradient is summed over tiles in fp32. Numerics follow HF: the head runs in the model dtype,
    the loss in fp32 (fp64 for fp64 models), and the logit gradient is cast back to the model dtype. No host
    synchronisation: targets are picked with masked gathers.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, tile: int):
        acc = loss_dtype(hidden.dtype)
        flat = hidden.reshape(-1, hidden.shape[-1])
        tgt = targets.reshape(-1)
        valid = tgt != IGNORE_INDEX
        lse = torch.full((flat.shape[0],), float("-inf"), dtype=acc, device=hidden.device)
        picked = torch.zeros_like(lse)
        for lo in range(0, weight.shape[0], tile):
            logits = _tile_logits(flat, weight, bias, lo, tile).to(acc)
            lse = torch.logaddexp(lse, torch.logsumexp(logits, dim=-1))
            inside, index = _in_tile(tgt, valid, lo, logits.shape[1])
            picked += torch.where(inside, logits.gather(1, index).squeeze(1), 0.0)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.tile = tile
        return ((lse - picked) * valid).sum()

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        flat = hidden.reshape(-1, hidden.shape[-1])
        tgt = targets.reshape(-1)
        valid = tgt != IGNORE_INDEX
        scale = valid.to(lse.dtype) * grad.to(lse.dtype)
        dflat = torch.zeros(flat.shape, dtype=lse.dtype, device=flat.device)
        dweight = torch.empty_like(weight) if ctx.needs_input_grad[1] else None
        dbias = torch.empty_like(bias) if bias is not None and ctx.needs_input_grad[2] else None
        for lo in range(0, weight.shape[0], ctx.tile):
            logits = _tile_logits(flat, weight, bias, lo, ctx.tile).to(lse.dtype)
            dlogits = torch.exp(logits - lse[:, None])
            inside, index = _in_tile(tgt, valid, lo, logits.shape[1])
            dlogits.scatter_add_(1, index, -inside.to(dlogits.dtype)[:, None])  # softmax - one-hot
            dlogits = (dlogits * scale[:, None]).to(weight.dtype)
            w = weight[lo:lo + ctx.tile]
            dflat += (dlogits @ w).to(lse.dtype)
            if dweight is not None:
                dweight[lo:lo + ctx.tile] = dlogits.T @ flat
            if dbias is not None:
                dbias[lo:lo + ctx.tile] = dlogits.sum(0)
        return dflat.to(hidden.dtype).view_as(hidden), dweight, dbias, None, None


def _in_tile(tgt: torch.Tensor, valid: torch.Tensor, lo: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Which targets fall in the tile [lo, lo + width), and their column there (clamped where they do not)."""
    local = tgt - lo
    inside = valid & (local >= 0) & (local < width)
    return inside, local.clamp(0, width - 1)[:, None]


def _tile_logits(flat, weight, bias, lo: int, tile: int) -> torch.Tensor:
    w = weight[lo:lo + tile].T
    return flat @ w if bias is None else torch.addmm(bias[lo:lo + tile], flat, w)  # one rounding, as F.linear


def head_cross_entropy_sum(hidden: torch.Tensor, head: torch.nn.Linear, targets: torch.Tensor,
                           vocab_tile: int = 0) -> torch.Tensor:
    """Sum of token cross-entropies of the LM head ``head`` on ``hidden`` (B, c, H) against ``targets`` (B, c).

    ``vocab_tile`` > 0 computes the head and the loss in vocabulary tiles of that many rows, so the (c x vocab)
    logits never exist whole (they are gigabytes for long chunks and 128K-token vocabularies); 0 or a tile not
    smaller than the vocabulary uses the plain head."""
    if vocab_tile <= 0 or vocab_tile >= head.weight.shape[0]:
        return cross_entropy_sum(head(hidden), targets)
    return _VocabTiledCrossEntropy.apply(hidden, head.weight, head.bias, targets, vocab_tile)
