"""Where the time of one exact-rollout step goes, and how fast the candidate attention kernels are.

Part 1: attention microbenchmarks (forward + backward) for one chunk of queries against a long prefix, for
the kernels the chunk attention could use: SDPA with a lower-right causal bias (today's path), SDPA flash and
cuDNN on the split problem (dense prefix + causal diagonal block), and full-sequence causal attention (what HF
runs) for reference.  Part 2: a torch.profiler table of one step at a given length.  JSON lines to stdout and
$OUT/profile.jsonl.
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

    results = {}
    for name, fn in [("lower_right_bias", lower_right), ("split_flash", split(SDPBackend.FLASH_ATTENTION)),
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


def profile_step(T, chunk):
    from torch.profiler import ProfilerActivity, profile
    from transformers import LlamaConfig, LlamaForCausalLM

    from rollout_dist import chunked_forward_backward
    cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                      num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=1 << 22,
                      attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16)
    ids = torch.randint(0, 32000, (1, T), device="cuda")
    chunked_forward_backward(model, ids[:, :8192], chunk_size=min(chunk, 8192))
    model.zero_grad(set_to_none=True)
    for c in sorted({chunk, 2048, 8192, 16384}):
        torch.cuda.synchronize()
        t0 = time.time()
        chunked_forward_backward(model, ids, chunk_size=c)
        torch.cuda.synchronize()
        emit({"what": "step_no_opt", "T": T, "chunk": c, "s": round(time.time() - t0, 3),
              "tok_s": round(T / (time.time() - t0), 1)})
        model.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        chunked_forward_backward(model, ids, chunk_size=chunk)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=90)
    print(table)
    with open(os.path.join(OUT, f"profile_T{T}.txt"), "w") as f:
        f.write(table)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, default=65536)
    ap.add_argument("--chunk", type=int, default=4096)
    args = ap.parse_args()
    for prefix in (0, 12288, 61440, 126976):
        attention_micro(4096, prefix)
    attention_micro(8192, 57344)
    full_causal_micro(16384)
    full_causal_micro(65536)
    profile_step(args.T, args.chunk)


if __name__ == "__main__":
    main()
