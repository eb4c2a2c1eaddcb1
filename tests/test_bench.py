"""The long-document trainer benchmark runs end to end (on CPU here; its figures come from GPU runs)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import child_env

ROOT = Path(__file__).resolve().parents[1]


def test_train_long_steps_and_probe_write_json(tmp_path):
    env = child_env(OUT=str(tmp_path))
    cmd = [sys.executable, str(ROOT / "bench" / "train_long.py"), "--tokens", "300", "500", "--probe-chunks", "0",
           "3", "--steps", "1", "--", "model=tiny", "rollout.chunk_size=64", "trainer.device=cpu",
           "rollout.offload=kv", "rollout.vocab_tile=100"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "train_long.jsonl").read_text().splitlines()]
    assert [(r["T"], r["mode"]) for r in records] == [(300, "steps"), (500, "probe")]
    steps, probe = records
    assert steps["tok_s"] > 0 and steps["loss"] > 0 and steps["offload"] == "kv" and steps["vocab_tile"] == 100
    assert probe["fits"] and probe["backward_chunks"] == 3 and len(probe["backward_chunk_s"]) == 2


def test_train_long_names_a_bad_override(tmp_path):
    cmd = [sys.executable, str(ROOT / "bench" / "train_long.py"), "--tokens", "300", "--", "model=tiny",
           "trainer.device=cpu", "rollout.offload=disk"]
    proc = subprocess.run(cmd, env=child_env(OUT=str(tmp_path)), capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "rollout.offload='disk' is not one of" in proc.stderr and "Traceback" not in proc.stderr


def test_variant_names_parse_into_rollout_options():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from rollout_vs_hf import parse_variant
    finally:
        sys.path.remove(str(ROOT / "bench"))
    assert parse_variant("cudnn+keep327680+kv20+vt16384:2048") == (
        "rollout_dist[cudnn+keep327680+kv20+vt16384]", 2048,
        {"attention": "cudnn", "keep_attention": True, "keep_tokens": 327680, "offload": "kv", "offload_layers": 20,
         "vocab_tile": 16384})
    assert parse_variant("sdpa+all:512")[2] == {"attention": "sdpa", "offload": "all"}
    with pytest.raises(SystemExit, match="unknown flag 'kvx'"):
        parse_variant("cudnn+kvx:512")


def test_bf16_chunks_measures_errors_against_fp32(tmp_path):
    cmd = [sys.executable, str(ROOT / "bench" / "bf16_chunks.py"), "--shape", "tiny", "--device", "cpu", "--chunk",
           "16", "--chunks", "2", "4"]
    proc = subprocess.run(cmd, env=child_env(OUT=str(tmp_path)), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "bf16_chunks.jsonl").read_text().splitlines()]
    assert [(r["system"], r["T"]) for r in records] == [("rollout_bf16", 32), ("hf_fullseq_bf16", 32),
                                                        ("rollout_bf16", 64), ("hf_fullseq_bf16", 64)]
    for r in records:  # bf16 against fp32: errors of bf16 rounding, neither zero nor wild
        assert 1e-4 < r["median_rel_err"] <= r["max_rel_err"] < 0.1, r


def test_memory_scale_tiny_writes_json(tmp_path):
    cmd = [sys.executable, str(ROOT / "bench" / "memory_scale.py"), "--tiny", "--short", "1024", "--long", "2048",
           "--longest", "4096", "--steps", "1"]
    proc = subprocess.run(cmd, env=child_env(OUT=str(tmp_path), OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "memory_scale.jsonl").read_text().splitlines()]
    setup, *runs, summary = records
    assert setup["what"] == "setup" and setup["memory_params"] > 0 and summary["summary"]
    assert [(r["mode"], r["tokens"], r["chunks"]) for r in runs] == [
        ("exact", 1024, 2), ("memory", 1024, 2), ("memory", 2048, 4), ("memory", 4096, 8)]
    for r in runs:
        assert r["step_s"] > 0 and r["tok_s"] > 0 and r["loss"] > 0 and r["chunk_size"] == 512
        assert r["peak_gib"] is None  # CPU: no allocator peak
    # 2 layers x 1 row x 16 slots x hidden 64 x float32, plus the float32 topic vector; K/V 2 x 2 x 2 x 16 x 4 B
    assert summary["state_bytes_per_chunk_formula"] == 2 * 16 * 64 * 4
    assert summary["state_bytes_per_chunk"] == 2 * 16 * 64 * 4 + 64 * 4
    assert summary["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 4
    assert runs[-1]["stored_state_bytes"] == 8 * summary["state_bytes_per_chunk"]
    assert summary["longest_tokens_one_step"] == 4096
    assert "longest document trained in one step: 4096 tokens" in proc.stdout


def test_memory_eval_curriculum_schedule():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from memory_eval import curriculum_chunks
    finally:
        sys.path.remove(str(ROOT / "bench"))
    from types import SimpleNamespace

    args = SimpleNamespace(curriculum=(2, 3, 5), curriculum_frac=0.5, steps=60, chunks=9)
    lengths = [curriculum_chunks(args, s) for s in range(60)]
    assert lengths == [2] * 10 + [3] * 10 + [5] * 10 + [9] * 30
    args.curriculum = ()
    assert {curriculum_chunks(args, s) for s in range(60)} == {9}


def test_memory_eval_tiny_reports_every_variant(tmp_path):
    cmd = [sys.executable, str(ROOT / "bench" / "memory_eval.py"), "--tiny"]
    proc = subprocess.run(cmd, env=child_env(OUT=str(tmp_path)), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "memory_eval.jsonl").read_text().splitlines()]
    assert rows[0]["setup"]["curriculum"] == [2, 3] and rows[0]["chance"] == pytest.approx(0.001)
    results = {r["variant"]: r for r in rows[1:]}
    assert list(results) == ["memory", "memory/ablated", "local", "exact"]
    for r in results.values():
        assert set(r["accuracy"]) == {"1", "2"} and all(0 <= a <= 1 for a in r["accuracy"].values())
        assert len(r["text_loss_by_chunk"]) == 3 and r["steps"] == 6
    assert results["memory"]["text_loss_by_chunk"][0] == results["memory/ablated"]["text_loss_by_chunk"][0]
