"""A nested state (dicts, lists, tuples of tensors, numbers, strings, None) as Zarr v3 arrays plus a JSON skeleton.

``split(state)`` returns the skeleton (JSON-able; every tensor replaced by ``{"T": name}``) and the tensors by
array name; ``join(skeleton, arrays)`` rebuilds the state.  Leaves JSON cannot hold (DeepSpeed's loss scaler,
its ``fragment_address`` tuples, enums) are pickled into a uint8 array (``{"P": name}``) and so checksummed like
every array.  Array names follow the keys ("optimizer/state/0/exp_avg"), so a store reads like the state.

Dicts with string keys are ``{"M": [[key, value], ...]}`` (their order is kept), others ``{"D": [[key, value],
...]}``, lists ``{"L": [...]}``, tuples ``{"U": [...]}``.  Arrays hold a tensor's bytes uncompressed in chunks of
about ``CHUNK_BYTES`` along the first axis; bfloat16, which Zarr v3 lacks, is stored as uint16 words with
``torch_dtype: bfloat16`` in the array's attributes (every array records its torch dtype).  Each array's checksum
is xxh3-64 of its C-order bytes.
"""
from __future__ import annotations

import math
import pickle
import re
from collections import OrderedDict

import numpy as np
import torch
import xxhash

CHUNK_BYTES = 64 << 20
_STORED_AS = {torch.bfloat16: torch.int16}
_SAFE = re.compile(r"[^A-Za-z0-9._-]")


def split(state, prefix: str = "") -> tuple[object, dict[str, torch.Tensor]]:
    """(skeleton, {array name: tensor}) for a nested state; pickled leaves are uint8 tensors."""
    arrays: dict[str, torch.Tensor] = {}

    def name_for(path: list[str]) -> str:
        name = "/".join(_SAFE.sub("_", p) or "_" for p in [prefix, *path] if p != "")
        base, n = name, 1
        while name in arrays:
            name, n = f"{base}~{n}", n + 1
        return name

    def enc(x, path):
        if torch.is_tensor(x):
            name = name_for(path)
            arrays[name] = x.detach()
            return {"T": name}
        if x is None or isinstance(x, (bool, str)):
            return x
        if isinstance(x, int) and type(x) is int:
            return x
        if isinstance(x, float) and type(x) is float:
            return x if math.isfinite(x) else {"F": repr(x)}
        if isinstance(x, torch.dtype):
            return {"dtype": str(x).replace("torch.", "")}
        if type(x) in (dict, OrderedDict):
            if all(type(k) is str for k in x):  # pairs, not a JSON object: the order is kept (DeepSpeed needs it)
                return {"M": [[k, enc(v, path + [k])] for k, v in x.items()]}
            return {"D": [[enc(k, path + ["key"]), enc(v, path + [str(k)])] for k, v in x.items()]}
        if type(x) in (list, tuple, torch.Size):
            return {"L" if type(x) is list else "U": [enc(v, path + [str(i)]) for i, v in enumerate(x)]}
        name = name_for(path)
        arrays[name] = torch.frombuffer(bytearray(pickle.dumps(x, protocol=4)), dtype=torch.uint8)
        return {"P": name}

    return enc(state, []), arrays


def join(skeleton, arrays: dict[str, torch.Tensor]):
    """The state ``split`` took apart."""
    def dec(x):
        if not isinstance(x, dict):
            return x
        (kind, v), = x.items()
        if kind == "T":
            return arrays[v]
        if kind == "P":
            return pickle.loads(arrays[v].numpy().tobytes())
        if kind == "F":
            return float(v)
        if kind == "dtype":
            return getattr(torch, v)
        if kind == "M":
            return {k: dec(e) for k, e in v}
        if kind == "D":
            return {_hashable(dec(k)): dec(e) for k, e in v}
        return [dec(e) for e in v] if kind == "L" else tuple(dec(e) for e in v)
    return dec(skeleton)


def _hashable(k):
    return tuple(k) if isinstance(k, list) else k


def member(skeleton, keys: str):
    """The skeleton of a string-keyed dict restricted to ``keys`` (comma-separated), for reading a part."""
    wanted = keys.split(",")
    return {"M": [[k, e] for k, e in skeleton["M"] if k in wanted]}


def array_names(skeleton) -> list[str]:
    """The array names a skeleton refers to."""
    out: list[str] = []

    def walk(x):
        if isinstance(x, dict):
            (kind, v), = x.items()
            if kind in ("T", "P"):
                out.append(v)
            elif kind == "M":
                for _, e in v:
                    walk(e)
            elif kind == "D":
                for k, e in v:
                    walk(k)
                    walk(e)
            elif kind in ("L", "U"):
                for e in v:
                    walk(e)
    walk(skeleton)
    return out


# bytes of tensors ------------------------------------------------------------------------------------------------
def to_numpy(t: torch.Tensor) -> np.ndarray:
    """The tensor's bytes as a C-order numpy array (bfloat16 as uint16 words)."""
    t = t.detach().cpu().contiguous()
    stored = _STORED_AS.get(t.dtype)
    a = (t.view(stored) if stored is not None else t).numpy()
    return a.view(np.uint16) if t.dtype == torch.bfloat16 else a


def from_numpy(a: np.ndarray, torch_dtype: str) -> torch.Tensor:
    dtype = getattr(torch, torch_dtype)
    if dtype == torch.bfloat16:
        return torch.from_numpy(np.require(a, requirements="C").view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.require(a, requirements="C"))


def checksum(a: np.ndarray) -> str:
    """xxh3-64 of an array's C-order bytes, as 16 hex digits."""
    return xxhash.xxh3_64_hexdigest(memoryview(np.require(a, requirements="C").reshape(-1).view(np.uint8)))


def dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def chunk_shape(shape: tuple[int, ...], itemsize: int, axis: int = 0, target: int = CHUNK_BYTES) -> tuple[int, ...]:
    """Chunks of about ``target`` bytes, cut along ``axis`` only (whole along the others)."""
    if not shape:
        return ()
    other = max(1, math.prod(s for i, s in enumerate(shape) if i != axis)) * itemsize
    rows = max(1, min(max(shape[axis], 1), target // other))
    return tuple(rows if i == axis else max(s, 1) for i, s in enumerate(shape))
