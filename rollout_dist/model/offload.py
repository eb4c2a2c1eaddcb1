"""Carried K/V (and optionally dK/dV) kept in pinned host memory, staged layer by layer into a few device slots.

The exact rollout needs every layer's K/V of the whole prefix, but only one layer's at a time: a layer's
attention reads them (fill and recompute passes) and its attention backward reads them again.  So the per-layer
buffers live on the host and a *ring* of device slots (two by default) holds the layers in use; while layer l
computes, layer l+1's prefix is copied in on a side stream (layer l-1's during backward).  A chunk of c queries
does about 4·c FLOPs of attention per byte of K/V copied, so for chunks of thousands of tokens the copies hide
behind the attention.

During the recompute pass, tensors autograd saves that live in a slot (the K/V views attention keeps for its
backward) are replaced by a small token through ``torch.autograd.graph.saved_tensors_hooks``; backward stages
the layer again when it unpacks them.  Nothing else changes: the attention kernels, the HF modules and the
``_CarriedKV`` hand-back of dK/dV are those of the in-device state.

Only the first ``layers`` layers may be offloaded (``rollout.offload_layers``); the others keep their state on
the device as in ``KVState``.  That sizes host and device use in steps of one layer's state, for machines where
neither alone holds it all (an 8B model's optimizer on the host leaves room there for only part of its K/V).

On CPU (tests) the "host" and the slots are both CPU tensors and copies are synchronous; the staging logic is
the same.
"""
from __future__ import annotations

import math
import os
import weakref

import torch

from .kv_state import KVState, _CarriedKV

OFFLOAD_MODES = ("none", "kv", "all")
"""none: everything on the device; kv: K/V on the host, dK/dV on the device; all: K/V and dK/dV on the host."""


def offloaded_layers(num_layers: int, requested: int = 0) -> int:
    """How many of ``num_layers`` layers an offloaded state puts on the host: the first ``requested`` (0: all)."""
    return min(requested, num_layers) if requested else num_layers


MEMINFO = "/proc/meminfo"
PROC_CGROUP = "/proc/self/cgroup"
CGROUP_ROOT = "/sys/fs/cgroup"
"""Where the host-memory figures are read (tests point them at fake files)."""

