"""Digest records: what a rank tells the coordinator about its state, in a versioned binary layout.

A ``Digest`` is one tensor's fingerprint at one place of a run: a chunk's state update in one layer (the K and V
the chunk appended, ``layer.L.key``/``layer.L.value`` as ``CarriedState.state_dict`` names them), a parameter or
an optimizer tensor after (or before) an optimizer step, or a hidden-state tensor sent or received between
pipeline stages.  Large tensors are reduced where they live (``reduce``): only the fingerprint crosses to the host.

Hash functions (``Digest.hash_alg``):

* ``HASH_XXH64`` (1): ``xxhash.xxh64_intdigest`` (seed 0) of the tensor's bytes, C-contiguous, in its own dtype
  (the canonical layout of ``CarriedState.state_dict``: (B, positions, kv_heads, head_dim) for K/V).  Used for
  tensors on the CPU.  Not the snapshot manifests' function: those use XXH3-64 (``xxhash.xxh3_64``).
* ``HASH_BLOCK64`` (2): for tensors on a GPU, ``xxh64`` of a block checksum computed on the GPU
  (``block_checksum``): the bytes (zero-padded to whole 32-bit words) are read as signed 32-bit little-endian
  words w_0..w_{n-1}, split into ``BLOCKS`` blocks of ``ceil(n / BLOCKS)`` words (the last zero-padded), and block
  b's checksum is the exact int64 sum over j of wrap32(w_{b,j} * (2j + 1)), where wrap32 is two's-complement
  32-bit wrap-around; the record's hash is ``xxh64`` of those ``BLOCKS`` little-endian int64 values.  A single
  flipped bit changes one product by an odd multiple of a power of two below 2^32, which is never 0 mod 2^32, so
  that block's sum changes: a one-bit fault is always seen.  It is not xxh64 of the bytes and matches no
  manifest.  ``block_checksum`` gives the same values on the CPU, so the two are comparable when needed.

Top-K: the ``k`` entries of largest magnitude of the tensor (a state update's K/V, a parameter's update), as flat
indices (int64) and values (float64), ``torch.topk`` order (descending magnitude).

Binary layout, version 1 (little-endian), one record:

    offset size  field
    0      4     magic b"RDDG"
    4      1     layout version (1)
    5      1     kind (``KINDS``)
    6      1     hash_alg (0 none, 1 xxh64 of bytes, 2 xxh64 of the GPU block checksum)
    7      1     phase (0 fill, 1 recompute, 2 step, 3 replay)
    8      4     global rank (int32)
    12     4     data-parallel rank (int32)
    16     4     pipeline stage (int32)
    20     8     step (int64; 1-based: the step whose update this is, as logs and metrics count)
    28     8     document id (int64; -1 for step-level records)
    36     4     chunk index (int32; -1 for step-level records)
    40     4     layer (int32; global decoder layer, -1 where none)
    44     8     monotonic timestamp (uint64, ``time.monotonic_ns`` of the sending process)
    52     8     hash (uint64)
    60     2     k: top-K entries (uint16)
    62     2     name length in bytes (uint16)
    64     n     name (UTF-8): the tensor's name (``layer.3.key``, a parameter's name, ``optimizer.<param>.exp_avg``)
    ...    8k    top-K indices (int64)
    ...    8k    top-K values (float64)
    ...    8     xxh64 of every byte of the record before this field (uint64): a record damaged in transit is refused

Records sort by (step, document, chunk, stage, layer, rank, kind, name) (``Digest.order``): the coordinator's
order, the same on every rank.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np
import torch
import xxhash

MAGIC = b"RDDG"
LAYOUT_VERSION = 1
HEADER = struct.Struct("<4sBBBBiiiqqiiQQHH")
TRAILER = struct.Struct("<Q")

# kinds
STATE = 1  # a chunk's state update (K or V of one layer) as the fill pass wrote it
RECOMPUTE = 2  # the same update recomputed by the backward pass
STORED = 3  # the fill pass's update as the state holds it when the backward pass reaches the chunk
PARAM = 4  # a parameter after the optimizer step
PARAM_BEFORE = 5  # a parameter just before the next optimizer step (at rest since the last one)
OPTIM = 6  # an optimizer tensor after the step (fp32 master, exp_avg, ...; this rank's partition under ZeRO 1/2)
OPTIM_BEFORE = 7  # the same just before the next optimizer step
UPDATE = 8  # top-K of a parameter's update (hash: of the parameter after the step)
SENT = 9  # hidden states (or their gradient) a pipeline stage sent
RECEIVED = 10  # what the next (or previous) stage received
MISMATCH = 11  # a rank's own check failed (name: what; hash: the observed value); everyone stops on it
STEP_END = 12  # a rank's records of this step are complete
KINDS = {STATE: "state", RECOMPUTE: "recompute", STORED: "stored", PARAM: "param", PARAM_BEFORE: "param_before",
         OPTIM: "optim", OPTIM_BEFORE: "optim_before", UPDATE: "update", SENT: "sent", RECEIVED: "received",
         MISMATCH: "mismatch", STEP_END: "step_end"}

HASH_NONE, HASH_XXH64, HASH_BLOCK64 = 0, 1, 2
PHASES = ("fill", "recompute", "step", "replay")
BLOCKS = 64


class DigestFormatError(ValueError):
    """Bytes that are not a valid digest record (wrong magic or version, truncated, damaged)."""


@dataclass
class Digest:
    kind: int
    rank: int
    step: int
    name: str = ""
    dp_rank: int = 0
    stage: int = 0
    document: int = -1
    chunk: int = -1
    layer: int = -1
    phase: int = 2
    hash: int = 0
    hash_alg: int = HASH_NONE
    t_ns: int = 0
    indices: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    values: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))

    @property
    def order(self) -> tuple:
        return (self.step, self.document, self.chunk, self.stage, self.layer, self.rank, self.kind, self.name)

    @property
    def kind_name(self) -> str:
        return KINDS.get(self.kind, str(self.kind))

    def where(self) -> str:
        """Rank, step, chunk, stage, layer and tensor, for messages."""
        parts = [f"rank {self.rank}", f"step {self.step}"]
        if self.document >= 0:
            parts.append(f"document {self.document}")
        if self.chunk >= 0:
            parts.append(f"chunk {self.chunk}")
        parts.append(f"stage {self.stage}")
        if self.layer >= 0:
            parts.append(f"layer {self.layer}")
        parts.append(f"tensor {self.name}")
        return ", ".join(parts)

    def pack(self) -> bytes:
        name = self.name.encode("utf-8")
        k = len(self.indices)
        head = HEADER.pack(MAGIC, LAYOUT_VERSION, self.kind, self.hash_alg, self.phase, self.rank, self.dp_rank,
                           self.stage, self.step, self.document, self.chunk, self.layer, self.t_ns,
                           self.hash & 0xFFFFFFFFFFFFFFFF, k, len(name))
        body = (head + name + np.ascontiguousarray(self.indices, "<i8").tobytes()
                + np.ascontiguousarray(self.values, "<f8").tobytes())
        return body + TRAILER.pack(xxhash.xxh64_intdigest(body))


def unpack_one(buf: bytes | memoryview, offset: int = 0) -> tuple[Digest, int]:
    """One record starting at ``offset``; returns it and the offset after it."""
    buf = memoryview(buf)
    if len(buf) - offset < HEADER.size:
        raise DigestFormatError(f"truncated digest record at byte {offset}")
    (magic, version, kind, alg, phase, rank, dp_rank, stage, step, doc, chunk, layer, t_ns, h, k,
     nlen) = HEADER.unpack_from(buf, offset)
    if magic != MAGIC:
        raise DigestFormatError(f"not a digest record at byte {offset} (magic {bytes(magic)!r})")
    if version != LAYOUT_VERSION:
        raise DigestFormatError(f"digest layout version {version} at byte {offset}; this code reads "
                                f"version {LAYOUT_VERSION}")
    end = offset + HEADER.size + nlen + 16 * k
    if len(buf) < end + TRAILER.size:
        raise DigestFormatError(f"truncated digest record at byte {offset}")
    (check,) = TRAILER.unpack_from(buf, end)
    if xxhash.xxh64_intdigest(buf[offset:end]) != check:
        raise DigestFormatError(f"digest record at byte {offset} is damaged (its xxh64 does not match)")
    p = offset + HEADER.size
    name = bytes(buf[p:p + nlen]).decode("utf-8")
    p += nlen
    indices = np.frombuffer(buf[p:p + 8 * k], "<i8").copy()
    values = np.frombuffer(buf[p + 8 * k:end], "<f8").copy()
    return Digest(kind, rank, step, name, dp_rank, stage, doc, chunk, layer, phase, h, alg, t_ns, indices,
                  values), end + TRAILER.size


def pack_all(records) -> bytes:
    return b"".join(r.pack() for r in records)


def unpack_all(buf: bytes | memoryview) -> list[Digest]:
    out, offset = [], 0
    while offset < len(buf):
        record, offset = unpack_one(buf, offset)
        out.append(record)
    return out


# ------------------------------------------------------------------------------------------- reductions
def _words(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as signed 32-bit words (zero-padded to a whole word); no copy when already whole and
    word-aligned (a view into a flat buffer after a parameter of an odd number of 2-byte elements is not)."""
    raw = t.detach().contiguous().reshape(-1).view(torch.uint8)
    pad = (-raw.numel()) % 4
    if pad or raw.storage_offset() % 4:
        raw = torch.cat([raw, raw.new_zeros(pad)])
    return raw.view(torch.int32)


