"""rollout_dist exact rollout vs the HF full-sequence baseline, one GPU, same call, same model shape.

Baseline (as ../shared/bench/baseline_hf_fullseq.py): HF LlamaForCausalLM, bf16, SDPA, gradient checkpointing,
fused AdamW, one whole document per step.  Ours: the same model and optimizer, one step =
``ExactRollout.run`` (one rollout per variant, kept across steps) + ``opt.step()``.  Each step is timed with
synchronisation after a warm-up step; the figure is the minimum over timed steps.  FLOPs = 6*N*T + 6*L*H*T^2
against a bf16 matmul peak measured in the same call.  One JSON line per measurement to stdout and
$OUT/rollout_vs_hf.jsonl; a table last.

    python bench/rollout_vs_hf.py --model tinyllama_1b --hf 131072 --ours 262144 --chunk 4096
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import time
from functools import partial

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from _probe import BackwardStopper, PeakTrace, ProbeDone  # noqa: E402

from rollout_dist import ExactRollout  # noqa: E402
from rollout_dist.engine.budget import activation_bytes_per_token, estimate_peak, pending_gradient_bytes  # noqa: E402
from rollout_dist.model import CausalLMAdapter  # noqa: E402

SHAPES = {
    "tinyllama_1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                         num_attention_heads=32, num_key_value_heads=4),
    "llama3_8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0),
}
OUT = os.environ.get("OUT", "/tmp")
RECORDS = []


def emit(rec):
    RECORDS.append(rec)
    line = json.dumps(rec)
    print(line, flush=True)
    with open(os.path.join(OUT, "rollout_vs_hf.jsonl"), "a") as f:
        f.write(line + "\n")


def matmul_peak():
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(10):
        a @ b
    e1.record()
    torch.cuda.synchronize()
    return 2 * n ** 3 * 10 / (e0.elapsed_time(e1) / 1e3) / 1e12


class NoOptimizer:
    """``--optimizer none``: steps end at the gradients, as on the GPU under ZeRO-Offload (optimizer states and
    update on the host), so an 8B model's fwd/bwd fits beside its carried state."""

    def __init__(self, params):
        self.params = list(params)

    def step(self):
        pass

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None


def build(shape, optimizer="adamw"):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=1 << 22, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device("cuda"):  # initialised on the GPU in bf16: an 8B model in fp32 on the host takes minutes
        model = LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16)
    model.config.use_cache = False
    if optimizer == "none":
        return model, NoOptimizer(model.parameters())
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)


def hf_step(model, opt, ids, chunk):
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return out.loss.item()


def parse_variant(variant: str) -> tuple[str, int, dict]:
    """ATTENTION[+keep|+keepN][+kv|+all|+kvL|+allL][+vtN]:CHUNK -> (label, chunk, chunked_forward_backward
    options); keepN keeps the attention outputs of the chunks in the last N tokens only; kvL/allL offload the
    first L layers' state only."""
    spec, chunk = variant.split(":")
    attention, *flags = spec.split("+")
    opts = {"attention": attention}
    for flag in flags:
        if flag == "keep":
            opts["keep_attention"] = True
        elif flag.startswith("keep") and flag[4:].isdigit():
            opts.update(keep_attention=True, keep_tokens=int(flag[4:]))
        elif flag in ("kv", "all"):
            opts["offload"] = flag
        elif flag.rstrip("0123456789") in ("kv", "all") and flag[-1].isdigit():
            mode = flag.rstrip("0123456789")
            opts.update(offload=mode, offload_layers=int(flag[len(mode):]))
        elif flag.startswith("vt") and flag[2:].isdigit():
            opts["vocab_tile"] = int(flag[2:])
        else:
            raise SystemExit(f"variant {variant!r}: unknown flag {flag!r} (keep, keepN, kv, all, kvL, allL, vtN)")
    return f"rollout_dist[{spec}]", int(chunk), opts


_ROLLOUTS: dict = {}


def rollout_for(chunk, opts) -> ExactRollout:
    """One rollout per variant, kept across steps as a training loop keeps it (its pinned host pool is reused)."""
    key = (chunk, tuple(sorted(opts.items())))
    if key not in _ROLLOUTS:
        _ROLLOUTS[key] = ExactRollout(chunk, **opts)
    return _ROLLOUTS[key]


