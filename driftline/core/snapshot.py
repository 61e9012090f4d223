"""Compact binary form of detector snapshots: a small JSON header plus raw numpy arrays.

Snapshots (:meth:`~driftline.core.slices.SliceDetectors.snapshot` and the banks and counts in
it) are JSON-ready scalars, lists and dicts with numpy arrays at the leaves. :func:`pack` writes
the structure as JSON with each array replaced by ``{ref: i}`` and appends the arrays' bytes;
:func:`unpack` reverses it. ``ref`` is ``"__nd__"`` unless user data (a model version, say) uses
that key, in which case a suffix makes it unique; it is stored in the index. Float lists in JSON
cost ~20 bytes and a float parse per number; here an array costs its bytes and one
``frombuffer``. Layout, little-endian::

    b"DLS" | version (u8) | index length (u32) | doc length (u32) | index | doc | array bytes…

    index = {"ref": ref, "arrays": [[dtype, shape], …]} (JSON; arrays in order, unpadded)
    doc = the JSON structure (version 1 wrote the bare array list, with ref ``"__nd__"``)

>>> import numpy as np
>>> blob = pack({"n": 3, "s": np.array([0.5, 0.0]), "tags": ("a", None)})
>>> doc = unpack(blob)
>>> doc["n"], doc["s"].tolist(), doc["tags"]
(3, [0.5, 0.0], ['a', None])
>>> unpack(pack({"__nd__": 0, "a": np.zeros(1)}))["__nd__"]
0
>>> plain({"s": np.array([1.0, np.nan])})
{'s': [1.0, None]}
"""

from __future__ import annotations

import functools
import json
import math
import struct
from typing import Any

import numpy as np
from pydantic_core import PydanticSerializationError, to_json

MAGIC = b"DLS"
VERSION = 2
_HEAD = struct.Struct("<3sBII")
_REF = "__nd__"


def is_packed(blob: bytes) -> bool:
    """True for :func:`pack` output (False for, e.g., a legacy JSON record)."""
    return blob[:3] == MAGIC


def pack(doc: Any) -> bytes:
    """``doc`` (dicts, lists, tuples, JSON scalars, numpy arrays) as bytes."""
    ref, n = _REF, 0
    while True:
        arrays, body = _dump(doc, ref)
        # Inside a JSON string a quote is escaped, so '"ref":' only ever matches a real key: as
        # many matches as arrays means no user dict has the key and every {ref: i} is ours.
        if body.count(f'"{ref}":'.encode()) == len(arrays):
            break
        n += 1
        ref = f"{_REF}{n}"
    index = to_json({"ref": ref, "arrays": [[_dtype_str(a.dtype), a.shape] for a in arrays]})
    return b"".join([_HEAD.pack(MAGIC, VERSION, len(index), len(body)), index, body,
                     *(a.tobytes() for a in arrays)])


@functools.lru_cache(maxsize=64)  # snapshots' arrays have a few dtypes
def _dtype_str(dt: np.dtype[Any]) -> str:
    """``dt.str``, which makes a new string at each call, cached."""
    return dt.str


def _dump(doc: Any, ref: str) -> tuple[list[np.ndarray], bytes]:
    """The doc as compact JSON (arrays replaced by ``{ref: i}``) and its arrays (ref order).

    pydantic-core's serializer writes it in about a third of the stdlib's time (a checkpoint
    packs every dirty slice each interval). Its bytes can differ from ``json.dumps``'s (UTF-8
    instead of ``\\u`` escapes, ``0.00001`` for ``1e-05``) but read back to the same document:
    floats are written as a shortest string that parses to the same double. Its fallback for
    values it does not know costs microseconds each, so arrays held in dicts (where snapshots
    keep theirs) are swapped for their refs first; ``leaf`` takes the rest. It fails on strings
    UTF-8 cannot carry (lone surrogates) and on what ``leaf`` refuses: those go through the
    stdlib, which escapes the former and raises ``TypeError`` for the latter. (It also writes a
    few Python types the stdlib refuses, e.g. sets and datetimes; snapshots hold none.)"""
    arrays: list[np.ndarray] = []

    def leaf(x: Any) -> Any:  # the encoder calls this for what it cannot encode itself
        if isinstance(x, np.ndarray):
            arrays.append(np.ascontiguousarray(x))
            return {ref: len(arrays) - 1}
        if isinstance(x, np.generic):
            return x.item()
        raise TypeError(f"cannot pack {type(x).__name__}")

    try:
        swapped = _swap_arrays(doc, arrays, ref) if type(doc) is dict else doc
        return arrays, to_json(swapped, fallback=leaf)
    except PydanticSerializationError:
        arrays.clear()
        return arrays, json.dumps(doc, default=leaf, separators=(",", ":")).encode()


def _swap_arrays(d: dict[Any, Any], arrays: list[np.ndarray], ref: str) -> dict[Any, Any]:
    """``d`` with the arrays among its values (and its dict values', recursively) replaced by
    ``{ref: i}``, appended to ``arrays``; copied where something changed, else ``d`` itself."""
    out: dict[Any, Any] | None = None
    for k, v in d.items():
        t = type(v)
        if t is dict:
            w: Any = _swap_arrays(v, arrays, ref)
            if w is v:
                continue
        elif t is np.ndarray:
            arrays.append(np.ascontiguousarray(v))
            w = {ref: len(arrays) - 1}
        else:
            continue
        if out is None:
            out = dict(d)
        out[k] = w
    return d if out is None else out


def unpack(blob: bytes) -> Any:
    """The document :func:`pack` wrote; arrays come back writable, with their dtype."""
    magic, version, n_index, n_body = _HEAD.unpack_from(blob)
    if magic != MAGIC or version not in (1, VERSION):
        raise ValueError("not a packed snapshot")
    at = _HEAD.size
    index = json.loads(blob[at : at + n_index])
    ref, index = (_REF, index) if version == 1 else (index["ref"], index["arrays"])
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
        return arrays[d[ref]] if len(d) == 1 and ref in d else d

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
