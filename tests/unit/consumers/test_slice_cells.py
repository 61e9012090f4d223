"""An open alarm's per-cell counts (station × shift × lot, from the alarm on): in the alarm and
update messages, bounded, and through the slice's snapshot (``SliceState``; no Kafka)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np

from driftline.consumers.checkpoint import decode_record, encode_record
from driftline.consumers.slice_state import SliceState
from driftline.core.budget import DAY, Budget
from driftline.core.cells import CellTally
from driftline.core.slices import SliceDetectors
from driftline.core.snapshot import plain
from driftline.schema import SliceUpdate
from tests.unit.consumers.fakes import FlatBaselines, one_slice_book

T0 = datetime(2026, 11, 16, 0, 0, tzinfo=UTC)
K = 4


def _upd(i: int, cluster: int, ood: bool, lot: str, shift: str = "day") -> SliceUpdate:
    return SliceUpdate(
        slice_id="station=S", template="station", event_id=f"e{i}",
        ts=T0 + timedelta(seconds=4 * i), source_partition=0, source_offset=i, station="S",
        shift=shift, lot=lot, baseline="station=S", cluster=cluster, distance=0.1, ood=ood)


def _state() -> SliceState:
    return SliceState("station=S", "station", SliceDetectors(arl0=1e4), FlatBaselines(K), 500)


def _feed(st: SliceState, seed: int, n: int, start: int = 0) -> list[dict[str, Any]]:
    """Clean for 500 events, then lot ``L2`` (every third event) is OOD at 60 %."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(start, start + n):
        lot = ("L1", "L2", "L3")[i % 3]
        bad = i >= 500 and lot == "L2"
        ood = bool(rng.random() < (0.6 if bad else 0.01))
        out += [m for m in st.update(_upd(i, int(rng.integers(K)), ood, lot))]
    return out


def test_alarm_messages_carry_the_cells_of_the_change() -> None:
    st = _state()
    msgs = [m for m in _feed(st, 1, 3000) if m["kind"] in ("alarm", "update")
            and m["detector"] == "ood_rate"]
    assert msgs and msgs[0]["kind"] == "alarm"
    last = msgs[-1]["evidence"]["cells"]
    rows = {tuple(r[:3]): r[3:] for r in last["cells"]}
    bad = rows[("S", "day", "L2")]
    assert bad[1] / bad[0] > 0.4  # the changed lot's OOD rate, far above 1 %
    for lot in ("L1", "L3"):
        n, ood, exp = rows[("S", "day", lot)][:3]
        assert ood < exp + 4 * np.sqrt(exp) + 2
    assert last["overflow"][0] == 0
    # the cells count the alarm's events: as many as the tally since the alarm, or fewer
    assert sum(r[3] for r in last["cells"]) <= msgs[-1]["evidence"]["counts"]["n"]


def test_cells_are_bounded_and_pool_the_rest() -> None:
    t = CellTally(max_cells=3)
    p = np.full(K, 1 / K)
    for i in range(100):
        t.update(("S", "day", f"L{i % 10}"), 0, p, ood=False, ood_p0=0.01)
    d = t.as_dict()
    assert len(d["cells"]) == 3 and d["overflow"][0] == 70 and t.n == 100


def test_cells_survive_a_checkpoint_and_old_snapshots_restore_without() -> None:
    st = _state()
    _feed(st, 2, 1500)
    assert "ood_rate" in st.open and st.cells["ood_rate"].n > 0
    snap = decode_record(encode_record(plain(st.snapshot())))
    back = SliceState.restore(snap, FlatBaselines(K), 500)
    assert back.cells["ood_rate"].as_dict() == st.cells["ood_rate"].as_dict()
    del snap["cells"]  # a checkpoint written before cells
    old = SliceState.restore(snap, FlatBaselines(K), 500)
    assert old.cells["ood_rate"].n == 0
    _feed(old, 3, 10, start=1500)
    assert old.cells["ood_rate"].n == 10


def test_no_cells_without_an_open_alarm() -> None:
    st = _state()
    _feed(st, 4, 400)
    assert not st.open and not st.cells


def test_one_persistent_moderate_change_is_one_incident() -> None:
    """Service defaults (2 events/s): OOD 1 % → 3 % from 1 h on, for good. The detector
    restarts after each crossing and, the change being moderate, sits near zero a while before
    it climbs again: read from the timing alone each re-crossing was a new episode, and the
    book opened 8 incidents. The alarm's cells show the change went on in between."""
    rng = np.random.default_rng(0)
    every_s = 0.5
    st = SliceState("station=S", "station",
                    SliceDetectors(arl0=Budget(1.0, 30 * DAY, 200, 2, 1 / every_s).arl0()),
                    FlatBaselines(K), 500)
    msgs = []
    for i in range(int(4 * 3600 / every_s)):
        t = T0 + timedelta(seconds=i * every_s)
        ood = bool(rng.random() < (0.03 if i * every_s >= 3600 else 0.01))
        u = SliceUpdate(slice_id="station=S", template="station", event_id=f"e{i}", ts=t,
                        source_partition=0, source_offset=i, station="S", shift="day",
                        lot="L", baseline="station=S", cluster=int(rng.integers(K)),
                        distance=0.1, ood=ood)
        msgs += [{**m, "slice_id": "station=S", "template": "station"} for m in st.update(u)]
    g = one_slice_book(st, msgs, T0 + timedelta(days=1))
    kinds = [m["kind"] for m in msgs]
    assert kinds.count("update") >= 3 and kinds.count("clear") == 0
    assert len(g.incidents) == 1
