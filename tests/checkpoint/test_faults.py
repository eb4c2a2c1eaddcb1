"""Faults against the snapshot store, on CPU, through the real entry point (launch/train.py, torchrun for dp=2).

A tiny Llama with dropout on (``model.attention_dropout=0.1``, so the random streams matter), two short documents,
5 steps with a snapshot after every step.  The reference is an uninterrupted run's ``final/model.safetensors``;
"bit-identical" is ``torch.equal`` on every tensor of it.

* SIGKILL at chosen instants, then ``checkpoint.resume=latest`` until the run is done: inside a snapshot write
  (the store polled for a version being written; the process frozen with SIGSTOP, the write checked still
  unfinished, then killed), at a seeded random delay within the run's measured steps, and at injection points of
  a small runner around launch/train.py (``RUNNER``: the process stops itself with SIGSTOP inside the fill pass,
  inside the backward pass, or right after the optimizer updated the weights, and the test kills it).  One
  process; and dp=2 under torchrun, where one rank is killed and the launcher must end the other.
* Damage to the newest version (bytes flipped in a chunk file, a truncated chunk file, a flipped byte in the
  version manifest): the resume names the version and the array, falls back to the previous version, and the
  final weights still equal the reference.
* A full disk (a small tmpfs, or RLIMIT_FSIZE where mounting is not allowed) and a store without write permission:
  non-zero exit, the error names the store, the versions before are intact and a resume from them works.

After every fault, every version the store lists as valid is read back whole and checked (``verify``): a kill
never leaves a version that looks valid and is not.
"""
import ctypes
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rollout_dist.checkpoint.store import SnapshotStore
from tests.helpers import child_env

REPO = Path(__file__).resolve().parents[2]
TRAIN = REPO / "launch" / "train.py"
STEPS = 5
COMMON = ["trainer.device=cpu", "rollout.chunk_size=64", "model.attention_dropout=0.1", "trainer.log_every=1",
          "trainer.tensorboard=false", "checkpoint.every=1"]
TIMEOUT = 180  # seconds any one launch may take before the test fails (and kills what it started)
_VERSION = re.compile(r"^v(\d{6,})$")

RUNNER = r'''"""launch/train.py with an injection point.  FAULT_STOP=fill:S:C | backward:S:C | optimizer:S makes the
process (on rank FAULT_RANK only, if set) stop itself with SIGSTOP: in the fill or the backward pass of chunk C of
the S-th step this process takes, or right after the optimizer updated the weights of its S-th step (before the
engine counts the step and moves the LR schedule).  The test then kills it with SIGKILL."""
import os
import runpy
import signal
import sys

train = sys.argv.pop(1)
sys.argv[0] = train
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(train))))
spec = os.environ.get("FAULT_STOP", "")
rank = os.environ.get("RANK", "0")
if spec and os.environ.get("FAULT_RANK", rank) == rank:
    from torch.optim.optimizer import register_optimizer_step_post_hook

    phase, *at = spec.split(":")
    step, chunk = int(at[0]), (int(at[1]) if len(at) > 1 else None)
    taken = [0]

    def stop(where):
        sys.stderr.write(f"FAULT: rank {rank} stopped {where}\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGSTOP)

    def after_optimizer(optimizer, args, kwargs):
        taken[0] += 1
        if phase == "optimizer" and taken[0] == step:
            stop(f"in the optimizer step of its step {step}")

    register_optimizer_step_post_hook(after_optimizer)
    if phase in ("fill", "backward"):
        from rollout_dist import trainer

        init = trainer.Trainer.__init__

        def with_hook(self, *args, **kwargs):
            init(self, *args, **kwargs)

            def on_chunk(event):
                if event.phase == phase and event.chunk == chunk and taken[0] + 1 == step:
                    stop(f"in the {phase} pass of chunk {chunk} of its step {step}")
            self.chunk_hooks.append(on_chunk)

        trainer.Trainer.__init__ = with_hook
runpy.run_path(train, run_name="__main__")
'''


# ------------------------------------------------------------------------------------------------ launching
def write_docs(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "a.txt").write_text("A short document about chunked rollouts. " * 20)
    (d / "b.jsonl").write_text(json.dumps({"text": "Another document. " * 15}) + "\n")
    return d


