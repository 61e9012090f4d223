"""The evidence view's cells: where in an alarmed slice the change is (no Redis)."""

from __future__ import annotations

from driftline.alerts.evidence import slice_evidence
from driftline.service.schemas.incidents import CellsView
from tests.unit.alerts.test_cooccurrence import ONSET, _msg, _rows


def test_a_station_s_cells_name_the_changed_lot_and_shift() -> None:
    rows = _rows(0)
    view = CellsView.of(slice_evidence(_msg("station=S2", "update", rows, 1.0, ONSET + 900)))
    assert view is not None and view.events == 8 * 60 and view.pooled == 0
    # S2's night shift (every lot) and its day shift's L3 changed: 5 of its 8 cells
    assert {(c.shift, c.lot) for c in view.affected} == {
        ("night", "L1"), ("night", "L2"), ("night", "L3"), ("night", "L4"), ("day", "L3")}
    assert view.precision == 5 / 8


def test_no_cells_no_view() -> None:
    msg = _msg("station=S2", "update", _rows(0), 1.0, ONSET + 900)
    del msg["evidence"]["cells"]
    assert CellsView.of(slice_evidence(msg)) is None
