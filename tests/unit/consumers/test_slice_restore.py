"""Slices restored from a checkpoint run on the false-alarm budget the detect stage runs with
now, not the one in their record: after a tightened ``DRIFTLINE_BUDGET_*``, and after a new
reference that feeds more detectors per slice (each gets a smaller share of the budget)."""

from __future__ import annotations

import logging
import math
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from driftline.consumers.checkpoint import CheckpointStore, decode_record, encode_record
from driftline.consumers.detect_stage import DetectStage
from driftline.consumers.slice_state import SliceRestorer, SliceState
from driftline.core.slices import SliceDetectors
from driftline.metrics import ConsumerMetrics, DetectMetrics
from driftline.schema import SliceUpdate
from tests.unit.consumers.fakes import FlatBaselines
from tests.unit.consumers.test_detect_stage import _Consumer

T0 = datetime(2026, 11, 16, 0, 0, tzinfo=UTC)
OLD, NEW = 1e4, 1e9  # per-detector γ in the checkpoint, and now


def _upd(i: int, cluster: int, ood: bool = False, sid: str = "station=s1") -> SliceUpdate:
    station = sid.split("=")[1]
    return SliceUpdate(
        slice_id=sid, template="station", event_id=f"e{i}", ts=T0 + timedelta(seconds=i),
        source_partition=0, source_offset=i, station=station, shift="day", lot="L",
        baseline=sid, cluster=cluster, distance=0.1, ood=ood)


def _checkpoint(arl0: float, k: int = 4, events: int = 50, sid: str = "station=s1",
                ood_every: int = 0) -> dict[str, Any]:
    """A slice's state record after ``events`` events at per-detector target ``arl0``, as
    the stage stores and reads it back."""
    st = SliceState(sid, "station", SliceDetectors(arl0=arl0), FlatBaselines(k, reference_id="A"),
                    100)
    for i in range(events):
        st.update(_upd(i, i % k, ood=bool(ood_every) and i % ood_every == 0, sid=sid))
    record: dict[str, Any] = decode_record(encode_record({"state": st.snapshot()}))
    return record["state"]


def _new_slice(arl0: float, baselines: FlatBaselines, first: SliceUpdate) -> SliceState:
    st = SliceState(first.slice_id, "station", SliceDetectors(arl0=arl0), baselines, 100)
    st.update(first)
    return st


def _thresholds(st: SliceState) -> dict[str, float]:
    return {name: d.threshold for name, d in st.det.detectors.items()}


def test_a_restored_slice_takes_the_budget_now() -> None:
    """The reviewer's case: written at γ = 10⁴ (cluster-mix h 12.39), restored where new slices
    get γ = 10⁹; it judged against 12.39 still. Now it has a new slice's thresholds, and is
    counted as moved — once, and not again when restored on the budget it already has."""
    refa = FlatBaselines(4, reference_id="A")
    restore = SliceRestorer(refa, 100, NEW)
    st = restore(_checkpoint(OLD))
    nxt = _upd(50, 2)
    st.update(nxt)
    assert _thresholds(st) == _thresholds(_new_slice(NEW, refa, nxt))
    assert st.det.arl0 == NEW and restore.retuned == 1
    again = restore(decode_record(encode_record({"state": st.snapshot()}))["state"])
    assert _thresholds(again) == _thresholds(st) and restore.retuned == 1


def test_a_new_reference_restarts_the_slice_on_the_budget_now() -> None:
    """Checkpoint at γ = 10⁴ on reference A (K = 4); the stage now runs reference B (K = 6),
    whose detectors per slice give γ = 10⁹. The restart for the new reference kept the old γ
    (cluster-mix h 12.79 where a new slice gets 24.31); now it is the new slice's."""
    refb = FlatBaselines(6, reference_id="B")
    st = SliceRestorer(refb, 100, NEW)(_checkpoint(OLD))
    nxt = _upd(50, 5)
    st.update(nxt)  # another reference: the slice restarts
    mix = st.det.detectors["cluster_mix"]
    assert st.reference_id == "B" and mix.bank_size == 6 * 6
    assert _thresholds(st) == _thresholds(_new_slice(NEW, refb, nxt))
    # the union bound of a bank of M CUSUMs at per-detector γ: h = ln γ + ln M (cusum.py)
    assert mix.threshold == pytest.approx(math.log(NEW) + math.log(6 * 6))


