"""Memory mode against exact mode at long documents, one GPU, one process, one model.

The model (TinyLlama-1.1B shape, random init, bf16, built on the GPU as bench/rollout_vs_hf.py builds it) is
wrapped once with ``rollout_dist.with_memory(model, MemoryConfig(slots=16))``; exact-mode runs use the inner HF
model (``memory_model.model``), so both modes train the same weights.  Variants, in this order:

  exact   --short tokens (131,072), chunks of --exact-chunk (16,384, as the repo's 131K runs), attention="auto"
  memory  --short tokens, chunks of --chunk (16,384)
  memory  --long tokens (1,048,576)
  memory  each of --longest (4,194,304; more lengths, e.g. 8388608, run only while --budget allows)

A step is ``rollout_dist.chunked_forward_backward`` (forward and backward of the whole document) then, with
``--optimizer adamw``, a fused AdamW step; the default ``none`` stops at the gradients.  Gradients are set to None
between steps (outside the timing).  --short lengths: one warm-up step on the first min(T, 2 chunks) tokens (the
kernels, the multi-chunk path), then --steps timed steps, the fastest reported; longer lengths: one step (same
kernels, already warm).  Peak memory: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``
(weights, gradients, token ids and the step's own memory).

Memory mode keeps, per document row, the carried state at every chunk boundary (layers x slots x hidden float32
slots plus a hidden-size float32 topic vector), whatever the chunk's length, plus one chunk's activations; its
peak should grow with T only by that state (and the int64 token ids and targets, 16 bytes a token).  Exact mode
keeps the K/V of the whole document (2 x layers x kv_heads x head_dim x 2 bytes a token).  Both figures are
computed from the model and set beside the measured growth (peak(long) - peak(short)) / extra chunks.

Model FLOPs (MFU against a bf16 matmul peak measured in the same call): exact 6*N*T + 6*L*H*T^2 (causal
attention counted once, as bench/rollout_vs_hf.py); memory 6*N*T + 6*L*H*T*c (chunk-local causal attention)
+ 12*L*H*T*m (the read over m memory slots).  Memory mode's recompute of each chunk's forward is not counted.

One JSON line per measurement and a summary line to stdout and $OUT/memory_scale.jsonl; a table last.
``--tiny`` runs the same code on the CPU with a tiny float32 model (hidden 64, 2 layers; 2,048 / 8,192 /
16,384 tokens in chunks of 512) for tests.

    python bench/memory_scale.py                       # one H200: bash bench/device/memory.sh
    python bench/memory_scale.py --longest 4194304 8388608 --budget 560
    python bench/memory_scale.py --tiny
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from rollout_vs_hf import SHAPES, build, matmul_peak  # noqa: E402

import rollout_dist  # noqa: E402

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)
RECORDS: list[dict] = []
T0 = time.time()


def emit(rec: dict) -> None:
    RECORDS.append(rec)
    line = json.dumps(rec)
    print(line, flush=True)
    out = os.environ.get("OUT", "/tmp")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "memory_scale.jsonl"), "a") as f:
        f.write(line + "\n")


def note(msg: str) -> None:
    print(f"# [{time.time() - T0:6.1f} s] {msg}", flush=True)


def build_model(tiny: bool):
    """The HF model: TinyLlama-1.1B shape on the GPU in bf16 (bench/rollout_vs_hf.py's build), or the tiny one
    on the CPU in float32."""
    if not tiny:
        return build("tinyllama_1b", "none")[0]
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(**TINY, max_position_embeddings=1 << 22, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(cfg, dtype=torch.float32)
    model.config.use_cache = False
    return model


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def gib(nbytes) -> float | None:
    return None if nbytes is None else round(nbytes / 2 ** 30, 3)


def sizes(memory_model, batch: int) -> dict:
    """Bytes of the carried state per chunk boundary (formula and as the model allocates it) and of exact mode's
    K/V per token."""
    cfg = memory_model.config
    layers, hidden = cfg.num_hidden_layers, cfg.hidden_size
    kv_heads = cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // cfg.num_attention_heads
    slots = memory_model.memory_config.slots
    state_elem = torch.tensor([], dtype=memory_model.state_dtype).element_size()
    carry = memory_model.initial_carry(batch)
    slot_bytes = sum(s.numel() * s.element_size() for s in carry.slots)
    topic_bytes = batch * hidden * 4  # (B, hidden) float32, set from the first chunk on
    model_elem = next(memory_model.model.parameters()).element_size()
    return {"state_bytes_per_chunk_formula": layers * batch * slots * hidden * state_elem,
            "state_formula": f"layers {layers} x batch {batch} x slots {slots} x hidden {hidden} x {state_elem} B",
            "state_bytes_per_chunk": slot_bytes + topic_bytes,
            "kv_bytes_per_token": 2 * layers * kv_heads * head_dim * model_elem,
            "kv_formula": f"2 x layers {layers} x kv_heads {kv_heads} x head_dim {head_dim} x {model_elem} B"}


def model_flops(model, T: int, chunk: int | None, slots: int) -> float:
    cfg = model.config
    n = sum(p.numel() for p in model.parameters())
    layers, hidden = cfg.num_hidden_layers, cfg.hidden_size
    if chunk is None:  # exact: causal attention over the whole document
        return 6 * n * T + 6 * layers * hidden * T * T
    return 6 * n * T + 6 * layers * hidden * T * chunk + 12 * layers * hidden * T * slots


class Progress:
    """Memory mode's per-chunk ``backward``: the plain backward, and a progress line every ``every`` chunks."""

    def __init__(self, label: str, chunks: int):
        self.label, self.chunks, self.done = label, chunks, 0
        self.every = max(1, chunks // 8)

    def __call__(self, objective):
        objective.backward()
        self.done += 1
        if self.done % self.every == 0 and self.done < self.chunks:
            note(f"{self.label}: backward {self.done}/{self.chunks} chunks")


def zero_grads(model) -> None:
    for p in model.parameters():
        p.grad = None


def measure(mode: str, model, T: int, chunk: int, args, device, peak_tflops, opt, timed: int, warmup: bool,
            info: dict) -> dict:
    """``timed`` steps of ``mode`` ("exact" or "memory") on a random (1, T) document (after a warm-up step on
    the first min(T, 2 chunks) tokens if ``warmup``)."""
    slots = info["slots"]
    chunks = -(-T // chunk)
    rec = {"mode": mode, "tokens": T, "chunk_size": chunk, "chunks": chunks, "batch": 1,
           "vocab_tile": args.vocab_tile, "optimizer": args.optimizer, "dtype": str(info["dtype"]).split(".")[-1],
           "device": info["device_name"]}
    if mode == "memory":
        rec.update(slots=slots, state_bytes_per_chunk=info["state_bytes_per_chunk"],
                   stored_state_bytes=info["state_bytes_per_chunk"] * chunks)
    else:
        rec.update(attention="auto", kv_bytes_per_token=info["kv_bytes_per_token"],
                   kv_bytes=info["kv_bytes_per_token"] * T)
    zero_grads(model)
    gc.collect()  # the allocator's cache is kept: the one-step lengths reuse the blocks of the chunks before
    cuda = device.type == "cuda"
    gen = torch.Generator(device=device).manual_seed(T)
    ids = torch.randint(0, model.config.vocab_size, (1, T), device=device, generator=gen)

    def step(x, progress=None):
        if mode == "exact":
            res = rollout_dist.chunked_forward_backward(model, x, chunk_size=chunk, attention="auto",
                                                        vocab_tile=args.vocab_tile)
        else:
            res = rollout_dist.chunked_forward_backward(model, x, chunk_size=chunk, vocab_tile=args.vocab_tile,
                                                        backward=progress)
        if opt is not None:
            opt.step()
        return res

    try:
        if warmup:
            w = min(T, 2 * chunk)
            note(f"{mode} T={T}: warm-up step on {w} tokens")
            step(ids[:, :w])
            sync(device)
            zero_grads(model)
            rec["warmup_tokens"] = w
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            rec["allocated_before_gib"] = gib(torch.cuda.memory_allocated())
        times, res = [], None
        for i in range(timed):
            note(f"{mode} T={T}: step {i + 1}/{timed} ({chunks} chunks of {chunk})")
            progress = Progress(f"{mode} T={T}", chunks) if mode == "memory" and chunks >= 16 else None
            sync(device)
            t0 = time.perf_counter()
            res = step(ids, progress)
            sync(device)
            times.append(time.perf_counter() - t0)
            zero_grads(model)
        dt = min(times)
        flops = model_flops(model, T, chunk if mode == "memory" else None, slots)
        rec.update(steps=timed, step_s=round(dt, 3), step_s_all=[round(t, 3) for t in times],
                   tok_s=round(T / dt, 1), model_tflops=round(flops / dt / 1e12, 2), loss=round(res.loss, 4))
        if peak_tflops:
            rec["mfu"] = round(flops / dt / 1e12 / peak_tflops, 3)
    except torch.OutOfMemoryError as err:
        rec.update(oom=True, error=str(err).splitlines()[0][:300])
    finally:
        zero_grads(model)
    if cuda and rec.get("oom"):
        torch.cuda.empty_cache()
    rec["peak_gib"] = gib(torch.cuda.max_memory_allocated()) if cuda else None
    del ids
    emit(rec)
    note(f"{mode} T={T}: " + (f"{rec['step_s']} s/step, {rec['tok_s']} tok/s, peak {rec['peak_gib']} GiB"
                              if "step_s" in rec else "OOM"))
    return rec


def summarize(info: dict, exact_chunk: int, chunk: int) -> dict:
    mem = {r["tokens"]: r for r in RECORDS if r.get("mode") == "memory" and "step_s" in r}
    exact = [r for r in RECORDS if r.get("mode") == "exact" and "step_s" in r]
    token_bytes = 16  # int64 token ids and targets, per token
    s = {"summary": True, "state_formula": info["state_formula"],
         "state_bytes_per_chunk_formula": info["state_bytes_per_chunk_formula"],
         "state_bytes_per_chunk": info["state_bytes_per_chunk"], "kv_formula": info["kv_formula"],
         "kv_bytes_per_token": info["kv_bytes_per_token"], "memory_chunk": chunk, "exact_chunk": exact_chunk,
         "kv_bytes_per_memory_chunk": info["kv_bytes_per_token"] * chunk,
         "kv_over_state_per_chunk": round(info["kv_bytes_per_token"] * chunk / info["state_bytes_per_chunk"], 1),
         "predicted_growth_bytes_per_chunk": info["state_bytes_per_chunk"] + token_bytes * chunk,
         "longest_tokens_one_step": max(mem) if mem else None}
    short = min(mem) if mem else None
    growth = {}
    for T, r in sorted(mem.items()):
        if T != short and r.get("peak_gib") is not None and mem[short].get("peak_gib") is not None:
            extra = r["chunks"] - mem[short]["chunks"]
            growth[str(T)] = round((r["peak_gib"] - mem[short]["peak_gib"]) * 2 ** 30 / extra)
    s["measured_growth_bytes_per_chunk"] = growth or None
    if exact and short is not None:
        e = next((r for r in exact if r["tokens"] == short), None)
        if e is not None:
            s["memory_vs_exact_tok_s"] = round(mem[short]["tok_s"] / e["tok_s"], 3)
            if e.get("peak_gib") is not None:
                s["memory_vs_exact_peak"] = round(mem[short]["peak_gib"] / e["peak_gib"], 3)
    emit(s)
    return s


def table(s: dict) -> None:
    print(f"\n{'mode':<7} {'tokens':>10} {'chunk':>6} {'step s':>8} {'tok/s':>9} {'MFU':>6} {'peak GiB':>9} "
          f"{'state/KV MiB':>12}")
    for r in RECORDS:
        if "mode" not in r:
            continue
        kept = r.get("stored_state_bytes", r.get("kv_bytes"))
        print(f"{r['mode']:<7} {r['tokens']:>10} {r['chunk_size']:>6} "
              f"{r.get('step_s', 'OOM' if r.get('oom') else r.get('skipped', '-')):>8} {r.get('tok_s', '-'):>9} "
              f"{r.get('mfu', '-'):>6} {str(r.get('peak_gib', '-')):>9} {kept / 2 ** 20:>12.2f}")
    print(f"carried state per chunk boundary: {s['state_bytes_per_chunk']:,} B ({s['state_formula']} = "
          f"{s['state_bytes_per_chunk_formula']:,} B, + float32 topic vector)")
    print(f"exact K/V: {s['kv_bytes_per_token']:,} B/token ({s['kv_formula']}), "
          f"{s['kv_bytes_per_memory_chunk']:,} B per {s['memory_chunk']}-token chunk = "
          f"{s['kv_over_state_per_chunk']}x the state")
    print(f"peak growth per extra chunk: measured {s['measured_growth_bytes_per_chunk']}, predicted "
          f"{s['predicted_growth_bytes_per_chunk']:,} B (state + 16 B/token of int64 ids and targets)")
    print(f"longest document trained in one step: {s['longest_tokens_one_step']} tokens")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny float32 model on the CPU (tests)")
    ap.add_argument("--short", type=int, help="tokens of the exact-vs-memory comparison (131072; tiny 2048)")
    ap.add_argument("--long", type=int, help="memory mode's long document (1048576; tiny 8192)")
    ap.add_argument("--longest", type=int, nargs="*", help="one step each, while --budget allows "
                    "(4194304; tiny 16384)")
    ap.add_argument("--chunk", type=int, help="memory mode's chunk (16384; tiny 512)")
    ap.add_argument("--exact-chunk", type=int, help="exact mode's chunk (16384; tiny 512)")
    ap.add_argument("--vocab-tile", type=int, help="tiled LM head, both modes (16384; tiny 100)")
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--steps", type=int, default=2, help="timed steps at --short (the fastest is reported)")
    ap.add_argument("--optimizer", choices=["none", "adamw"], default="none",
                    help="none: a step ends at the gradients; adamw: plus a (fused on GPU) AdamW step")
    ap.add_argument("--budget", type=float, default=540.0,
                    help="seconds from start; a --longest length predicted (from --long's tok/s) to end later is "
                         "skipped and recorded")
    ap.add_argument("--no-exact", action="store_true", help="skip exact mode")
    args = ap.parse_args()
    defaults = (dict(short=2048, long=8192, longest=[16384], chunk=512, exact_chunk=512, vocab_tile=100)
                if args.tiny else
                dict(short=131072, long=1048576, longest=[4194304], chunk=16384, exact_chunk=16384,
                     vocab_tile=16384))
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.tiny:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1") or 1))
    elif not torch.cuda.is_available():
        sys.exit("bench/memory_scale.py: no GPU (use --tiny on the CPU)")
    device = torch.device("cpu" if args.tiny else "cuda")
    peak_tflops = None if args.tiny else matmul_peak()
    hf = build_model(args.tiny)
    memory_model = rollout_dist.with_memory(hf, rollout_dist.MemoryConfig(slots=args.slots))
    info = {"slots": args.slots, "dtype": next(hf.parameters()).dtype,
            "device_name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", **sizes(memory_model, 1)}
    opt = None
    if args.optimizer == "adamw":
        opt = torch.optim.AdamW(memory_model.parameters(), lr=1e-4, fused=device.type == "cuda")
    emit({"what": "setup", "model": "tiny" if args.tiny else "tinyllama_1b", "shape": TINY if args.tiny else
          SHAPES["tinyllama_1b"], "hf_params": sum(p.numel() for p in hf.parameters()),
          "memory_params": sum(p.numel() for p in memory_model.memory_parameters()), "slots": args.slots,
          "dtype": str(info["dtype"]).split(".")[-1], "device": info["device_name"], "torch": torch.__version__,
          "bf16_matmul_tflops": None if peak_tflops is None else round(peak_tflops, 1),
          "optimizer": args.optimizer})
    if not args.no_exact:
        measure("exact", hf, args.short, args.exact_chunk, args, device, peak_tflops, opt, args.steps, True, info)
    measure("memory", memory_model, args.short, args.chunk, args, device, peak_tflops, opt, args.steps, True, info)
    rate = measure("memory", memory_model, args.long, args.chunk, args, device, peak_tflops, opt, 1, False,
                   info).get("tok_s")
    for T in args.longest:
        predicted = T / rate if rate else None
        if predicted is not None and time.time() - T0 + predicted > args.budget:
            rec = {"mode": "memory", "tokens": T, "chunk_size": args.chunk, "chunks": -(-T // args.chunk),
                   "skipped": "budget", "predicted_step_s": round(predicted, 1),
                   "stored_state_bytes": info["state_bytes_per_chunk"] * -(-T // args.chunk)}
            emit(rec)
            note(f"memory T={T}: skipped (predicted {predicted:.0f} s, {time.time() - T0:.0f} s of "
                 f"{args.budget:.0f} s used)")
            continue
        r = measure("memory", memory_model, T, args.chunk, args, device, peak_tflops, opt, 1, False, info)
        if r.get("oom"):
            break
    table(summarize(info, args.exact_chunk, args.chunk))


if __name__ == "__main__":
    main()
