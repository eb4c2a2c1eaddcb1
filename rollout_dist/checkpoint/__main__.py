"""Look at, check and export the training snapshots of a run (a snapshot store, docs/checkpoints.md).

    python -m rollout_dist.checkpoint list runs/tl-128k/state.zarr [--json]
    python -m rollout_dist.checkpoint verify runs/tl-128k/state.zarr [--version v000042]
    python -m rollout_dist.checkpoint export runs/tl-128k/state.zarr out/tl-128k [--version 42] [--config FILE]

``list`` reads the manifests only: one line per version, oldest first (name, step, when it was written, size,
valid / half-written / damaged, and the layout pp, dp, ZeRO stage it was written with).  ``verify`` reads every
array of every version (or of one) and checks it against the xxh3-64 checksum its manifest records.  ``export``
rebuilds the whole model from the run's resolved config recorded in the manifest, loads the snapshot's weights
(checked while read; the pipeline stages' parts stitched back into one model) and writes an HF
``save_pretrained`` directory with the tokenizer, as the run's ``final/`` is written.  STORE is a path or an
fsspec URL; a version is written ``v000042`` or ``42``.

Exit status: 0 done; 1 a snapshot is damaged or half-written (``verify``: one of those it checked; ``export``: the
one asked for); 2 a usage error, said in one line on stderr (no store there, an unknown version, an OUT_DIR that
is not empty, ...).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from datetime import datetime
from pathlib import Path

from . import tree
from .store import (FORMAT, FORMAT_VERSION, MANIFEST, CorruptSnapshot, SnapshotStore, VersionInfo, parse_version,
                    version_name)

PROG = "python -m rollout_dist.checkpoint"


class UsageError(Exception):
    """What the command line asks for cannot be done as asked (exit 2)."""


class Damaged(Exception):
    """The snapshot asked for is damaged or half-written (exit 1)."""


# ----------------------------------------------------------------------------------------------------- helpers
def _where(store: SnapshotStore) -> str:
    return store.loc.root if store.loc.posix else store.url


def open_store(url: str) -> SnapshotStore:
    """The snapshot store at ``url``; ``UsageError`` saying what was looked at where there is none."""
    try:
        store = SnapshotStore(url)
        raw = store.loc.read("zarr.json")
    except (ImportError, ValueError, OSError) as err:  # an fsspec protocol without its backend, a bad URL, ...
        raise UsageError(f"{url}: cannot open the store ({type(err).__name__}: {err})") from None
    where = _where(store)
    if raw is None:
        if not store.loc.exists(""):
            raise UsageError(f"no snapshot store at {where}: no such directory")
        hint = (f"; the run directory's store is {store.loc.path('state.zarr')}"
                if store.loc.exists("state.zarr/zarr.json") else "")
        raise UsageError(f"{where} is not a snapshot store (no zarr.json there){hint}")
    try:
        attrs = json.loads(raw)["attributes"]
    except (ValueError, KeyError, TypeError):
        raise UsageError(f"{where} is not a snapshot store (its zarr.json is not a Zarr group's)") from None
    if attrs.get("format") != FORMAT:
        raise UsageError(f"{where} is a Zarr store but not a snapshot store (format {attrs.get('format')!r}, "
                         f"not {FORMAT!r})")
    if attrs.get("format_version", 0) > FORMAT_VERSION:
        raise UsageError(f"{where} has snapshot format version {attrs['format_version']}; this rollout_dist reads "
                         f"up to {FORMAT_VERSION}: use a newer rollout_dist")
    return store


def _valid_names(versions: list[VersionInfo]) -> str:
    return ", ".join(v.name for v in versions if v.valid) or "none"


def pick(store: SnapshotStore, versions: list[VersionInfo], text: str) -> VersionInfo:
    """The version ``text`` names (valid or not); ``UsageError`` naming the valid ones where there is none."""
    try:
        step = parse_version(text)
    except ValueError as err:
        raise UsageError(f"--version: {err}") from None
    for v in versions:
        if v.step == step:
            return v
    raise UsageError(f"{_where(store)} has no version {version_name(step)}; valid versions: "
                     f"{_valid_names(versions)}")


def _short(store: SnapshotStore, version: str, message: str) -> str:
    """A store's message without the "<store> <version>: " it starts with."""
    return message.removeprefix(f"{store.url} {version}: ")