_NO_LIMIT = 2**60  # cgroup v1 writes "no limit" as 2^63-1 rounded down to a page; v2 as "max"
_CGROUP_FILES = (("memory.max", "memory.current"),  # v2
                 ("memory.limit_in_bytes", "memory.usage_in_bytes"))  # v1


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _cgroup_dirs() -> list[str]:
    """Directories that may hold this process's memory cgroup files, innermost first: its cgroup (from
    /proc/self/cgroup; v2's ``0::/path`` under the root or under ``unified/``, v1's ``N:memory:/path`` under
    ``memory/``) and every ancestor up to the mount, whose limits bind it too.  Inside a container with its own
    cgroup namespace the path is ``/`` and the mount itself is the cgroup."""
    paths = {}
    for line in (_read(PROC_CGROUP) or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3 and (parts[1] == "" or "memory" in parts[1].split(",")):
            paths["v2" if parts[1] == "" else "v1"] = parts[2].strip().strip("/")
    bases = [(CGROUP_ROOT, paths.get("v2", "")), (os.path.join(CGROUP_ROOT, "unified"), paths.get("v2", "")),
             (os.path.join(CGROUP_ROOT, "memory"), paths.get("v1", ""))]
    dirs = []
    for base, rel in bases:
        parts = [p for p in rel.split("/") if p]
        dirs += [os.path.join(base, *parts[:n]) for n in range(len(parts), -1, -1)]
    return dirs


def cgroup_free_bytes() -> tuple[int, str] | None:
    """What this process's memory cgroup still lets it take, (limit - usage, the directory whose limit binds),
    the smallest over its cgroup and their ancestors, cgroup v2 (memory.max, memory.current) or v1
    (memory.limit_in_bytes, memory.usage_in_bytes); None where no limit is set or none can be read."""
    best = None
    for d in _cgroup_dirs():
        for limit_file, usage_file in _CGROUP_FILES:
            limit, usage = _read(os.path.join(d, limit_file)), _read(os.path.join(d, usage_file))
            if limit is None or usage is None or limit.strip() == "max":
                continue
            try:
                limit_b, usage_b = int(limit), int(usage)
            except ValueError:
                continue
            if limit_b >= _NO_LIMIT:
                continue
            free = max(limit_b - usage_b, 0)
            if best is None or free < best[0]:
                best = (free, f"the memory cgroup limit of {limit_b / 2**30:.1f} GiB, {usage_b / 2**30:.1f} GiB "
                              f"used ({os.path.join(d, limit_file)})")
    return best


def host_memory() -> tuple[int | None, str]:
    """(bytes of host memory this process may still take, where the figure comes from).

    Where a memory cgroup sets a limit, that limit less its usage: it is what the kernel enforces, and on the
    multi-GPU machines (Firecracker microVMs whose RAM is added as it is used) /proc/meminfo's MemTotal starts
    near 31 GiB of the 256-560 GiB the cgroup allows, so MemAvailable under-reports.  Without a limit,
    MemAvailable of /proc/meminfo.  (None, why) where neither can be read."""
    limited = cgroup_free_bytes()
    if limited is not None:
        return limited
    for line in (_read(MEMINFO) or "").splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024, "MemAvailable of /proc/meminfo (no memory cgroup limit is set)"
    return None, "neither a memory cgroup limit nor /proc/meminfo could be read"


def available_host_bytes() -> int | None:
    """Host memory this process may still take (``host_memory``'s figure), or None where it cannot be read."""
    return host_memory()[0]


def local_ranks_on_host() -> int:
    """Processes of this job on this host, from the launcher (torchrun/deepspeed: LOCAL_WORLD_SIZE; Open MPI:
    OMPI_COMM_WORLD_LOCAL_SIZE); 1 where none says."""
    for var in ("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE"):
        if os.environ.get(var, "").isdigit():
            return max(1, int(os.environ[var]))
    return 1


def host_bytes_needed(mode: str, num_layers: int, tokens: int, kv_heads: int, head_dim: int,
                      dtype: torch.dtype) -> int:
    """Host bytes an offload ``mode`` holds for ``tokens`` (batch x length): K/V, and with ``all`` dK/dV too."""
    per_kind = num_layers * tokens * kv_heads * head_dim * dtype.itemsize
    return per_kind * {"none": 0, "kv": 2, "all": 4}[mode]


def check_host_memory(nbytes: int, what: str, available: int | None = None,
                      local_ranks: int | None = None) -> None:
    """Refuses, with the figures, host memory that would not fit.  ``nbytes`` is one process's share; every
    process of the job on this host (``local_ranks``, default ``local_ranks_on_host()``) takes its own at the same
    time, so ``nbytes`` x ``local_ranks`` is compared with 90% of what is available (``available``, default
    ``host_memory()``: the cgroup limit less its usage, else MemAvailable).  Pipeline stages hold different layer
    counts: callers pass the largest stage's share, so that every rank reaches the same verdict."""
    local = local_ranks_on_host() if local_ranks is None else max(1, local_ranks)
    source = None
    if available is None:
        available = available_host_bytes()
        figure, source = host_memory()
        source = source if figure == available else None
    if available is None:
        return
    total = nbytes * local
    if total > 0.9 * available:
        share = (f" per process, {total / 2**30:.1f} GiB for the {local} processes on this host," if local > 1
                 else "")
        raise MemoryError(f"{what} needs {nbytes / 2**30:.1f} GiB of host memory{share} but "
                          f"{available / 2**30:.1f} GiB are available{f' ({source})' if source else ''} and at most "
                          "90% of it is used; use rollout.offload=kv (dK/dV stay on the GPU) instead of all, offload "
                          "fewer layers (rollout.offload_layers), a shorter document (data.max_doc_tokens), fewer "
                          "processes on this host, or a host with more memory")


class HostPool:
    """Host buffers for offloaded state, page-locked on CUDA machines and kept for reuse between rollouts.

    Page-locking tens of GiB takes seconds, so a training loop should not pay it per document.  Buffers are
    registered with cudaHostRegister instead of coming from PyTorch's pinned allocator, which rounds every request
    up to a power of two (up to 2x the host memory at these sizes).  A buffer comes back to the pool when its
    user is done (``give``); when no free buffer is large enough, smaller free ones are released first, so what
    the pool holds stays near the largest document's need.  A pool belongs to its user (a rollout); when it is
    collected (after every buffer came back: a ring keeps its pool alive) its buffers are unregistered, since memory
    freed while still registered makes a later registration of the same addresses fail.
    """

    def __init__(self):
        self._free: list[torch.Tensor] = []  # flat uint8 buffers, registered when pinned (mutated in place: the
        self._pinned: dict[int, bool] = {}  # finalizer holds these two)
        self.allocated = 0  # buffers allocated so far (tests check reuse)
        self._finalizer = weakref.finalize(self, _release_all, self._free, self._pinned)

    def take(self, nbytes: int, pinned: bool) -> torch.Tensor:
        fitting = [b for b in self._free if b.numel() >= nbytes and self._pinned[b.data_ptr()] == pinned]
        if fitting:
            buf = min(fitting, key=torch.Tensor.numel)
            self._remove(buf)
            return buf
        for small in [b for b in self._free if b.numel() < nbytes]:
            self._release(small)
        buf = torch.empty(nbytes, dtype=torch.uint8)
        if pinned:
            err = torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), nbytes, 0)
            if int(err) != 0:
                raise RuntimeError(f"could not page-lock {nbytes / 2**30:.1f} GiB of host memory for offloaded "
                                   f"K/V (cudaHostRegister error {int(err)}); shorten the document, offload less "
                                   "(rollout.offload=kv instead of all) or use a host with more memory")
        self._pinned[buf.data_ptr()] = pinned
        self.allocated += 1
        return buf

    @property
    def free_bytes(self) -> int:
        return sum(b.numel() for b in self._free)

    def give(self, buffers: list[torch.Tensor]) -> None:
        self._free.extend(buffers)

    def _remove(self, buf: torch.Tensor) -> None:
        self._free[:] = [b for b in self._free if b is not buf]

    def _release(self, buf: torch.Tensor) -> None:
        self._remove(buf)
        _unregister(buf, self._pinned)

    def close(self) -> None:
        """Releases every free buffer now (the pool stays usable)."""
        _release_all(self._free, self._pinned)


