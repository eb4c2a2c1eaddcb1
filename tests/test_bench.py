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
