"""``/evidence`` names an alarmed slice whose cell is judged against a parent baseline its own
reference events do not fit: the alarm may be a gap in the reference, not drift (no Redis:
the book is a stand-in that returns one incident)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from driftline.alerts.model import Incident, SliceRef
from driftline.config import load_settings
from driftline.reference import build_reference
from driftline.reference.artifact import MANIFEST
from driftline.schema import parse_slice_id
from driftline.service.app import create_app
from tests.unit.alerts.synthetic import opened_apart
from tests.unit.reference.synthetic import reference_events, variant
from tests.unit.service.admin import ADMIN, AUTH
from tests.unit.service.keyvalue import KeyValue

# With --min-count 400 (tests/unit/reference/test_fallbacks.py): s1 and s1 day have baselines;
# s1 night (200, another mix) falls back to s1 and s2 (300, its own mix) to global, both misfits;
# s2 night (p ≈ 0.005) and s3 (uniform, like global) fall back and fit
MISFITS = {"station=s2": (300, "global"), "station=s1|shift=night": (200, "station=s1")}
FITTING = ["station=s2|shift=night", "station=s3", "station=s1", "station=s1|shift=day",
           "shift=night", "lot=L1"]


@pytest.fixture(scope="module")
def refs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("misfit")
    events, _ = reference_events()
    new = root / "new"
    build_reference(events, None, new, k=6, min_count=400, source_name="synthetic")
    old = variant(new, root / "old", lambda m: m["baselines"].pop("fallbacks"))
    return {"new": new, "old": old}


def _rid(path: Path) -> str:
    return str(json.loads((path / MANIFEST).read_text())["reference_id"])


def _incident(reference_id: str | None) -> Incident:
    """A station=s2 incident whose alarmed slices are every kind of cell, all raised on
    ``reference_id``."""
    g, _, _ = opened_apart("station=s2", now=datetime(2026, 1, 5, 8, 0, tzinfo=UTC))
    (inc,) = g.incidents.values()
    root = inc.slices[inc.root.slice_id]
    slices = {}
    for sid in [*MISFITS, *FITTING]:
        dims = parse_slice_id(sid)
        ref = SliceRef(template="+".join(dims), dims=dims, slice_id=sid)
        slices[sid] = root.model_copy(update={"ref": ref, "reference_id": reference_id})
    return inc.model_copy(update={"slices": slices})


def _evidence(ref_dir: Path, inc: Incident) -> dict[str, Any]:
    app = create_app(CollectorRegistry(), None,
                     load_settings(reference_dir=str(ref_dir), api_tokens=f"adm:admin:{ADMIN}"),
                     redis_client=KeyValue())  # type: ignore[arg-type]
    app.state.ctx.book = SimpleNamespace(get={inc.id: inc}.__getitem__)
    got = TestClient(app).get(f"/api/v1/incidents/{inc.id}/evidence", headers=AUTH)
    assert got.status_code == 200, got.text
    return {s["slice_id"]: s.get("baseline_misfit") for s in got.json()["slices"]}


@pytest.mark.parametrize("raised_on", ["this", None])  # None: an alarm from before the field
def test_a_slice_in_a_misfit_cell_says_its_alarm_may_be_a_reference_gap(
        refs: dict[str, Path], raised_on: str | None) -> None:
    rid = _rid(refs["new"]) if raised_on else None
    served = _evidence(refs["new"], _incident(rid))
    for sid, (n, parent) in MISFITS.items():
        found = served[sid]
        assert found is not None, sid
        assert {k: found[k] for k in ("cell", "reference_events", "judged_against")} == {
            "cell": sid, "reference_events": n, "judged_against": parent}
        assert 0 < found["p_value"] < 1e-3
        hint = found["hint"]
        assert hint.startswith(f"this cell had {n} reference events and is judged against "
                               f"{parent}, whose cluster mix its own reference events do "
                               f"not fit (p = {found['p_value']:.2g})")
        assert "gap in the reference, not drift" in hint and "data_coverage" in hint
        assert f"--min-count {n} or lower" in hint
    # cells that fit their fallback, have their own baseline, or are no cell (shift, lot)
    assert {sid: served[sid] for sid in FITTING} == dict.fromkeys(FITTING)


def test_an_alarm_of_another_reference_or_an_old_reference_flags_nothing(
        refs: dict[str, Path]) -> None:
    other = _evidence(refs["new"], _incident("0" * 16))
    assert set(other.values()) == {None}
    old = _evidence(refs["old"], _incident(_rid(refs["old"])))  # built before `fallbacks`
    assert set(old.values()) == {None}
