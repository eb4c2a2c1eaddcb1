"""The snapshot store: one Zarr v3 hierarchy of versioned snapshots, and the protocol that commits a version.

Layout (docs/checkpoints.md has the whole format)::

    state.zarr/                     root group (attributes: format)
      v000042/                      one group per version (the step the snapshot was taken after)
        r00000/ r00001/ ...         one group per rank, written only by that rank: its arrays (rollout_dist.
                                    checkpoint.tree names), and ``manifest/`` once they are durable
        manifest/                   the version's manifest, published last by rank 0

A manifest is a Zarr group whose ``zarr.json`` attributes hold it, so it is one file (one object) that appears at
once: on a POSIX path written to a temporary name, fsynced, renamed into place and the directory fsynced; on an
object store (any fsspec URL; no rename) written last as one object.  A version counts only through its manifest:
every rank has written and fsynced its arrays and directory entries and published its rank manifest (its arrays'
xxh3-64, shapes, dtypes and the state's skeleton), then rank 0 gathers those into the version manifest (which
carries its own checksum).  A crash at any instant leaves the earlier versions as they were; a version without
a manifest is half-written, ignored, and removed by ``remove_incomplete`` on the next start.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass

import numpy as np
import torch
import xxhash

from . import tree

FORMAT = "rollout_dist.snapshot"
FORMAT_VERSION = 1
_VERSION_DIR = re.compile(r"^v(\d{6,})$")
MANIFEST = "manifest/zarr.json"


class SnapshotError(RuntimeError):
    """A snapshot that cannot be written or read; the message names the store, the version and what failed."""


class CorruptSnapshot(SnapshotError):
    """What was read back differs from what its manifest recorded (or the manifest itself is damaged)."""


DIGESTS = "digests"
"""The coordinator's ordered digest log beside the versions: one file per step (rollout_dist.coordinator)."""


def digest_log_name(step: int) -> str:
    return f"{DIGESTS}/s{step:09d}.rdd"


def version_name(step: int) -> str:
    return f"v{step:06d}"


def rank_name(rank: int) -> str:
    return f"r{rank:05d}"


def parse_version(text) -> int:
    """42, "42", "v000042" -> 42."""
    s = str(text).strip()
    m = re.fullmatch(r"v?(\d+)", s)
    if not m:
        raise ValueError(f"{text!r} is not a version (e.g. v000042 or 42)")
    return int(m.group(1))


def _group_json(attributes: dict) -> bytes:
    return json.dumps({"zarr_format": 3, "node_type": "group", "attributes": attributes}, indent=1,
                      sort_keys=True).encode()


def _sealed(body: dict) -> dict:
    """``body`` with its own checksum, so a damaged manifest is told from a valid one."""
    return {"manifest": body, "xxh3": xxhash.xxh3_64_hexdigest(json.dumps(body, sort_keys=True).encode())}


def _unseal(raw: bytes, where: str) -> dict:
    try:
        attrs = json.loads(raw)["attributes"]
        body, digest = attrs["manifest"], attrs["xxh3"]
    except (ValueError, KeyError, TypeError) as err:
        raise CorruptSnapshot(f"{where}: unreadable manifest ({err})") from None
    if xxhash.xxh3_64_hexdigest(json.dumps(body, sort_keys=True).encode()) != digest:
        raise CorruptSnapshot(f"{where}: the manifest's checksum does not match its contents")
    return body


