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
# keys include the array marker and its fallbacks: user data (a model version) may use them
keys = st.sampled_from(["__nd__", "__nd__1", "__nd__2"]) | st.text(max_size=6)
docs = st.recursive(scalars | arrays, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(
    keys, kids, max_size=4), max_leaves=20)


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


def test_user_keys_that_look_like_the_marker_survive() -> None:
    doc = {"versions": {"__nd__": 50}, "s": np.arange(3.0), "more": {"__nd__1": 0}}
    back = unpack(pack(doc))
    assert back["versions"] == {"__nd__": 50} and back["more"] == {"__nd__1": 0}
    assert back["s"].tolist() == [0.0, 1.0, 2.0]


def test_version_1_blobs_still_unpack() -> None:
    import struct
    body, index = b'{"s":{"__nd__":0}}', b'[["<f8",[2]]]'
    blob = (struct.pack("<3sBII", b"DLS", 1, len(index), len(body)) + index + body
            + np.array([1.5, 2.5]).tobytes())
    assert unpack(blob)["s"].tolist() == [1.5, 2.5]


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


def test_floats_strings_and_arrays_anywhere_read_back_exactly() -> None:
    """The body is written by pydantic-core, not the stdlib: every double must read back to
    the same bits, arrays in lists as well as in dicts, odd strings via the stdlib."""
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**63, size=20_000, dtype=np.uint64) * rng.choice([1, -1], 20_000)
    doubles = bits.astype(np.int64).view(np.float64)
    floats = [*doubles[np.isfinite(doubles)].tolist(), 1e-05, 1e16, 1e22, 3.0, -0.0, 5e-324,
              float("inf"), -float("inf")]
    doc = {"f": floats, "a": [np.arange(3), {"b": np.ones((2, 2), np.int32)}],
           "c": np.zeros(2), 7: {"nested": {"d": np.array([1 + 2j])}}, "s": "é\u2028\ud800x"}
    back = unpack(pack(doc))
    assert np.array(back["f"]).tobytes() == np.array(floats).tobytes()
    assert all(type(x) is float for x in back["f"])
    assert back["a"][0].tolist() == [0, 1, 2] and back["a"][1]["b"].dtype == np.int32
    assert back["7"]["nested"]["d"].tolist() == [1 + 2j] and back["c"].tolist() == [0.0, 0.0]
    assert back["s"] == "é\u2028\ud800x"
    assert json.loads(json.dumps(plain(unpack(pack({"x": doc["a"]}))))) == {
        "x": [[0, 1, 2], {"b": [[1, 1], [1, 1]]}]}
    with pytest.raises(TypeError):
        pack({"x": object()})
