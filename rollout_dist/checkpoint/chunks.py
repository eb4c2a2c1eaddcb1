"""Chunk snapshots: the carried state of a long document, snapshotted inside its fill pass, appending only what
each chunk added, so that a run killed inside the document resumes at its last chunk snapshot.

Layout, inside the snapshot store (docs/checkpoints.md)::

    state.zarr/chunks/s000042/r00000/       step index 42 (it runs on version v000042's weights), rank 0
      positions                 int64 (B, P)        appended along axis 1
      layer.{L}.key, .value     model dtype (B, P, kv_heads, head_dim), appended along axis 1
      manifest/zarr.json        published (atomically) after every append: the boundary, what the document
                                depends on (base version, random-stream key, chunk spans' xxh3), and per array
                                the xxh3 of every appended segment [start, end)

Each append writes the new positions into the arrays (resized), fsyncs them and then replaces the manifest, so
the manifest always describes durable bytes; a crash mid-append leaves the previous manifest in force (extra
positions beyond it are ignored).  A snapshot is used only for the very document it was taken of: same base
version, same stream key (seed, step, document), same chunk spans.
"""
from __future__ import annotations

import json
import time

import numpy as np
import torch
import xxhash

from ..model.carried_state import CarriedState
from . import tree
from .store import CorruptSnapshot, SnapshotStore, rank_name

GROWING = ("positions",)
"""Per-position tensors of the carried-state layout besides the layers' K/V (which end in .key / .value)."""


def spans_digest(spans) -> str:
    return xxhash.xxh3_64_hexdigest(json.dumps([[int(s), int(e)] for s, e in spans]).encode())


def _grows(name: str) -> bool:
    return name in GROWING or name.endswith((".key", ".value"))


class ChunkSnapshots:
    """This rank's chunk snapshots of one document at a time, in ``store`` under ``chunks/``."""

    def __init__(self, store: SnapshotStore, rank: int):
        self.store, self.rank = store, rank
        self.rel: str | None = None
        self.meta: dict = {}
        self.table: dict[str, dict] = {}
        self.position = self.written = 0  # tokens captured, tokens durable
        self.capture_seconds = self.write_seconds = 0.0
        self.count = 0

    @staticmethod
    def step_dir(step: int) -> str:
        return f"chunks/s{step:06d}"

    # ---------------------------------------------------------------------------------------------- writing
    def begin(self, step: int, base_version: int, stream_key, spans) -> None:
        """Starts the snapshots of the document run at step index ``step`` on ``base_version``'s weights."""
        self.rel = f"{self.step_dir(step)}/{rank_name(self.rank)}"
        self.store.loc.remove(self.rel)
        for rel in ("chunks", self.step_dir(step)):
            self.store.ensure_group(rel)
        self.meta = {"step": step, "base_version": base_version, "stream": [int(x) for x in stream_key],
                     "spans": spans_digest(spans), "chunks": len(spans)}
        self.table, self.position, self.written = {}, 0, 0

    def capture(self, state: CarriedState) -> dict[str, torch.Tensor]:
        """What ``state`` (fill phase) gained since the previous capture, copied to host memory (``write`` it)."""
        t0 = time.perf_counter()
        sd = state.state_dict(since=self.position)
        self.position = int(sd["position"])
        self.capture_seconds += time.perf_counter() - t0
        return sd

    def write(self, sd: dict[str, torch.Tensor]) -> None:
        """Appends a capture to the arrays, makes it durable, then publishes the manifest."""
        import zarr

        t0 = time.perf_counter()
        group = zarr.open_group(self.store.loc.zarr_url(self.rel), mode="a", zarr_format=3)
        start = self.written
        for name, t in sd.items():
            if not _grows(name):
                continue
            a = tree.to_numpy(t)
            entry = self.table.get(name)
            if entry is None:
                shape = list(a.shape)
                shape[1] = 0
                arr = group.create_array(name, shape=tuple(shape), dtype=a.dtype,
                                         chunks=tree.chunk_shape(tuple(max(s, 1) for s in a.shape), a.itemsize, 1),
                                         compressors=None, fill_value=0, attributes={"torch_dtype": tree.dtype_name(t)})
                entry = self.table[name] = {"dtype": tree.dtype_name(t), "shape": shape, "segments": []}
            else:
                arr = group[name]
            end = start + a.shape[1]
            entry["shape"][1] = end
            arr.resize(tuple(entry["shape"]))
            if a.shape[1]:
                arr[:, start:end] = a
            entry["segments"].append([start, end, tree.checksum(a)])
        self.store.loc.fsync_tree(self.rel)
        small = {k: v.tolist() for k, v in sd.items() if not _grows(k)}
        body = {**self.meta, "rank": self.rank, "state": small, "arrays": self.table, "time": time.time()}
        self.store.publish(self.rel, body)
        self.written = int(sd["position"])
        self.write_seconds += time.perf_counter() - t0
        self.count += 1

    def continue_from(self, body: dict) -> None:
        """Appends after the snapshot ``body`` (a resumed document)."""
        self.rel = f"{self.step_dir(body['step'])}/{rank_name(self.rank)}"
        self.meta = {k: body[k] for k in ("step", "base_version", "stream", "spans", "chunks")}
        self.table = json.loads(json.dumps(body["arrays"]))
        self.position = self.written = int(body["state"]["position"])

    # ---------------------------------------------------------------------------------------------- reading
    def find(self, step: int, base_version: int, stream_key, spans) -> dict | None:
        """The manifest of this rank's chunk snapshot of that document, if there is one it may continue."""
        try:
            body = self.store.manifest(f"{self.step_dir(step)}/{rank_name(self.rank)}")
        except CorruptSnapshot:
            return None
        if body is None:
            return None
        same = (body["base_version"] == base_version and body["stream"] == [int(x) for x in stream_key]
                and body["spans"] == spans_digest(spans))
        return body if same else None

    def load(self, body: dict) -> dict[str, torch.Tensor]:
        """The carried state's ``state_dict`` a found snapshot holds, every segment checked."""
        import zarr

        rel = f"{self.step_dir(body['step'])}/{rank_name(self.rank)}"
        out = {k: torch.tensor(v) for k, v in body["state"].items()}
        for name, entry in body["arrays"].items():
            where = f"{self.store.url} {rel}: array {name}"
            try:
                arr = zarr.open_array(self.store.loc.zarr_url(f"{rel}/{name}"), mode="r")
                end = entry["shape"][1]
                a = np.asarray(arr[:, :end])
            except Exception as err:
                raise CorruptSnapshot(f"{where} cannot be read ({type(err).__name__}: {err})") from None
            for s, e, digest in entry["segments"]:
                if tree.checksum(a[:, s:e]) != digest:
                    raise CorruptSnapshot(f"{where}: positions [{s}, {e}) differ from the manifest's checksum")
            out[name] = tree.from_numpy(a, entry["dtype"])
        for key in ("position", "chunks", "phase", "version"):
            out[key] = out[key].to(torch.int64)
        return out
