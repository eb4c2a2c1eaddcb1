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
BACKENDS = ("cudnn", "flash", "math")
# cuDNN refuses some tiny problems (s_q = s_kv = 1, seen on H200); parts shorter than this go to FA2
_CUDNN_MIN_LEN = 16


class SplitKernel:
    """A split-attention backend and what it has learned: the backends that refused grouped K/V heads (fewer K/V
    heads than query heads), which get transiently expanded heads from then on.  Owned by its user (a rollout's
    ``ChunkKernel``), never shared by the process: one model's refusal does not change another's kernels."""

    def __init__(self, backend: str):
        if backend not in BACKENDS:
            raise ValueError(f"unknown split-attention backend {backend!r}; choose one of {BACKENDS}")
        self.backend = backend
        self.expanded_kv: set[str] = {"math"}  # the reference kernel computes per query head


def _as_kernel(kernel: SplitKernel | str) -> SplitKernel:
    return SplitKernel(kernel) if isinstance(kernel, str) else kernel


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


def _forward(kernel: SplitKernel, q, k, v, causal: bool, scale: float):
    backend = _part_backend(kernel.backend, q, k)
    groups = q.shape[1] // k.shape[1]
    if groups > 1 and backend not in kernel.expanded_kv:
        try:
            return _forward_kernel(backend, q, k, v, causal, scale)
        except torch.OutOfMemoryError:
            raise  # out of memory is not a refusal of grouped heads (and expanding them would need more)
        except RuntimeError:
            kernel.expanded_kv.add(backend)
    return _forward_kernel(backend, q, _expand(k, groups), _expand(v, groups), causal, scale)


def _backward(kernel: SplitKernel, dout, q, k, v, out, lse, rest, causal: bool, scale: float):
    backend = _part_backend(kernel.backend, q, k)
    groups = q.shape[1] // k.shape[1]
    if groups == 1 or backend not in kernel.expanded_kv:
        return _backward_kernel(backend, dout, q, k, v, out, lse, rest, causal, scale)
    gq, gk, gv = _backward_kernel(backend, dout, q, _expand(k, groups), _expand(v, groups), out, lse, rest, causal,
                                  scale)
    return gq, _reduce(gk, groups), _reduce(gv, groups)


def _math_scores(q, k, causal: bool, scale: float):
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = (q.to(acc) @ k.to(acc).transpose(-1, -2)) * scale
    if causal:  # square block: lower-right and upper-left alignment coincide
        n = scores.shape[-1]
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return scores, acc


def _math_forward(q, k, v, causal: bool, scale: float):
    """Reference kernel (any device and dtype): output and log-sum-exp, as the fused kernels return them."""
    scores, acc = _math_scores(q, k, causal, scale)
    lse = torch.logsumexp(scores, dim=-1)
    out = (torch.exp(scores - lse[..., None]) @ v.to(acc)).to(q.dtype)
    return out, lse, None


def _math_backward(dout, q, k, v, out, lse, causal: bool, scale: float):
    """Flash-style backward from a given output and log-sum-exp (which may be those of a larger key set)."""
    scores, acc = _math_scores(q, k, causal, scale)
    p = torch.exp(scores - lse.to(acc).reshape(scores.shape[:-1])[..., None])
    dout_, out_ = dout.to(acc), out.to(acc)
    dv = p.transpose(-1, -2) @ dout_
    dp = dout_ @ v.to(acc).transpose(-1, -2)
    ds = p * (dp - (dout_ * out_).sum(-1, keepdim=True))
    dq = (ds @ k.to(acc)) * scale
    dk = (ds.transpose(-1, -2) @ q.to(acc)) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _forward_kernel(backend: str, q, k, v, causal: bool, scale: float):
    if backend == "math":
        return _math_forward(q, k, v, causal, scale)
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
    if backend == "math":
        return _math_backward(dout, q, k, v, out, lse, causal, scale)
    cum_q, cum_k, max_q, max_k, seed, offset = rest
    if backend == "cudnn":
        q, k, v, out, dout = q.contiguous(), k.contiguous(), v.contiguous(), out.contiguous(), dout.contiguous()
        return aten._scaled_dot_product_cudnn_attention_backward(
            dout, q, k, v, out, lse, seed, offset, None, cum_q, cum_k, max_q, max_k, 0.0, causal, scale=scale)
    return aten._scaled_dot_product_flash_attention_backward(
        dout, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, 0.0, causal, seed, offset, scale=scale)


