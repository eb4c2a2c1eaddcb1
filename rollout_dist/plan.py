"""Plan documents into chunks and write the chunk index (a new version of a Zarr store), then print a summary.

    python -m rollout_dist.plan --data 'corpus/*.jsonl' --out plans/corpus --profile legal
    python -m rollout_dist.plan --data docs/ --out plans/docs --tokenizer /models/my-llama --mode memory

``--data`` takes what ``data.path`` takes (a .txt/.jsonl file, a directory, a glob; omitted: the bundled
corpus).  ``--profile`` is an option of the Hydra group ``hydra_conf/planner`` or a YAML file of that schema.
Bad input stops with one line naming the file (and line) and exit status 2; nothing is dropped silently:
empty documents are kept with 0 chunks and listed, replaced invalid UTF-8 is counted per file.
"""
from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from pathlib import Path

import xxhash
from tqdm.auto import tqdm

from rollout_dist.config import ConfigError
from rollout_dist.data import DataError, LoadReport, find_files, read_texts
from rollout_dist.planning.config import PlannerConfig, load_profile
from rollout_dist.planning.index import ChunkIndexError, write_index
from rollout_dist.planning.planner import MODES, PlanError, plan_document
from rollout_dist.planning.tokens import ByteTokenMap, OffsetTokenMap, TokenizerError, tokenizer_fingerprint

log = logging.getLogger(__name__)

PROFILE_DIR = Path(__file__).resolve().parents[1] / "hydra_conf" / "planner"
_SURROGATE = re.compile("[\ud800-\udfff]")


def load_planner_profile(profile: str) -> PlannerConfig:
    """``legal`` (hydra_conf/planner/legal.yaml) or a path to a YAML file -> checked PlannerConfig."""
    path = Path(profile)
    if path.suffix not in (".yaml", ".yml"):
        path = PROFILE_DIR / f"{profile}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PROFILE_DIR.glob("*.yaml")) if PROFILE_DIR.is_dir() else []
        raise ConfigError(f"planner profile {profile!r}: no file {path}; choose one of {known} or pass a YAML path")
    return load_profile(path)


def load_tokenizer(spec: str):
    """(tokenizer, index attrs, token-map factory) for ``byte`` or an HF tokenizer directory."""
    if spec == "byte":
        from rollout_dist.tokenizer import byte_tokenizer
        tok = byte_tokenizer()
        info = {"kind": "byte", "name": "byte", "fingerprint": tokenizer_fingerprint(tok), "vocab_size": len(tok)}
        return tok, info, lambda text, where: ByteTokenMap(text, where)
    if not Path(spec).is_dir():
        raise TokenizerError(f"--tokenizer {spec!r}: neither 'byte' nor a directory holding an HF tokenizer")
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(spec)
    except Exception as err:  # noqa: BLE001 - transformers raises many kinds; say which directory failed
        raise TokenizerError(f"--tokenizer {spec!r}: cannot load an HF tokenizer from it ({err})") from None
    info = {"kind": "hf", "name": str(Path(spec).resolve()), "fingerprint": tokenizer_fingerprint(tok),
            "vocab_size": len(tok)}
    return tok, info, lambda text, where: OffsetTokenMap(text, tok, where)