def _unregister(buf: torch.Tensor, pinned: dict[int, bool]) -> None:
    if pinned.pop(buf.data_ptr(), False):
        torch.cuda.cudart().cudaHostUnregister(buf.data_ptr())


def _release_all(free: list[torch.Tensor], pinned: dict[int, bool]) -> None:
    for buf in free:
        _unregister(buf, pinned)
    free.clear()



def _give_back(pool: HostPool, buffers: list[torch.Tensor], stream) -> None:
    if stream is not None:
        stream.synchronize()  # no copy may still be writing into a buffer the next user gets
    pool.give(buffers)


def _copy_rows(dst: torch.Tensor, src: torch.Tensor, lo: int, hi: int) -> None:
    """dst[:, lo:hi] = src[:, lo:hi], one batch row at a time: each row's range is contiguous, so the copy goes
    straight between page-locked host memory and the device, asynchronously (a strided multi-row slice would go
    through blocking pageable temporaries)."""
    for b in range(dst.shape[0]):
        dst[b, lo:hi].copy_(src[b, lo:hi], non_blocking=True)


class LayerRing:
    """Per-layer (B, T, heads, D) tensors on the host and ``slots`` device buffers holding one layer's [0, n) each.

    ``acquire`` returns the device slot holding a layer's prefix (copying it in if needed, waiting for a copy
    already issued); ``prefetch`` issues that copy early on the side stream; ``write`` copies a slot range back.
    The most recently acquired slot is never the victim of a copy-in, and every copy-in waits (on the device)
    for all work issued before it, so a slot is not overwritten while a kernel may still read it.
    """

    def __init__(self, num_layers: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                 slots: int = 2, zero: bool = False, stream: torch.cuda.Stream | None = None,
                 pool: HostPool | None = None):
        if slots < 2:
            raise ValueError(f"a layer ring needs at least 2 slots (one in use, one filling); got {slots}")
        self.device, self.stream = device, stream
        numel = math.prod(shape)
        pool = HostPool() if pool is None else pool
        flats = [pool.take(numel * dtype.itemsize, pinned=device.type == "cuda") for _ in range(num_layers)]
        self.host = [f[:numel * dtype.itemsize].view(dtype).view(shape) for f in flats]
        self._host_bytes = num_layers * numel * dtype.itemsize
        if zero:
            for t in self.host:
                t.zero_()
        # the buffers return to the pool when the ring is closed or collected, after its copies finished
        self.release = weakref.finalize(self, _give_back, pool, flats, stream)
        self.slots = [torch.empty(shape, dtype=dtype, device=device) for _ in range(slots)]
        self._layer: list[int | None] = [None] * slots
        self._valid = [0] * slots  # slot i holds layer _layer[i] on [0, _valid[i])
        self._ready: list[object] = [None] * slots
        self._order = list(range(slots))  # least recently used first
        self._storages = {s.untyped_storage().data_ptr(): i for i, s in enumerate(self.slots)}

    @property
    def host_bytes(self) -> int:
        return self._host_bytes

    @property
    def device_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.slots)

    def slot_of(self, tensor: torch.Tensor) -> int | None:
        """Index of the slot ``tensor`` is a view of, or None."""
        return self._storages.get(tensor.untyped_storage().data_ptr())

    def layer_in(self, slot: int) -> tuple[int | None, int]:
        return self._layer[slot], self._valid[slot]

    def _touch(self, slot: int) -> None:
        self._order.remove(slot)
        self._order.append(slot)

    def _find(self, layer: int, n: int) -> int | None:
        for i, (held, valid) in enumerate(zip(self._layer, self._valid)):
            if held == layer and valid >= n:
                return i
        return None

    def _on_side_stream(self, copy) -> object:
        """Runs ``copy`` after all work issued so far on the current stream; returns its completion event."""
        if self.stream is None:
            copy()
            return None
        issued = torch.cuda.current_stream(self.device).record_event()
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(issued)
            copy()
            return self.stream.record_event()

    def prefetch(self, layer: int, n: int) -> int:
        """Makes a slot hold ``layer`` on [0, n) (copy issued, maybe not finished); returns the slot."""
        slot = self._find(layer, n)
        if slot is not None:
            return slot
        slot = self._order[0]
        dst, src = self.slots[slot], self.host[layer]
        if n > 0:
            self._ready[slot] = self._on_side_stream(lambda: _copy_rows(dst, src, 0, n))
        # n == 0: nothing to copy; an event still pending for this slot (its last write-back) stays to be waited
        self._layer[slot], self._valid[slot] = layer, n
        self._touch(slot)
        self._order.insert(0, self._order.pop())  # a prefetched slot is not "in use" yet
        return slot

    def acquire(self, layer: int, n: int) -> tuple[int, torch.Tensor]:
        """The slot holding ``layer`` on [0, n), ready for kernels issued on the current stream from now on."""
        slot = self.prefetch(layer, n)
        if self._ready[slot] is not None:
            torch.cuda.current_stream(self.device).wait_event(self._ready[slot])
            self._ready[slot] = None
        self._touch(slot)
        return slot, self.slots[slot]

    def extend(self, slot: int, n: int) -> None:
        """Kernels on the current stream wrote [valid, n) of the slot (a chunk's fresh K/V)."""
        self._valid[slot] = max(self._valid[slot], n)

    def truncate(self, slot: int, n: int) -> None:
        """Only [0, n) of the slot is to be trusted from now on (the rest was consumed)."""
        self._valid[slot] = min(self._valid[slot], n)

    def write(self, slot: int, lo: int, hi: int) -> None:
        """Copies the slot's [lo, hi) to its layer's host tensor, after the work issued so far."""
        if hi <= lo:
            return
        dst, src = self.host[self._layer[slot]], self.slots[slot]
        # the next acquire of this slot waits for the copy to have read it (a resident dK/dV slot is added into
        # by the next chunk)
        self._ready[slot] = self._on_side_stream(lambda: _copy_rows(dst, src, lo, hi))

    def close(self) -> None:
        """Waits for the ring's copies and returns its host buffers to the pool (the ring is unusable after)."""
        self.release()
        self.host = []