class Location:
    """Files of a store: a local or shared POSIX path (fsync, atomic rename), or an fsspec URL (objects)."""

    def __init__(self, url: str):
        self.url = str(url)
        if "://" in self.url and not self.url.startswith("file://"):
            import fsspec
            self.fs, self.root = fsspec.core.url_to_fs(self.url)
            self.posix = False
        else:
            self.fs, self.root = None, os.path.abspath(self.url.removeprefix("file://"))
            self.posix = True

    def path(self, rel: str = "") -> str:
        return f"{self.root}/{rel}".rstrip("/") if rel else self.root

    def zarr_url(self, rel: str = "") -> str:
        """What ``zarr.open_group`` takes for ``rel``: a path, or a URL (zarr's own fsspec store)."""
        return self.path(rel) if self.posix else self.fs.unstrip_protocol(self.path(rel))

    def exists(self, rel: str) -> bool:
        return os.path.exists(self.path(rel)) if self.posix else self.fs.exists(self.path(rel))

    def read(self, rel: str) -> bytes | None:
        try:
            if self.posix:
                with open(self.path(rel), "rb") as f:
                    return f.read()
            return self.fs.cat_file(self.path(rel))
        except FileNotFoundError:
            return None

    def write_atomic(self, rel: str, data: bytes) -> None:
        """``data`` at ``rel``, appearing whole or not at all, and durable when this returns."""
        target = self.path(rel)
        if not self.posix:
            self.fs.pipe_file(target, data)  # one object, written last: appears whole
            return
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = f"{target}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
        _fsync_dir(os.path.dirname(target))

    def dirs(self, rel: str = "") -> list[str]:
        """Names of the sub-directories (prefixes) of ``rel``."""
        base = self.path(rel)
        try:
            if self.posix:
                return sorted(e.name for e in os.scandir(base) if e.is_dir())
            return sorted(os.path.basename(p.rstrip("/")) for p in self.fs.ls(base, detail=False)
                          if self.fs.isdir(p))
        except FileNotFoundError:
            return []

    def files(self, rel: str = "") -> list[str]:
        """Names of the files (objects) directly in ``rel``."""
        base = self.path(rel)
        try:
            if self.posix:
                return sorted(e.name for e in os.scandir(base) if e.is_file())
            return sorted(os.path.basename(p) for p in self.fs.ls(base, detail=False) if self.fs.isfile(p))
        except FileNotFoundError:
            return []

    def remove(self, rel: str) -> None:
        target = self.path(rel)
        if self.posix:
            if os.path.isfile(target):
                os.remove(target)
            shutil.rmtree(target, ignore_errors=True)
        elif self.fs.exists(target):
            self.fs.rm(target, recursive=True)

    def fsync_tree(self, rel: str) -> None:
        """Makes every file under ``rel`` and the directory entries down to it durable (POSIX; object stores
        are durable once a write returns)."""
        if not self.posix:
            return
        top = self.path(rel)
        for d, _, files in os.walk(top):
            for name in files:
                fd = os.open(os.path.join(d, name), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            _fsync_dir(d)
        parent = os.path.dirname(top)
        while parent.startswith(self.root) and parent != os.path.dirname(self.root):
            _fsync_dir(parent)
            parent = os.path.dirname(parent)

    def size(self, rel: str) -> int:
        top = self.path(rel)
        if self.posix:
            return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(top) for f in fs)
        return int(self.fs.du(top)) if self.fs.exists(top) else 0


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class VersionInfo:
    step: int
    name: str
    manifest: dict | None
    problem: str | None = None

    @property
    def valid(self) -> bool:
        return self.manifest is not None


