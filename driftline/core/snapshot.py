"""Compact binary form of detector snapshots: a small JSON header plus raw numpy arrays.

Snapshots (:meth:`~driftline.core.slices.SliceDetectors.snapshot` and the banks and counts in
it) are JSON-ready scalars, lists and dicts with numpy arrays at the leaves. :func:`pack` writes
the structure as JSON with each array replaced by ``{"__nd__": i}`` and appends the arrays'
bytes; :func:`unpack` reverses it. Float lists in JSON cost ~20 bytes and a float parse per
number; here an array costs its bytes and one ``frombuffer``. Layout, little-endian::

    b"DLS" | version (u8) | index length (u32) | doc length (u32) | index | doc | array bytes…

    index = [[dtype, shape], …] (JSON; the arrays in order, unpadded), doc = the JSON structure

>>> import numpy as np
>>> blob = pack({"n": 3, "s": np.array([0.5, 0.0]), "tags": ("a", None)})
>>> doc = unpack(blob)
>>> doc["n"], doc["s"].tolist(), doc["tags"]
(3, [0.5, 0.0], ['a', None])
>>> plain({"s": np.array([1.0, np.nan])})
{'s': [1.0, None]}
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import numpy as np

MAGIC = b"DLS"
VERSION = 1
_HEAD = struct.Struct("<3sBII")
_REF = "__nd__"


def is_packed(blob: bytes) -> bool:
    """True for :func:`pack` output (False for, e.g., a legacy JSON record)."""
    return blob[:3] == MAGIC


def pack(doc: Any) -> bytes:
    """``doc`` (dicts, lists, tuples, JSON scalars, numpy arrays) as bytes."""
    arrays: list[np.ndarray] = []

    def leaf(x: Any) -> Any:  # json calls this for what it cannot encode itself
        if isinstance(x, np.ndarray):
            arrays.append(np.ascontiguousarray(x))
            return {_REF: len(arrays) - 1}
        if isinstance(x, np.generic):
            return x.item()
        raise TypeError(f"cannot pack {type(x).__name__}")

    body = json.dumps(doc, default=leaf, separators=(",", ":")).encode()
    index = json.dumps([[a.dtype.str, a.shape] for a in arrays], separators=(",", ":")).encode()
    return b"".join([_HEAD.pack(MAGIC, VERSION, len(index), len(body)), index, body,
                     *(a.tobytes() for a in arrays)])


def unpack(blob: bytes) -> Any:
    """The document :func:`pack` wrote; arrays come back writable, with their dtype."""
    magic, version, n_index, n_body = _HEAD.unpack_from(blob)
    if magic != MAGIC or version != VERSION:
        raise ValueError("not a packed snapshot")
    at = _HEAD.size
    index = json.loads(blob[at : at + n_index])
    body = blob[at + n_index : at + n_index + n_body]
    at += n_index + n_body
    arrays: list[np.ndarray] = []
    for dtype, shape in index:
        dt = np.dtype(dtype)
        count = math.prod(shape)
        arrays.append(np.frombuffer(blob, dt, count, at).reshape(shape).copy())
        at += count * dt.itemsize
    if at != len(blob):
        raise ValueError("packed snapshot has the wrong length")

    def hook(d: dict[str, Any]) -> Any:
        return arrays[d[_REF]] if len(d) == 1 and _REF in d else d

    return json.loads(body, object_hook=hook)


def plain(doc: Any) -> Any:
    """``doc`` with arrays as lists and NaN as None: JSON-ready, and comparable with ``==``."""
    if isinstance(doc, np.ndarray):
        return plain(doc.tolist())
    if isinstance(doc, dict):
        return {k: plain(v) for k, v in doc.items()}
    if isinstance(doc, list | tuple):
        return [plain(v) for v in doc]
    if isinstance(doc, float) and math.isnan(doc):
        return None
    if isinstance(doc, np.generic):
        return plain(doc.item())
    return doc
