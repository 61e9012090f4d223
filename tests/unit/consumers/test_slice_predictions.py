"""Predictions reach the prediction-mix and confidence detectors in the stream: through the
detect stage's parser and a slice's update, against a real reference's prediction baselines;
checkpoints round-trip; a prediction collapse alarms and clean predictions keep the budget."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from driftline.consumers.checkpoint import decode_record, encode_record
from driftline.consumers.detect_stage import DetectStage, PartitionState
from driftline.consumers.slice_state import SliceState, UpdateView
from driftline.core.budget import DAY, Budget
from driftline.core.slices import EventUpdate, SliceDetectors
from driftline.core.snapshot import plain
from driftline.metrics import ConsumerMetrics, DetectMetrics
from driftline.reference import build_reference
from driftline.reference.index import Reference
from driftline.runner import ReferenceBaselines
from driftline.schema import SliceUpdate
from tests.unit.consumers.test_detect_stage import Msg
from tests.unit.reference.synthetic import event, sample

T0 = datetime(2026, 11, 2, 6, 0, tzinfo=UTC)
KEY = "station=s1|shift=day"


def law(rng: np.random.Generator, n: int) -> list[tuple[str, float]]:
    """The plant's predictions: ok (80 %) with scores near 1, scrap with lower scores."""
    ok = rng.random(n) < 0.8
    scores = np.where(ok, rng.beta(30, 1.5, n), rng.uniform(0.5, 0.95, n))
    return [("ok" if o else "scrap", float(s)) for o, s in zip(ok, scores, strict=True)]


