"""The command users run: ``python launch/train.py [overrides]`` (what ``deepspeed launch/train.py`` starts)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import child_env

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "launch" / "train.py"


def run(*overrides, cwd):
    env = child_env(PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    proc = subprocess.run([sys.executable, str(TRAIN), *overrides], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture
def docs(tmp_path):
    d = tmp_path / "docs"
    d.mkdir()
    (d / "a.txt").write_text("A short document about chunked rollouts. " * 20)
    (d / "b.jsonl").write_text(json.dumps({"text": "Another document. " * 15}) + "\n")
    return d


def test_short_run_trains_and_saves_hf_model(tmp_path, docs):
    code, out = run(f"data.path={docs}", "trainer.max_steps=3", "trainer.log_every=1", "rollout.chunk_size=64",
                    f"checkpoint.dir={tmp_path / 'run'}", "--local_rank=0", cwd=tmp_path)
    assert code == 0, out
    assert "step     3" in out and "tok/s" in out and "peak" in out and "chunks" in out
    run_dir = tmp_path / "run"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 3
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (run_dir / "final").iterdir()}
    assert "chunk_size: 64" in (run_dir / "config.yaml").read_text()
    assert list((run_dir / "tensorboard").rglob("events.out.tfevents.*")), "no TensorBoard events written"


@pytest.mark.parametrize("overrides,message", [
    (["data.path=/nonexistent/corpus"], "data.path='/nonexistent/corpus': no such file or directory"),
    (["rollout.chunk_size=-5"], "rollout.chunk_size must be a positive number of tokens per chunk (e.g. 4096) or 0 "
                                "to pick it from GPU memory; got -5"),
    (["model.path=/nonexistent/model"], "model.path='/nonexistent/model': no such directory"),
    # found at set-up (the process group exists only then), still before the run directory is made
    (["parallel.pp=2"], "parallel.pp=2 must divide the number of processes (1)"),
])
def test_bad_input_exits_nonzero_with_a_named_message_and_writes_nothing(tmp_path, overrides, message):
    code, out = run(*overrides, f"checkpoint.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert code == 2, out
    assert message in out
    assert "Traceback" not in out
    assert not (tmp_path / "run").exists()


def test_no_documents_and_only_empty_documents(tmp_path):
    empty_dir = tmp_path / "nothing"
    empty_dir.mkdir()
    code, out = run(f"data.path={empty_dir}", f"checkpoint.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert code == 2 and "holds no documents" in out, out
    (empty_dir / "empty.txt").write_text("")
    (empty_dir / "one.txt").write_text("x")
    code, out = run(f"data.path={empty_dir}", f"checkpoint.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert code == 2 and "no usable documents" in out and "2 document(s) skipped" in out, out
    assert "skipping" in out and "empty.txt" in out
    assert not (tmp_path / "run").exists()


def test_token_ids_beyond_model_vocabulary_name_the_document(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from rollout_dist.tokenizer import byte_tokenizer
    model_dir = tmp_path / "small_vocab_model"
    LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    (tmp_path / "doc.txt").write_text("lower-case letters are bytes above 100")
    code, out = run(f"model.path={model_dir}", f"data.path={tmp_path / 'doc.txt'}",
                    f"checkpoint.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert code == 2, out
    assert "doc.txt: token id" in out and "outside the model's vocabulary (size 100)" in out


def test_unknown_model_group_lists_the_options(tmp_path):
    code, out = run("model=gpt5", f"checkpoint.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert code != 0
    assert "model/gpt5" in out and "tinyllama_1b" in out
    assert not (tmp_path / "run").exists()


def test_earlier_run_is_not_overwritten(tmp_path, docs):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "summary.json").write_text("{}")
    code, out = run(f"data.path={docs}", f"checkpoint.dir={run_dir}", cwd=tmp_path)
    assert code == 2 and "already holds an earlier run" in out, out
    assert (run_dir / "summary.json").read_text() == "{}" and len(list(run_dir.iterdir())) == 1


def test_plan_then_train_with_the_same_overrides(tmp_path, docs):
    """launch/plan.py writes data.chunk_index with the planner profile; training with the same overrides reads it."""
    index = tmp_path / "index"
    same = [f"data.path={docs}", f"data.chunk_index={index}", "planner=legal"]
    plan = subprocess.run([sys.executable, str(REPO / "launch" / "plan.py"), *same], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert plan.returncode == 0, plan.stdout + plan.stderr
    assert "profile legal, mode exact" in plan.stdout
    from rollout_dist.planning.index import ChunkIndex
    planned = ChunkIndex.open(index)
    assert planned.attrs["profile"]["profile"] == "legal"
    code, out = run(*same, "trainer.max_steps=2", "trainer.grad_accum=2", "trainer.log_every=1",
                    f"checkpoint.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert code == 0, out
    assert f"{planned.num_chunks} chunks for 2 documents" in out
    # both documents in every step: the chunk count per step is the planned total, not T / rollout.chunk_size
    assert f"chunks {planned.num_chunks:>4}" in out


def test_plan_needs_a_store_to_write(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "plan.py")], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "data.chunk_index names the store to write" in proc.stderr


def test_chunk_index_of_other_data_is_refused(tmp_path, docs):
    other = tmp_path / "other"
    other.mkdir()
    (other / "x.txt").write_text("some other document entirely. " * 10)
    index = tmp_path / "index"
    subprocess.run([sys.executable, "-m", "rollout_dist.plan", "--data", str(other), "--out", str(index)],
                   cwd=REPO, capture_output=True, text=True, timeout=120, check=True)
    code, out = run(f"data.path={docs}", f"data.chunk_index={index}", f"checkpoint.dir={tmp_path / 'run'}",
                    cwd=tmp_path)
    assert code == 2 and "has no plan for" in out, out
    assert not (tmp_path / "run").exists()
