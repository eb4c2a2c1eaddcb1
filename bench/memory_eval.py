"""Does memory mode's state carry information across chunks?  Pass-key recall k chunks back, k in {1, 2, 4, 8}.

Task: a document of ``--chunks`` chunks of ``--chunk`` byte tokens of real text (the bundled corpus; training
filler from the first 85% of each file, held-out filler from the rest).  The sentence "The pass key is NNN.
Remember it." sits inside chunk n-1-k; the last chunk ends with "What is the pass key? The pass key is NNN."
The answer NNN (3 random digits, 1,000 candidates: chance is 0.1%) lies k chunks before the question.  Accuracy:
all three digits right under greedy decoding (teacher-forced argmax, which equals greedy decoding up to the first
wrong digit), on ``--eval`` held-out questions per k.

Variants, trained on the same documents (same seed) for the same steps with the same optimizer:
- ``memory``: ``with_memory`` (memory mode), trained through every chunk;
- ``local``: the same architecture with the state ablated from the start (``ablate_state=True``): chunk-local;
- ``exact``: the plain HF model over the whole document (exact mode's result: full attention; the upper bound);
- ``memory/ablated``: the trained memory model evaluated with ``ablate_state=True`` (expected: chance).
Also the mean loss by chunk index on held-out real text of ``--text-chunks`` chunks (no pass key).

The objective is the mean next-token loss on the whole document plus the mean loss of the answer tokens
(``--answer-weight``).  Training documents grow in chunks (``--curriculum``, ARMT's and RMT's segment curriculum:
2, 3, 5 chunks, then ``--chunks`` for the second half of the steps); every variant sees the same documents.  The
defaults are the configuration of docs/memory_mode.md's results (memory 99.8-100 % at every k on one H200).
Training uses the whole-graph reference (``MemoryModel.forward``), which tests/memory/test_memory_model.py shows
equal to the chunked backward in float64, because it is faster for models this small; ``--chunked`` trains with
``rollout_dist.chunked_forward_backward`` instead.

Prints JSON lines (and writes them to $OUT/memory_eval.jsonl) and a table last.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rollout_dist import MemoryConfig, with_memory  # noqa: E402

CORPUS = Path(__file__).resolve().parents[1] / "rollout_dist" / "assets" / "corpus"
KS = (1, 2, 4, 8)
DIGITS = 3


def corpus_bytes(split: str) -> bytes:
    parts = []
    for path in sorted(CORPUS.glob("*.txt")):
        data = path.read_bytes()
        cut = int(len(data) * 0.85)
        parts.append(data[:cut] if split == "train" else data[cut:])
    return b"\n".join(parts)


class Task:
    """Documents of the pass-key task, drawn from ``rng`` over filler bytes ``text``."""

    def __init__(self, text: bytes, chunk: int, chunks: int, seed: int):
        self.text, self.chunk, self.chunks = text, chunk, chunks
        self.rng = random.Random(seed)

    def filler(self, n: int) -> list[int]:
        start = self.rng.randrange(0, len(self.text) - n)
        return list(self.text[start:start + n])

    def document(self, k: int) -> tuple[list[int], list[int], int]:
        """(tokens, answer digits' positions, key); the key sentence lies in chunk chunks-1-k."""
        key = self.rng.randrange(10 ** DIGITS)
        digits = f"{key:0{DIGITS}d}".encode()
        fact = b" The pass key is " + digits + b". Remember it. "
        question = b" What is the pass key? The pass key is " + digits + b"."
        c, n = self.chunk, self.chunks
        tokens = self.filler(c * n)
        j = n - 1 - k
        at = j * c + self.rng.randrange(0, c - len(fact))
        tokens[at:at + len(fact)] = list(fact)
        end = n * c
        tokens[end - len(question):end] = list(question)
        answer_end = end - 1  # the final "."
        positions = list(range(answer_end - DIGITS, answer_end))
        return tokens, positions, key


def batch(task: Task, size: int, ks, device) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    docs = [task.document(ks[i % len(ks)]) for i in range(size)]
    ids = torch.tensor([d[0] for d in docs], device=device)
    answer = torch.tensor([d[1] for d in docs], device=device)
    return ids, answer, [ks[i % len(ks)] for i in range(size)]


def build(args, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    heads = args.width // 64
    config = LlamaConfig(vocab_size=320, hidden_size=args.width, intermediate_size=int(args.width * 8 / 3) // 64 * 64,
                         num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=1 << 16, rope_parameters={"rope_type": "default",
                                                                            "rope_theta": 10000.0},
                         tie_word_embeddings=False, attn_implementation="sdpa", use_cache=False)
    return LlamaForCausalLM(config).to(device)


def logits_of(variant: str, model, ids: torch.Tensor, chunk: int, ablate: bool = False) -> torch.Tensor:
    if variant == "exact":
        return model(ids).logits
    return model(ids, chunk_size=chunk, ablate_state=ablate).logits


def objective(logits: torch.Tensor, ids: torch.Tensor, answer: torch.Tensor, answer_weight: float) -> torch.Tensor:
    lm = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    rows = torch.arange(ids.shape[0], device=ids.device)[:, None]
    picked = logits[rows, answer - 1].float()  # the logits that predict the answer digits
    ans = F.cross_entropy(picked.reshape(-1, logits.shape[-1]), ids[rows, answer].reshape(-1))
    return lm + answer_weight * ans


def train(variant: str, args, device, log) -> tuple[torch.nn.Module, dict]:
    base = build(args, device)
    if variant == "exact":
        model, groups = base, [{"params": list(base.parameters()), "lr": args.lr, "weight_decay": 0.1}]
    else:
        model = with_memory(base, MemoryConfig(slots=args.slots, write_dim=args.write_dim))
        mem = {id(p) for p in model.memory_parameters()}
        groups = [{"params": [p for p in model.parameters() if id(p) not in mem], "lr": args.lr, "weight_decay": 0.1},
                  {"params": model.memory_parameters(), "lr": args.memory_lr, "weight_decay": 0.0}]
    base_lrs = [g["lr"] for g in groups]  # torch keeps the group dicts themselves as param_groups
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.95), fused=device.type == "cuda")
    task = Task(corpus_bytes("train"), args.chunk, args.chunks, seed=args.seed)
    if variant != "exact" and args.gate_std:
        with torch.no_grad():
            for mem in model.memory:  # selective writes from the start: dt depends on what the slot pooled
                mem.gate_input.normal_(std=args.gate_std * mem.gate_input.numel() ** -0.5)
    ablate = variant == "local"
    model.train()
    t0, history = time.perf_counter(), []
    warm = max(1, args.steps // 20)
    step, t5 = 0, None
    while step < args.steps:
        if step == 5:
            t5 = time.perf_counter()
        if step == 25 and args.max_seconds:  # fit the budget: every variant then trains this many steps
            # a step costs about as much as its document's chunks (launch-bound): scale the measured steps' cost to
            # the mean length over the schedule
            per_chunk = (time.perf_counter() - t5) / 20 / task.chunks
            mean_chunks = sum(curriculum_chunks(args, s) for s in range(args.steps)) / args.steps
            fit = int(args.max_seconds / (per_chunk * mean_chunks))
            if fit < args.steps:
                log(f"  {variant}: {args.steps} steps would exceed --max-seconds={args.max_seconds}; {fit} steps")
                args.steps = fit
            args.max_seconds = 0
        scale = min(1.0, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for g, base_lr in zip(opt.param_groups, base_lrs):
            g["lr"] = base_lr * max(scale, 0.05)
        task.chunks = curriculum_chunks(args, step)
        ids, answer, _ = batch(task, args.batch, tuple(k for k in args.train_ks if k < task.chunks), device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            if args.chunked and variant != "exact":
                loss = chunked_step(model, ids, answer, args, ablate)
            else:
                loss = objective(logits_of(variant, model, ids, args.chunk, ablate), ids, answer, args.answer_weight)
                loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
            history.append((step, round(float(loss.detach()), 4)))
            log(f"  {variant} step {step}/{args.steps} loss {history[-1][1]:.3f} ({time.perf_counter() - t0:.0f} s)")
        step += 1
    seconds = time.perf_counter() - t0
    gates = None
    if variant != "exact":
        gates = [float(m.inject.abs().mean()) for m in model.memory]
    return model, {"train_seconds": round(seconds, 1), "steps": step,
                   "loss_history": history, "inject_gate_mean_abs": gates}


def curriculum_chunks(args, step: int) -> int:
    """The training documents' length in chunks at ``step``: the ``--curriculum`` lengths, each for an equal share
    of the first ``--curriculum-frac`` of the steps, then ``--chunks`` (ARMT's and RMT's segment curriculum)."""
    stages = [n for n in args.curriculum if n < args.chunks]
    if not stages:
        return args.chunks
    share = args.curriculum_frac * args.steps / len(stages)
    i = int(step // share) if share > 0 else len(stages)
    return stages[i] if i < len(stages) else args.chunks


def chunked_step(model, ids, answer, args, ablate) -> torch.Tensor:
    """The answer-weighted objective through ``chunked_forward_backward``: labels hold every next token, and the
    answer digits are repeated in a second pass with the other labels masked (two rollouts, one step)."""
    from rollout_dist import chunked_forward_backward

    lm = chunked_forward_backward(model, ids, chunk_size=args.chunk, ablate_state=ablate)
    labels = torch.full_like(ids, -100)
    rows = torch.arange(ids.shape[0], device=ids.device)[:, None]
    labels[rows, answer] = ids[rows, answer]
    ans = chunked_forward_backward(model, ids, chunk_size=args.chunk, labels=labels, ablate_state=ablate,
                                   loss_normalizer=labels.ne(-100).sum().item() / args.answer_weight)
    return torch.tensor(lm.loss + args.answer_weight * ans.loss)


@torch.no_grad()
def accuracy(variant: str, model, args, device, k: int, ablate: bool) -> float:
    task = Task(corpus_bytes("eval"), args.chunk, args.chunks, seed=10_000 + 97 * k + args.seed)
    model.eval()
    right = total = 0
    while total < args.eval:
        size = min(args.eval_batch, args.eval - total)
        ids, answer, _ = batch(task, size, (k,), device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = logits_of(variant, model, ids, args.chunk, ablate)
        rows = torch.arange(size, device=device)[:, None]
        guess = logits[rows, answer - 1].argmax(-1)
        right += int((guess == ids[rows, answer]).all(dim=1).sum())
        total += size
    model.train()
    return right / total


@torch.no_grad()
def loss_by_chunk(variant: str, model, args, device, ablate: bool) -> list[float]:
    text = corpus_bytes("eval")
    c, n = args.chunk, args.text_chunks
    rng = random.Random(args.seed + 1)
    starts = [rng.randrange(0, len(text) - c * n) for _ in range(args.text_docs)]
    ids = torch.tensor([list(text[s:s + c * n]) for s in starts], device=device)
    model.eval()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logits = logits_of(variant, model, ids, c, ablate)
    model.train()
    tok = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                          reduction="none").view(ids.shape[0], -1)
    tok = F.pad(tok, (0, 1), value=float("nan"))
    return [round(float(tok[:, t * c:(t + 1) * c].nanmean()), 4) for t in range(n)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", default="memory,local,exact")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--chunks", type=int, default=9)
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--write-dim", type=int, default=128)
    p.add_argument("--steps", type=int, default=740)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--memory-lr", type=float, default=3e-3)
    p.add_argument("--answer-weight", type=float, default=5.0)
    p.add_argument("--train-ks", default="1,2,3,4,5,6,7,8")
    p.add_argument("--eval", type=int, default=500)
    p.add_argument("--eval-batch", type=int, default=250)
    p.add_argument("--text-chunks", type=int, default=16)
    p.add_argument("--text-docs", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--curriculum", default="2,3,5",
                   help="document lengths in chunks before --chunks, e.g. 2,3,5: each trains an equal share of the "
                        "first --curriculum-frac of the steps (every variant sees the same documents)")
    p.add_argument("--curriculum-frac", type=float, default=0.5)
    p.add_argument("--gate-std", type=float, default=0.0,
                   help="initial spread of the write gate's input weights (0: as the library initialises them)")
    p.add_argument("--max-seconds", type=float, default=0,
                   help="fit the first variant's training into this long (its speed measured over steps 5-25); "
                        "every variant then trains that many steps")
    p.add_argument("--chunked", action="store_true", help="train memory variants with chunked_forward_backward")
    p.add_argument("--tiny", action="store_true", help="a CPU smoke run of the same code")
    args = p.parse_args()
    if args.tiny:
        args.layers, args.width, args.chunk, args.chunks, args.steps, args.batch = 2, 64, 48, 4, 6, 4
        args.eval, args.eval_batch, args.text_chunks, args.text_docs, args.train_ks = 8, 8, 3, 2, "1,2"
        args.curriculum = "2,3"
    args.train_ks = tuple(int(k) for k in args.train_ks.split(","))
    args.curriculum = tuple(int(n) for n in args.curriculum.split(",") if n)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ks = tuple(k for k in KS if k < args.chunks)
    out = Path(os.environ.get("OUT", "/tmp/out"))
    out.mkdir(parents=True, exist_ok=True)
    sink = open(out / "memory_eval.jsonl", "a")

    def log(msg):
        print(msg, flush=True)

    def emit(row):
        row = {"bench": "memory_eval", **row}
        print(json.dumps(row), flush=True)
        sink.write(json.dumps(row) + "\n")
        sink.flush()

    setup = {k: v for k, v in vars(args).items()}
    emit({"setup": setup, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
          "chance": 10.0 ** -DIGITS})
    table = {}
    for variant in args.variants.split(","):
        model, info = train(variant, args, device, log)
        evals = [(variant, False)] + ([(variant + "/ablated", True)] if variant == "memory" else [])
        for name, ablate in evals:
            acc = {k: accuracy(variant, model, args, device, k, ablate) for k in ks}
            curve = loss_by_chunk(variant, model, args, device, ablate)
            emit({"variant": name, **info, "accuracy": {str(k): v for k, v in acc.items()}, "eval_per_k": args.eval,
                  "text_loss_by_chunk": curve})
            table[name] = (acc, curve)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"\npass-key accuracy ({args.eval} per k; chance {10.0 ** -DIGITS:.3%}); loss on real text, chunk 0 / last")
    print(f"{'variant':<16}" + "".join(f"{'k=' + str(k):>8}" for k in ks) + f"{'loss c0':>9}{'c_last':>8}")
    for name, (acc, curve) in table.items():
        print(f"{name:<16}" + "".join(f"{acc[k]:>8.3f}" for k in ks) + f"{curve[0]:>9.3f}{curve[-1]:>8.3f}")


if __name__ == "__main__":
    main()
