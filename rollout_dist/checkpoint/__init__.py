"""Versioned training snapshots in a Zarr v3 store (docs/checkpoints.md).

- ``store``: the store's layout, the commit protocol (manifests published last), reading with checksums;
- ``tree``: a nested state as arrays plus a JSON skeleton (bf16 as 2-byte words);
- ``writer``: host copies and the background writer;
- ``engine_state``: what of a DeepSpeed engine a snapshot holds, and putting it back;
- ``chunks``: append-only snapshots of the carried state inside a long document;
- ``__main__``: ``python -m rollout_dist.checkpoint list|verify|export STORE``.
"""
from .store import CorruptSnapshot, SnapshotError, SnapshotStore, parse_version, version_name

__all__ = ["CorruptSnapshot", "SnapshotError", "SnapshotStore", "parse_version", "version_name"]