def train_command(run_dir: Path, docs: Path, *overrides: str, nproc: int = 1, runner: Path | None = None,
                  steps: int = STEPS) -> list[str]:
    launcher = ([sys.executable] if nproc == 1 else
                [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"])
    script = [str(runner), str(TRAIN)] if runner is not None else [str(TRAIN)]
    return [*launcher, *script, f"data.path={docs}", f"checkpoint.dir={run_dir}", *COMMON,
            f"trainer.max_steps={steps}", *(["parallel.dp=2"] if nproc == 2 else []), *overrides]


class Attempt:
    """One launch (of the trainer, or of torchrun and its workers) in its own session, its output in files so that
    nothing blocks on a pipe."""

    def __init__(self, workdir: Path, name: str, cmd: list[str], preexec_fn=None, **env: str):
        self.name = name
        self.out, self.err = workdir / f"{name}.out", workdir / f"{name}.err"
        full_env = child_env(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **env)
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(cmd, cwd=workdir, env=full_env, stdout=out, stderr=err,
                                         start_new_session=True, preexec_fn=preexec_fn)
        self.pid = self.proc.pid
        self.started = time.monotonic()

    def stdout(self) -> str:
        return self.out.read_text(errors="replace")

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def text(self) -> str:
        return self.stdout() + self.stderr()

    def tail(self, n: int = 4000) -> str:
        return f"--- {self.name} (exit {self.proc.returncode}) ---\n" + self.text()[-n:]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float = TIMEOUT) -> int:
        """The exit status; fails the test (killing what is left of the launch) if it does not end in time."""
        try:
            return self.proc.wait(timeout=max(1.0, timeout - (time.monotonic() - self.started)))
        except subprocess.TimeoutExpired:
            self.kill_all()
            raise AssertionError(f"{self.name} still running after {timeout} s (killed)\n{self.tail()}") from None

    def leftovers(self, grace: float = 5.0) -> bool:
        """Whether any process of the launch's session outlived it (by more than ``grace`` seconds)."""
        deadline = time.monotonic() + grace
        while True:
            try:
                os.killpg(self.pid, 0)
            except ProcessLookupError:
                return False
            if time.monotonic() > deadline:
                return True
            time.sleep(0.05)

    def kill_all(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


def proc_state(pid: int) -> str | None:
    """The state letter of ``/proc/PID/stat`` (R, S, T stopped, Z zombie, ...); None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat[stat.rindex(")") + 2]


def _ended(attempt: Attempt, pid: int) -> bool:
    return not attempt.alive() or proc_state(pid) in (None, "Z", "X")


def wait_stopped(attempt: Attempt, pid: int, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while proc_state(pid) not in ("T", "t"):
        if _ended(attempt, pid):
            raise AssertionError(f"{attempt.name}: pid {pid} ended before it stopped\n{attempt.tail()}")
        if time.monotonic() > deadline:
            attempt.kill_all()
            raise AssertionError(f"{attempt.name}: pid {pid} did not stop within {timeout} s\n{attempt.tail()}")
        time.sleep(0.005)


def kill_when_stopped(attempt: Attempt, pid: int | None = None) -> str:
    """Waits for the process to stop itself at the runner's injection point, then SIGKILLs it; returns where."""
    pid = attempt.pid if pid is None else pid
    wait_stopped(attempt, pid)
    os.kill(pid, signal.SIGKILL)
    where = re.findall(r"FAULT: rank \d+ stopped (.*)", attempt.stderr())
    assert where, attempt.tail()
    return where[-1]


def pending_version(store: Path, manifest: str, min_step: int) -> str | None:
    """A version newer than every committed one whose ``manifest`` (the version's, or a rank part's) is not there
    yet: one being written; only once versions up to ``min_step - 1`` are committed, so that one survives the
    kill.  (A version being deleted by retention is older than a committed one.)"""
    try:
        names = [n for n in os.listdir(store) if _VERSION.match(n)]
    except FileNotFoundError:
        return None
    committed = max((int(n[1:]) for n in names if (store / n / "manifest" / "zarr.json").exists()), default=0)
    if committed < min_step - 1:
        return None
    for n in sorted(names):
        if int(n[1:]) > committed and int(n[1:]) >= min_step and not (store / n / manifest).exists():
            return n
    return None


def kill_inside_write(attempt: Attempt, store: Path, pid: int | None = None, part: str | None = None,
                      min_step: int = 1) -> str:
    """SIGKILLs the process while a snapshot version is being written (``part``: while that rank's part of it is
    not yet published).  The store is polled; once a version is seen unfinished the process is frozen (SIGSTOP),
    the version checked still unfinished, and killed; if it finished in between, the process goes on (SIGCONT)
    and the next version is waited for.  Polling starts once set-up is done: a version an earlier attempt left
    half-written is not being written (set-up removes it).  Returns the version's name."""
    pid = attempt.pid if pid is None else pid
    manifest = "manifest/zarr.json" if part is None else f"{part}/manifest/zarr.json"
    deadline = time.monotonic() + TIMEOUT
    wait_for_log(attempt, "run directory: ")
    while time.monotonic() < deadline:
        name = pending_version(store, manifest, min_step)
        if name is not None:
            os.kill(pid, signal.SIGSTOP)
            wait_stopped(attempt, pid)
            if not (store / name / manifest).exists():
                os.kill(pid, signal.SIGKILL)
                return name
            os.kill(pid, signal.SIGCONT)
        if _ended(attempt, pid):
            raise AssertionError(f"{attempt.name}: ended without a snapshot write to kill inside\n{attempt.tail()}")
        time.sleep(0.002)
    attempt.kill_all()
    raise AssertionError(f"{attempt.name}: no snapshot write seen within {TIMEOUT} s")


def wait_for_log(attempt: Attempt, text: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while text not in attempt.stderr():
        if not attempt.alive():
            raise AssertionError(f"{attempt.name}: ended before {text!r}\n{attempt.tail()}")
        assert time.monotonic() < deadline, attempt.tail()
        time.sleep(0.01)


def kill_after(attempt: Attempt, delay: float, pid: int | None = None, after: str = "run directory: ") -> None:
    """SIGKILLs the process (``pid``: that one of the launch) ``delay`` seconds after ``after`` shows in its log
    (set-up done: the steps begin)."""
    wait_for_log(attempt, after)
    time.sleep(delay)
    if attempt.alive():
        os.kill(attempt.pid if pid is None else pid, signal.SIGKILL)


def worker_pids(attempt: Attempt, nproc: int) -> dict[int, int]:
    """rank -> pid of torchrun's workers, once all have started."""
    import psutil

    deadline = time.monotonic() + TIMEOUT
    while True:
        found = {}
        for child in psutil.Process(attempt.pid).children(recursive=True):
            try:
                rank = child.environ().get("RANK")
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if rank is not None and str(TRAIN) in " ".join(child.cmdline()):
                found[int(rank)] = child.pid
        if len(found) == nproc:
            return found
        if not attempt.alive() or time.monotonic() > deadline:
            raise AssertionError(f"{attempt.name}: workers not found\n{attempt.tail()}")
        time.sleep(0.05)


# ------------------------------------------------------------------------------------------------ checking
def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "final" / "model.safetensors")


def assert_bit_identical(got: dict, ref: dict, what: str) -> None:
    assert got.keys() == ref.keys(), what
    differ = [k for k, t in ref.items() if not torch.equal(got[k], t)]
    assert not differ, f"{what}: {len(differ)} of {len(ref)} tensors differ from the uninterrupted run: {differ[:5]}"


def valid_and_verified(store: Path) -> list[str]:
    """The valid versions' names; each read back whole and checked against its manifest."""
    s = SnapshotStore(str(store))
    valid = s.valid_versions()
    for v in valid:
        assert s.verify(v) == [], f"{v.name} looks valid but is not: {s.verify(v)}"
    return [v.name for v in valid]


def loaded_version(text: str) -> str | None:
    """The version a resumed attempt loaded (None: it started from scratch)."""
    m = re.search(r"loaded snapshot (v\d{6}) \(step \d+\)", text)
    if m:
        return m.group(1)
    assert "no valid snapshot in" in text and "starting from scratch" in text, text[-4000:]
    return None


def error_line(stderr: str) -> str:
    """The last line of stderr, without torch's ``[rankN]:`` prefix."""
    last = [ln for ln in stderr.splitlines() if ln.strip()][-1]
    return re.sub(r"^\[rank\d+\]:\s*", "", last)


def step_spans(metrics: Path) -> list[float]:
    """Seconds each step of a run took from the training loop's point of view (compute, snapshot copy, waiting
    for the previous snapshot's write), from its metrics.jsonl."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    return [r["seconds"] + (r.get("snapshot_wait_s") or 0) + (r.get("snapshot_block_s") or 0) for r in rows]


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    return write_docs(tmp_path_factory.mktemp("docs"))


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    path = tmp_path_factory.mktemp("runner") / "fault_runner.py"
    path.write_text(RUNNER)
    return path


DAMAGES = ("flip", "truncate", "manifest")
_damaged_resumes: dict = {}  # damage -> (attempt, run, array) started by ``reference``, waited for by ``damaged``


def selected_damages(request) -> list[str]:
    """The damages whose resumes the selected tests of this module look at."""
    wanted = set()
    for item in request.session.items:
        if getattr(item, "module", None) is not request.module:
            continue
        if "manifest_damaged" in item.fixturenames:
            wanted.add("manifest")
        elif "damaged" in item.fixturenames:
            wanted.add(item.callspec.params["damage"])
    return [d for d in DAMAGES if d in wanted]


@pytest.fixture(scope="module")
def reference(request, tmp_path_factory, docs):
    """An uninterrupted one-process run: its run directory (v000004, v000005 kept) and final weights.  The resumes
    of its damaged copies (section 2; one process each) start right after it, in the background, so that they run
    while the kill tests' single processes leave a core idle; ``damaged`` waits for them."""
    work = tmp_path_factory.mktemp("reference")
    run = work / "run"
    a = Attempt(work, "reference", train_command(run, docs))
    assert a.wait() == 0, a.tail()
    assert valid_and_verified(run / "state.zarr") == ["v000004", "v000005"]
    ref = run, weights(run)
    for damage in selected_damages(request):
        _damaged_resumes[damage] = start_damaged(tmp_path_factory.mktemp(f"damaged-{damage}"), docs, ref, damage)

    def stop_leftovers():  # a session that ends (or stops at a failure) before a damage test waited for its resume
        for attempt, _, _ in _damaged_resumes.values():
            if attempt.alive():
                attempt.kill_all()
        _damaged_resumes.clear()
    request.addfinalizer(stop_leftovers)
    return ref


# ------------------------------------------------------------------------------------------------ 1. SIGKILL
@pytest.mark.slow
def test_sigkill_at_chosen_instants_then_resume_is_bit_identical(tmp_path, docs, runner, reference):
    """One process, killed five times and resumed with checkpoint.resume=latest after each; the last attempt ends
    the run.  Instants: inside a snapshot write (v000002 or later), inside the fill pass, inside the backward
    pass, right after the optimizer step, and at a seeded random delay within the steps (drawn over the
    reference run's measured step times; should it fall after the end, that attempt just finishes the run).
    Each resume loads the newest valid version the store held, after removing the half-written one."""
    ref_run, ref_weights = reference
    run, store = tmp_path / "run", tmp_path / "run" / "state.zarr"
    rng = random.Random(20240611)
    spans = step_spans(ref_run / "metrics.jsonl")
    kills, resumed_from = [], []
    for i, fault in enumerate(["write", "fill", "backward", "optimizer", "random", None]):
        valid = valid_and_verified(store) if store.exists() else []
        expect = valid[-1] if valid else None
        done = int(expect[1:]) if expect else 0
        at = min(3, STEPS - done)  # its 2nd step's save waits for the 1st snapshot's commit: progress
        stop = {"fill": f"fill:{at}:1", "backward": f"backward:{at}:2", "optimizer": f"optimizer:{at}"}.get(fault)
        if stop is not None and done == STEPS:
            continue  # no step left to inject into (not expected with 5 steps)
        overrides = ["checkpoint.resume=latest"] if i else []
        a = Attempt(tmp_path, f"attempt{i}-{fault}", train_command(run, docs, *overrides, runner=runner),
                    **({"FAULT_STOP": stop} if stop else {}))
        if fault == "write":
            half = kill_inside_write(a, store, min_step=2)
            kills.append(f"inside the write of {half}")
        elif fault == "random":
            delay = rng.uniform(0, 0.8 * sum(spans[done:]))
            kill_after(a, delay)
            kills.append(f"{delay:.2f} s into the steps")
        elif stop is not None:
            kills.append(kill_when_stopped(a))
        code = a.wait()
        if i:  # it loaded the newest valid version there was (or started from scratch without one)
            assert loaded_version(a.text()) == expect, a.tail()
            resumed_from.append(expect)
        if fault is None or code == 0:  # the end (or the random delay fell after it)
            assert code == 0, a.tail()
            if fault is not None:
                kills[-1] += " (after the run ended: no kill)"
            continue
        assert code == -signal.SIGKILL, a.tail()
        if fault == "write":
            assert not (store / half / "manifest" / "zarr.json").exists()
    assert (run / "final" / "model.safetensors").exists(), kills
    assert len(set(resumed_from)) >= 2 and None not in resumed_from[-1:], resumed_from
    assert sum("no kill" not in k for k in kills) >= 4, kills
    log = (run / "train.log").read_text()
    assert "removed half-written snapshot versions of an earlier attempt" in log
    print("killed:", "; ".join(kills), "| resumed from:", resumed_from)
    assert_bit_identical(weights(run), ref_weights, f"killed {kills}")


@pytest.mark.slow
def test_dp2_one_rank_killed_launcher_ends_the_other_resume_is_bit_identical(request, tmp_path, docs, runner):
    """dp=2 under torchrun: rank 1 is killed (1) stopped in the backward pass of its 3rd step (v000001
    committed), and (2) while its part of a later snapshot is not yet published (rank 0 then waits for it to
    commit the version).  Each time torchrun must end rank 0 and exit non-zero within a minute, leaving no process
    behind (nothing hangs); then the run resumes with both ranks and ends bit-identical to an uninterrupted dp=2
    run."""
    ref = tmp_path / "ref"
    # the uninterrupted run goes on in the background, while the attempts' killed and stopped ranks idle
    uninterrupted = Attempt(tmp_path, "dp2-reference", train_command(ref, docs, nproc=2))
    request.addfinalizer(lambda: uninterrupted.alive() and uninterrupted.kill_all())  # should the test fail early
    run, store = tmp_path / "run", tmp_path / "run" / "state.zarr"
    expect, kills, ends = None, [], []
    for i, fault in enumerate(["backward", "write", None]):
        overrides = ["checkpoint.resume=latest"] if i else []
        env = {"FAULT_STOP": "backward:3:1", "FAULT_RANK": "1"} if fault == "backward" else {}
        a = Attempt(tmp_path, f"dp2-attempt{i}-{fault}", train_command(run, docs, *overrides, nproc=2,
                                                                          runner=runner), **env)
        if fault is not None:
            pids = worker_pids(a, 2)
            if fault == "backward":
                kills.append(kill_when_stopped(a, pids[1]))
            else:
                kills.append(f"inside its part of {kill_inside_write(a, store, pids[1], part='r00001', min_step=2)}")
            t0 = time.monotonic()
            code = a.wait(timeout=90)
            ended_in = time.monotonic() - t0
            ends.append(round(ended_in, 1))
            assert code != 0, a.tail()
            assert ended_in < 60, f"torchrun took {ended_in:.0f} s to end rank 0\n{a.tail()}"
            assert all(proc_state(p) in (None, "Z") for p in pids.values()), pids
            assert not a.leftovers(), f"processes of {a.name} outlived torchrun"
            valid = valid_and_verified(store) if store.exists() else []
            expect = valid[-1] if valid else None
        else:
            assert a.wait() == 0, a.tail()
        if i:
            assert loaded_version(a.text()) == expect, a.tail()
    assert expect is not None, "the last resume started from scratch: no snapshot survived the kills"
    print("rank 1 killed:", "; ".join(kills), "| torchrun ended rank 0 within (s):", ends, "| resumed from", expect)
    assert uninterrupted.wait() == 0, uninterrupted.tail()
    assert_bit_identical(weights(run), weights(ref), f"dp=2, rank 1 killed {kills}")


# ------------------------------------------------------------------------------------------------ 2. damage
def chunk_file(version_dir: Path) -> tuple[Path, str]:
    """The largest chunk file of the model's weights in rank 0's part, and the name of its array."""
    files = [p for p in (version_dir / "r00000" / "module").rglob("*") if p.is_file() and p.name != "zarr.json"]
    path = sorted(files, key=lambda p: (-p.stat().st_size, str(p)))[0]
    rel = path.relative_to(version_dir / "r00000").as_posix()
    return path, rel.split("/c/")[0]


def flip(path: Path, offset: int, count: int = 1) -> None:
    data = bytearray(path.read_bytes())
    for i in range(offset, offset + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def start_damaged(work: Path, docs: Path, reference, damage: str):
    """A copy of the reference run whose newest version (v000005) is damaged, its resume to the end started:
    (attempt, run directory, damaged array)."""
    run = work / "run"
    shutil.copytree(reference[0], run)
    shutil.rmtree(run / "final")
    newest = run / "state.zarr" / "v000005"
    array = None
    if damage == "manifest":
        path = newest / "manifest" / "zarr.json"
        flip(path, len(path.read_bytes()) // 2)
    else:
        path, array = chunk_file(newest)
        if damage == "flip":
            flip(path, path.stat().st_size // 2, 4)
        else:
            os.truncate(path, path.stat().st_size // 2)
    a = Attempt(work, f"resume-{damage}", train_command(run, docs, "checkpoint.resume=latest"))
    return a, run, array


@pytest.fixture(scope="module")
def damaged(tmp_path_factory, docs, reference):
    """damage -> (attempt, exit status, run directory, damaged array) of the resume of a damaged copy."""
    def get(damage: str):
        if damage not in _damaged_resumes:  # not started with the reference (not selected then)
            _damaged_resumes[damage] = start_damaged(tmp_path_factory.mktemp(f"damaged-{damage}"), docs, reference,
                                                     damage)
        a, run, array = _damaged_resumes[damage]
        return a, a.wait(), run, array
    return get


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_chunk_is_named_and_the_resume_falls_back(damaged, reference, damage):
    """Four bytes flipped in, or the second half cut off, a chunk file of the newest version: the resume says
    which version and which array, loads the one before, and the run ends bit-identical."""
    a, code, run, array = damaged(damage)
    assert code == 0, a.tail()
    log = (run / "train.log").read_text()
    store = run / "state.zarr"
    assert f"ERROR rollout_dist: snapshot v000005 is damaged: {store} v000005: array r00000/{array}" in log, log
    assert ("checksum" if damage == "flip" else "cannot be read") in log.split("snapshot v000005 is damaged")[1]
    assert "snapshot v000005 cannot be used (a rank found it damaged); falling back to the previous valid version" \
           in log
    assert loaded_version(log) == "v000004"
    assert "snapshot v000005 is damaged" in a.stderr()  # on the console too
    assert valid_and_verified(store) == ["v000004", "v000005"]  # v000005 rewritten by the resumed run
    assert_bit_identical(weights(run), reference[1], f"{damage} in {array}")


@pytest.fixture(scope="module")
def manifest_damaged(damaged):
    return damaged("manifest")


@pytest.mark.slow
def test_damaged_manifest_falls_back_and_the_run_is_bit_identical(manifest_damaged, reference):
    a, code, run, _ = manifest_damaged
    assert code == 0, a.tail()
    assert loaded_version(a.text()) == "v000004"
    assert valid_and_verified(run / "state.zarr") == ["v000004", "v000005"]
    assert_bit_identical(weights(run), reference[1], "flipped byte in v000005's manifest")


@pytest.mark.slow
def test_damaged_manifest_is_named_in_the_log(manifest_damaged):
    a, code, run, _ = manifest_damaged
    log = (run / "train.log").read_text()
    assert re.search(r"v000005.*(damaged|checksum|unreadable)", log), log


# ------------------------------------------------------------------------------------------------ 3. disk
def tmpfs_usage(version_dir: Path) -> int:
    """Bytes a version takes on a tmpfs (every file rounded up to whole pages)."""
    page = 4096
    return sum(-(-p.stat().st_size // page) * page for p in version_dir.rglob("*") if p.is_file())


def try_mount_tmpfs(where: Path, size: int) -> bool:
    if os.environ.get("FAULT_TESTS_NO_MOUNT") == "1":
        return False
    where.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True,
                          text=True)
    return proc.returncode == 0


def _limit_file_size(limit: int):
    def preexec():
        import resource
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


@pytest.mark.slow
def test_disk_full_fails_naming_the_store_and_keeps_earlier_versions(tmp_path, docs, reference, record_property):
    """The store on a tmpfs sized for two and a half versions (``mount -t tmpfs -o size=...``): v000001 and
    v000002 fit, v000003 does not.  Where mounting is not allowed (no CAP_SYS_ADMIN; or FAULT_TESTS_NO_MOUNT=1),
    the fallback: a copy of the reference run without its v000005 resumed under RLIMIT_FSIZE below a chunk file's
    size (SIGXFSZ ignored: EFBIG), so writing v000005 fails.  Which one ran is recorded as the test's property
    ``disk`` (``pytest --junitxml``) and printed.  Either way: non-zero exit, the last line on stderr is the
    error naming the store, the failed version and the cause; the earlier versions are valid and verify; and
    a resume once there is room again (tmpfs remounted larger) ends bit-identical."""
    run = tmp_path / "run"
    ref_run, ref_weights = reference
    per_version = tmpfs_usage(ref_run / "state.zarr" / "v000005")
    mnt = tmp_path / "small"
    size = (per_version * 5 // 2) // 4096 * 4096
    mounted = try_mount_tmpfs(mnt, size)
    record_property("disk", "tmpfs" if mounted else "rlimit")
    print(f"disk full by {'a tmpfs of ' + str(size) + ' bytes' if mounted else 'RLIMIT_FSIZE'}")
    try:
        if mounted:
            store = mnt / "state.zarr"
            a = Attempt(tmp_path, "disk-full", train_command(run, docs, f"checkpoint.store={store}"))
            failed, cause = "v000003", "[Errno 28] No space left on device"
        else:
            store = run / "state.zarr"
            shutil.copytree(ref_run, run)
            shutil.rmtree(run / "final")
            SnapshotStore(str(store)).delete("v000005")
            largest = max(p.stat().st_size for p in (store / "v000004").rglob("*") if p.is_file())
            a = Attempt(tmp_path, "disk-full", train_command(run, docs, "checkpoint.resume=latest"),
                        preexec_fn=_limit_file_size(largest - 1))
            failed, cause = "v000005", "[Errno 27] File too large"
        code = a.wait()
        assert code not in (0, -signal.SIGKILL), a.tail()
        line = error_line(a.stderr())
        m = re.search(rf"checkpoint store {re.escape(str(store))}: writing snapshot {failed} failed: (.*); the "
                      r"versions before it are intact: (.*)$", line)
        assert m and cause in m.group(1), a.tail()
        valid = valid_and_verified(store)
        assert valid and m.group(2) == ", ".join(valid) and all(v < failed for v in valid), (valid, line)
        if mounted:
            assert valid == ["v000001", "v000002"], valid
            subprocess.run(["mount", "-o", "remount,size=256m", str(mnt)], check=True)
        extra = [f"checkpoint.store={store}"] if mounted else []
        b = Attempt(tmp_path, "after-disk-full", train_command(run, docs, "checkpoint.resume=latest", *extra))
        assert b.wait() == 0, b.tail()
        assert loaded_version(b.text()) == valid[-1]
        if mounted:
            assert f"removed half-written snapshot versions of an earlier attempt: {failed}" in b.text()
        assert_bit_identical(weights(run), ref_weights, "after a full disk")
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _drop_permission_override():
    """preexec_fn for a root child: CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH and CAP_FOWNER leave its bounding set,
    so that after exec it is root bound by the files' permission bits (needs CAP_SETPCAP)."""
    libc = ctypes.CDLL(None, use_errno=True)

    def preexec():
        for cap in (1, 2, 3):
            if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
                raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")
    return preexec


def _as_nobody():
    def preexec():
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)
    return preexec


_PROBE = """import os, sys
run, store, docs = sys.argv[1:]
import rollout_dist.trainer  # the venv and the repo
open(os.path.join(store, "zarr.json")).read()
os.listdir(docs)
open(os.path.join(run, "train.log"), "a").close()
try:
    os.mkdir(os.path.join(store, "probe"))
except PermissionError:
    sys.exit(3)
"""


def _refused_only_the_store(preexec, run: Path, store: Path, docs: Path, **env: str) -> bool:
    """Whether a child started with ``preexec`` runs this venv, reads the run, the store and the documents,
    writes the run directory, and is refused a write in the store."""
    try:
        proc = subprocess.run([sys.executable, "-c", _PROBE, str(run), str(store), str(docs)], preexec_fn=preexec,
                              capture_output=True, env=child_env(OMP_NUM_THREADS="1", **env), timeout=120)
    except (OSError, subprocess.SubprocessError):
        return False
    return proc.returncode == 3


@pytest.mark.slow
def test_store_without_write_permission_fails_naming_the_store(tmp_path, docs, reference, record_property):
    """A copy of the reference run (v000004, v000005) resumed to step 6 by a process that may not write its store
    (the store read-only by its permission bits, the rest of the run directory writable): non-zero exit, the last
    line on stderr names the store and the denied permission, v000004 and v000005 are intact and no v000006
    appears.  Who runs the child, as root: root without its permission override (CAP_DAC_OVERRIDE,
    CAP_DAC_READ_SEARCH, CAP_FOWNER dropped from the bounding set: a plain user's checks on root's own files);
    where that is not possible, user 65534 (nobody) if it can run the venv and read the repo and the run
    (not where they live under a 0700 /root or pytest's 0700 temporary directory, as on this project's
    machines); else the test is skipped.  Not root: the same user.  Which one ran is the test's property
    ``who`` and printed."""
    run = tmp_path / "run"
    shutil.copytree(reference[0], run)
    store = run / "state.zarr"
    subprocess.run(["chmod", "-R", "a-w", str(store)], check=True)
    env = {}
    try:
        if os.geteuid() != 0:
            preexec, who = None, "the same user"
        else:
            preexec, who = _drop_permission_override(), "root without CAP_DAC_OVERRIDE"
        if not _refused_only_the_store(preexec, run, store, docs):
            if os.geteuid() != 0:
                pytest.skip("this user is not refused a write to a read-only directory")
            for p in [run, *run.iterdir()]:  # theirs: the run directory; root's: the store
                if p != store:
                    shutil.chown(p, 65534, 65534)
            home = tmp_path / "home"
            home.mkdir()
            shutil.chown(home, 65534, 65534)
            preexec, who, env = _as_nobody(), "user 65534", {"HOME": str(home)}
            if not _refused_only_the_store(preexec, run, store, docs, **env):
                pytest.skip("neither root without CAP_DAC_OVERRIDE nor user 65534 can run this venv, read the run "
                            "and be refused a write to its store only")
        record_property("who", who)
        print(f"the child runs as {who}")
        a = Attempt(tmp_path, "no-permission", train_command(run, docs, "checkpoint.resume=latest", steps=6),
                    preexec_fn=preexec, **env)
        code = a.wait()
        assert code not in (0, -signal.SIGKILL), a.tail()
        assert loaded_version(a.text()) == "v000005"
        line = error_line(a.stderr())
        assert (f"checkpoint store {store}: writing snapshot v000006 failed: [Errno 13] Permission denied"
                in line), a.tail()
        assert line.endswith("the versions before it are intact: v000004, v000005"), line
        assert valid_and_verified(store) == ["v000004", "v000005"]
        assert not (store / "v000006").exists()
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(store)], check=False)
