"""``python -m rollout_dist.checkpoint list|verify|export STORE`` against the store of a tiny CPU run (two versions,
v000001 and v000002), run as a user runs it: a subprocess, its output and exit status."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from rollout_dist.trainer import Trainer
from tests.helpers import child_env
from tests.test_trainer import make_trainer

REPO = Path(__file__).resolve().parents[2]
ARRAY = "r00000/module/model.embed_tokens.weight"


def clis(*argvs) -> list[subprocess.CompletedProcess]:
    """Each argv run by ``python -m rollout_dist.checkpoint``, all at once (each spends seconds importing torch)."""
    procs = [subprocess.Popen([sys.executable, "-m", "rollout_dist.checkpoint", *map(str, argv)], cwd=REPO,
                              env=child_env(OMP_NUM_THREADS="1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for argv in argvs]
    done = []
    for argv, proc in zip(argvs, procs):
        out, err = proc.communicate(timeout=300)
        done.append(subprocess.CompletedProcess(argv, proc.returncode, out, err))
    return done


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(store, the trained weights at the end): two steps, a snapshot after each; the manifests record the
    run's resolved config, as launch/train.py's runs do."""
    tmp = tmp_path_factory.mktemp("cli")
    cfg = make_trainer(tmp, grad_accum=1, max_steps=2, checkpoint_every=1).cfg  # writes nothing
    trainer = Trainer(cfg, resolved_config=OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    trainer.fit()
    weights = {k: v.detach().clone() for k, v in trainer.engine.module.state_dict().items()}
    return tmp / "run" / "state.zarr", weights


def copy_of(store: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(store, tmp_path / "state.zarr"))


@pytest.fixture(scope="module")
def listed(run):
    """``list`` and ``list --json`` of the run's store, run together."""
    return clis(("list", run[0]), ("list", run[0], "--json"))


def test_list_shows_every_version_valid_with_step_size_and_layout(listed):
    proc = listed[0]
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["v000001", "v000002"]
    for step, line in enumerate(lines, 1):
        assert f"step {step}" in line and " valid " in line and "pp=1 dp=1 zero=0" in line
        assert " MB" in line or " KB" in line


def test_list_json_is_for_scripts(listed):
    proc = listed[1]
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert [(r["version"], r["step"], r["status"]) for r in rows] == [("v000001", 1, "valid"), ("v000002", 2, "valid")]
    assert all(r["nbytes"] > 0 and r["layout"]["pp"] == 1 and r["time_iso"] for r in rows)


def test_verify_names_the_array_whose_bytes_were_flipped_and_list_reads_only_manifests(run, tmp_path):
    intact = Path(shutil.copytree(run[0], tmp_path / "intact.zarr"))
    store = copy_of(run[0], tmp_path)
    chunk = sorted((store / "v000002" / ARRAY / "c").rglob("*"))[-1]
    assert chunk.is_file()
    data = bytearray(chunk.read_bytes())
    data[:8] = bytes(b ^ 0xFF for b in data[:8])
    chunk.write_bytes(bytes(data))

    proc, every, one, listed, exported = clis(  # the intact copy and the damaged one, all at once
        ("verify", intact), ("verify", store), ("verify", store, "--version", "1"), ("list", store),
        ("export", store, tmp_path / "out", "--version", "v000002"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [line.split(":")[0] for line in proc.stdout.splitlines()] == ["v000001", "v000002"]
    assert all(": ok (" in line for line in proc.stdout.splitlines())
    assert every.returncode == 1, every.stdout + every.stderr
    assert "v000001: ok" in every.stdout and "v000002: damaged" in every.stdout
    assert f"array {ARRAY}: checksum" in every.stdout and "differs from the manifest's" in every.stdout
    # one version only: the other's damage is not looked at
    assert one.returncode == 0 and one.stdout.startswith("v000001: ok"), one.stdout + one.stderr
    # manifests only: the damaged bytes are not read
    assert listed.returncode == 0 and listed.stdout.count(" valid ") == 2, listed.stdout + listed.stderr
    # export checks what it reads, and writes nothing then
    assert exported.returncode == 1 and ARRAY in exported.stderr, exported.stderr
    assert not (tmp_path / "out").exists()


def test_a_version_without_its_manifest_is_half_written(run, tmp_path):
    store = copy_of(run[0], tmp_path)
    shutil.copytree(store / "v000002", store / "v000003")
    shutil.rmtree(store / "v000003" / "manifest")
    listed, verified, as_json = clis(("list", store), ("verify", store), ("list", store, "--json"))
    assert listed.returncode == 0, listed.stderr
    last = listed.stdout.splitlines()[-1]
    assert last.split()[0] == "v000003" and "half-written" in last
    assert verified.returncode == 1 and "v000003: half-written" in verified.stdout, verified.stdout + verified.stderr
    assert "v000002: ok" in verified.stdout
    assert json.loads(as_json.stdout)[-1]["status"] == "half-written"


def test_export_writes_an_hf_directory_with_the_trained_weights_bit_for_bit(run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    store, weights = run
    out, first = tmp_path / "exported", tmp_path / "first"
    proc, older = clis(("export", store, out),
                       ("export", store, first, "--version", "1", "--config", store.parent / "config.yaml"))
    assert proc.returncode == 0, proc.stderr
    assert "v000002" in proc.stdout  # the newest valid one
    assert older.returncode == 0 and "v000001" in older.stdout, older.stderr
    step1 = load_file(first / "model.safetensors")
    assert step1.keys() == weights.keys() and not torch.equal(step1["lm_head.weight"], weights["lm_head.weight"])
    model = AutoModelForCausalLM.from_pretrained(out)
    state = model.state_dict()
    assert sorted(state) == sorted(weights)
    for name, tensor in weights.items():
        assert state[name].dtype == tensor.dtype and torch.equal(state[name], tensor), name
    assert len(AutoTokenizer.from_pretrained(out)) > 256
    # what the run itself saved at its end, file for file
    final = store.parent / "final"
    assert (out / "config.json").read_text() == (final / "config.json").read_text()
    saved = load_file(final / "model.safetensors")
    exported = load_file(out / "model.safetensors")
    assert saved.keys() == exported.keys() and all(torch.equal(saved[k], exported[k]) for k in saved)


def test_usage_errors_are_one_line_with_exit_status_2(run, tmp_path):
    store, _ = run
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    unknown, occupied, run_dir, nowhere = clis(
        ("export", store, tmp_path / "out", "--version", "v000007"), ("export", store, busy),
        ("list", store.parent), ("verify", tmp_path / "nowhere"))
    for proc in (unknown, occupied, run_dir, nowhere):
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "v000007" in unknown.stderr and "v000001, v000002" in unknown.stderr
    assert "not empty" in occupied.stderr and [p.name for p in busy.iterdir()] == ["notes.txt"]
    assert not (tmp_path / "out").exists()
    # the run directory, not its store: the message names the store in it
    assert str(store.parent) in run_dir.stderr and str(store) in run_dir.stderr
    assert str(tmp_path / "nowhere") in nowhere.stderr


@pytest.mark.slow  # two processes train (torchrun, gloo), then the export: about 15 s
def test_export_joins_the_pipeline_stages_into_the_model_the_run_saved(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(REPO / "launch" / "train.py"), "parallel.pp=2", "model.num_layers=3", "trainer.max_steps=1",
           "checkpoint.every=1", "trainer.device=cpu", "data.max_doc_tokens=128", "trainer.tensorboard=false",
           f"checkpoint.dir={run_dir}"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=child_env(OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    store, out = run_dir / "state.zarr", tmp_path / "exported"
    listed, proc = clis(("list", store, "--json"), ("export", store, out))
    assert [(r["version"], r["layout"]["pp"]) for r in json.loads(listed.stdout)] == [("v000001", 2)]
    assert proc.returncode == 0 and "2 pipeline stages joined" in proc.stdout, proc.stderr
    saved = load_file(run_dir / "final" / "model.safetensors")  # the run gathered its stages on rank 0
    exported = load_file(out / "model.safetensors")
    assert sorted(exported) == sorted(saved) and any(k.startswith("model.layers.2.") for k in saved)
    assert all(exported[k].dtype == saved[k].dtype and torch.equal(exported[k], saved[k]) for k in saved)
    assert (out / "config.json").read_text() == (run_dir / "final" / "config.json").read_text()