def _clean(text: str, where: str, invalid_utf8: str, report: LoadReport) -> str:
    """Lone surrogates (JSON "\\ud800" escapes) are not text: replaced with U+FFFD and counted, or an error."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError as err:
        if invalid_utf8 == "error":
            raise DataError(f"{where}: character {err.start} is a lone surrogate, not text; fix the source or use "
                            "--invalid-utf8 replace") from None
        fixed, n = _SURROGATE.subn("\ufffd", text)
        report.replaced_utf8[where] = report.replaced_utf8.get(where, 0) + n
        return fixed


def plan_corpus(data: str | None, out: str, cfg: PlannerConfig, *, tokenizer: str = "byte", mode: str = "exact",
                text_field: str = "text", invalid_utf8: str = "replace", progress: bool = True) -> tuple[Path, dict]:
    """Reads, plans and writes one index version; returns its directory and the summary."""
    if mode not in MODES:
        raise PlanError(f"--mode {mode!r}: choose exact or memory")
    if invalid_utf8 not in ("replace", "error"):
        raise ConfigError(f"--invalid-utf8 {invalid_utf8!r}: choose replace or error")
    files = find_files(data)
    _, tok_info, token_map = load_tokenizer(tokenizer)
    report = LoadReport()
    plans, doc_sources, sources = [], [], []
    start = time.perf_counter()
    total_bytes = sum(p.stat().st_size for p in files)
    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="planning", disable=not progress) as bar:
        for path in files:
            raw = path.read_bytes()
            sources.append({"path": str(path.resolve()), "xxh3_64": xxhash.xxh3_64_hexdigest(raw),
                            "bytes": len(raw)})
            del raw
            for where, text in read_texts([path], text_field, invalid_utf8, report):
                text = _clean(text, where, invalid_utf8, report)
                plans.append(plan_document(text, token_map(text, where), cfg, mode=mode, doc_id=where))
                doc_sources.append(len(sources) - 1)
            bar.update(path.stat().st_size)
    if not plans:
        raise DataError(f"--data {data!r}: {len(files)} file(s) read and no documents in them (only blank JSONL "
                        "lines?)")
    empty = [p.doc_id for p in plans if not p.chunks]
    version_dir = write_index(out, plans, sources=sources, doc_sources=doc_sources, profile=cfg.to_dict(),
                              mode=mode, tokenizer=tok_info,
                              problems={"empty_documents": empty, "replaced_utf8": dict(report.replaced_utf8)})
    seconds = time.perf_counter() - start
    sizes = sorted(c.token_count for p in plans for c in p.chunks)
    kinds: dict = {}
    for p in plans:
        for c in p.chunks:
            kinds[c.boundary_kind] = kinds.get(c.boundary_kind, 0) + 1
    summary = {
        "index": str(version_dir), "profile": cfg.profile, "mode": mode, "tokenizer": tok_info["name"],
        "files": len(files), "documents": len(plans), "chunks": len(sizes),
        "tokens": sum(p.n_tokens for p in plans),
        "chunk_tokens": {"min": sizes[0], "median": sizes[len(sizes) // 2], "max": sizes[-1]} if sizes else {},
        "boundary_kinds": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
        "token_cuts": sum(p.token_cuts for p in plans), "empty_documents": empty,
        "replaced_utf8": dict(report.replaced_utf8), "seconds": round(seconds, 2),
        "mb_per_s": round(total_bytes / 1e6 / seconds, 2) if seconds > 0 else None,
    }
    return version_dir, summary


def format_summary(s: dict) -> str:
    lines = [f"wrote {s['index']}",
             f"  {s['files']} file(s), {s['documents']} document(s), {s['tokens']:,} tokens -> {s['chunks']:,} "
             f"chunk(s) [profile {s['profile']}, mode {s['mode']}, tokenizer {s['tokenizer']}]"]
    if s["chunk_tokens"]:
        ct = s["chunk_tokens"]
        lines.append(f"  chunk tokens: min {ct['min']}, median {ct['median']}, max {ct['max']}")
    lines.append("  boundaries: " + ", ".join(f"{k} {v}" for k, v in s["boundary_kinds"].items()))
    if s["token_cuts"]:
        lines.append(f"  warning: {s['token_cuts']} chunk(s) start inside a sentence longer than max_chunk_tokens "
                     "(cut at token level; boundary kind token_cut:sentence_over_max)")
    if s["empty_documents"]:
        lines.append(f"  warning: {len(s['empty_documents'])} empty document(s), kept with 0 chunks "
                     f"(first: {s['empty_documents'][0]})")
    for where, n in s["replaced_utf8"].items():
        lines.append(f"  warning: {where}: {n} invalid UTF-8 sequence(s) replaced with U+FFFD")
    lines.append(f"  {s['seconds']} s ({s['mb_per_s']} MB/s)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rollout_dist.plan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="a .txt/.jsonl file, a directory or a glob (default: the "
                                                     "bundled corpus)")
    parser.add_argument("--out", required=True, help="chunk index store (a directory; a new version is added)")
    parser.add_argument("--profile", default="default", help="default|legal|medical|finance or a YAML file")
    parser.add_argument("--tokenizer", default="byte", help="'byte' (built-in) or an HF tokenizer directory")
    parser.add_argument("--mode", default="exact", choices=MODES,
                        help="exact: chunks tile the document; memory: also record overlaps (profile's "
                             "memory_overlap_tokens)")
    parser.add_argument("--text-field", default="text", help="JSONL field holding the text")
    parser.add_argument("--invalid-utf8", default="replace", choices=("replace", "error"),
                        help="replace invalid UTF-8 with U+FFFD (counted) or stop with an error")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cfg = load_planner_profile(args.profile)
        _, summary = plan_corpus(args.data, args.out, cfg, tokenizer=args.tokenizer, mode=args.mode,
                                 text_field=args.text_field, invalid_utf8=args.invalid_utf8,
                                 progress=not args.no_progress)
    except (DataError, ConfigError, TokenizerError, PlanError, ChunkIndexError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