@pytest.fixture(scope="module")
def ref(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    rng = np.random.default_rng(21)
    events = [event(i, emb, "s1", "day", prediction={"label": lb, "score": sc})
              for i, (emb, (lb, sc)) in enumerate(zip(sample(rng, rng.choice(6, 1000)),
                                                       law(rng, 1000), strict=True))]
    out = tmp_path_factory.mktemp("ref") / "ref"
    return build_reference(events, None, out, k=6, min_count=300)


def _update(i: int, pred: tuple[str, float] | None, **over: Any) -> SliceUpdate:
    doc: dict[str, Any] = dict(
        slice_id="station=s1", template="station", event_id=f"ev-{i}",
        ts=T0 + timedelta(seconds=2 * i), source_partition=0, source_offset=i, station="s1",
        shift="day", lot="L1", baseline=KEY, cluster=i % 6, distance=0.1, ood=False,
        prediction=None if pred is None else {"label": pred[0], "score": pred[1]})
    return SliceUpdate(**{**doc, **over})


def _slice(baselines: Any, arl0: float = 1e4) -> SliceState:
    return SliceState("station=s1", "station", SliceDetectors(arl0=arl0), baselines, 50)


def _feed(state: SliceState, updates: list[UpdateView]) -> list[dict[str, Any]]:
    return [m for u in updates for m in state.update(u)]


def test_the_detect_stage_feeds_label_and_score_to_both_detectors(ref: Reference) -> None:
    """Slice-updates as the embed stage writes them (JSON, through the stage's parser) reach
    the prediction detectors with the label's category and the low-confidence flag, exactly
    as the core detectors fed by hand."""
    baselines = ReferenceBaselines(ref)
    pb = ref.prediction_for(KEY)
    assert pb is not None and pb.key == KEY and pb.labels == ("ok", "scrap")
    reg = CollectorRegistry()
    stage = DetectStage(None, "t", None,  # type: ignore[arg-type]
                        lambda u: _slice(baselines), lambda s: SliceState.restore(
                            s, baselines, 50), DetectMetrics(reg), ConsumerMetrics(reg))
    stage.parts = {0: PartitionState(epoch=1, next_offset=None, slices={})}
    preds = law(np.random.default_rng(1), 400)
    preds[7] = ("dent", 0.4)  # a label the reference never predicted: other
    stage.apply_batch(0, [Msg(0, i, _update(i, p).model_dump_json().encode(), 1)
                          for i, p in enumerate(preds)])
    got = stage.parts[0].slices["station=s1"].model.det  # type: ignore[attr-defined]
    by_hand = SliceDetectors(arl0=1e4)
    b = baselines.detector_baseline(KEY)  # stated rates, and the bounds the detectors judge by
    for i, (label, score) in enumerate(preds):
        by_hand.update(EventUpdate(
            cluster=i % 6, baseline=b, ood=False, time=(T0.timestamp() + 2 * i),
            prediction={"ok": 0, "scrap": 1}.get(label, 2), prediction_baseline=pb,
            low_confidence=score < pb.low_confidence_cut))
    # the prediction detectors judge against the bounds, not the stated rates
    assert pb.low_confidence_bound > pb.low_confidence_rate
    assert (pb.bounds[0] < pb.p).all() and (pb.p < pb.bounds[1]).all()
    assert set(got.detectors) == {"cluster_mix", "ood_rate", "prediction_mix", "confidence"}
    assert plain(got.snapshot()) == plain(by_hand.snapshot())
    assert got.detectors["confidence"].n == got.detectors["prediction_mix"].n == 400


def test_labelled_events_feed_the_prediction_detectors_like_unlabelled_ones(
    ref: Reference
) -> None:
    class Labelled(ReferenceBaselines):  # the fixture's reference has predictions, no labels
        def expected_error(self, cluster: int) -> float | None:
            return 0.05

    baselines = Labelled(ref)
    preds = law(np.random.default_rng(2), 300)
    plain_slice, labelled = _slice(baselines), _slice(baselines)
    _feed(plain_slice, [_update(i, p) for i, p in enumerate(preds)])
    _feed(labelled, [_update(i, p, label="ok", error=p[0] != "ok")
                     for i, p in enumerate(preds)])
    for name in ("prediction_mix", "confidence", "cluster_mix", "ood_rate"):
        assert plain(labelled.det.detectors[name].snapshot()) == plain(
            plain_slice.det.detectors[name].snapshot()), name
    assert "error_rate" in labelled.det.detectors
    late = _update(300, None, label="ok", error=True, distance=None, ood=None, late_label=True)
    before = plain(labelled.det.detectors["prediction_mix"].snapshot())
    labelled.update(late)
    assert plain(labelled.det.detectors["prediction_mix"].snapshot()) == before


def test_a_reference_without_predictions_runs_neither_detector(ref: Reference) -> None:
    class Old(ReferenceBaselines):
        def prediction(self, key: str) -> None:
            return None

    state = _slice(Old(ref))
    _feed(state, [_update(i, p) for i, p in enumerate(law(np.random.default_rng(3), 50))])
    assert set(state.det.detectors) == {"cluster_mix", "ood_rate"} and state.n == 50


def test_checkpoints_round_trip_and_continue_bit_for_bit(ref: Reference) -> None:
    baselines = ReferenceBaselines(ref)
    rng = np.random.default_rng(4)
    updates = [_update(i, p) for i, p in enumerate(law(rng, 200) + [("scrap", 0.2)] * 60)]
    a = _slice(baselines, arl0=500.0)
    _feed(a, updates[:230])
    b = SliceState.restore(decode_record(encode_record({"state": a.snapshot()}))["state"],
                           baselines, 50)
    assert plain(b.snapshot()) == plain(a.snapshot())
    assert _feed(a, updates[230:]) == _feed(b, updates[230:])
    assert plain(b.snapshot()) == plain(a.snapshot())


def test_a_new_label_vocabulary_restarts_only_the_prediction_mix(
    ref: Reference, caplog: pytest.LogCaptureFixture
) -> None:
    baselines = ReferenceBaselines(ref)
    state = _slice(baselines)
    _feed(state, [_update(i, p) for i, p in enumerate(law(np.random.default_rng(5), 40))])
    pb = baselines.prediction(KEY)
    assert pb is not None
    p = np.array([0.7, 0.2, 0.05, 0.05])
    wider = pb._replace(labels=("ok", "scrap", "dent"), codes={"ok": 0, "scrap": 1, "dent": 2},
                        p=p, bounds=np.stack([p, p]))
    baselines._predictions = {KEY: wider}  # the reference was rebuilt with another label
    state.update(_update(40, ("dent", 0.9)))
    assert state.det.detectors["prediction_mix"].n == 1  # afresh, on four categories
    assert state.det.detectors["confidence"].n == 41 and state.n == 41
    assert "label vocabulary changed" in caplog.text


def test_a_prediction_collapse_alarms_and_clean_predictions_keep_the_budget(
    ref: Reference
) -> None:
    """The review's stream: predictions collapse from ok (≈0.99) to scrap (0.2). At fleet
    thresholds (γ from the default budget, split over four detectors) both detectors alarm
    within 300 events in every run, the prediction mix naming the label that lost its mass.

    Clean predictions, drawn from the reference's own law: a slice restarts a detector after
    each alarm, so over ``E`` events a detector with ARL0 ``≥ γ`` raises at most ``E/γ`` false
    alarms on average (the renewal argument of ``driftline.core.budget``). At a small ``γ``
    (so that alarms happen), the count over ``R`` runs stays within that plus three Poisson
    standard deviations."""
    baselines = ReferenceBaselines(ref)
    fleet = Budget(false_incidents=1.0, period_s=30 * DAY, n_slices=200, detectors_per_slice=4,
                   event_rate=2.0).arl0()
    runs = 12
    for r in range(runs):
        rng = np.random.default_rng(100 + r)
        state = _slice(baselines, arl0=fleet)
        clean = law(rng, 100)
        collapsed = [("scrap", 0.2)] * 300
        out = _feed(state, [_update(i, p) for i, p in enumerate(clean + collapsed)])
        first = {m["detector"]: m for m in out if m["kind"] == "alarm"}
        assert set(first) == {"prediction_mix", "confidence"}, r
        assert all(m["time"] > T0.timestamp() + 2 * 99 for m in first.values())
        moved = first["prediction_mix"]["argmax"]  # the strongest member: mass out of ok
        assert (moved["label"], moved["direction"]) == ("ok", "out"), moved

    gamma, runs, events = 300.0, 20, 3000
    alarms = {"prediction_mix": 0, "confidence": 0}
    for r in range(runs):
        rng = np.random.default_rng(1000 + r)
        state = _slice(baselines, arl0=gamma)
        for m in _feed(state, [_update(i, p) for i, p in enumerate(law(rng, events))]):
            if m["kind"] in ("alarm", "update") and m["detector"] in alarms:
                alarms[m["detector"]] += 1
    bound = runs * events / gamma
    assert all(count <= bound + 3 * math.sqrt(bound) for count in alarms.values()), alarms


def test_the_embed_stage_sends_each_slice_the_events_label_and_score() -> None:
    from driftline.consumers.detect_stage import FastPrediction, parse_update
    from driftline.consumers.embed_stage import EmbedStage
    from driftline.metrics import EmbedMetrics
    from tests.unit.consumers import test_embed_stage as es

    producer = es.Producer()
    stage = EmbedStage(None, producer, events_topic="ev", updates_topic="up",  # type: ignore[arg-type]
                       dlq_topic="dlq", embedder=None, reference=es.Reference(),
                       templates=["station", "lot"], metrics=EmbedMetrics(CollectorRegistry()))
    value = es._event(0, "s1", embedding=[1.0, 0.0, 0.0],
                      prediction={"label": "scrap", "score": 0.2})
    stage.process([es.Msg("ev", 0, 0, b"k", value)])
    sent = [parse_update(v) for t, _, v in producer.sent if t == "up"]
    assert [u.slice_id for u in sent] == ["station=s1", "lot=L1"]
    assert all(u.prediction == FastPrediction("scrap", 0.2) for u in sent)