class OffloadedKVState(KVState):
    """``KVState`` whose K/V (``mode="kv"``), or K/V and dK/dV (``mode="all"``), live in host memory.

    Device memory no longer grows with the document for what is offloaded: it holds ``slots`` layers' worth of
    buffers per offloaded tensor kind (full document length each), the rest stays as in ``KVState``.  ``layers``
    > 0 offloads only the state's first ``layers`` layers; the later ones stay on the device (``keys``/``values``
    hold None for the offloaded ones).  Host buffers come from ``pool`` (the owner's, so that a training loop
    reuses them from document to document; None: a pool of the state's own)."""

    def __init__(self, num_layers: int, batch: int, kv_heads: int, length: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, layer_offset: int = 0, mode: str = "kv",
                 slots: int = 2, layers: int = 0, pool: HostPool | None = None):
        if mode not in ("kv", "all"):
            raise ValueError(f"offload mode {mode!r} is not one of {OFFLOAD_MODES[1:]}")
        if layers < 0:
            raise ValueError(f"layers to offload must be >= 0 (0: all), got {layers}")
        self.offloaded = offloaded_layers(num_layers, layers)
        shape = (batch, length, kv_heads, head_dim)
        resident = [None] * self.offloaded + [torch.empty(shape, dtype=dtype, device=device)
                                              for _ in range(num_layers - self.offloaded)]
        super().__init__(keys=resident, values=[t if t is None else torch.empty_like(t) for t in resident],
                         layer_offset=layer_offset, length=length)
        self.mode = mode
        self.pool = HostPool() if pool is None else pool
        self._shape, self._dtype, self._device = shape, dtype, device
        # this state's own bytes only: the trainer counted every process of the host before any allocated
        # (train/planner.check_host_fits); by now other processes' buffers may be taken already, so they are
        # missing from what is available and counting their shares again would refuse a run that fits
        available = available_host_bytes()
        check_host_memory(host_bytes_needed(mode, self.offloaded, batch * length, kv_heads, head_dim, dtype),
                          f"rollout.offload={mode} for {batch} x {length} tokens and {self.offloaded} layers",
                          None if available is None else available + self.pool.free_bytes, local_ranks=1)
        stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.rings = {kind: LayerRing(self.offloaded, self._shape, dtype, device, slots=slots, stream=stream,
                                      pool=self.pool) for kind in ("k", "v")}
        self.grad_rings: dict[str, LayerRing] = {}
        self._grad_slot: dict[tuple[int, str], int] = {}
        self.packed = 0  # saved tensors replaced by a token during recompute (tests check it is not 0)

    # sizes -------------------------------------------------------------------------------------------------
    @property
    def _all_rings(self) -> list[LayerRing]:
        return [*self.rings.values(), *self.grad_rings.values()]

    @property
    def nbytes(self) -> int:
        """Device bytes held for the carried state: what ``KVState`` counts (kept attention outputs, dK/dV on
        the device; its K/V lists are empty here) plus the slots."""
        return super().nbytes + sum(r.device_bytes for r in self._all_rings)

    @property
    def host_bytes(self) -> int:
        return sum(r.host_bytes for r in self._all_rings)

    def allocate_grads(self) -> None:
        on_host = self.offloaded if self.mode == "all" else 0  # layers whose dK/dV live in host rings
        self.dkeys = [None] * on_host + [torch.zeros(self._shape, dtype=self._dtype, device=self._device)
                                         for _ in range(self.num_layers - on_host)]
        self.dvalues = [t if t is None else torch.zeros_like(t) for t in self.dkeys]
        if on_host:
            stream = self.rings["k"].stream
            self.grad_rings = {kind: LayerRing(on_host, self._shape, self._dtype, self._device,
                                               slots=len(self.rings[kind].slots), zero=True, stream=stream,
                                               pool=self.pool) for kind in ("k", "v")}

    def _layer_tensor(self, kind: str, layer: int) -> torch.Tensor:
        """Offloaded layers: the host tensor (the slots only ever hold copies of it, written back as they change)."""
        if layer < self.offloaded:
            if kind in ("k", "v"):
                return self.rings[kind].host[layer]
            if self.grad_rings:
                return self.grad_rings[kind[1]].host[layer]
        return super()._layer_tensor(kind, layer)

    def _settle(self) -> None:
        for ring in self._all_rings:
            if ring.stream is not None:
                ring.stream.synchronize()

    # forward -----------------------------------------------------------------------------------------------
    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        layer = layer_idx - self.layer_offset
        if layer >= self.offloaded:
            return super().update(key, value, layer_idx, *args, **kwargs)
        s, e = self.start, self.start + key.shape[2]
        last = layer == self.offloaded - 1  # the last layer of the rings
        out, mismatch, seen = [], [], []
        for kind, fresh in (("k", key), ("v", value)):
            ring = self.rings[kind]
            if self.phase == "fill":
                slot, buf = ring.acquire(layer, s)
                buf[:, s:e].copy_(fresh.transpose(1, 2))
                seen.append(buf[:, s:e])
                ring.extend(slot, e)
                ring.write(slot, s, e)
                # the next layer's prefix now; after the last layer, layer 0's for the next chunk ([0, e))
                ring.prefetch(0 if last else layer + 1, e)
                out.append(buf[:, :e].transpose(1, 2))
                continue
            stored = e <= self.filled  # else the chunk is the last one, never stored by the fill pass
            slot, buf = ring.acquire(layer, e if stored else s)
            seen.append((fresh.detach().transpose(1, 2), buf[:, s:e] if stored else None))
            if self.verify_recompute and stored:
                mismatch.append((fresh.detach().transpose(1, 2) - buf[:, s:e]).abs().max().item())
            out.append(_CarriedKV.apply(fresh, buf, self, layer, kind, s, self.filled))
            if not stored:
                ring.extend(slot, e)
                ring.write(slot, s, e)  # backward stages this layer again and needs the chunk's part
            if not last:
                ring.prefetch(layer + 1, e)
            elif kind in self.grad_rings:
                self.grad_rings[kind].prefetch(layer, e)  # backward starts with the last layer
        if self.phase == "fill":
            self.observe_kv(layer, s, e, seen[0], seen[1])
        else:
            self.observe_kv(layer, s, e, seen[0][0], seen[1][0], seen[0][1], seen[1][1])
        if mismatch:  # one entry per chunk and layer, as KVState records it
            self.recompute_mismatch.append(max(mismatch))
        if layer == self.num_layers - 1 and self.phase == "fill":
            self.filled = max(self.filled, e)
        return out[0], out[1]

    # backward ----------------------------------------------------------------------------------------------
    def grad_buffer(self, layer: int, kind: str, end: int) -> torch.Tensor:
        if not self.grad_rings or layer >= self.offloaded:
            return super().grad_buffer(layer, kind, end)
        slot, buf = self.grad_rings[kind].acquire(layer, end)
        self._grad_slot[(layer, kind)] = slot
        return buf

    def grad_accumulated(self, layer: int, kind: str, start: int, end: int) -> None:
        if not self.grad_rings or layer >= self.offloaded:
            return
        ring, slot = self.grad_rings[kind], self._grad_slot.pop((layer, kind))
        ring.write(slot, 0, start)
        ring.truncate(slot, start)  # [start, end) was handed to this chunk's own K/V
        if layer > 0:
            ring.prefetch(layer - 1, end)  # the same chunk's backward reaches layer - 1 next

    def autograd_hooks(self):
        """Saved-tensor hooks for the recompute pass: a saved view of a K/V slot becomes (ring, layer, view
        geometry) and is staged again when backward unpacks it."""
        def pack(t: torch.Tensor):
            for kind, ring in self.rings.items():
                slot = ring.slot_of(t)
                if slot is not None:
                    layer, valid = ring.layer_in(slot)
                    self.packed += 1
                    return (kind, layer, valid, t.size(), t.stride(), t.storage_offset())
            return t

        def unpack(packed):
            if isinstance(packed, torch.Tensor):
                return packed
            kind, layer, valid, size, stride, offset = packed
            ring = self.rings[kind]
            _, buf = ring.acquire(layer, valid)
            if layer > 0:
                ring.prefetch(layer - 1, valid)
            return buf.as_strided(size, stride, offset)

        return torch.autograd.graph.saved_tensors_hooks(pack, unpack)

    def close(self) -> None:
        for ring in self._all_rings:
            ring.close()
