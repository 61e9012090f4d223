"""The packed snapshot format: round trips of nested documents with numpy arrays."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from driftline.core.snapshot import is_packed, pack, plain, unpack

arrays = hnp.arrays(
    dtype=st.sampled_from([np.float64, np.int32, np.int64, np.complex128, np.bool_]),
    shape=hnp.array_shapes(min_dims=1, max_dims=2, min_side=0, max_side=5))
scalars = st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.text(max_size=8) | \
    st.floats(allow_nan=False, allow_infinity=False)
docs = st.recursive(scalars | arrays, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(
    st.text(max_size=6).filter(lambda k: k != "__nd__"), kids, max_size=4), max_leaves=20)


def _same(a: object, b: object) -> bool:
    if isinstance(a, np.ndarray):
        return (isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape
                and a.tobytes() == b.tobytes() and b.flags.writeable)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return isinstance(b, list) and len(a) == len(b) and all(map(_same, a, b))
    return a == b and type(a) is type(b)


@settings(max_examples=150, deadline=None)
@given(doc=docs)
def test_pack_round_trips_bit_for_bit(doc: object) -> None:
    blob = pack(doc)
    assert is_packed(blob)
    assert _same(doc, unpack(blob))
    assert pack(unpack(blob)) == blob


def test_nan_and_legacy_and_damage() -> None:
    doc = {"t": np.array([1.0, np.nan]), "x": float("nan")}
    back = unpack(pack(doc))
    assert np.isnan(back["t"][1]) and back["t"][0] == 1.0
    assert json.loads(json.dumps(plain(doc))) == {"t": [1.0, None], "x": None}
    assert not is_packed(b'{"state": {}}')
    with pytest.raises(ValueError):
        unpack(pack(doc)[:-3])
    with pytest.raises(ValueError):
        unpack(b"XYZ" + pack(doc)[3:])