def status(store: SnapshotStore, v: VersionInfo) -> str:
    if v.valid:
        return "valid"
    if v.problem.startswith("no manifest"):
        return "half-written"
    return f"damaged: {_short(store, v.name, v.problem)}"


def human(nbytes: int | None) -> str:
    if nbytes is None:
        return "-"
    if nbytes >= 1e9:
        return f"{nbytes / 1e9:.2f} GB"
    if nbytes >= 1e6:
        return f"{nbytes / 1e6:.1f} MB"
    return f"{nbytes / 1e3:.1f} KB"


def _iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t).astimezone().isoformat(timespec="seconds")


def _layout(m: dict | None) -> str:
    if m is None or "layout" not in m:
        return ""
    x = m["layout"]
    return f"pp={x['pp']} dp={x['dp']} zero={x['zero_stage']}"


def _arrays(v: VersionInfo) -> list[tuple[str, str, dict]]:
    """(rank, array name, manifest entry) of every array of a valid version."""
    return [(rank, name, entry) for rank, part in sorted(v.manifest["ranks"].items())
            for name, entry in part["arrays"].items()]


# ------------------------------------------------------------------------------------------------------- list
def describe(store: SnapshotStore, v: VersionInfo) -> dict:
    m = v.manifest
    kind = "valid" if v.valid else status(store, v).split(":")[0]
    return {"version": v.name, "step": v.step, "status": kind,
            "problem": None if v.valid else _short(store, v.name, v.problem),
            "time": m.get("time") if m else None, "time_iso": _iso(m.get("time")) if m else None,
            "nbytes": m.get("nbytes") if m else None, "arrays": len(_arrays(v)) if m else None,
            "layout": m.get("layout") if m else None}


def cmd_list(args) -> int:
    store = open_store(args.store)
    versions = store.versions()
    if args.json:
        print(json.dumps([describe(store, v) for v in versions], indent=1))
        return 0
    if not versions:
        print(f"{_where(store)}: no versions", file=sys.stderr)
        return 0
    rows = [(v.name, f"step {v.step}", _iso(v.manifest.get("time")) if v.valid else "-",
             human(v.manifest.get("nbytes") if v.valid else None), status(store, v), _layout(v.manifest))
            for v in versions]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    state_width = max((len(r[4]) for r in rows if r[5]), default=0)
    for r in rows:
        cells = [r[i].ljust(widths[i]) if i else r[i] for i in range(4)]
        cells[3] = r[3].rjust(widths[3])
        cells.append(f"{r[4].ljust(state_width)}  {r[5]}" if r[5] else r[4])
        print("  ".join(cells).rstrip())
    return 0


# ----------------------------------------------------------------------------------------------------- verify
def cmd_verify(args) -> int:
    from tqdm.auto import tqdm

    store = open_store(args.store)
    versions = store.versions()
    targets = [pick(store, versions, args.version)] if args.version is not None else versions
    if not targets:
        print(f"{_where(store)}: no versions to verify", file=sys.stderr)
        return 0
    total = sum(len(_arrays(v)) for v in targets if v.valid)
    failed = False
    with tqdm(total=total, desc="verify", unit="array", file=sys.stderr, dynamic_ncols=True) as bar:
        for v in targets:
            if not v.valid:
                failed = True
                tqdm.write(f"{v.name}: {status(store, v)}", file=sys.stdout)
                continue
            bar.set_postfix_str(v.name)
            problems, arrays = [], _arrays(v)
            for rank, name, entry in arrays:
                try:
                    store.read_array(v.name, f"{v.name}/{rank}", name, entry)
                except CorruptSnapshot as err:
                    problems.append(_short(store, v.name, str(err)))
                bar.update(1)
            if problems and store.loc.read(f"{v.name}/{MANIFEST}") is None:
                tqdm.write(f"{v.name}: deleted while being verified (a running trainer keeps only the newest "
                           "versions); not checked", file=sys.stdout)
                continue
            if problems:
                failed = True
                tqdm.write(f"{v.name}: damaged: {len(problems)} of {len(arrays)} arrays differ from the manifest",
                           file=sys.stdout)
                for p in problems:
                    tqdm.write(f"  {p}", file=sys.stdout)
            else:
                tqdm.write(f"{v.name}: ok ({len(arrays)} arrays, {human(v.manifest['nbytes'])})", file=sys.stdout)
    return 1 if failed else 0


