"""Planner throughput in MB of text per second on one core, tokenization included; prints one JSON object.

The corpus is text already on the machine, written by others: /usr/share/common-licenses/* and the text files
under /usr/share/doc (``.gz`` decompressed; files that are not UTF-8 text, or look binary, are skipped).
The process is pinned to one core (and the HF tokenizer to one thread) so the figure is per core.

    python bench/plan_speed.py                       # about 20 MB, byte tokenizer, default profile
    python bench/plan_speed.py --mb 50 --profile legal
    python bench/plan_speed.py --hf-mb 2             # also time the HF byte tokenizer's offset path on 2 MB
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAYON_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOTS = ("/usr/share/common-licenses", "/usr/share/doc")
SKIP_SUFFIXES = (".png", ".jpg", ".gif", ".svg", ".pdf", ".ico", ".jpeg", ".woff", ".ttf", ".bz2", ".xz", ".zip")


def corpus(limit_bytes: int, max_file_bytes: int) -> tuple[list[tuple[str, str]], int]:
    """(path, text) of readable UTF-8 text files, in sorted path order, until ``limit_bytes``."""
    out, total = [], 0
    for root in ROOTS:
        for path in sorted(Path(root).rglob("*")):
            if total >= limit_bytes:
                return out, total
            if not path.is_file() or path.is_symlink() or path.suffix.lower() in SKIP_SUFFIXES:
                continue
            try:
                raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
            except (OSError, EOFError):
                continue
            if not raw or len(raw) > max_file_bytes or b"\0" in raw[:4096]:
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                continue
            out.append((str(path), text))
            total += len(raw)
    return out, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=20.0, help="MB of text to plan (default 20)")
    parser.add_argument("--profile", default="default", help="planner profile (hydra_conf/planner/NAME.yaml)")
    parser.add_argument("--hf-mb", type=float, default=0.0,
                        help="also time the HF tokenizer offset path (OffsetTokenMap) on this many MB")
    parser.add_argument("--repeat", type=int, default=1, help="best of this many passes")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})

    from rollout_dist.plan import load_planner_profile
    from rollout_dist.planning.planner import plan_document
    from rollout_dist.planning.tokens import ByteTokenMap, OffsetTokenMap
    from rollout_dist.tokenizer import byte_tokenizer

    cfg = load_planner_profile(args.profile)
    docs, total = corpus(int(args.mb * 1e6), max_file_bytes=8_000_000)
    best = float("inf")
    for _ in range(args.repeat):
        chunks = tokens = 0
        t0 = time.perf_counter()
        for where, text in docs:
            plan = plan_document(text, ByteTokenMap(text, where), cfg, doc_id=where)
            chunks += len(plan.chunks)
            tokens += plan.n_tokens
        best = min(best, time.perf_counter() - t0)
    result = {
        "bench": "plan_speed", "corpus": list(ROOTS), "files": len(docs), "mb": round(total / 1e6, 3),
        "tokens": tokens, "chunks": chunks, "profile": cfg.profile, "tokenizer": "byte (ByteTokenMap)",
        "seconds": round(best, 3), "mb_per_s_per_core": round(total / 1e6 / best, 2),
        "cores_used": 1, "cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
    }
    if args.hf_mb > 0:
        tok = byte_tokenizer()
        sample, size = [], 0
        for where, text in docs:
            if size >= args.hf_mb * 1e6:
                break
            sample.append((where, text))
            size += len(text.encode("utf-8"))
        t0 = time.perf_counter()
        for where, text in sample:
            plan_document(text, OffsetTokenMap(text, tok, where), cfg, doc_id=where)
        dt = time.perf_counter() - t0
        result["hf_offsets_path"] = {"mb": round(size / 1e6, 3), "seconds": round(dt, 3),
                                     "mb_per_s_per_core": round(size / 1e6 / dt, 2)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
