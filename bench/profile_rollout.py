"""Where the time of one exact-rollout step goes, and how fast the candidate attention kernels are.

Part 1: attention microbenchmarks (forward + backward) for one chunk of queries against a long prefix, for
the kernels the chunk attention could use: SDPA with a lower-right causal bias (today's path), SDPA flash and
cuDNN on the split problem (dense prefix + causal diagonal block), and full-sequence causal attention (what HF
runs) for reference, beside rollout_dist's own split kernel as the rollout calls it.  Part 2: one whole step per
variant under torch.profiler: the top kernels, and GPU seconds by kind (attention, matmul, copy, optimizer, other)
against the step's wall time.  JSON lines to stdout and $OUT/profile.jsonl.

    python bench/profile_rollout.py --T 131072 --variants cudnn+keep:16384 --micro 16384
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from rollout_dist.model.split_attention import split_chunk_attention  # noqa: E402

OUT = os.environ.get("OUT", "/tmp")


def emit(rec):
    print(json.dumps(rec), flush=True)
    with open(os.path.join(OUT, "profile.jsonl"), "a") as f:
        f.write(json.dumps(rec) + "\n")


def timed(fn, reps=5):
    fn()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ts = []
    for _ in range(reps):
        e0.record()
        fn()
        e1.record()
        torch.cuda.synchronize()
        ts.append(e0.elapsed_time(e1) / 1e3)
    return sorted(ts)[len(ts) // 2]


def attention_micro(q_len, prefix, hq=32, hkv=4, d=64):
    dev, dt = "cuda", torch.bfloat16
    kv_len = prefix + q_len
    q = torch.randn(1, hq, q_len, d, device=dev, dtype=dt, requires_grad=True)
    k = torch.randn(1, hkv, kv_len, d, device=dev, dtype=dt, requires_grad=True)
    v = torch.randn(1, hkv, kv_len, d, device=dev, dtype=dt, requires_grad=True)
    go = torch.randn(1, hq, q_len, d, device=dev, dtype=dt)
    # causal FLOPs: 4*d per (q, k) pair forward, 2.5x that for forward+backward
    pairs = q_len * prefix + q_len * (q_len + 1) / 2
    flops = 4 * d * hq * pairs * 3.5

    def lower_right():
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(q_len, kv_len), enable_gqa=True)
        torch.autograd.backward(o, go)

    def split(backend):
        def fn():
            with sdpa_kernel(backend):
                kp, vp = k[:, :, :prefix], v[:, :, :prefix]
                kd, vd = k[:, :, prefix:], v[:, :, prefix:]
                o1 = F.scaled_dot_product_attention(q, kp, vp, enable_gqa=True)
                o2 = F.scaled_dot_product_attention(q, kd, vd, is_causal=True, enable_gqa=True)
                torch.autograd.backward([o1, o2], [go, go])  # timing only (no LSE merge)
        return fn

    def ours():  # rollout_dist's split kernel as the rollout calls it (grouped K/V heads as they are)
        o = split_chunk_attention(q, k, v, None, "cudnn")
        torch.autograd.backward(o, go)

    def ours_forward():
        with torch.no_grad():
            split_chunk_attention(q, k, v, None, "cudnn")

    results = {}
    try:
        t_fwd = timed(ours_forward)
        results["rollout_split_cudnn_fwd"] = {"ms": round(t_fwd * 1e3, 2),
                                              "tflops": round(flops / 3.5 / t_fwd / 1e12, 1)}
    except Exception as err:
        results["rollout_split_cudnn_fwd"] = {"error": str(err).splitlines()[0][:160]}
    for name, fn in [("rollout_split_cudnn", ours), ("lower_right_bias", lower_right),
                     ("split_flash", split(SDPBackend.FLASH_ATTENTION)),
                     ("split_cudnn", split(SDPBackend.CUDNN_ATTENTION)),
                     ("split_efficient", split(SDPBackend.EFFICIENT_ATTENTION))]:
        try:
            t = timed(fn)
            results[name] = {"ms": round(t * 1e3, 2), "tflops": round(flops / t / 1e12, 1)}
        except Exception as err:  # a backend that refuses the shape
            results[name] = {"error": str(err).splitlines()[0][:160]}
        q.grad = k.grad = v.grad = None
    emit({"what": "attention_fwd_bwd", "q_len": q_len, "prefix": prefix, **results})


def full_causal_micro(T, hq=32, hkv=4, d=64):
    q = torch.randn(1, hq, T, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, hkv, T, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, hkv, T, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    go = torch.randn_like(q)
    flops = 4 * d * hq * T * (T + 1) / 2 * 3.5
    out = {}
    for name, be in [("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)]:
        def fn():
            with sdpa_kernel(be):
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
                torch.autograd.backward(o, go)
        try:
            t = timed(fn, reps=3)
            out[name] = {"ms": round(t * 1e3, 2), "tflops": round(flops / t / 1e12, 1)}
        except Exception as err:
            out[name] = {"error": str(err).splitlines()[0][:160]}
    emit({"what": "full_causal_fwd_bwd", "T": T, **out})


KERNEL_KINDS = (  # (kind, substrings of the kernel name), first match wins
    ("attention", ("cudnn", "fmha", "flash", "attention", "sdpa")),
    ("matmul", ("gemm", "xmma", "cutlass", "nvjet", "sm90_", "wgmma")),
    ("copy", ("memcpy", "memset", "copy", "cat", "fill")),
    ("optimizer", ("adam",)),
)


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(k in low for k in keys)), "elementwise/other")


def profile_step(T, variant, optimizer=True):
    """One whole step (rollout + fused AdamW) of ``variant`` (bench/rollout_vs_hf.py syntax) under the profiler:
    the top kernels, and GPU time by kind of kernel against the step's wall time (the rest is GPU idle)."""
    from torch.profiler import ProfilerActivity, profile

    from rollout_vs_hf import build, ours_step, parse_variant
    label, chunk, opts = parse_variant(variant)
    model, opt = build("tinyllama_1b", "adamw" if optimizer else "none")
    ids = torch.randint(0, model.config.vocab_size, (1, T), device="cuda")
    ours_step(model, opt, ids[:, :8192], min(chunk, 8192), **opts)  # warm-up, creates the optimizer states
    torch.cuda.synchronize()
    t0 = time.time()
    ours_step(model, opt, ids, chunk, **opts)
    torch.cuda.synchronize()
    plain = time.time() - t0
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.time()
        ours_step(model, opt, ids, chunk, **opts)
        torch.cuda.synchronize()
        profiled = time.time() - t0
    kinds: dict[str, float] = {}
    for ev in prof.key_averages():
        us = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        kinds[kernel_kind(ev.key)] = kinds.get(kernel_kind(ev.key), 0.0) + us / 1e6
    emit({"what": "step_profile", "variant": variant, "T": T, "step_s": round(plain, 3),
          "profiled_step_s": round(profiled, 3), "gpu_s_by_kind": {k: round(v, 3) for k, v in sorted(kinds.items())},
          "gpu_busy_s": round(sum(kinds.values()), 3)})
    table = prof.key_averages().table(sort_by="device_time_total", row_limit=30, max_name_column_width=100)
    print(table)
    with open(os.path.join(OUT, f"profile_T{T}_{label.replace('/', '_')}.txt"), "w") as f:
        f.write(table)
    del model, opt
    torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--T", type=int, default=65536)
    ap.add_argument("--variants", nargs="*", default=["cudnn:4096"],
                    help="rollout_dist variants to profile, as in bench/rollout_vs_hf.py (ATTENTION[+keep]...:CHUNK)")
    ap.add_argument("--micro", type=int, nargs="*", default=[4096, 16384],
                    help="query lengths of the attention microbenchmarks (none: skip them)")
    args = ap.parse_args()
    for q_len in args.micro:
        for prefix in (0, args.T // 2 - q_len, args.T - q_len):
            if prefix >= 0:
                attention_micro(q_len, prefix)
    if args.micro:
        full_causal_micro(16384)
    for variant in args.variants:
        profile_step(args.T, variant)


if __name__ == "__main__":
    main()