# ----------------------------------------------------------------------------------------------------- export
def run_config(text: str, where: str):
    """The ``TrainConfig`` of a run's resolved config (YAML), checked as a run checks it."""
    from omegaconf import OmegaConf

    from ..config import ConfigError, TrainConfig, to_train_config

    try:
        return to_train_config(OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.create(text)))
    except ConfigError as err:
        raise UsageError(f"{where}: {err}") from None
    except Exception as err:  # YAML that does not parse, a value OmegaConf cannot merge: many kinds
        raise UsageError(f"{where} is not a run's config ({type(err).__name__}: {err})") from None


def module_state(store: SnapshotStore, v: VersionInfo) -> dict:
    """The whole model's state dict of a version, every array checked: the module of each pipeline stage
    (written by the stage's data-parallel rank 0), its decoder layers renamed from the stage's own numbering to
    the whole model's (``global_name``, with the global layers the stage recorded)."""
    from ..model.stage import StageInfo, global_name

    pp = v.manifest["layout"]["pp"]
    stages: dict[int, tuple[dict, StageInfo | None]] = {}
    for index, rank in sorted((int(r[1:]), r) for r, part in v.manifest["ranks"].items() if part["role"].get("model")):
        sub = tree.member(v.manifest["ranks"][rank]["tree"], "module,stage,weights")
        if not any(k == "module" for k, _ in sub["M"]):
            raise CorruptSnapshot(f"{store.url} {v.name}: rank {rank} holds a model part but its state has none")
        _, arrays = store.read_rank(v, rank, tree.array_names(sub))
        part = tree.join(sub, arrays)
        info = StageInfo(**part["stage"]) if part.get("stage") else None
        stage = info.stage if info else index % pp
        module = part["module"]
        if part.get("weights") == "optimizer":  # ZeRO: the weights are the stage's masters, over its replicas
            module = {**module, **masters_of_stage(store, v, stage, pp)}
        stages.setdefault(stage, (module, info))
    missing = [s for s in range(pp) if s not in stages]
    if missing:
        raise CorruptSnapshot(f"{store.url} {v.name}: no rank holds the weights of pipeline stage(s) "
                              f"{', '.join(map(str, missing))}")
    if pp == 1:
        return stages[0][0]
    unplaced = [s for s in range(pp) if stages[s][1] is None]
    if unplaced:
        raise CorruptSnapshot(f"{store.url} {v.name}: the part of pipeline stage(s) {', '.join(map(str, unplaced))} "
                              "does not record which decoder layers it holds")
    state = {}
    for s in range(pp):
        module, info = stages[s]
        state.update({global_name(name, info): t for name, t in module.items()})
    return state


def masters_of_stage(store: SnapshotStore, v: VersionInfo, stage: int, pp: int) -> dict:
    """A pipeline stage's parameters rebuilt from its data-parallel ranks' ZeRO partitions (fp32 masters)."""
    from .engine_state import weights_from_partitions

    parts = []
    for rank in sorted(int(r[1:]) for r in v.manifest["ranks"]):
        if rank % pp != stage:
            continue
        name = f"r{rank:05d}"
        sub = tree.member(v.manifest["ranks"][name]["tree"], "optimizer,param_shapes")
        _, arrays = store.read_rank(v, name, tree.array_names(sub))
        parts.append(tree.join(sub, arrays))
    return weights_from_partitions([p["optimizer"] for p in parts], parts[0]["param_shapes"])