def test_a_lowered_threshold_raises_an_alarm_at_the_next_event() -> None:
    """The statistics are kept and the new threshold applies from the next event: an OOD
    statistic that was below the old threshold but is above the new one alarms at once."""
    snap = _checkpoint(1e12, events=200, ood_every=20)  # OOD at 5 % against 1 %
    ood = snap["detectors"]["detectors"]["ood_rate"]
    assert snap["open"] == {} and not max(ood["s"]) >= ood["threshold"]  # none at γ = 10¹²
    st = SliceRestorer(FlatBaselines(4, reference_id="A"), 100, 100.0)(snap)
    assert st.det.detectors["ood_rate"].statistic > st.det.detectors["ood_rate"].threshold
    msgs = st.update(_upd(200, 0, ood=True))
    assert [(m["kind"], m["detector"]) for m in msgs] == [("alarm", "ood_rate")]


class _Records:
    """A store holding the given slice records for partition 0."""

    wait_s = 1.0
    waiting_at_most = staticmethod(CheckpointStore.waiting_at_most)

    def __init__(self, records: dict[str, dict[str, Any]]) -> None:
        self.records = records

    def claim(self, partitions: Any) -> dict[int, int]:
        return dict.fromkeys(partitions, 3)

    def load(self, partition: int) -> tuple[int, dict[str, Any], str]:
        return 10, self.records, "0-0"


@pytest.mark.parametrize(("arl0", "moved"), [(NEW, 3), (OLD, 0)])
def test_the_stage_logs_how_many_restored_slices_took_new_thresholds(
        caplog: pytest.LogCaptureFixture, arl0: float, moved: int) -> None:
    """One line per partition load says how many of its slices' thresholds moved."""
    refa = FlatBaselines(4, reference_id="A")
    records = {sid: {"state": _checkpoint(OLD, sid=sid), "applied": {"0": 49}}
               for sid in ("station=s1", "station=s2", "station=s3")}
    reg = CollectorRegistry()
    stage = DetectStage(_Consumer(), "t", _Records(records),  # type: ignore[arg-type]
                        lambda u: SliceState(u.slice_id, u.template, SliceDetectors(arl0=arl0),
                                             refa, 100),
                        SliceRestorer(refa, 100, arl0), DetectMetrics(reg), ConsumerMetrics(reg))
    stage.pending = {0}
    stage._generation = 4  # the consumer's
    with caplog.at_level(logging.INFO, logger="driftline.consumers.detect_stage"):
        stage._restore_pending()
    (line,) = [r for r in caplog.records if r.getMessage() == "partition restored"]
    assert line.slices == 3 and line.thresholds_updated == moved  # type: ignore[attr-defined]
    for entry in stage.parts[0].slices.values():
        assert entry.model.det.arl0 == arl0  # type: ignore[attr-defined]


def test_alarms_cleared_by_a_new_reference_say_so() -> None:
    """An open alarm that a reference switch clears is sent as a ``clear`` whose ``reason``
    says the detectors restarted: the book must not record the change as ended."""
    snap = _checkpoint(100.0, events=200, ood_every=2)
    assert snap["open"], "the OOD rate at 50 % against 1 % opened an alarm"
    st = SliceRestorer(FlatBaselines(4, reference_id="B"), 100, 100.0)(snap)
    msgs = st.update(_upd(200, 0))
    clears = [m for m in msgs if m["kind"] == "clear"]
    assert clears and {m["detector"] for m in clears} == set(snap["open"])
    assert {m.get("reason") for m in clears} == {"reference_changed"}
