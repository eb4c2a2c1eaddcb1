"""bf16 gradients over many chunks of one document: each parameter's relative L2 error against an fp32 reference.

In bf16 the carried dK/dV of an early chunk take up to C-1 rounded additions, and with ZeRO 0 and 1 the parameter
gradients of all C chunks add up in the weights' bf16 ``.grad``.  For C = 8, 64 and 256 chunks of one document
(same model, same chunk size) this measures, per parameter, ||g - g_ref|| / ||g_ref|| where g_ref is the fp32
gradient (the same weights in fp32, exact chunked rollout: equal to full-sequence fp32 up to fp32 rounding), for

- ``rollout_bf16``: the exact rollout of the bf16 model (dK/dV and .grad in bf16, as at ZeRO 0/1);
- ``hf_fullseq_bf16``: HF full-sequence forward/backward of the bf16 model (SDPA, gradient checkpointing), the
  baseline a user would otherwise run, at the same length where it fits.

Median and max over parameters, one JSON line per (system, chunks) to stdout and $OUT/bf16_chunks.jsonl; a
table last.  ``--shape tiny --device cpu`` is a smoke test.

    python bench/bf16_chunks.py --chunk 256 --chunks 8 64 256
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from rollout_dist import ExactRollout  # noqa: E402

OUT = os.environ.get("OUT", "/tmp")
COMMON = dict(max_position_embeddings=1 << 20, attention_dropout=0.0, tie_word_embeddings=False)
SHAPES = {"small": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                        num_attention_heads=16, num_key_value_heads=4, **COMMON),
          "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, **COMMON)}  # CPU smoke tests


def emit(rec: dict) -> None:
    line = json.dumps(rec)
    print(line, flush=True)
    with open(os.path.join(OUT, "bf16_chunks.jsonl"), "a") as f:
        f.write(line + "\n")


def grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.detach().float().clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out


def errors(got: dict, ref: dict) -> dict:
    rel = [((got[n] - g).norm() / g.norm()).item() for n, g in ref.items() if g.norm() > 0]
    return {"median_rel_err": statistics.median(rel), "max_rel_err": max(rel), "params": len(rel)}


def hf_fullseq(model, ids) -> None:
    model.gradient_checkpointing_enable()
    model.train()
    logits = model(ids).logits
    loss = torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:])
    del logits
    loss.backward()
    model.gradient_checkpointing_disable()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--chunks", type=int, nargs="+", default=[8, 64, 256])
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM
    shape, device = SHAPES[args.shape], torch.device(args.device)
    torch.manual_seed(0)
    with device:
        ref_model = LlamaForCausalLM(LlamaConfig(**shape, attn_implementation="sdpa")).float()
    bf16_model = LlamaForCausalLM(ref_model.config).to(device=device, dtype=torch.bfloat16)
    bf16_model.load_state_dict(ref_model.state_dict())
    ref_model.load_state_dict({k: v.float() for k, v in bf16_model.state_dict().items()})  # the same bf16 weights
    rows = []
    for c in args.chunks:
        T = c * args.chunk
        ids = torch.randint(0, shape["vocab_size"], (1, T), generator=torch.Generator().manual_seed(c)).to(device)
        ExactRollout(args.chunk, attention="sdpa").run(ref_model, ids)
        ref = grads(ref_model)
        ExactRollout(args.chunk, attention=args.attention).run(bf16_model, ids)
        rec = {"system": "rollout_bf16", "chunks": c, "chunk": args.chunk, "T": T, **errors(grads(bf16_model), ref)}
        emit(rec)
        rows.append(rec)
        try:
            hf_fullseq(bf16_model, ids)
            rec = {"system": "hf_fullseq_bf16", "chunks": 1, "T": T, **errors(grads(bf16_model), ref)}
        except torch.OutOfMemoryError:
            bf16_model.zero_grad(set_to_none=True)
            rec = {"system": "hf_fullseq_bf16", "T": T, "oom": True}
        emit(rec)
        rows.append(rec)
        del ref
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"{'system':16} {'T':>7} {'chunks':>6} {'median':>9} {'max':>9}")
    for r in rows:
        if "median_rel_err" in r:
            print(f"{r['system']:16} {r['T']:>7} {r['chunks']:>6} {r['median_rel_err']:>9.2e} {r['max_rel_err']:>9.2e}")


if __name__ == "__main__":
    main()
