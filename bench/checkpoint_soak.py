"""A randomized soak of the snapshot store: many kill/resume cycles with random SIGKILL instants and now and then
a damaged newest version, on CPU, through the real entry point.  Prints one JSON summary on stdout.

    python bench/checkpoint_soak.py --cycles 30 --seed 0 [--steps 12] [--nproc 1|2] [--damage 0.2] [--workdir DIR]

The run is the one of tests/checkpoint/test_faults.py (a tiny Llama with dropout on, two short documents,
``checkpoint.every=1``), ``--steps`` long; an uninterrupted run of it is the reference.  Each cycle launches the
run (``checkpoint.resume=latest`` once it has started) and kills it (SIGKILL; with ``--nproc 2`` one rank, at
random, torchrun ending the other) at an instant drawn at random from:

* ``random``: a random delay after set-up, up to the measured time of the next 2-5 steps;
* ``write``: inside a snapshot write (the store polled, the process frozen, the write checked unfinished);
* ``fill`` / ``backward`` / ``optimizer``: an injection point of the tests' runner, in a random step (2-5 of the
  attempt: a snapshot commits about a step after it is taken, so that the run goes forward) and chunk.

After a kill, with probability ``--damage``, the newest valid version is damaged: bytes flipped in a random
chunk file, a chunk file truncated, or a byte of its manifest flipped.  Every resume must load the newest version
that reads back whole (a fallback where that is not the newest listed); every version listed valid after a kill
must verify, except those damaged on purpose.  When the run reaches its end within the cycles, it is compared
with the reference and a fresh run (a new segment) starts; after the last cycle the current run is resumed to the
end and compared.  Exit status 0 when every segment is bit-identical and nothing unexpected was seen, else 1.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from rollout_dist.checkpoint.store import SnapshotStore  # noqa: E402
from tests.checkpoint.test_faults import (RUNNER, Attempt, flip, kill_after, kill_inside_write,  # noqa: E402
                                          kill_when_stopped, loaded_version, step_spans, train_command, weights,
                                          worker_pids, write_docs)


def store_state(store: Path) -> tuple[list[str], list[str]]:
    """(valid versions, those of them that do not read back whole)."""
    if not store.exists():
        return [], []
    s = SnapshotStore(str(store))
    valid = s.valid_versions()
    return [v.name for v in valid], [v.name for v in valid if s.verify(v)]


def damage(store: Path, name: str, rng: random.Random) -> str:
    """Damages version ``name``; returns what was done."""
    version = store / name
    kind = rng.choice(["flip", "truncate", "manifest"])
    if kind == "manifest":
        path = version / "manifest" / "zarr.json"
        flip(path, rng.randrange(len(path.read_bytes())))
        return kind
    files = sorted(p for p in version.glob("r*/**/c/**/*") if p.is_file() and p.stat().st_size > 0)
    path = rng.choice(files)
    if kind == "flip":
        flip(path, rng.randrange(path.stat().st_size))
    else:
        os.truncate(path, rng.randrange(path.stat().st_size))
    return kind


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cycles", type=int, default=30, help="kill/resume cycles (default 30)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=12, help="trainer.max_steps of the run (default 12)")
    ap.add_argument("--nproc", type=int, choices=(1, 2), default=1, help="1 process, or dp=2 under torchrun")
    ap.add_argument("--damage", type=float, default=0.2, help="probability of damaging the newest version after "
                                                              "a kill (default 0.2)")
    ap.add_argument("--workdir", type=Path, help="where the runs go (default: a temporary directory, removed)")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    t_start = time.monotonic()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="checkpoint_soak_"))
    work.mkdir(parents=True, exist_ok=True)
    docs = write_docs(work / "docs")
    runner = work / "fault_runner.py"
    runner.write_text(RUNNER)
    nproc, steps = args.nproc, args.steps

    def command(run, *overrides, fault_runner=True):
        return train_command(run, docs, *overrides, nproc=nproc, runner=runner if fault_runner else None,
                             steps=steps)

    ref_run = work / "reference"
    a = Attempt(work, "reference", command(ref_run, fault_runner=False))
    if a.wait() != 0:
        print(a.tail(), file=sys.stderr)
        return 1
    reference, spans = weights(ref_run), step_spans(ref_run / "metrics.jsonl")

    kills, damages = Counter(), Counter()
    fallbacks = from_scratch = unexpected = completed_by_chance = 0
    problems: list[str] = []
    segments: list[dict] = []
    damaged: set[str] = set()
    seg, attempts, started, newest = 0, 0, False, None
    run = work / f"run{seg}"

    def finish_segment() -> None:
        nonlocal seg, run, started, attempts
        same = all(torch.equal(weights(run)[k], t) for k, t in reference.items())
        segments.append({"run": run.name, "attempts": attempts, "bit_identical": same})
        if not same:
            problems.append(f"{run.name}: final weights differ from the reference")
        seg, attempts, started = seg + 1, 0, False
        damaged.clear()
        run = work / f"run{seg}"

    def check_load(text: str, expect: str | None, newest: str | None) -> None:
        """``expect``: the newest version that reads back whole; ``newest``: the newest committed (before any
        damage)."""
        nonlocal fallbacks, from_scratch, unexpected
        try:
            got = loaded_version(text)
        except AssertionError:  # killed before it loaded anything
            return
        if got is None:
            from_scratch += 1
        if got != newest:
            fallbacks += 1
        if got != expect:
            unexpected += 1
            problems.append(f"{run.name} attempt {attempts}: loaded {got}, expected {expect}")

    for cycle in range(args.cycles):
        store = run / "state.zarr"
        valid, unreadable = store_state(store)
        expect = next((v for v in reversed(valid) if v not in unreadable), None)
        done = int(expect[1:]) if expect else 0
        if done == steps:  # nothing left to kill in: end the segment, start a fresh run
            b = Attempt(work, f"{run.name}-end", command(run, "checkpoint.resume=latest"))
            if b.wait() != 0:
                problems.append(f"{run.name}: the resume to the end failed")
                break
            check_load(b.text(), expect, newest)
            finish_segment()
            store, valid, unreadable, expect, done, newest = run / "state.zarr", [], [], None, 0, None
        kind = rng.choice(["random", "random", "write", "fill", "backward", "optimizer"])
        at = rng.randint(min(2, steps - done), min(5, steps - done))  # a snapshot commits about a step late
        env = {"fill": {"FAULT_STOP": f"fill:{at}:{rng.randrange(5)}"},
               "backward": {"FAULT_STOP": f"backward:{at}:{rng.randrange(5)}"},
               "optimizer": {"FAULT_STOP": f"optimizer:{at}"}}.get(kind, {})
        victim = rng.randrange(nproc)
        if env and nproc == 2:
            env["FAULT_RANK"] = str(victim)
        a = Attempt(work, f"{run.name}-attempt{attempts}-{kind}",
                    command(run, *(["checkpoint.resume=latest"] if started else [])), **env)
        attempts += 1
        pid = worker_pids(a, 2)[victim] if nproc == 2 else a.pid
        try:
            if kind == "write":
                kill_inside_write(a, store, pid, part=None if nproc == 1 else f"r{victim:05d}", min_step=done + 1)
            elif kind == "random":
                ahead = sum(spans[done:done + rng.randint(2, 5)])
                kill_after(a, rng.uniform(0, ahead), pid)
            else:
                kill_when_stopped(a, pid)
        except AssertionError as err:  # the run ended before the instant came: fine, counted
            if "ended" not in str(err):
                raise
        code = a.wait()
        if a.leftovers():
            problems.append(f"{a.name}: processes outlived the launcher (killed)")
            a.kill_all()
        if started:
            check_load(a.text(), expect, newest)
        started = True
        valid, unreadable = store_state(store)
        newest = valid[-1] if valid else None
        if code == 0:
            completed_by_chance += 1
            continue
        kills[kind] += 1
        surprise = [v for v in unreadable if v not in damaged]
        if surprise:
            problems.append(f"{run.name}: after a kill ({kind}) {surprise} are listed valid but do not read back")
        damaged = {v for v in damaged if v in unreadable}
        if valid and rng.random() < args.damage:
            what = damage(store, valid[-1], rng)
            damages[what] += 1
            if what != "manifest":
                damaged.add(valid[-1])

    # the last run, to its end
    valid, unreadable = store_state(run / "state.zarr")
    expect = next((v for v in reversed(valid) if v not in unreadable), None)
    b = Attempt(work, f"{run.name}-end", command(run, *(["checkpoint.resume=latest"] if started else [])))
    if b.wait() != 0:
        problems.append(f"{run.name}: the resume to the end failed")
    else:
        if started:
            check_load(b.text(), expect, newest)
        finish_segment()
    summary = {"cycles": args.cycles, "seed": args.seed, "nproc": nproc, "steps": steps,
               "kills": sum(kills.values()), "kills_by_instant": dict(kills),
               "attempts_that_finished_before_their_kill": completed_by_chance,
               "damaged_versions": dict(damages), "fallbacks": fallbacks, "resumes_from_scratch": from_scratch,
               "unexpected_loads": unexpected, "segments": segments,
               "bit_identical": bool(segments) and all(s["bit_identical"] for s in segments),
               "problems": problems, "seconds": round(time.monotonic() - t_start, 1)}
    print(json.dumps(summary, indent=1))
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if summary["bit_identical"] and not problems else 1


if __name__ == "__main__":
    sys.exit(main())
