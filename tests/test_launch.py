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
    assert code == 2, out
    assert "model/gpt5" in out and "tinyllama_1b" in out
    assert len(out.strip().splitlines()) == 1, out
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("script,override,message", [
    # a misspelt key added with "+" (what Hydra's own error suggests) was trained with, ignored
    ("train", "+rolout.chunk_size=64", "rolout.chunk_size=64: unknown key 'rolout' in the config; did you mean "
                                       "rollout.chunk_size=64?"),
    ("train", "+trainer.max_stepz=3", "trainer.max_stepz=3: unknown key 'max_stepz' in trainer; did you mean "
                                      "trainer.max_steps=3?"),
    # Hydra's own errors: several lines, exit 1
    ("train", "rollout.chunk_sise=64", "rollout.chunk_sise=64: unknown key 'chunk_sise' in rollout; did you mean "
                                       "rollout.chunk_size=64?"),
    ("train", "trainer.max_steps=abc", "trainer.max_steps=abc: trainer.max_steps takes an integer, not 'abc'"),
    ("plan", "+rolout.chunk_size=64", "did you mean rollout.chunk_size=64?"),
    ("plan", "trainer.max_steps=abc", "trainer.max_steps=abc: trainer.max_steps takes an integer, not 'abc'"),
])
def test_command_line_errors_are_one_line_with_exit_2(tmp_path, script, override, message):
    env = child_env(PYTHONUNBUFFERED="1")
    env.pop("HYDRA_FULL_ERROR", None)
    where = f"data.chunk_index={tmp_path / 'index'}" if script == "plan" else f"checkpoint.dir={tmp_path / 'run'}"
    proc = subprocess.run([sys.executable, str(REPO / "launch" / f"{script}.py"), override, where], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    lines = out.strip().splitlines()
    assert len(lines) == 1 and "ERROR rollout_dist: " in lines[0] and message in lines[0], out
    assert not (tmp_path / "run").exists() and not (tmp_path / "index").exists()


def test_hydra_flags_and_experiments_still_work(tmp_path):
    """--cfg job prints the composed config and exits without training; --help; hydra.* and +experiment."""
    proc = subprocess.run([sys.executable, str(TRAIN), "+experiment=tinyllama_2m", f"hydra.run.dir={tmp_path / 'h'}",
                           "--local_rank=0", "--cfg", "job"], cwd=tmp_path, env=child_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "name: tinyllama_1b" in proc.stdout and "offload: kv" in proc.stdout
    proc = subprocess.run([sys.executable, str(TRAIN), "--help"], cwd=tmp_path, env=child_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "experiment: llama3_8b_500k, tinyllama_2m" in proc.stdout, proc.stdout
    assert not list(tmp_path.iterdir())


def rendered_segments(text):
    """What a terminal shows of each write between carriage returns and newlines (a bar redraws after \\r)."""
    return [seg for line in text.split("\n") for seg in line.split("\r") if seg.strip()]


def test_console_is_quiet_and_log_lines_print_above_the_bar(tmp_path, docs):
    """DeepSpeed's notices that need no action stay off the console (train.log keeps them), and a log line
    (a saved checkpoint, a warning) never follows a progress bar's characters on the same line."""
    env = child_env(PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    env.pop("DS_ACCELERATOR", None)  # set in this process by any earlier in-process CPU trainer: detection then
    run_dir = tmp_path / "run"       # warns nothing
    # 3 steps with the default warm-up of 4: DeepSpeed's scheduler warns; checkpoints are logged while the bar runs
    proc = subprocess.run([sys.executable, str(TRAIN), f"data.path={docs}", "trainer.max_steps=3",
                           "trainer.log_every=1", "rollout.chunk_size=64", "checkpoint.every=1",
                           f"checkpoint.dir={run_dir}"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    console = proc.stdout + proc.stderr
    for noise in ("Setting accelerator to CPU", "warmup_num_steps", "Attempting to get learning rate", "[WARNING]"):
        assert noise not in console, console
    bar = ("step/s]", "s/step]", "step/s,", "s/step,", "%|")
    for seg in rendered_segments(proc.stderr):
        if any(mark in seg for mark in bar):
            assert " rollout_dist: " not in seg and "Warning" not in seg and " WARNING " not in seg, seg
    saved = [seg for seg in rendered_segments(proc.stderr) if "snapshot v0000" in seg and "committed" in seg]
    assert len(saved) == 3 and all(" INFO rollout_dist: snapshot v0000" in s for s in saved), saved
    assert "step     1" in proc.stdout and "train: 100%" in proc.stderr and " done: 3 steps" in proc.stderr
    log = (run_dir / "train.log").read_text()
    assert "WARNING DeepSpeed: total_num_steps 3 is less than warmup_num_steps 4" in log
    import torch
    if not torch.cuda.is_available():  # DeepSpeed's accelerator detection, before the run directory existed
        assert "WARNING DeepSpeed: Setting accelerator to CPU" in log
    assert log.index("data: ") < log.index("step     1") < log.index("snapshot v000001 committed") < log.index("done:")


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
