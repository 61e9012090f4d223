"""Read legacy (pre-1.6, non-zip) torch checkpoints with ``pickle`` and numpy only.

A legacy file is five pickles followed by raw bytes:

1. the magic number ``0x1950A86A20F9469CFC6C``;
2. the protocol version (1001);
3. ``sys_info`` (byte order and C type sizes);
4. the object itself, whose storages are persistent ids
   ``('storage', storage_type, key, location, numel[, view_metadata])`` and whose tensors are
   ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)``;
5. the list of storage keys; then, for each key in that order, an 8-byte little-endian element
   count followed by the storage's raw little-endian data.

The unpickler resolves only the few globals a state dict needs and refuses everything else, so a
hostile file cannot run code. Torch is never imported.
"""

from __future__ import annotations

import collections
import pickle
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001

_STORAGE_DTYPES: dict[str, np.dtype[Any]] = {
    name: np.dtype(code).newbyteorder("<")
    for name, code in {
        "DoubleStorage": "f8",
        "FloatStorage": "f4",
        "HalfStorage": "f2",
        "LongStorage": "i8",
        "IntStorage": "i4",
        "ShortStorage": "i2",
        "CharStorage": "i1",
        "ByteStorage": "u1",
        "BoolStorage": "?",
    }.items()
}


@dataclass(frozen=True)
class _StorageType:
    dtype: np.dtype[Any]


@dataclass(frozen=True)
class _StorageRef:
    key: str
    dtype: np.dtype[Any]
    offset: int  # elements into the base storage (non-zero only for legacy storage views)


@dataclass(frozen=True)
class _TensorRef:
    storage: _StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor_v2(
    storage: _StorageRef, offset: int, size: tuple[int, ...], stride: tuple[int, ...], *_: Any
) -> _TensorRef:
    return _TensorRef(storage, int(offset), tuple(size), tuple(stride))


def _rebuild_parameter(data: _TensorRef, *_: Any) -> _TensorRef:
    return data


_ALLOWED: dict[tuple[str, str], Callable[..., Any]] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that knows a state dict's globals and nothing else."""

    def __init__(self, file: IO[bytes]) -> None:
        super().__init__(file)
        self.storage_dtypes: dict[str, np.dtype[Any]] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")

    def persistent_load(self, pid: Any) -> _StorageRef:
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        storage_type, key = pid[1], str(pid[2])
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unsupported storage type {storage_type!r}")
        self.storage_dtypes[key] = storage_type.dtype
        view = pid[5] if len(pid) == 6 else None
        if view is None:
            return _StorageRef(key, storage_type.dtype, 0)
        # Legacy storage view: (view_key, offset, view_size) into the base storage `key`.
        return _StorageRef(key, storage_type.dtype, int(view[1]))


def _read_storage(file: IO[bytes], dtype: np.dtype[Any]) -> np.ndarray[Any, Any]:
    header = file.read(8)
    if len(header) != 8:
        raise ValueError("truncated checkpoint: missing storage header")
    count = int.from_bytes(header, "little")
    data = file.read(count * dtype.itemsize)
    if len(data) != count * dtype.itemsize:
        raise ValueError("truncated checkpoint: storage data is short")
    return np.frombuffer(data, dtype=dtype)


def _materialise(ref: _TensorRef, storages: Mapping[str, np.ndarray[Any, Any]]) -> np.ndarray:
    base = storages[ref.storage.key]
    start = ref.storage.offset + ref.offset
    if len(ref.size) != len(ref.stride):
        raise ValueError("tensor size and stride differ in length")
    if any(n == 0 for n in ref.size):
        return np.empty(ref.size, dtype=base.dtype.newbyteorder("="))
    last = start + sum((n - 1) * s for n, s in zip(ref.size, ref.stride, strict=True))
    if start < 0 or last >= base.size or any(s < 0 for s in ref.stride):
        raise ValueError(f"tensor view exceeds its storage {ref.storage.key!r}")
    view = np.lib.stride_tricks.as_strided(
        base[start:],
        shape=ref.size,
        strides=tuple(s * base.dtype.itemsize for s in ref.stride),
        writeable=False,
    )
    return np.array(view, dtype=base.dtype.newbyteorder("="), order="C")  # copy, writeable


def load_legacy_state_dict(source: str | Path | IO[bytes]) -> dict[str, np.ndarray]:
    """Load a legacy torch ``state_dict`` file as ``{name: array}`` without torch.

    Raises ``pickle.UnpicklingError`` when the file names any global outside the allow-list and
    ``ValueError`` when it is not a legacy little-endian checkpoint.
    """
    if isinstance(source, str | Path):
        with open(source, "rb") as opened:
            return load_legacy_state_dict(opened)
    file = source
    if _RestrictedUnpickler(file).load() != MAGIC_NUMBER:
        raise ValueError("not a legacy torch checkpoint (bad magic number)")
    if _RestrictedUnpickler(file).load() != PROTOCOL_VERSION:
        raise ValueError("unsupported legacy torch protocol version")
    sys_info = _RestrictedUnpickler(file).load()
    if not isinstance(sys_info, dict) or not sys_info.get("little_endian", False):
        raise ValueError("only little-endian legacy checkpoints are supported")
    unpickler = _RestrictedUnpickler(file)
    obj = unpickler.load()
    keys = _RestrictedUnpickler(file).load()
    if not isinstance(keys, list):
        raise ValueError("storage key list is missing")
    storages: dict[str, np.ndarray[Any, Any]] = {}
    for key in map(str, keys):
        if key not in unpickler.storage_dtypes:
            raise ValueError(f"storage {key!r} is listed but never referenced")
        storages[key] = _read_storage(file, unpickler.storage_dtypes[key])
    if not isinstance(obj, Mapping):
        raise ValueError(f"expected a state dict, got {type(obj).__name__}")
    return {
        str(name): _materialise(value, storages)
        for name, value in obj.items()
        if isinstance(value, _TensorRef)
    }