def ours_step(model, opt, ids, chunk, **opts):
    loss = rollout_for(chunk, opts).run(model, ids).loss
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def _peak_gib() -> float:
    return round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)


_ACTIVATION_PER_TOKEN: dict[int, int] = {}


def predicted_gib(model, T, chunk, opts) -> float:
    """The memory model's peak (rollout_dist/engine/budget.py), to set beside the measured one."""
    adapter = CausalLMAdapter(model)
    if id(model) not in _ACTIVATION_PER_TOKEN:
        _ACTIVATION_PER_TOKEN[id(model)] = activation_bytes_per_token(adapter)
    fixed = (torch.cuda.memory_allocated() if torch.cuda.is_available() else 0) + pending_gradient_bytes(model)
    est = estimate_peak(adapter, T, chunk, fixed=fixed, offload=opts.get("offload", "none"),
                        keep_attention=opts.get("keep_attention", False), vocab_tile=opts.get("vocab_tile", 0),
                        keep_tokens=opts.get("keep_tokens", 0), offload_layers=opts.get("offload_layers", 0),
                        activation_per_token=_ACTIVATION_PER_TOKEN[id(model)])
    return round(est.total / 2 ** 30, 2)


def probe_memory(model, opt, T, chunk, backward_chunks, opts, trace=False):
    """Fill forward over all chunks, then the backward of the last ``backward_chunks`` chunks (bench/_probe.py):
    the step's peak, for lengths where a whole step would outlast the device call.  ``trace``: also what was
    allocated at the peak, by the code that allocated it (bench/_probe.py PeakTrace)."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    rec = {"system": "rollout_dist_probe", "T": T, "chunk": chunk, "gpu": torch.cuda.get_device_name(),
           "backward_chunks": backward_chunks, **opts, "predicted_peak_gib": predicted_gib(model, T, chunk, opts)}
    stopper = BackwardStopper(torch.Tensor.backward, backward_chunks)
    tracer = PeakTrace() if trace else contextlib.nullcontext()
    ids = torch.randint(0, model.config.vocab_size, (1, T), device="cuda")
    rec["allocated_before_gib"] = round(torch.cuda.memory_allocated() / 2 ** 30, 2)
    try:
        with tracer:
            rollout_for(chunk, opts).run(model, ids, backward=stopper)
    except ProbeDone:
        rec.update(stopper.summary(), peak_mem_gib=_peak_gib())
        if trace:
            rec["peak_breakdown"] = tracer.breakdown()
    except torch.OutOfMemoryError:
        rec.update(oom=True, peak_mem_gib=_peak_gib())
    finally:
        opt.zero_grad(set_to_none=True)
    emit(rec)
    return rec


def measure(system, step, model, opt, T, chunk, peak, steps, deadline, opts=None):
    cfg = model.config
    n_params = sum(p.numel() for p in model.parameters())
    flops = 6 * n_params * T + 6 * cfg.num_hidden_layers * cfg.hidden_size * T * T
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    rec = {"system": system, "T": T, "chunk": chunk,
           "gpu": torch.cuda.get_device_name()}
    if opts is not None:  # a rollout_dist variant: the memory model's prediction beside the measured peak
        rec["predicted_peak_gib"] = predicted_gib(model, T, chunk, opts)
    try:
        ids = torch.randint(0, cfg.vocab_size, (1, T), device="cuda")
        times = []
        for _ in range(steps):
            torch.cuda.synchronize()
            t0 = time.time()
            loss = step(model, opt, ids, chunk)
            torch.cuda.synchronize()
            times.append(time.time() - t0)
            if time.time() > deadline:
                break
        dt = min(times)
        rec.update(step_s=round(dt, 3), tok_s=round(T / dt, 1), model_tflops=round(flops / dt / 1e12, 1),
                   mfu=round(flops / dt / 1e12 / peak, 3), loss=round(loss, 4),
                   peak_mem_gib=_peak_gib(), timed_steps=len(times))
    except torch.OutOfMemoryError:
        rec.update(oom=True, peak_mem_gib=_peak_gib())
    finally:
        opt.zero_grad(set_to_none=True)
    emit(rec)
    return rec


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tinyllama_1b", choices=sorted(SHAPES))
    ap.add_argument("--hf", type=int, nargs="*", default=[131072], help="document lengths for the HF baseline")
    ap.add_argument("--ours", type=int, nargs="*", default=[131072, 262144], help="lengths for rollout_dist")
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--variants", nargs="*", default=["auto:4096"],
                    help="rollout_dist variants as ATTENTION[+keep|+keepN][+kv|+all][+vtN]:CHUNK (attention: auto, "
                         "cudnn, flash, sdpa; keep: rollout.keep_attention; keepN: also keep_attention_tokens=N; "
                         "kv/all: rollout.offload; vtN: rollout.vocab_tile=N)")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per length (after one warm-up step)")
    ap.add_argument("--budget", type=float, default=540.0, help="seconds; later lengths are skipped after it")
    ap.add_argument("--probe", type=int, nargs="*", default=[],
                    help="lengths to probe for memory only (fill + a few backward chunks), after the timed runs")
    ap.add_argument("--probe-chunks", type=int, default=3)
    ap.add_argument("--trace", action="store_true",
                    help="probes also record what was allocated at their peak, by the code that allocated it")
    ap.add_argument("--optimizer", choices=["adamw", "none"], default="adamw",
                    help="none: steps stop at the gradients (optimizer states off the GPU, as under ZeRO-Offload)")
    args = ap.parse_args()
    t_start = time.time()
    deadline = t_start + args.budget
    peak = matmul_peak()
    emit({"what": "bf16_matmul_8192", "tflops": round(peak, 1), "gpu": torch.cuda.get_device_name(),
          "torch": torch.__version__, "model": args.model, "optimizer": args.optimizer})
    runs = [("hf_fullseq", hf_step, args.hf, None, {})]
    for variant in args.variants:
        label, chunk, opts = parse_variant(variant)
        runs.append((label, partial(ours_step, **opts), args.ours, chunk, opts))
    for system, step, lengths, chunk, opts in runs:
        probes = args.probe if system.startswith("rollout_dist") else []
        if not lengths and not probes:
            continue
        model, opt = build(args.model, args.optimizer)
        if system == "hf_fullseq":
            model.gradient_checkpointing_enable()
        # the warm-up step also creates the optimizer states, so later peaks include them
        warm = min(lengths[0], 8192) if lengths else 8192
        ours = None if system == "hf_fullseq" else opts
        measure(system + "_warmup", step, model, opt, warm, chunk, peak, 1, deadline)
        for T in lengths:
            if time.time() > deadline:
                emit({"system": system, "T": T, "skipped": "time budget"})
                continue
            rec = measure(system, step, model, opt, T, chunk, peak, args.steps, deadline, ours)
            if rec.get("oom"):
                break
        for T in probes:
            probe_memory(model, opt, T, chunk, args.probe_chunks, opts, args.trace)
        del model, opt
        gc.collect()
        torch.cuda.empty_cache()
    hf = {r["T"]: r["tok_s"] for r in RECORDS if r.get("system") == "hf_fullseq" and "tok_s" in r}
    print("\nsystem                               chunk  T         tok/s     vs HF  MFU    peak GiB  step s")
    for r in RECORDS:
        if "T" in r and "warmup" not in r["system"] and "probe" not in r["system"]:
            ratio = f"{r['tok_s'] / hf[r['T']]:.2f}x" if "tok_s" in r and r["T"] in hf else "-"
            print(f"{r['system']:<36} {str(r.get('chunk') or '-'):<6} {r['T']:<9} "
                  f"{r.get('tok_s', 'OOM' if r.get('oom') else '-'):<9} {ratio:<6} {r.get('mfu', '-'):<6} "
                  f"{r.get('peak_mem_gib', '-'):<9} {r.get('step_s', '-')}")
    for r in RECORDS:
        if r.get("system") == "rollout_dist_probe":
            opts = "+".join(f"{k}={v}" for k, v in r.items()
                            if k in ("attention", "offload", "vocab_tile", "keep_tokens", "offload_layers"))
            print(f"probe {opts:<30} {r['chunk']:<6} {r['T']:<9} {'fits' if r.get('fits') else 'OOM':<9} "
                  f"{'':<6} {'':<6} {r.get('peak_mem_gib', '-'):<9} backward chunk s {r.get('backward_chunk_s')}")

if __name__ == "__main__":
    main()
