"""The embed stage's event ids against a real Redis (its prediction cache): a label sent with
its event and one that arrives later reach the detect stage marked apart, and an event sent
twice is counted once."""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

import pytest
import redis
from prometheus_client import CollectorRegistry

from driftline.consumers.embed_stage import EmbedStage
from driftline.metrics import EmbedMetrics
from tests.unit.consumers.test_embed_stage import (
    Embedder,
    Msg,
    Producer,
    Reference,
    _event,
    _FragileReference,
)

pytestmark = pytest.mark.integration


def _stage(redis_url: str, reference: Any = None) -> tuple[EmbedStage, Producer,
                                                          CollectorRegistry, redis.Redis]:
    """An embed stage on the test stand-ins, with the real Redis: stage, producer, registry,
    client."""
    client = redis.Redis.from_url(redis_url)
    producer, registry = Producer(), CollectorRegistry()
    stage = EmbedStage(
        None, producer, events_topic="ev", updates_topic="up",  # type: ignore[arg-type]
        dlq_topic="dlq", embedder=Embedder(), reference=reference or Reference(),
        templates=["station"], metrics=EmbedMetrics(registry), redis_client=client)
    return stage, producer, registry, client


def test_inline_and_late_labels_are_told_apart(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    producer = Producer()
    stage = EmbedStage(
        None, producer, events_topic="ev", updates_topic="up",  # type: ignore[arg-type]
        dlq_topic="dlq", embedder=Embedder(), reference=Reference(), templates=["station"],
        metrics=EmbedMetrics(CollectorRegistry()), redis_client=client)
    tag = uuid.uuid4().hex[:8]
    pred = {"label": "ok", "score": 0.9}
    stage.process([
        Msg("ev", 0, 0, b"k", _event(0, "s1", event_id=f"{tag}-0", embedding=[1.0, 0.0, 0.0],
                                     prediction=pred, label="scratch")),
        Msg("ev", 0, 1, b"k", _event(1, "s1", event_id=f"{tag}-1", embedding=[0.0, 1.0, 0.0],
                                     prediction=pred))])
    # the late label, then a new event of the same station, in one batch
    stage.process([
        Msg("ev", 0, 2, b"k", json.dumps({
            "event_id": f"{tag}-1", "ts": "2026-11-23T09:00:00Z", "station": "s1",
            "shift": "day", "lot": "L1", "label": "scratch"}).encode()),
        Msg("ev", 0, 3, b"k", _event(3, "s1", event_id=f"{tag}-3", embedding=[0.0, 0.0, 1.0]))])
    updates = [json.loads(v) for t, _, v in producer.sent if t == "up"]
    got = [(u["event_id"], u["label"], u["error"], u["late_label"], u["distance"] is not None)
           for u in updates]
    assert got == [(f"{tag}-0", "scratch", True, False, True),  # counted for drift too
                   (f"{tag}-1", None, None, False, True),
                   (f"{tag}-1", "scratch", True, True, False),  # the error detectors only
                   (f"{tag}-3", None, None, False, True)]
    # sent in source order, as the detect stage's skip-by-highest-offset needs: the label
    # (offset 2) was looked up after the event at offset 3 was embedded, but goes first
    assert [u["source_offset"] for u in updates] == [0, 1, 2, 3]
    client.close()


def test_a_late_label_s_window_is_the_configured_one(redis_url: str) -> None:
    """DRIFTLINE_LATE_LABEL_HOURS: one key per inference event for that long (a week by
    default, ~170-260 MB of Redis per event/s): a plant whose labels come within a day keeps
    a seventh of it; a label after the window is dead-lettered as unknown_event."""
    stage, producer, _, client = _stage(redis_url)
    stage.prediction_ttl_s = 1
    tag = uuid.uuid4().hex[:8]
    stage.process([Msg("ev", 0, 0, b"k", _event(0, "s1", event_id=f"{tag}-0",
                                                  embedding=[1.0, 0.0, 0.0]))])
    assert 0 < client.pttl(f"dl:pred:ev:{tag}-0") <= 1000
    client.pexpire(f"dl:pred:ev:{tag}-0", 1)  # the window has passed
    while client.exists(f"dl:pred:ev:{tag}-0"):
        pass
    stage.process([Msg("ev", 0, 1, b"k", json.dumps({
        "event_id": f"{tag}-0", "ts": "2026-11-23T09:00:00Z", "station": "s1",
        "shift": "day", "lot": "L1", "label": "scratch"}).encode())])
    (dead,) = [json.loads(v) for t, _, v in producer.sent if t == "dlq"]
    assert dead["reason"] == "unknown_event"
    client.close()


def test_a_late_label_goes_to_its_event_s_slices_and_time(redis_url: str) -> None:
    """The label event's own station, shift, lot and time are the labelling tool's: the error
    belongs to the slices the event was seen in, at the time it was seen."""
    client = redis.Redis.from_url(redis_url)
    producer = Producer()
    stage = EmbedStage(
        None, producer, events_topic="ev", updates_topic="up",  # type: ignore[arg-type]
        dlq_topic="dlq", embedder=Embedder(), reference=Reference(),
        templates=["station", "station+shift", "lot"],
        metrics=EmbedMetrics(CollectorRegistry()), redis_client=client)
    tag = uuid.uuid4().hex[:8]
    stage.process([Msg("ev", 0, 0, b"k", _event(
        5, "s1", event_id=f"{tag}-5", embedding=[1.0, 0.0, 0.0],
        prediction={"label": "ok", "score": 0.9}))])
    stage.process([Msg("ev", 0, 1, b"k", json.dumps({
        "event_id": f"{tag}-5", "ts": "2026-11-24T22:00:00Z", "station": "s1",
        "shift": "night", "lot": "unknown", "label": "scratch"}).encode())])
    late = [json.loads(v) for t, _, v in producer.sent if t == "up"][3:]
    assert sorted(u["slice_id"] for u in late) == [
        "lot=L1", "station=s1", "station=s1|shift=day"]
    assert {(u["ts"], u["shift"], u["lot"], u["error"], u["late_label"]) for u in late} == {
        ("2026-11-23T08:00:05Z", "day", "L1", True, True)}
    # a label is no event of its station: neither counted nor dating its activity
    metrics = stage.metrics
    assert metrics.events_per_station.labels("s1")._value.get() == 1
    assert metrics.last_event_time.labels("s1")._value.get() == 1795420805.0
    client.close()


def test_an_event_sent_twice_is_counted_once_and_a_replayed_batch_again(redis_url: str) -> None:
    """A sender's retry lands the same event_id at a new offset: skipped (the detect stage's
    dedupe by source offset cannot see it). A batch read again after a crash is the same
    positions: its updates go out again, for the detect stage to skip by offset."""
    stage, producer, registry, client = _stage(redis_url)
    tag = uuid.uuid4().hex[:8]
    first = [Msg("ev", 1, 10, b"k", _event(1, "s1", event_id=f"{tag}-1", embedding=[1.0, 0, 0])),
             Msg("ev", 1, 11, b"k", _event(2, "s1", event_id=f"{tag}-2", embedding=[0, 1.0, 0])),
             # the retry of event 1, in the same poll
             Msg("ev", 1, 12, b"k", _event(1, "s1", event_id=f"{tag}-1", embedding=[1.0, 0, 0]))]
    stage.process(first)
    stage.process(first[:2])  # the batch read again after a crash (same positions)
    later = Msg("ev", 0, 99, b"k", _event(2, "s1", event_id=f"{tag}-2", embedding=[0, 1.0, 0]))
    stage.process([later])  # a retry of event 2 much later, on another partition
    offsets = [json.loads(v)["source_offset"] for t, _, v in producer.sent if t == "up"]
    assert offsets == [10, 11, 10, 11]
    assert registry.get_sample_value("driftline_embed_duplicate_events_total") == 2
    client.close()


def test_an_event_dead_lettered_after_its_id_was_stored_counts_when_sent_again(
        redis_url: str) -> None:
    """An event that fails alone after its id was stored goes to the dead-letter topic; sent
    again once fixed, at a new position, it is not a duplicate."""

    class Picky(Reference):
        def baseline_for(self, station: str, shift: str | None) -> Any:
            if station == "boom":
                raise RuntimeError("no baseline for this station")
            return super().baseline_for(station, shift)

    stage, producer, registry, client = _stage(redis_url, Picky())
    tag = uuid.uuid4().hex[:8]
    stage.process_guarded([
        Msg("ev", 0, 0, b"k", _event(0, "s1", event_id=f"{tag}-0", embedding=[1.0, 0, 0])),
        Msg("ev", 0, 1, b"k", _event(1, "boom", event_id=f"{tag}-1", embedding=[1.0, 0, 0]))])
    assert [(t, json.loads(v).get("reason")) for t, _, v in producer.sent] == [
        ("up", None), ("dlq", "processing_failed")]
    stage.process_guarded([  # the fixed event, replayed from the dead-letter topic
        Msg("ev", 0, 9, b"k", _event(1, "s2", event_id=f"{tag}-1", embedding=[1.0, 0, 0]))])
    assert [json.loads(v)["source_offset"] for t, _, v in producer.sent if t == "up"] == [0, 9]
    assert registry.get_sample_value("driftline_embed_duplicate_events_total") == 0
    client.close()


def test_a_late_label_keeps_the_reference_its_event_was_embedded_on(redis_url: str) -> None:
    """A reference activated between an event and its label: the label's cluster id is the
    old reference's, so its updates say so, and the detect stage skips them as another
    reference's instead of judging them against the new one's clusters."""

    class Newer(Reference):
        reference_id = "ref-newer"

    tag = uuid.uuid4().hex[:8]
    before, _, _, client = _stage(redis_url)
    before.process([Msg("ev", 0, 0, b"k", _event(0, "s1", event_id=f"{tag}-0",
                                                 embedding=[1.0, 0, 0],
                                                 prediction={"label": "ok", "score": 0.9}))])
    after, producer, _, client2 = _stage(redis_url, Newer())
    after.process([
        Msg("ev", 0, 1, b"k", json.dumps({
            "event_id": f"{tag}-0", "ts": "2026-11-23T09:00:00Z", "station": "s1",
            "shift": "day", "lot": "L1", "label": "scratch"}).encode()),
        Msg("ev", 0, 2, b"k", _event(2, "s1", event_id=f"{tag}-2", embedding=[1.0, 0, 0]))])
    got = [(u["event_id"], u["late_label"], u["reference_id"])
           for u in (json.loads(v) for t, _, v in producer.sent if t == "up")]
    assert got == [(f"{tag}-0", True, "ref-test"), (f"{tag}-2", False, "ref-newer")]
    client.close()
    client2.close()


def _until_through(redis_url: str, batch: list[Msg], restarts: int
                   ) -> tuple[list[str], Producer, CollectorRegistry]:
    """``batch`` read by a fresh worker after each stop (as its supervisor restarts it), until
    a worker gets through it or ``restarts`` ran: the stops' reasons (the failure count, or the
    refusal), and the last worker's producer and registry."""
    stops: list[str] = []
    for _restart in range(restarts):
        stage, producer, registry, client = _stage(redis_url, _FragileReference())
        try:
            stage.process_guarded(batch)
        except RuntimeError as exc:
            found = re.search(r"failure \d of \d|the worker, not the events", str(exc))
            stops.append(found.group() if found else str(exc))
            assert [t for t, _, _ in producer.sent] == []  # nothing sent: all read again
            continue
        finally:
            client.close()
        break
    return stops, producer, registry


def test_a_poison_event_is_dead_lettered_at_its_third_failure(redis_url: str) -> None:
    """An event that fails alone, with none of its kind going through, stops the worker: the
    fault may be its own. Counted in Redis across restarts, the event's third failure
    dead-letters it instead (two stops), so that one poison event cannot stall its partition
    for good; a later one, after an event went through, likewise. Without the count every
    restart stopped again on the first one."""
    tag = uuid.uuid4().hex[:8]
    topic = f"ev-{tag}"

    def msg(n: int, second: float) -> Msg:
        return Msg(topic, 0, n, b"k", _event(n, "s1", event_id=f"{tag}-{n}",
                                             embedding=[1.0, second, 0.0]))

    dead = []
    for batch, expected in (([msg(0, 7.0)], ["failure 1 of 3", "failure 2 of 3"]),
                            ([msg(1, 0.0)], []),  # a good event goes through
                            ([msg(2, 7.0)], ["failure 1 of 3", "failure 2 of 3"])):
        stops, producer, registry = _until_through(redis_url, batch, 6)
        assert stops == expected
        dead += [json.loads(v) for t, _, v in producer.sent if t == "dlq"]
    assert [(d["offset"], d["reason"]) for d in dead] == [(0, "processing_failed"),
                                                         (2, "processing_failed")]
    assert all("failed alone 3 times (2 worker stops): RuntimeError: index: unexpected input"
               in d["detail"] for d in dead)


def test_a_broken_worker_dead_letters_one_event_not_every_one(redis_url: str) -> None:
    """A worker that fails on every event (here its index) makes each look like poison. After
    one poison event on a partition, the next one is dead-lettered only once an event has gone
    through there: until then the worker keeps stopping and the events stay in Kafka. Without
    that rule every event of the partition went to the dead-letter topic, three failures
    each."""
    tag = uuid.uuid4().hex[:8]
    topic = f"ev-{tag}"
    batches = [[Msg(topic, 0, n, b"k", _event(n, "s1", event_id=f"{tag}-{n}",
                                              embedding=[1.0, 7.0, 0.0]))] for n in range(2)]
    stops, producer, _ = _until_through(redis_url, batches[0], 6)
    assert stops == ["failure 1 of 3", "failure 2 of 3"]
    assert [json.loads(v)["offset"] for t, _, v in producer.sent if t == "dlq"] == [0]
    stops, producer, _ = _until_through(redis_url, batches[1], 6)
    assert stops == ["failure 1 of 3", "failure 2 of 3", *["the worker, not the events"] * 4]
    assert producer.sent == []
