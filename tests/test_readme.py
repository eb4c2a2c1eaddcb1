"""README's commands work as written: every ``python launch/...``/``deepspeed launch/...`` line of its bash blocks
composes a valid config (in this process, and through the script with ``--cfg job``, which prints the config and
exits); the lines that need nothing but the checkout run, in a scratch directory that looks like one."""
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from rollout_dist.config import to_train_config
from tests.helpers import child_env

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PLACEHOLDER = "/path/to/"  # README's stand-in for the reader's own model and data
RUN_STEPS = "trainer.max_steps=2"  # appended to a training line that runs: the default is 40 steps


def commands() -> list[list[str]]:
    """The argv of each launch command in README's bash blocks (continuation lines joined, comments dropped, the
    shell's quotes removed)."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            if len(argv) >= 2 and argv[0] in ("python", "deepspeed") and argv[1].startswith("launch/"):
                found.append(argv)
    return found


def runs_here(argv: list[str]) -> bool:
    """Whether a line runs in seconds with the checkout alone: the planner, and training on the embedded default
    (no other model or data)."""
    if argv[0] != "python" or any(PLACEHOLDER in a for a in argv):
        return False
    if argv[1] == "launch/plan.py":
        return True
    return argv[1] == "launch/train.py" and not any(a.lstrip("+").startswith(("model", "data.", "experiment"))
                                                    for a in argv[2:])


def scratch_checkout(path: Path) -> Path:
    """A directory where README's relative paths resolve as in the repository, and runs write nowhere else."""
    for name in ("launch", "hydra_conf", "rollout_dist"):
        (path / name).symlink_to(REPO / name)
    return path


def test_readme_has_the_commands_it_documents():
    argvs = commands()
    assert len(argvs) >= 4, argvs
    assert any(a[1] == "launch/plan.py" for a in argvs) and any(a[0] == "deepspeed" for a in argvs)
    assert any(runs_here(a) and a[1] == "launch/train.py" for a in argvs)


@pytest.mark.parametrize("argv", commands(), ids=lambda a: " ".join(a)[:80])
def test_every_command_composes_a_valid_config(argv):
    """Unknown keys (with or without "+"), bad values and missing group options all fail here."""
    with initialize_config_dir(config_dir=str(REPO / "hydra_conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=argv[2:])
    to_train_config(cfg)


def test_commands_run_or_compose_through_their_scripts(tmp_path):
    """All at once (two cores): the lines that run here run; every other one prints its config (--cfg job)."""
    cwd = scratch_checkout(tmp_path)
    env = child_env(PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    procs = []
    for argv in commands():
        if runs_here(argv):
            extra = [RUN_STEPS] if argv[1] == "launch/train.py" else []
        else:
            extra = ["--cfg", "job"]
        cmd = [sys.executable, argv[1], *argv[2:], *extra]
        procs.append((argv, subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                             stderr=subprocess.STDOUT, text=True)))
    for argv, proc in procs:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{' '.join(argv)}\n{out}"
        if runs_here(argv) and argv[1] == "launch/train.py":
            assert " done: 2 steps" in out, out
        elif runs_here(argv):
            assert "wrote " in out, out
        else:
            assert "trainer:" in out and "max_steps:" in out, out