def cmd_export(args) -> int:
    import torch

    from ..config import ConfigError
    from ..train.export import full_model, save_model_dir

    store = open_store(args.store)
    out = Path(args.out_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"OUT_DIR {out} is a file; give a new or empty directory")
    if out.is_dir() and any(out.iterdir()):
        raise UsageError(f"OUT_DIR {out} is not empty; nothing is overwritten: give a new or empty directory")
    versions = store.versions()
    if args.version is not None:
        v = pick(store, versions, args.version)
        if not v.valid:
            raise Damaged(f"{v.name} of {_where(store)} is {status(store, v)}; valid versions: "
                          f"{_valid_names(versions)}")
    else:
        valid = [v for v in versions if v.valid]
        if not valid:
            raise UsageError(f"{_where(store)} holds no valid version" + (
                f" ({', '.join(f'{v.name}: {status(store, v)}' for v in versions)})" if versions else ""))
        v = valid[-1]
    if args.config is not None:
        try:
            text, where = Path(args.config).read_text(), f"--config {args.config}"
        except OSError as err:
            raise UsageError(f"--config {args.config}: cannot be read ({err.strerror or err})") from None
    else:
        text, where = v.manifest.get("config"), f"the config recorded in {v.name}"
        if text is None:
            raise UsageError(f"{v.name} of {_where(store)} records no config (its run was started without its "
                             "resolved config); pass the run's config.yaml with --config")
    cfg = run_config(text, where)
    state = module_state(store, v)
    floating = Counter(t.dtype for t in state.values() if t.is_floating_point())
    # model.dtype=auto resolves to what the run trained in (bf16 on GPUs, fp32 on a CPU): the dtype the snapshot
    # records (ZeRO stores fp32 masters of bf16 weights), else the stored weights'
    trained = v.manifest.get("model_dtype")
    dtype = getattr(torch, cfg.model.dtype) if cfg.model.dtype != "auto" else (
        getattr(torch, trained) if trained else floating.most_common(1)[0][0] if floating else torch.float32)
    try:
        model, tokenizer = full_model(cfg.model, state, dtype, memory=cfg.memory if cfg.rollout.mode == "memory"
                                      else None)
    except ConfigError as err:  # model.path that is not there on this machine
        raise UsageError(f"{where}: {err}") from None
    except RuntimeError as err:  # load_state_dict: names or shapes that are not the config's model's
        first = str(err).strip().splitlines()
        raise UsageError(f"the weights of {v.name} do not fit the model of {where}: "
                         f"{' '.join(line.strip() for line in first)[:500]}") from None
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        save_model_dir(model, tokenizer, out)
    except BaseException:
        if created:
            import shutil
            shutil.rmtree(out, ignore_errors=True)
        raise
    params = sum(p.numel() for p in model.parameters())
    print(f"exported {v.name} (step {v.step}) of {_where(store)} to {out}: {type(model).__name__}, "
          f"{params / 1e6:.2f}M parameters, {str(dtype).replace('torch.', '')}"
          + (f", {pp} pipeline stages joined" if (pp := v.manifest["layout"]["pp"]) > 1 else ""))
    return 0


# ------------------------------------------------------------------------------------------------------- main
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="list|verify|export")
    ls = sub.add_parser("list", help="every version, from the manifests only")
    ls.add_argument("store", metavar="STORE", help="the snapshot store (<checkpoint.dir>/state.zarr or a URL)")
    ls.add_argument("--json", action="store_true", help="a JSON list instead of lines")
    ls.set_defaults(run=cmd_list)
    ver = sub.add_parser("verify", help="read every array and check its checksum")
    ver.add_argument("store", metavar="STORE")
    ver.add_argument("--version", help="only this version (v000042 or 42)")
    ver.set_defaults(run=cmd_verify)
    ex = sub.add_parser("export", help="the model of a version as an HF save_pretrained directory")
    ex.add_argument("store", metavar="STORE")
    ex.add_argument("out_dir", metavar="OUT_DIR", help="a new or empty directory")
    ex.add_argument("--version", help="the version to export (default: the newest valid one)")
    ex.add_argument("--config", help="the run's resolved config (its config.yaml), for a snapshot that records "
                                     "none; default: the one in the manifest")
    ex.set_defaults(run=cmd_export)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (Damaged, CorruptSnapshot) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