def _merge(out1, lse1, out2, lse2):
    """Softmax-weighted merge of two partial attentions over disjoint key sets (fp32 arithmetic, fp64 for fp64)."""
    acc = torch.float64 if out1.dtype == torch.float64 else torch.float32
    l1, l2 = lse1.to(acc), lse2.to(acc)
    shape = l1.shape + (1,) * (out1.dim() - l1.dim())
    lse = torch.logaddexp(l1, l2)
    w1 = torch.exp(l1 - lse).reshape(shape)
    w2 = torch.exp(l2 - lse).reshape(shape)
    out = (out1.to(acc) * w1 + out2.to(acc) * w2).to(out1.dtype)
    return out, lse.to(lse1.dtype)


def split_forward(q, k, v, scale: float, kernel: SplitKernel | str):
    """(out, lse, parts) of lower-right causal attention: the prefix and the diagonal block, merged; ``parts``
    holds what each part's backward kernel needs."""
    kernel = _as_kernel(kernel)
    c, e = q.shape[2], k.shape[2]
    s = e - c
    own = _forward(kernel, q, k[:, :, s:], v[:, :, s:], True, scale)
    if s == 0:
        return own[0], own[1], [(s, e, True, own[2])]
    pre = _forward(kernel, q, k[:, :, :s], v[:, :, :s], False, scale)
    out, lse = _merge(pre[0], pre[1], own[0], own[1])
    return out, lse, [(0, s, False, pre[2]), (s, e, True, own[2])]


class SplitChunkAttention(torch.autograd.Function):
    """q (B, Hq, c, D) against k, v (B, Hkv, e, D), the last c keys being the chunk's own (lower-right causal).

    ``cached``: (out, lse, parts) that ``split_forward`` returned for these very q, k, v (kept from the fill pass),
    so the forward kernels are not run again; backward is the same either way."""

    @staticmethod
    def forward(ctx, q, k, v, scale: float, kernel: SplitKernel, cached=None):
        out, lse, parts = split_forward(q, k, v, scale, kernel) if cached is None else cached
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.parts, ctx.scale, ctx.kernel = parts, scale, kernel
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dout = dout.contiguous()
        dq = None
        dks, dvs = [], []
        for lo, hi, causal, rest in ctx.parts:
            gq, gk, gv = _backward(ctx.kernel, dout, q, k[:, :, lo:hi], v[:, :, lo:hi], out, lse, rest, causal,
                                   ctx.scale)
            dq = gq if dq is None else dq + gq
            dks.append(gk)
            dvs.append(gv)
        dk = dks[0] if len(dks) == 1 else torch.cat(dks, dim=2)
        dv = dvs[0] if len(dvs) == 1 else torch.cat(dvs, dim=2)
        return dq, dk, dv, None, None, None


def split_chunk_attention(q, k, v, scale: float | None, kernel: SplitKernel | str, cached=None) -> torch.Tensor:
    """(B, Hq, c, D) output of lower-right causal attention of q over k, v.  Grouped K/V heads are passed as
    they are; a backend that refuses them is remembered by ``kernel`` (a backend name: a kernel of this call's
    own) and gets transiently expanded heads from then on."""
    kernel = _as_kernel(kernel)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return SplitChunkAttention.apply(q, k, v, scale, kernel, cached)