def block_checksum(t: torch.Tensor, blocks: int = BLOCKS) -> torch.Tensor:
    """(``blocks``,) int64 on the tensor's device: see the module docstring (``HASH_BLOCK64``).  The products stay
    32-bit (one int32 temporary the size of the tensor) and only the sums widen: a step hashes every parameter and
    optimizer moment twice, so memory traffic is what this costs."""
    w = _words(t)
    per = max(1, -(-w.numel() // blocks))
    if w.numel() != per * blocks:
        w = torch.cat([w, w.new_zeros(per * blocks - w.numel())])
    weights = torch.arange(1, 2 * per, 2, dtype=torch.int32, device=w.device)
    return (w.view(blocks, per) * weights).sum(dim=1, dtype=torch.int64)


def topk(t: torch.Tensor, k: int, group: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices and values (float64) of the ``k`` entries of largest magnitude, on the tensor's device.

    Large tensors go in two stages, exact up to ties: the largest magnitude of each group of ``group`` entries,
    the ``k`` groups with the largest of those (every one of the top ``k`` entries lies in one of them: a group
    holding one has a maximum at least the k-th largest entry, and at most k groups do), then the top ``k`` of
    those groups' entries.  One pass over the tensor instead of a selection over all of it."""
    flat = t.detach().reshape(-1)
    k = min(k, flat.numel())
    if k == 0:
        return flat.new_zeros(0, dtype=torch.int64), flat.new_zeros(0, dtype=torch.float64)
    n = flat.numel()
    if n <= 64 * group:
        idx = torch.topk(flat.float().abs(), k, sorted=True).indices
        return idx, flat[idx].to(torch.float64)
    whole = n // group * group
    mags = flat[:whole].view(-1, group).abs().amax(dim=1).float()
    groups = torch.topk(mags, min(k, mags.numel()), sorted=False).indices
    cand = (groups[:, None] * group + torch.arange(group, device=flat.device)).reshape(-1)
    if whole < n:  # the tail that fills no whole group: always a candidate
        cand = torch.cat([cand, torch.arange(whole, n, device=flat.device)])
    pick = torch.topk(flat[cand].float().abs(), k, sorted=True).indices
    idx = cand[pick]
    return idx, flat[idx].to(torch.float64)


class Reduction:
    """A tensor's fingerprint, reduced where the tensor lives; ``finish`` (host side, after the device is done)
    gives the hash and the top-K as host values."""

    __slots__ = ("alg", "payload", "hash", "idx", "vals")

    def __init__(self, t: torch.Tensor, k: int = 0):
        self.hash = None
        if t.device.type == "cpu":  # hashed now: nothing to wait for
            self.alg, self.payload = HASH_XXH64, None
            self.hash = xxhash.xxh64_intdigest(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
        else:
            self.alg, self.payload = HASH_BLOCK64, block_checksum(t)
        self.idx, self.vals = topk(t, k) if k else (None, None)

    def to_host(self) -> None:
        """Starts the copies of the small results to the host (non-blocking on a GPU)."""
        if self.alg == HASH_BLOCK64:
            self.payload = self.payload.to("cpu", non_blocking=True)
        if self.idx is not None and self.idx.device.type != "cpu":
            self.idx, self.vals = self.idx.to("cpu", non_blocking=True), self.vals.to("cpu", non_blocking=True)

    def finish(self) -> tuple[int, int, np.ndarray, np.ndarray]:
        """(hash_alg, hash, indices, values); call once the device copies are complete."""
        h = self.hash
        if h is None:
            h = xxhash.xxh64_intdigest(self.payload.reshape(-1).view(torch.uint8).numpy())
        if self.idx is None:
            return self.alg, h, np.zeros(0, np.int64), np.zeros(0, np.float64)
        return self.alg, h, self.idx.numpy().astype(np.int64), self.vals.numpy().astype(np.float64)


def tensor_hash(t: torch.Tensor) -> tuple[int, int]:
    """(hash_alg, hash) of one tensor, synchronously (see the module docstring for which function)."""
    r = Reduction(t)
    r.to_host()
    if t.device.type == "cuda":
        torch.cuda.current_stream(t.device).synchronize()
    alg, h, _, _ = r.finish()
    return alg, h
