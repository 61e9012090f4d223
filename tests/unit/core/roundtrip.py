"""The snapshot round trip every stateful detector owes: restored from either encoding half-way,
it goes on exactly as the original."""

from __future__ import annotations

import json
from collections.abc import Sequence

from driftline.core.slices import EventUpdate, SliceDetectors
from driftline.core.snapshot import pack, plain, unpack


def assert_slice_round_trip(a: SliceDetectors, events: Sequence[EventUpdate], cut: int) -> None:
    """Feed ``a`` the first ``cut`` events, restore copies from its packed and its JSON
    snapshot, and check all three give the same alarms and end in the same state."""
    for e in events[:cut]:
        a.update(e)
    b = SliceDetectors.restore(unpack(pack(a.snapshot())))
    c = SliceDetectors.restore(json.loads(json.dumps(plain(a.snapshot()))))
    for e in events[cut:]:
        assert a.update(e) == b.update(e) == c.update(e)
    assert pack(a.snapshot()) == pack(b.snapshot())
    assert plain(a.snapshot()) == plain(c.snapshot())
