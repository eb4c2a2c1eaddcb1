"""Chunk attention split into two standard problems and merged by log-sum-exp (CUDA, fp16/bf16).

A chunk of c queries at the end of e = s + c keys attends densely to the prefix [0, s) and causally to its own
block [s, e).  Both parts are shapes every fused kernel supports (no mask tensor), so the fastest one can run
them: cuDNN's fused attention (about 1.5x FA2 on H100/H200 for these shapes, bench/profile_rollout.py) or FA2.
Forward merges the two partial outputs with their log-sum-exps; backward calls each part's backward kernel with
the *merged* output and log-sum-exp, which yields exactly that part's share of the gradient of the full softmax
(the ring-attention identity; PyTorch's context parallelism does the same).  The prefix gradient comes back for
all e keys, which is what the carried dK/dV need.
"""
from __future__ import annotations

import torch

aten = torch.ops.aten
BACKENDS = ("cudnn", "flash")
# cuDNN refuses some tiny problems (s_q = s_kv = 1, seen on H200); parts shorter than this go to FA2
_CUDNN_MIN_LEN = 16
# backends found to refuse grouped K/V heads (fewer K/V heads than query heads); they get expanded heads
_NEEDS_EXPANDED_KV: set[str] = set()


def _expand(t: torch.Tensor, groups: int) -> torch.Tensor:
    return t if groups == 1 else t.repeat_interleave(groups, dim=1)


def _reduce(g: torch.Tensor, groups: int) -> torch.Tensor:
    if groups == 1:
        return g
    b, h, n, d = g.shape
    return g.view(b, h // groups, groups, n, d).sum(2)


def _part_backend(backend: str, q, k) -> str:
    if backend == "cudnn" and min(q.shape[2], k.shape[2]) < _CUDNN_MIN_LEN:
        return "flash"
    return backend


def _forward(backend: str, q, k, v, causal: bool, scale: float):
    backend = _part_backend(backend, q, k)
    groups = q.shape[1] // k.shape[1]
    if groups > 1 and backend not in _NEEDS_EXPANDED_KV:
        try:
            return _forward_kernel(backend, q, k, v, causal, scale)
        except RuntimeError:
            _NEEDS_EXPANDED_KV.add(backend)
    return _forward_kernel(backend, q, _expand(k, groups), _expand(v, groups), causal, scale)


def _backward(backend: str, dout, q, k, v, out, lse, rest, causal: bool, scale: float):
    backend = _part_backend(backend, q, k)
    groups = q.shape[1] // k.shape[1]
    if groups == 1 or backend not in _NEEDS_EXPANDED_KV:
        return _backward_kernel(backend, dout, q, k, v, out, lse, rest, causal, scale)
    gq, gk, gv = _backward_kernel(backend, dout, q, _expand(k, groups), _expand(v, groups), out, lse, rest, causal,
                                  scale)
    return gq, _reduce(gk, groups), _reduce(gv, groups)


def _forward_kernel(backend: str, q, k, v, causal: bool, scale: float):
    if backend == "cudnn":
        # cuDNN's fused attention gave wrong results on the (B, S, H, D)-strided views the model hands over
        # (H200, torch 2.11); contiguous (B, H, S, D) copies are transient and cheap next to the attention itself
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, 0.0, causal, False, scale=scale)
        return out, lse, (cum_q, cum_k, max_q, max_k, seed, offset)
    out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = aten._scaled_dot_product_flash_attention(
        q, k, v, 0.0, causal, False, scale=scale)
    return out, lse, (cum_q, cum_k, max_q, max_k, seed, offset)


def _backward_kernel(backend: str, dout, q, k, v, out, lse, rest, causal: bool, scale: float):
    cum_q, cum_k, max_q, max_k, seed, offset = rest
    if backend == "cudnn":
        q, k, v, out, dout = q.contiguous(), k.contiguous(), v.contiguous(), out.contiguous(), dout.contiguous()
        return aten._scaled_dot_product_cudnn_attention_backward(
            dout, q, k, v, out, lse, seed, offset, None, cum_q, cum_k, max_q, max_k, 0.0, causal, scale=scale)
    return aten._scaled_dot_product_flash_attention_backward(
        dout, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, 0.0, causal, seed, offset, scale=scale)


def _merge(out1, lse1, out2, lse2):
    """Softmax-weighted merge of two partial attentions over disjoint key sets (fp32 arithmetic)."""
    l1, l2 = lse1.float(), lse2.float()
    shape = l1.shape + (1,) * (out1.dim() - l1.dim())
    lse = torch.logaddexp(l1, l2)
    w1 = torch.exp(l1 - lse).reshape(shape)
    w2 = torch.exp(l2 - lse).reshape(shape)
    out = (out1.float() * w1 + out2.float() * w2).to(out1.dtype)
    return out, lse.to(lse1.dtype)


class SplitChunkAttention(torch.autograd.Function):
    """q (B, Hq, c, D) against k, v (B, Hkv, e, D), the last c keys being the chunk's own (lower-right causal)."""

    @staticmethod
    def forward(ctx, q, k, v, scale: float, backend: str):
        c, e = q.shape[2], k.shape[2]
        s = e - c
        own = _forward(backend, q, k[:, :, s:], v[:, :, s:], True, scale)
        if s == 0:
            out, lse, parts = own[0], own[1], [(s, e, True, own[2])]
        else:
            pre = _forward(backend, q, k[:, :, :s], v[:, :, :s], False, scale)
            out, lse = _merge(pre[0], pre[1], own[0], own[1])
            parts = [(0, s, False, pre[2]), (s, e, True, own[2])]
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.parts, ctx.scale, ctx.backend = parts, scale, backend
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dout = dout.contiguous()
        dq = None
        dks, dvs = [], []
        for lo, hi, causal, rest in ctx.parts:
            gq, gk, gv = _backward(ctx.backend, dout, q, k[:, :, lo:hi], v[:, :, lo:hi], out, lse, rest, causal,
                                   ctx.scale)
            dq = gq if dq is None else dq + gq
            dks.append(gk)
            dvs.append(gv)
        dk = dks[0] if len(dks) == 1 else torch.cat(dks, dim=2)
        dv = dvs[0] if len(dvs) == 1 else torch.cat(dvs, dim=2)
        return dq, dk, dv, None, None


def split_chunk_attention(q, k, v, scale: float | None, backend: str) -> torch.Tensor:
    """(B, Hq, c, D) output of lower-right causal attention of q over k, v.  Grouped K/V heads are passed as
    they are; a kernel that refuses them is remembered and gets transiently expanded heads from then on."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown split-attention backend {backend!r}; choose one of {BACKENDS}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return SplitChunkAttention.apply(q, k, v, scale, backend)
