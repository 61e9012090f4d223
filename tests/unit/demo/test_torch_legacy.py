"""The legacy torch reader, on checkpoints hand-built with pickle protocol 2 (no torch needed)."""

from __future__ import annotations

import io
import os
import pickle
import sys
import types
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from driftline.demo.torch_legacy import MAGIC_NUMBER, PROTOCOL_VERSION, load_legacy_state_dict

SYS_INFO = {
    "protocol_version": PROTOCOL_VERSION,
    "little_endian": True,
    "type_sizes": {"short": 2, "int": 4, "long": 4},
}


@dataclass(frozen=True)
class Storage:
    """Stands for a torch storage; pickled as a persistent id, its data goes after the pickles."""

    key: str
    type_name: str
    data: np.ndarray
    view: tuple[str, int, int] | None = None


class FakeTorch:
    """Fake ``torch`` / ``torch._utils`` modules so pickle writes the globals torch would."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        torch = types.ModuleType("torch")
        utils = types.ModuleType("torch._utils")
        for name in ("FloatStorage", "LongStorage"):
            cls = type(name, (), {"__module__": "torch"})
            setattr(torch, name, cls)
        for name in ("_rebuild_tensor_v2", "_rebuild_parameter"):
            func = types.FunctionType((lambda *a: None).__code__, {}, name)
            func.__module__, func.__qualname__ = "torch._utils", name
            setattr(utils, name, func)
        torch._utils = utils  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, "torch", torch)
        monkeypatch.setitem(sys.modules, "torch._utils", utils)
        self.torch, self.utils = torch, utils

    def tensor(
        self, storage: Storage, offset: int, size: tuple[int, ...], stride: tuple[int, ...]
    ) -> Reducible:
        args = (storage, offset, size, stride, False, OrderedDict())
        return Reducible(lambda: (self.utils._rebuild_tensor_v2, args))

    def parameter(self, tensor: Reducible) -> Reducible:
        return Reducible(lambda: (self.utils._rebuild_parameter, (tensor, True, OrderedDict())))


class Reducible:
    """Pickles as whatever ``(callable, args)`` its function returns."""

    def __init__(self, reduce: Any) -> None:
        self.reduce = reduce

    def __reduce__(self) -> Any:
        return self.reduce()


def write_checkpoint(fake: FakeTorch, state: Any, storages: list[Storage]) -> bytes:
    buf = io.BytesIO()
    for header in (MAGIC_NUMBER, PROTOCOL_VERSION, SYS_INFO):
        pickle.dump(header, buf, protocol=2)

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj: Any) -> Any:
            if not isinstance(obj, Storage):
                return None
            pid = ("storage", getattr(fake.torch, obj.type_name), obj.key, "cpu", obj.data.size)
            return (*pid, obj.view) if obj.view else pid

    Pickler(buf, protocol=2).dump(state)
    pickle.dump([s.key for s in storages], buf, protocol=2)
    for s in storages:
        buf.write(s.data.size.to_bytes(8, "little"))
        buf.write(s.data.astype(s.data.dtype.newbyteorder("<")).tobytes())
    return buf.getvalue()


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeTorch:
    return FakeTorch(monkeypatch)


def test_tensors_keep_shape_stride_offset_and_dtype(fake: FakeTorch, tmp_path: Path) -> None:
    floats = Storage("0", "FloatStorage", np.arange(12, dtype=np.float32))
    longs = Storage("1", "LongStorage", np.array([7, 42], dtype=np.int64))
    viewed = Storage("2", "FloatStorage", np.arange(10, dtype=np.float32), ("2v", 4, 6))
    state = OrderedDict(
        [
            ("weight", fake.tensor(floats, 0, (3, 4), (4, 1))),
            ("transposed", fake.tensor(floats, 0, (4, 3), (1, 4))),
            ("offset", fake.tensor(floats, 2, (2, 2), (4, 1))),
            ("scalar", fake.tensor(longs, 1, (), ())),
            ("param", fake.parameter(fake.tensor(floats, 8, (4,), (1,)))),
            ("view", fake.tensor(viewed, 1, (2,), (2,))),
            ("empty", fake.tensor(floats, 0, (0, 5), (5, 1))),
        ]
    )
    path = tmp_path / "legacy.pth"
    path.write_bytes(write_checkpoint(fake, state, [floats, longs, viewed]))

    loaded = load_legacy_state_dict(path)

    base = np.arange(12, dtype=np.float32)
    assert list(loaded) == list(state)
    np.testing.assert_array_equal(loaded["weight"], base.reshape(3, 4))
    np.testing.assert_array_equal(loaded["transposed"], base.reshape(3, 4).T)
    np.testing.assert_array_equal(loaded["offset"], [[2, 3], [6, 7]])
    assert loaded["scalar"].shape == () and loaded["scalar"].dtype == np.int64
    assert int(loaded["scalar"]) == 42
    np.testing.assert_array_equal(loaded["param"], [8, 9, 10, 11])
    np.testing.assert_array_equal(loaded["view"], [5, 7])  # storage view starts at element 4
    assert loaded["empty"].shape == (0, 5)
    assert loaded["weight"].flags.writeable and loaded["transposed"].flags.c_contiguous


def test_refuses_os_system_without_running_it(fake: FakeTorch, tmp_path: Path) -> None:
    sentinel = tmp_path / "pwned"
    evil = Reducible(lambda: (os.system, (f"touch {sentinel}",)))
    data = write_checkpoint(fake, OrderedDict([("x", evil)]), [])

    with pytest.raises(pickle.UnpicklingError, match="system"):
        load_legacy_state_dict(io.BytesIO(data))
    assert not sentinel.exists()


@pytest.mark.parametrize("target", [eval, getattr, io.open, types.SimpleNamespace])
def test_refuses_any_other_global(fake: FakeTorch, target: Any) -> None:
    data = write_checkpoint(fake, OrderedDict([("x", Reducible(lambda: (target, ("1",))))]), [])
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        load_legacy_state_dict(io.BytesIO(data))


def test_rejects_zip_format_and_truncation(fake: FakeTorch) -> None:
    with pytest.raises(ValueError, match="magic"):
        load_legacy_state_dict(io.BytesIO(pickle.dumps(123, protocol=2)))
    floats = Storage("0", "FloatStorage", np.arange(4, dtype=np.float32))
    state = OrderedDict([("w", fake.tensor(floats, 0, (4,), (1,)))])
    data = write_checkpoint(fake, state, [floats])
    with pytest.raises(ValueError, match="truncated"):
        load_legacy_state_dict(io.BytesIO(data[:-3]))


def test_rejects_tensor_outside_its_storage(fake: FakeTorch) -> None:
    floats = Storage("0", "FloatStorage", np.arange(4, dtype=np.float32))
    state = OrderedDict([("w", fake.tensor(floats, 2, (3,), (1,)))])
    with pytest.raises(ValueError, match="exceeds"):
        load_legacy_state_dict(io.BytesIO(write_checkpoint(fake, state, [floats])))