class SnapshotStore:
    """Versioned snapshots in one Zarr v3 store at ``url`` (a path or an fsspec URL)."""

    def __init__(self, url: str):
        self.loc = Location(url)
        self.url = self.loc.url

    # ------------------------------------------------------------------------------------------------ finding
    def versions(self) -> list[VersionInfo]:
        """Every version directory, oldest first, with its manifest (None where there is none or it is damaged,
        with ``problem`` saying which)."""
        out = []
        for name in self.loc.dirs():
            m = _VERSION_DIR.match(name)
            if not m:
                continue
            try:
                body = self.manifest(name)
            except CorruptSnapshot as err:
                out.append(VersionInfo(int(m.group(1)), name, None, str(err)))
                continue
            out.append(VersionInfo(int(m.group(1)), name, body, None if body else "no manifest (half-written)"))
        return sorted(out, key=lambda v: v.step)

    def valid_versions(self) -> list[VersionInfo]:
        return [v for v in self.versions() if v.valid]

    def remove_incomplete(self) -> list[str]:
        """Removes half-written versions (no manifest); returns their names.  (Call while nothing writes.)"""
        gone = []
        for v in self.versions():
            if v.manifest is None and v.problem.startswith("no manifest"):
                self.loc.remove(v.name)
                gone.append(v.name)
        return gone

    def delete(self, name: str) -> None:
        """Removes a version: its manifest first, so that it is never found half-deleted."""
        self.loc.remove(f"{name}/manifest")
        self.loc.remove(name)

    # ------------------------------------------------------------------------------------------------ writing
    def ensure_root(self) -> None:
        self.ensure_group("", {"format": FORMAT, "format_version": FORMAT_VERSION})

    def ensure_group(self, rel: str, attributes: dict | None = None) -> None:
        """The Zarr group metadata of ``rel`` (``""``: the root), written unless it is there."""
        key = f"{rel}/zarr.json" if rel else "zarr.json"
        if self.loc.read(key) is None:
            self.loc.write_atomic(key, _group_json(attributes or {}))

    def publish(self, rel: str, body: dict) -> None:
        """Publishes the manifest of group ``rel`` (sealed with its checksum): it appears whole or not at all."""
        self.loc.write_atomic(f"{rel}/{MANIFEST}", _group_json(_sealed(body)))

    def manifest(self, rel: str) -> dict | None:
        """The manifest of group ``rel``; None if there is none; ``CorruptSnapshot`` if it is damaged."""
        raw = self.loc.read(f"{rel}/{MANIFEST}")
        return None if raw is None else _unseal(raw, f"{self.url} {rel}")

    def write_rank(self, step: int, rank: int, skeleton, arrays: dict[str, torch.Tensor], role: dict) -> None:
        """Writes this rank's arrays of version ``step`` under ``vSTEP/rRANK``, makes them durable and publishes
        the rank manifest.  Only this rank writes there."""
        import zarr

        rel = f"{version_name(step)}/{rank_name(rank)}"
        self.loc.remove(rel)  # a retry of this very write
        group = zarr.open_group(self.loc.zarr_url(rel), mode="w", zarr_format=3)
        table = {}
        for name, t in arrays.items():
            a = tree.to_numpy(t)
            arr = group.create_array(name, shape=a.shape, dtype=a.dtype, chunks=tree.chunk_shape(a.shape, a.itemsize),
                                     compressors=None, fill_value=0, attributes={"torch_dtype": tree.dtype_name(t)})
            if a.size:
                arr[...] = a
            table[name] = {"shape": list(a.shape), "dtype": tree.dtype_name(t), "nbytes": int(a.nbytes),
                           "xxh3": tree.checksum(a)}
        self.loc.fsync_tree(rel)
        self.publish(rel, {"rank": rank, "role": role, "arrays": table, "tree": skeleton})

    def commit(self, step: int, world: int, meta: dict, timeout_s: float = 600.0) -> dict:
        """Rank 0, after its own ``write_rank``: waits for every rank's manifest, then publishes the version's.
        Returns the version manifest."""
        name = version_name(step)
        deadline = time.monotonic() + timeout_s
        ranks, delay = {}, 0.01
        for r in range(world):
            while True:
                part = self.manifest(f"{name}/{rank_name(r)}")
                if part is not None:
                    ranks[rank_name(r)] = part
                    break
                if time.monotonic() > deadline:
                    raise SnapshotError(f"{self.url} {name}: rank {r} did not finish writing its part within "
                                        f"{timeout_s:.0f} s; the version is not committed")
                time.sleep(delay)
                delay = min(delay * 2, 0.5)
        self.ensure_group(name, {"step": step})
        body = {"format": FORMAT, "format_version": FORMAT_VERSION, "version": name, "step": step,
                "time": time.time(), "world": world, **meta, "ranks": ranks,
                "nbytes": sum(a["nbytes"] for r in ranks.values() for a in r["arrays"].values())}
        self.publish(name, body)
        return body

    # ------------------------------------------------------------------------------------------------ reading
    def read_rank(self, version: VersionInfo, rank: str, names: list[str] | None = None,
                  ) -> tuple[object, dict[str, torch.Tensor]]:
        """(skeleton, arrays) of one rank's part of ``version``, every array checked against the manifest;
        ``CorruptSnapshot`` names the first that is not as recorded."""
        import zarr

        part = version.manifest["ranks"].get(rank)
        if part is None:
            raise CorruptSnapshot(f"{self.url} {version.name}: the manifest has no part of rank {rank}")
        rel = f"{version.name}/{rank}"
        arrays = {}
        for name in (names if names is not None else tree.array_names(part["tree"])):
            arrays[name] = self.read_array(version.name, rel, name, part["arrays"].get(name), zarr)
        return part["tree"], arrays

    def read_array(self, version: str, rel: str, name: str, entry: dict | None, zarr=None) -> torch.Tensor:
        if zarr is None:
            import zarr
        where = f"{self.url} {version}: array {rel.split('/', 1)[1]}/{name}"
        if entry is None:
            raise CorruptSnapshot(f"{where} is not in the manifest")
        try:
            a = zarr.open_array(self.loc.zarr_url(f"{rel}/{name}"), mode="r")[...]
        except Exception as err:  # missing or truncated chunk files, damaged metadata: zarr raises many kinds
            raise CorruptSnapshot(f"{where} cannot be read ({type(err).__name__}: {err})") from None
        a = np.asarray(a)
        if list(a.shape) != entry["shape"]:
            raise CorruptSnapshot(f"{where} has shape {list(a.shape)}, the manifest {entry['shape']}")
        digest = tree.checksum(a)
        if digest != entry["xxh3"]:
            raise CorruptSnapshot(f"{where}: checksum {digest} differs from the manifest's {entry['xxh3']}")
        return tree.from_numpy(a, entry["dtype"])

    def verify(self, version: VersionInfo) -> list[str]:
        """Reads every array of a version and checks it; the problems found (empty: valid)."""
        if not version.valid:
            return [version.problem or "no manifest"]
        problems = []
        for rank, part in version.manifest["ranks"].items():
            for name, entry in part["arrays"].items():
                try:
                    self.read_array(version.name, f"{version.name}/{rank}", name, entry)
                except CorruptSnapshot as err:
                    problems.append(str(err))
        return problems
