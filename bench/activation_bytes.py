"""Bytes autograd keeps per chunk token per decoder layer during a chunk's recompute (the M_chunk of the memory
model in docs/performance.md), by model shape, counted exactly through saved-tensor hooks
(rollout_dist.engine.budget.activation_bytes_per_token, decoder layers only).  Runs on CPU in bf16 with the
split-attention reference kernel, which saves what the GPU kernels save (q, k, v, output, log-sum-exp); weights
and the carried K/V buffers are not counted.  Prints one JSON line per shape.

    python bench/activation_bytes.py
"""
from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from rollout_dist.engine.budget import activation_bytes_per_token  # noqa: E402
from rollout_dist.model import CausalLMAdapter  # noqa: E402

SHAPES = {
    "tinyllama_1b": dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4,
                         num_hidden_layers=22),
    "llama3_8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                      num_hidden_layers=32),
}


def saved_bytes_per_token_layer(shape: dict, chunk: int = 256, layers: int = 2) -> float:
    cfg = LlamaConfig(vocab_size=320, max_position_embeddings=4 * chunk,
                      **{**shape, "num_hidden_layers": layers})
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    return activation_bytes_per_token(CausalLMAdapter(model), probe_tokens=chunk, layers_only=True) / layers


def main() -> None:
    for name, shape in SHAPES.items():
        per = saved_bytes_per_token_layer(shape)
        print(json.dumps({"shape": name, "saved_bytes_per_token_per_layer": round(per),
                          "saved_bytes_per_token_all_layers": round(per * shape["num_hidden_layers"]),
                          "chunk_4096_gib": round(per * shape["num_hidden_layers"] * 4096 / 2**30, 2),
                          "chunk_16384_gib": round(per * shape["num_hidden_layers"] * 16384 / 2**30, 2)}))


if __name__ == "__main__":
    main()
