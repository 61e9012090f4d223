"""Detect stage without Kafka: the fast slice-update parser, batch application (bad records
skipped, duplicates dropped, the same states however the stream is cut into polls) and the
checkpoint record format."""

from __future__ import annotations

import gc
import json
import logging
import math
import socket
import time
import tracemalloc
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any, NamedTuple

import numpy as np
import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st
from kafka import TopicPartition
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from driftline.consumers import detect_stage
from driftline.consumers.checkpoint import (
    REDIS_WAIT_S,
    CheckpointStore,
    Fenced,
    ResetRequest,
    StoredRecords,
    decode_record,
    encode_record,
    encode_summary,
    store_client,
)
from driftline.consumers.detect_stage import (
    DetectStage,
    FastUpdate,
    PartitionState,
    SliceEntry,
    parse_update,
)
from driftline.consumers.slice_state import SliceState, UpdateView
from driftline.core.baselines import DetectorBaseline
from driftline.core.slices import SliceDetectors
from driftline.core.snapshot import plain
from driftline.metrics import ConsumerMetrics, DetectMetrics
from driftline.schema import SliceUpdate

T0 = datetime(2026, 11, 2, 6, 0, tzinfo=UTC)
FIELDS = ("slice_id", "template", "event_id", "ts", "source_partition", "source_offset",
          "station", "shift", "lot", "baseline", "cluster", "distance", "ood", "model_version",
          "prediction", "label", "loss", "error", "late_label", "reference_id")


class Msg(NamedTuple):
    partition: int
    offset: int
    value: bytes
    timestamp: int
    headers: tuple[tuple[str, bytes], ...] = ()


class Baselines:
    def __init__(self) -> None:
        self.p = {"s1": np.array([0.6, 0.3, 0.1]), "s2": np.array([0.2, 0.3, 0.5])}
        self.judged: dict[str, DetectorBaseline] = {}

    def cluster_mix(self, key: str) -> np.ndarray:
        return self.p[key]

    def ood_rate(self, key: str) -> float:
        return 0.02 if key == "s1" else 0.05

    def detector_baseline(self, key: str) -> DetectorBaseline:
        """Taken as exact here (bounds = the stated mix and rate), one object per ``p``."""
        p, b = self.p[key], self.judged.get(key)
        if b is None or b.p is not p:
            b = self.judged[key] = DetectorBaseline.exact(p, self.ood_rate(key))
        return b

    def expected_error(self, cluster: int) -> float | None:
        return 0.1

    def prediction(self, key: str) -> None:  # a reference without prediction baselines
        return None


def _update(i: int, **over: Any) -> SliceUpdate:
    station = ("s1", "s2")[i % 2]
    doc: dict[str, Any] = dict(
        slice_id=f"station={station}", template="station", event_id=f"ev-{i}",
        ts=T0 + timedelta(seconds=7 * i), source_partition=i % 3, source_offset=i,
        station=station, shift="A", lot="L1", baseline=station, cluster=(i * 7) % 3,
        distance=0.1 * (i % 5), ood=i % 11 == 0, model_version="v1")
    return SliceUpdate(**{**doc, **over})


def _stage() -> DetectStage:
    baselines = Baselines()

    def new_slice(u: UpdateView) -> SliceState:
        return SliceState(u.slice_id, u.template, SliceDetectors(arl0=50.0, bucket_seconds=60.0),
                          baselines, 20)

    reg = CollectorRegistry()
    stage = DetectStage(None, "t", None, new_slice,  # type: ignore[arg-type]
                        lambda snap: SliceState.restore(snap, baselines, 20),
                        DetectMetrics(reg), ConsumerMetrics(reg))
    stage.parts = {0: PartitionState(epoch=1, next_offset=None, slices={})}
    return stage


def _states(stage: DetectStage) -> dict[str, Any]:
    return {sid: plain({"state": e.model.snapshot(), "applied": e.applied})
            for sid, e in stage.parts[0].slices.items()}


def _fields(upd: UpdateView) -> dict[str, Any]:
    pred = upd.prediction
    return {f: getattr(upd, f) for f in FIELDS} | {
        "prediction": None if pred is None else (pred.label, pred.score)}


@settings(max_examples=60, deadline=None)
@given(i=st.integers(0, 10_000), cluster=st.none() | st.integers(0, 2),
       ood=st.none() | st.booleans(), label=st.none() | st.just("scratch"),
       error=st.none() | st.booleans(), loss=st.none() | st.floats(0, 5),
       version=st.none() | st.just("v2"), late=st.booleans(),
       ref=st.none() | st.just("3f9c2a7b1d4e8f60"),
       prediction=st.none() | st.fixed_dictionaries({
           "label": st.text(min_size=1, max_size=128), "score": st.floats(0, 1)}))
def test_fast_parse_reads_what_pydantic_reads(
    i: int, cluster: int | None, ood: bool | None, label: str | None, error: bool | None,
    loss: float | None, version: str | None, late: bool, ref: str | None,
    prediction: dict[str, Any] | None
) -> None:
    upd = _update(i, cluster=cluster, ood=ood, label=label, error=error, loss=loss,
                  model_version=version, late_label=late, reference_id=ref,
                  prediction=prediction)
    raw = upd.model_dump_json().encode()
    fast = parse_update(raw)
    assert isinstance(fast, FastUpdate)
    assert _fields(fast) == _fields(upd)


def test_parse_falls_back_to_validation() -> None:
    doc = json.loads(_update(3).model_dump_json())
    coerced = parse_update(json.dumps({**doc, "cluster": "2", "source_offset": 3.0}).encode())
    assert isinstance(coerced, SliceUpdate) and coerced.cluster == 2
    with_prediction = {**doc, "prediction": {"label": "ok", "score": 1}}
    fast = parse_update(json.dumps(with_prediction).encode())
    assert isinstance(fast, FastUpdate) and fast.prediction == ("ok", 1.0)
    for score, read in (("0.5", 0.5), (True, 1.0)):  # pydantic coerces these
        slow = parse_update(json.dumps({**doc, "prediction": {"label": "ok", "score": score}})
                            .encode())
        assert isinstance(slow, SliceUpdate) and slow.prediction is not None
        assert slow.prediction.score == read
    for pred in ({"label": "ok", "score": 1.5}, {"label": "", "score": 0.5},
                 {"label": "ok", "score": 0.5, "extra": 1}, {"label": "ok"}, ["ok", 0.5],
                 {"label": "x" * 129, "score": 0.5}):
        with pytest.raises(ValidationError):
            parse_update(json.dumps({**doc, "prediction": pred}).encode())
    for bad in (b"{not json", b"\xff\xfe", b"[1, 2]", json.dumps({**doc, "ts": "yesterday"}),
                json.dumps({k: v for k, v in doc.items() if k != "baseline"}),
                json.dumps({**doc, "source_offset": "x"}), json.dumps({**doc, "ood": "maybe"})):
        with pytest.raises(ValidationError):
            parse_update(bad if isinstance(bad, bytes) else bad.encode())


def test_bad_records_are_logged_and_skipped_duplicates_dropped(
    caplog: pytest.LogCaptureFixture
) -> None:
    stage = _stage()
    good = [Msg(0, i, _update(i).model_dump_json().encode(), 1) for i in range(40)]
    bad = [Msg(0, 100 + i, v, 1) for i, v in enumerate(
        [b"{not json", b'{"slice_id": 3}', _update(1001, cluster=7).model_dump_json().encode(),
         _update(1002, baseline="nowhere").model_dump_json().encode()])]
    with caplog.at_level(logging.ERROR):
        stage.apply_batch(0, good[:20] + bad[:2] + good[20:] + good[5:10])
        before = _states(stage)
        stage.apply_batch(0, bad[2:])  # cluster 7 of 3, unknown baseline: nothing changes
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().endswith("skipped")]
    assert skipped == ["unreadable slice-update skipped"] * 2 + [
        "unusable slice-update skipped"] * 2
    assert _states(stage) == before
    assert sum(stage.slice_counts().values()) == 40
    assert stage.parts[0].next_offset == 104
    stage.store = _CommittingStore()  # type: ignore[assignment]
    stage.consumer = _Consumer()  # type: ignore[assignment]
    assert stage.checkpoint()  # skips are counted once committed
    samples = {s.name: s.value for m in stage.metrics.updates.collect() for s in m.samples}
    assert samples["driftline_detect_slice_updates_total"] == 40
    dupes = {s.name: s.value for m in stage.metrics.duplicates.collect() for s in m.samples}
    assert dupes["driftline_detect_duplicates_total"] == 5
    skips = {s.labels["reason"]: s.value for m in stage.metrics.skipped.collect()
             for s in m.samples if s.name.endswith("_total") and s.value}
    assert skips == {"unreadable": 2.0, "unusable": 2.0}


def test_a_reference_with_other_clusters_restarts_the_slice(
    caplog: pytest.LogCaptureFixture
) -> None:
    stage = _stage()
    stage.apply_batch(0, [Msg(0, i, _update(2 * i).model_dump_json().encode(), 1)
                          for i in range(30)])
    entry = stage.parts[0].slices["station=s1"]
    assert entry.model.n == 30
    entry.model.baselines.p["s1"] = np.full(5, 0.2)  # the reference was rebuilt with K = 5
    with caplog.at_level(logging.WARNING):
        stage.apply_batch(0, [Msg(0, 30 + i, _update(2 * (30 + i), cluster=4)
                                  .model_dump_json().encode(), 1) for i in range(10)])
    restarted = [r for r in caplog.records if "restarted" in r.getMessage()]
    assert len(restarted) == 1 and restarted[0].__dict__["previous"] == 3
    assert entry.model.n == 10  # counted afresh against the new clusters, none skipped
    assert entry.model.det.counts.n_clusters == 5


@settings(max_examples=25, deadline=None)
@given(cuts=st.lists(st.integers(1, 299), max_size=12))
def test_states_do_not_depend_on_how_the_stream_is_polled(cuts: list[int]) -> None:
    msgs = [Msg(0, i, _update(i, ood=i % 4 == 0 if i > 150 else i % 11 == 0).model_dump_json()
                .encode(), 1) for i in range(300)]
    whole, pieces = _stage(), _stage()
    whole.apply_batch(0, msgs)
    edges = [0, *sorted(set(cuts)), len(msgs)]
    for a, b in zip(edges, edges[1:], strict=False):
        if a < b:
            pieces.apply_batch(0, msgs[a:b])
    assert whole.outbox == pieces.outbox and whole.outbox  # the OOD change alarmed
    assert _states(whole) == _states(pieces)


def test_checkpoint_records_round_trip_and_read_legacy_json() -> None:
    stage = _stage()
    stage.apply_batch(0, [Msg(0, i, _update(i).model_dump_json().encode(), 1)
                          for i in range(200)])
    for sid, entry in stage.parts[0].slices.items():
        raw = encode_record({"state": entry.model.snapshot(), "applied": entry.applied})
        back = decode_record(raw)
        restored = SliceState.restore(back["state"], Baselines(), 20)
        assert plain(restored.snapshot()) == plain(entry.model.snapshot()), sid
        legacy = json.dumps(plain({"state": entry.model.snapshot(), "applied": entry.applied}))
        assert plain(decode_record(legacy.encode())) == plain(back)
        assert len(raw) < len(legacy)


def test_fast_update_has_every_slice_update_field() -> None:
    # the fast parser fills FastUpdate by hand: a field added to SliceUpdate must be added there
    assert set(FastUpdate.__slots__) == set(SliceUpdate.model_fields)


def test_exemplars_carry_their_event_position_and_older_checkpoints_still_read() -> None:
    stage = _stage()
    stage.apply_batch(0, [Msg(0, i, _update(i).model_dump_json().encode(), 1)
                          for i in range(30)])
    entry = next(iter(stage.parts[0].slices.values()))
    snap = plain(entry.model.snapshot())
    newest = snap["exemplars"][-1]
    upd = next(_update(i) for i in range(30) if _update(i).event_id == newest[0])
    assert newest[-2:] == [upd.source_partition, upd.source_offset]
    # written before thumbnails: five fields per exemplar, or dicts (format v1)
    snap["exemplars"] = [e[:5] for e in snap["exemplars"]]
    old = SliceState.restore(snap, Baselines(), 20)
    assert all(len(e) == 7 and e[5:] == (None, None) for e in old.exemplars)
    assert len(old.exemplars) == len(snap["exemplars"]) == 8
    snap["exemplars"] = [{"event_id": "e1", "cluster": 2, "distance": 0.1, "ts": 5.0,
                          "ood": False}]
    assert list(SliceState.restore(snap, Baselines(), 20).exemplars) == [
        ("e1", 2, 0.1, 5.0, False, None, None)]


def test_end_to_end_latency_is_observed_for_applied_updates_carrying_their_event_time() -> None:
    from driftline.schema import SOURCE_TS_HEADER

    stage = _stage()
    arrived = int(time.time() * 1000) - 2000  # the events reached Kafka two seconds ago

    def msg(i: int, sampled: bool) -> Msg:
        headers = ((SOURCE_TS_HEADER, b"%d" % arrived),) if sampled else ()
        return Msg(0, i, _update(i).model_dump_json().encode(), 1, headers)

    stage.apply_batch(0, [msg(i, i % 4 == 0) for i in range(40)])  # 10 carry the header
    stage.apply_batch(0, [msg(i, True) for i in range(8, 12)])  # replays: not observed
    stage.apply_batch(0, [Msg(0, 40, b"not json", 1, ((SOURCE_TS_HEADER, b"1"),))])
    hist = stage.metrics.e2e_latency
    count = sum(s.value for m in hist.collect() for s in m.samples if s.name.endswith("_count"))
    total = sum(s.value for m in hist.collect() for s in m.samples if s.name.endswith("_sum"))
    assert count == 10
    assert 2.0 <= total / count < 3.0


class _Consumer:
    """What the stage asks of its consumer around rebalances (no broker): pause, resume, seek,
    commits and the group generation."""

    def __init__(self, generation: int = 4) -> None:
        self.paused: set[int] = set()
        self.seeks: dict[int, int] = {}
        self.from_start: set[int] = set()
        self.generation = generation
        self.rejoins = 0
        self._coordinator = SimpleNamespace(request_rejoin=self._rejoin)

    def _rejoin(self) -> None:
        self.rejoins += 1

    def seek_to_beginning(self, tp: TopicPartition) -> None:
        self.from_start.add(tp.partition)

    def pause(self, *tps: TopicPartition) -> None:
        self.paused.update(tp.partition for tp in tps)

    def resume(self, *tps: TopicPartition) -> None:
        self.paused.difference_update(tp.partition for tp in tps)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.seeks[tp.partition] = offset

    def commit(self, offsets: Any) -> None:
        pass

    def commit_async(self, offsets: Any) -> None:
        pass

    def group_metadata(self) -> Any:
        return SimpleNamespace(generation_id=self.generation)


def _unreachable_store() -> CheckpointStore:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return CheckpointStore(store_client(f"redis://127.0.0.1:{port}/0", socket_timeout_s=0.5),
                           wait_s=REDIS_WAIT_S)


def _batch(partition: int, first: int, n: int) -> list[Msg]:
    return [Msg(partition, first + i, _update(first + i).model_dump_json().encode(), 0)
            for i in range(n)]


def _outcomes(stage: DetectStage) -> dict[str, float]:
    return {s.labels["outcome"]: s.value for m in stage.metrics.checkpoints.collect()
            for s in m.samples if s.name.endswith("_total")}


class _EmptyStore:
    """A reachable store that has never checkpointed anything."""

    wait_s = 1.0
    waiting_at_most = staticmethod(CheckpointStore.waiting_at_most)

    def claim(self, partitions: Any) -> dict[int, int]:
        return dict.fromkeys(partitions, 7)

    def load(self, partition: int) -> tuple[None, dict[str, Any], str]:
        return None, {}, "0-0"


def test_revoke_with_redis_unreachable_gives_up_in_time_and_reloads_what_it_keeps() -> None:
    """The revoke listener blocks kafka-python's heartbeats: with Redis refusing connections
    the final checkpoint is given up after ``revoke_wait_s`` (not the store's minute), the
    uncommitted work of every partition is dropped (one outbox serves them all) and the kept
    partition — never checkpointed — is paused, to be loaded again and read from the start."""
    stage = _stage()
    stage.store = _unreachable_store()
    stage.consumer = _Consumer()  # type: ignore[assignment]
    stage.revoke_wait_s = 0.5  # against the store's minute
    stage.parts[1] = PartitionState(epoch=1, next_offset=None, slices={})
    stage.apply_batch(0, _batch(0, 0, 20))
    stage.apply_batch(1, _batch(1, 100, 20))
    stage.outbox.append({"kind": "alarm"})
    t0 = time.monotonic()
    stage.on_partitions_revoked({TopicPartition("t", 0)})
    assert time.monotonic() - t0 < 5
    assert stage.parts == {} and stage.outbox == []
    assert stage.pending == {1} and stage.consumer.paused == {1}
    stage.store = _EmptyStore()  # type: ignore[assignment]
    stage._redis_retry_at = 0.0
    stage._generation = 4  # the generation that assigned partition 1 (the consumer's)
    stage._restore_pending()
    assert stage.consumer.from_start == {1} and stage.consumer.paused == set()  # not lost
    assert _outcomes(stage) == {"failed": 1.0, "dropped": 1.0}


class _FencingStore:
    """A store whose commit finds partition 0 claimed by another worker."""

    wait_s = 1.0
    waiting_at_most = staticmethod(CheckpointStore.waiting_at_most)

    def control_after(self, after: str) -> list[tuple[str, str]]:
        return []

    def commit(self, epochs: Any, *args: Any) -> None:
        raise Fenced({0}, "were claimed by another worker")


def test_a_fenced_checkpoint_drops_the_stale_partition_and_reloads_the_others() -> None:
    stage = _stage()
    stage.store = _FencingStore()  # type: ignore[assignment]
    stage.consumer = _Consumer()  # type: ignore[assignment]
    stage.parts[1] = PartitionState(epoch=1, next_offset=None, slices={})
    stage.apply_batch(0, _batch(0, 0, 10))
    stage.apply_batch(1, _batch(1, 50, 10))
    assert stage._checkpoint_safely() is True
    assert stage.parts == {} and stage.outbox == []
    assert stage.pending == {1}  # ours still: loaded again from its checkpoint
    assert stage.consumer.paused == {0, 1}  # 0 waits for the group to reassign it...
    assert stage.fenced == {0} and stage.consumer.rejoins == 1  # ...which is asked for
    assert _outcomes(stage) == {"fenced": 1.0}


def test_work_dropped_at_a_revoke_is_read_again_when_the_partitions_come_back() -> None:
    """EAGER rebalancing revokes every partition; with Redis down their never-checkpointed
    work is dropped, and when the group hands them back kafka-python keeps its read position:
    the restore must send them to the beginning (Redis has no offset), or that work is lost."""
    stage = _stage()
    stage.store = _unreachable_store()
    stage.consumer = consumer = _Consumer()  # type: ignore[assignment]
    stage.revoke_wait_s = 0.2
    stage.parts[1] = PartitionState(epoch=1, next_offset=None, slices={})
    stage.apply_batch(0, _batch(0, 0, 10))
    stage.apply_batch(1, _batch(1, 100, 10))
    stage.on_partitions_revoked({TopicPartition("t", 0), TopicPartition("t", 1)})
    assert stage.parts == {} and stage.pending == set()
    stage.on_partitions_assigned({TopicPartition("t", 0), TopicPartition("t", 1)})
    stage.store = _EmptyStore()  # type: ignore[assignment]
    stage._redis_retry_at = 0.0
    stage._restore_pending()
    assert consumer.from_start == {0, 1} and consumer.paused == set()
    assert sorted(stage.parts) == [0, 1] and stage.pending == set()


def test_partitions_are_not_claimed_once_the_group_moved_on() -> None:
    """A member evicted during an outage learns it from its heartbeats (generation reset):
    it must not claim, or it would fence the partitions' new owner."""
    stage = _stage()
    stage.parts = {}
    stage.store = _unreachable_store()
    stage.store.wait_s = 0.5
    stage.consumer = consumer = _Consumer(generation=4)  # type: ignore[assignment]
    stage.on_partitions_assigned({TopicPartition("t", 2)})
    assert stage.pending == {2} and consumer.paused == {2}
    consumer.generation = -1
    stage._restore_pending()
    assert not stage.outage.active and stage.pending == {2}  # no Redis call was made
    consumer.generation = 4
    stage._restore_pending()
    assert stage.outage.active and stage.pending == {2}  # tried: Redis is down


def test_summaries_are_stored_as_json_that_reads_back_as_written() -> None:
    for summary in ({"template": "station", "dims": {"station": "Stätion-1"}, "n": 3,
                     "last_time": 1793603363.5, "ratios": {"cluster_mix": 0.1 + 0.2},
                     "ood_ratio": 1e-05, "open": ["ood_rate"]},
                    {"template": "lot", "dims": {"lot": "bad\ud800"}, "n": 0, "last_time": None,
                     "ratios": {}, "ood_ratio": None, "open": []}):
        assert json.loads(encode_summary(summary)) == json.loads(json.dumps(summary))


class _CommittingStore(_FencingStore):
    def commit(self, epochs: Any, *args: Any) -> None:
        pass


def _series(stage: DetectStage) -> set[tuple[str, ...]]:
    return {(s.name, *s.labels.values()) for m in stage.metrics.slices.collect()
            for s in m.samples}


@pytest.mark.parametrize("redis_up", [True, False])
def test_gauges_of_slices_handed_to_another_worker_are_dropped(redis_up: bool) -> None:
    """The new owner exports them; a frozen copy here would keep a resolved slice "in alarm"
    under ``max by`` in the rules and dashboards. Whether or not the revoke's checkpoint
    reaches Redis."""
    stage = _stage()
    stage.store = _CommittingStore() if redis_up else _unreachable_store()  # type: ignore[assignment]
    stage.consumer = _Consumer()  # type: ignore[assignment]
    stage.revoke_wait_s = 0.2
    stage.parts[1] = PartitionState(epoch=1, next_offset=None, slices={})
    for p in (0, 1):  # station s1's updates on partition 0, s2's on partition 1
        stage.apply_batch(p, [Msg(p, i, _update(i).model_dump_json().encode(), 0)
                              for i in range(p, 40, 2)])
    for part in stage.parts.values():
        for entry in part.slices.values():
            stage._publish_gauges(entry, entry.model.gauges())
    before = _series(stage)
    assert {s[1] for s in before} == {"s1", "s2"}
    stage.on_partitions_revoked({TopicPartition("t", 0)})
    # the revoke's checkpoint failing drops the uncommitted work of every partition: the kept
    # one is loaded again from its checkpoint, and its slices publish again when next updated
    assert _series(stage) == ({s for s in before if s[1] == "s2"} if redis_up else set())


def test_the_per_slice_gauges_hold_little_memory_a_series() -> None:
    """DESIGN §7 counts the detect stage's memory for 10,000 live slices (< 100 MB): their
    1,600 station and station×shift slices export 17,600 gauge series, and a prometheus_client
    child per series took ~800 B (14 MB, the restored case over the target)."""
    stage = _stage()
    detectors = ("cluster_mix", "ood_rate", "prediction_mix", "confidence")
    stations = 300
    entries = [SliceEntry(SimpleNamespace(  # type: ignore[arg-type]
        template="station", dims={"station": f"st{i}"}, open={})) for i in range(stations)]
    gauges = [{"ratios": {d: i / 7 + j for j, d in enumerate(detectors)},
               "ood_ratio": i / 3, "cluster_shares": {k: i / 11 + k for k in range(8)}}
              for i in range(stations)]
    stage._publish_gauges(entries[0], gauges[0])  # first-call costs
    gc.collect()
    tracemalloc.start()
    try:
        for entry, g in zip(entries[1:], gauges[1:], strict=True):
            stage._publish_gauges(entry, g)
        gc.collect()
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    series = len(_series(stage))
    assert series == stations * (2 * len(detectors) + 1 + 8)
    assert held / (series * (stations - 1) / stations) < 100  # bytes a series


def test_a_fence_that_reloads_a_kept_partition_leaves_no_frozen_gauge() -> None:
    """A fence on partition 0 parks partition 1 and reloads it from its checkpoint; the
    reloaded slices start untracked, so partition 1's series must go with the park, or a
    later revoke of partition 1 leaves them exported beside the next owner's."""
    stage = _stage()
    stage.store = _CommittingStore()  # type: ignore[assignment]
    stage.consumer = _Consumer()  # type: ignore[assignment]
    stage.parts[1] = PartitionState(epoch=1, next_offset=None, slices={})
    for p in (0, 1):  # station s1's updates on partition 0, s2's on partition 1
        stage.apply_batch(p, [Msg(p, i, _update(i).model_dump_json().encode(), 0)
                              for i in range(p, 40, 2)])
    assert stage.checkpoint()
    assert {s[1] for s in _series(stage)} == {"s1", "s2"}
    records = {sid: {"state": e.model.snapshot(), "applied": e.applied}
               for sid, e in stage.parts[1].slices.items()}
    stage._on_fenced(Fenced({0}, "claimed"))  # partition 1 parked, to be loaded again
    assert {s[1] for s in _series(stage)} == set()
    stage.pending.discard(1)  # loaded again, as _restore_pending does
    stage.parts[1] = PartitionState(1, 40, {
        sid: SliceEntry(stage.restore_slice(r["state"]), r["applied"])
        for sid, r in records.items()})
    stage.apply_batch(1, [Msg(1, 41, _update(41).model_dump_json().encode(), 0)])
    assert stage.checkpoint()
    assert {s[1] for s in _series(stage)} == {"s2"}  # published again by its new update
    stage.on_partitions_revoked({TopicPartition("t", 1)})
    assert _series(stage) == set()


def test_an_event_sent_with_its_label_counts_for_drift_and_a_late_label_does_not() -> None:
    """DESIGN §2 lets an inference event carry its label: its cluster and OOD flag must reach
    the cluster-mix and OOD detectors like any event's (they were skipped as if it were a late
    label). A late label carries its event's cluster for the expected error only."""
    plain, labelled = _stage(), _stage()
    for i in range(0, 300, 2):  # station s1
        plain.apply_batch(0, [Msg(0, i, _update(i).model_dump_json().encode(), 0)])
        labelled.apply_batch(0, [Msg(0, i, _update(
            i, label="scratch", error=i % 3 == 0).model_dump_json().encode(), 0)])

    def seen(stage: DetectStage) -> tuple[Any, ...]:
        model = stage.parts[0].slices["station=s1"].model
        det = model.det.detectors
        counts = model.det.counts.since(0.0)
        return (counts.n, tuple(counts.clusters), counts.ood, det["cluster_mix"].statistic,
                det["ood_rate"].statistic)

    assert seen(labelled) == seen(plain) and seen(plain)[0] == 150
    assert "error_rate" in labelled.parts[0].slices["station=s1"].model.det.detectors
    before = seen(labelled)
    late = _update(300, label="scratch", error=True, distance=None, ood=None, late_label=True)
    labelled.apply_batch(0, [Msg(0, 300, late.model_dump_json().encode(), 0)])
    assert seen(labelled) == before  # the event was counted when it was embedded


@pytest.mark.parametrize(("sid", "template"), [
    ("s1", "station"), ("lot=L1", "station"), ("station=s1|lot=L1", "station"),
    ("station=", "station")])
def test_a_slice_id_that_does_not_match_its_template_is_skipped(sid: str, template: str) -> None:
    """Such a record (foreign, or damaged) became a slice whose summary and gauges failed every
    checkpoint, and, restored, every revoke: the worker crash-looped."""
    stage = _stage()
    stage.store = _CommittingStore()  # type: ignore[assignment]
    stage.consumer = _Consumer()  # type: ignore[assignment]
    bad = _update(0, slice_id=sid, template=template).model_dump_json().encode()
    stage.apply_batch(0, [Msg(0, 0, bad, 0), Msg(0, 1, _update(1).model_dump_json().encode(), 0)])
    assert list(stage.parts[0].slices) == ["station=s2"]
    assert stage.checkpoint()
    skips = {s.labels["reason"]: s.value for m in stage.metrics.skipped.collect()
             for s in m.samples if s.name.endswith("_total") and s.value}
    assert skips == {"unreadable": 1.0}
    assert stage._well_formed("station=s1|shift=A", "station+shift", 0)


def test_live_slices_follow_the_slices_created_between_rebalances() -> None:
    stage = _stage()
    stage.store = _CommittingStore()  # type: ignore[assignment]
    stage.consumer = _Consumer()  # type: ignore[assignment]
    stage.apply_batch(0, [Msg(0, i, _update(i, slice_id=f"lot=L{i}", template="lot", lot=f"L{i}")
                              .model_dump_json().encode(), 0) for i in range(50)])
    stage.checkpoint()
    live = next(s.value for m in stage.metrics.live_slices.collect() for s in m.samples)
    assert live == 50


def _feed(stage: DetectStage, first: int, n: int, **over: Any) -> None:
    """``n`` updates of station s1 (even event numbers) from offset ``first``."""
    stage.apply_batch(0, [Msg(0, first + j, _update(2 * (first + j), **over)
                              .model_dump_json().encode(), 0) for j in range(n)])


def test_a_reference_with_other_clusters_clears_the_slice_s_open_alarms() -> None:
    """Its open alarms were forgotten without a ``clear``, so their incident never resolved."""
    stage = _stage()
    _feed(stage, 0, 40, cluster=2)  # cluster 2 (p = 0.1) floods in: alarms
    model = stage.parts[0].slices["station=s1"].model
    opened = sorted(model.open)
    assert opened and [m["detector"] for m in stage.outbox if m["kind"] == "alarm"] == opened
    stage.outbox.clear()
    model.baselines.p["s1"] = np.full(5, 0.2)  # a reference rebuilt with K = 5
    _feed(stage, 40, 1, cluster=4, ood=False)
    assert [(m["kind"], m["detector"]) for m in stage.outbox] == [
        ("clear", name) for name in opened]
    assert not model.open


def test_the_alarm_log_line_dates_onset_and_crossing_in_utc(
        caplog: pytest.LogCaptureFixture) -> None:
    """It gave the onset as seconds since 1970 (``onset_time: 1794810725.0``) and not the
    crossing, so on-call could not read since when from the log."""
    stage = _stage()
    with caplog.at_level(logging.INFO, logger=detect_stage.__name__):
        _feed(stage, 0, 40, cluster=2)
    alarms = [m for m in stage.outbox if m["kind"] == "alarm"]
    lines = [r.__dict__ for r in caplog.records if r.getMessage() == "alarm"]
    assert alarms and len(lines) == len(alarms)
    for alarm, line in zip(alarms, lines, strict=True):
        onset = datetime.fromtimestamp(alarm["onset_time"], UTC)
        assert line["slice"] == "station=s1" and line["detector"] == alarm["detector"]
        assert line["onset"] == onset.strftime("%Y-%m-%dT%H:%M:%SZ")
        assert line["detected_at"] == datetime.fromtimestamp(
            alarm["time"], UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        assert T0 <= onset <= datetime.fromisoformat(line["detected_at"])
        assert line["statistic"] >= line["threshold"] > 0


def test_late_labels_are_not_events_and_do_not_move_the_gauge_window() -> None:
    """A late label for an old event set the slice's last event time back (the last-hour
    gauges then read some old hour), and counted as one more event (the summary's ``n``, the
    quiet count that auto-resolves an alarm)."""
    stage = _stage()
    for minute in range(180):  # three hours; the last one all cluster 2
        _feed(stage, minute, 1, ts=T0 + timedelta(minutes=minute), ood=False,
              cluster=2 if minute >= 120 else (0, 0, 0, 1, 2)[minute % 5])
    model = stage.parts[0].slices["station=s1"].model
    before, n, last = model.gauges(), model.n, model.last_time
    late = _update(0, ts=T0 + timedelta(minutes=10), source_offset=9999, label="scratch",
                   error=True, distance=None, ood=None, late_label=True)
    stage.apply_batch(0, [Msg(0, 180, late.model_dump_json().encode(), 0)])
    after = model.gauges()
    assert model.last_time == last and after["cluster_shares"] == before["cluster_shares"]
    assert after["cluster_shares"][2] == 1.0  # the last hour, all cluster 2
    assert model.n == n == 180
    assert "error_rate" in model.det.detectors  # the label was applied
    # an event older than the newest does not move the window back either
    _feed(stage, 181, 1, ts=T0, ood=False)
    assert model.last_time == last and model.n == 181


def _checkpointed_skips(stage: DetectStage) -> dict[str, float]:
    """Checkpoint the stage (skips are counted once it lands); the nonzero skip counts."""
    stage.store = _CommittingStore()  # type: ignore[assignment]
    stage.consumer = _Consumer()  # type: ignore[assignment]
    assert stage.checkpoint()
    return {s.labels["reason"]: s.value for m in stage.metrics.skipped.collect()
            for s in m.samples if s.name.endswith("_total") and s.value}


def test_updates_embedded_against_another_reference_are_skipped(
        caplog: pytest.LogCaptureFixture) -> None:
    """A rolling restart after an activation: an embed worker on the new reference while this
    detect worker runs the old one (or the reverse). Their cluster ids name other clusters."""
    stage = _stage()
    stage.reference_id = "old"
    with caplog.at_level(logging.WARNING):
        for ref in ("old", None, "new", "new", "old"):  # None: written before the field
            _feed(stage, stage.parts[0].next_offset or 0, 1, reference_id=ref)
    assert stage.parts[0].slices["station=s1"].model.n == 3
    skips = _checkpointed_skips(stage)
    assert skips == {"other_reference": 2.0}
    (line,) = [r for r in caplog.records if "another reference" in r.getMessage()]
    assert line.__dict__["skipped"] == {"new": 1}  # once a minute, with what was skipped


def test_late_labels_of_another_reference_are_skipped_apart_from_its_updates(
        caplog: pytest.LogCaptureFixture) -> None:
    """After every worker moved to a new reference, late labels of events embedded on the old
    one keep coming. They were counted as other_reference, which DriftlineMixedReferences
    reads as a fleet left split, and logged with advice to restart workers that were fine."""
    stage = _stage()
    stage.reference_id = "new"
    label = dict(label="scratch", error=True, distance=None, ood=None, late_label=True)
    with caplog.at_level(logging.INFO, logger="driftline.consumers.detect_stage"):
        _feed(stage, 0, 1, reference_id="new")
        _feed(stage, 1, 3, reference_id="old", **label)
    skips = _checkpointed_skips(stage)
    assert skips == {"other_reference_label": 3.0}
    lines = [r for r in caplog.records if "another reference" in r.getMessage()]
    assert [(r.levelno, r.__dict__["skipped"]) for r in lines] == [(logging.INFO, {"old": 3})]
    assert "no restart needed" in lines[0].getMessage()


def test_a_slice_restored_under_another_reference_restarts_even_with_as_many_clusters() -> None:
    """Cluster 2 of a rebuilt reference is another cluster: statistics and counts of the old
    one must not go on (they raised alarms fleet-wide after an activation)."""
    stage = _stage()
    baselines = stage.new_slice.__closure__[0].cell_contents  # type: ignore[attr-defined]
    baselines.reference_id = "old"
    _feed(stage, 0, 40, cluster=2)  # alarms on the old reference
    model = stage.parts[0].slices["station=s1"].model
    opened = sorted(model.open)
    assert opened and model.reference_id == "old"
    saved = decode_record(encode_record({"state": model.snapshot(), "applied": {}}))
    restored = SliceState.restore(saved["state"], baselines, 20)
    assert restored.reference_id == "old"
    baselines.reference_id = "new"  # the worker restarted on the rebuilt reference, K = 3
    stage.parts[0].slices["station=s1"].model = restored
    stage.outbox.clear()
    _feed(stage, 40, 1, cluster=0, ood=False)
    assert [(m["kind"], m["detector"]) for m in stage.outbox] == [("clear", d) for d in opened]
    assert restored.n == 1 and restored.reference_id == "new" and not restored.open



def test_slice_state_holds_no_reference_cycles() -> None:
    """A worker holds thousands of slices: ones that hold reference cycles would leave their
    freeing to the garbage collector's full collections, which walk every object of the worker
    (benchmarks/detect_cpu.py shows their cost). Slices — with open alarms (tallies, cells),
    restored from their records, updated after — are freed by reference counting alone: the
    collector finds none of them."""
    stage = _stage()
    _feed(stage, 0, 40, cluster=2)  # alarms open on s1: tallies and cells
    stage.apply_batch(0, [Msg(0, 100 + i, _update(2 * i + 1, source_offset=100 + i)
                              .model_dump_json().encode(), 0) for i in range(30)])  # s2
    entries = stage.parts[0].slices
    assert entries["station=s1"].model.open and entries["station=s1"].model.cells  # type: ignore[attr-defined]
    restored = {sid: stage.restore_slice(decode_record(encode_record(
        {"state": e.model.snapshot(), "applied": e.applied}))["state"])
        for sid, e in entries.items()}
    for i, model in enumerate(restored.values()):
        model.update(_update(200 + i, source_offset=200 + i, cluster=2))
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)  # what a collection finds unreachable stays in gc.garbage
    try:
        del entries, model
        stage.parts.clear()
        restored.clear()
        gc.collect()
        ours = [type(o).__qualname__ for o in gc.garbage
                if type(o).__module__.startswith("driftline")]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert ours == []


class _ResetStore(_CommittingStore):
    """A reachable store holding the on-call's reset requests (``requests``: slice ids)."""

    def __init__(self) -> None:
        self.requests: list[ResetRequest] = []

    def control_after(self, after: str) -> list[ResetRequest]:  # type: ignore[override]
        return self.requests


def _open_alarms(stage: DetectStage) -> dict[tuple[str, ...], float]:
    return {(s.labels["station"], s.labels["shift"], s.labels["detector"]): s.value
            for m in stage.metrics.slices.collect() for s in m.samples
            if s.name == "driftline_detect_open_alarms"}


def test_an_open_alarm_is_exported_at_the_checkpoint_and_goes_with_its_reset() -> None:
    """The ratio restarts at the crossing that opens an alarm, so it is below 1 whenever it is
    published and dashboards reading ``ratio >= 1`` never showed an alarm: whether one is open
    is its own gauge, 1 from the checkpoint after the alarm until a checkpoint after its reset
    (or clear)."""
    stage = _stage()
    stage.store = store = _ResetStore()  # type: ignore[assignment]
    stage.consumer = _Consumer()  # type: ignore[assignment]
    _feed(stage, 0, 40, cluster=2)  # cluster 2 (p = 0.1) floods in: alarms on s1
    model = stage.parts[0].slices["station=s1"].model
    opened = set(model.open)
    assert opened
    assert stage.checkpoint()
    gauge = _open_alarms(stage)
    assert {k[2] for k, v in gauge.items() if v == 1.0} == opened
    assert all(k[:2] == ("s1", "all") for k, v in gauge.items() if v == 1.0)
    assert set(gauge) == {("s1", "all", d) for d in model.det.detectors}
    ratios = {s.labels["detector"]: s.value for m in stage.metrics.slices.collect()
              for s in m.samples
              if s.name == "driftline_detect_statistic_ratio" and s.labels["station"] == "s1"}
    assert max(ratios.values()) < 1  # what the dashboards read before
    store.requests = [ResetRequest("1-0", "station=s1", None)]  # resolved: reset all
    assert stage.checkpoint()
    assert not model.open
    assert set(_open_alarms(stage).values()) == {0.0}


def test_a_reset_logs_the_incident_and_who_resolved_it(caplog: pytest.LogCaptureFixture) -> None:
    stage = _stage()
    stage.store = store = _ResetStore()  # type: ignore[assignment]
    stage.consumer = _Consumer()  # type: ignore[assignment]
    _feed(stage, 0, 40, cluster=2)
    assert stage.checkpoint()
    store.requests = [ResetRequest("1-0", "station=s1", ["cluster_mix"], "DL-000004", "olga")]
    with caplog.at_level(logging.INFO, logger="driftline.consumers.detect_stage"):
        assert stage.checkpoint()
    [rec] = [r for r in caplog.records if r.getMessage() == "slice reset on request"]
    assert (rec.slice, rec.detectors, rec.incident, rec.resolved_by, rec.request) == (
        "station=s1", ["cluster_mix"], "DL-000004", "olga", "1-0")


class _RecordsStore(_EmptyStore):
    """A reachable store holding partition 0's checkpointed records."""

    def __init__(self, records: dict[str, Any]) -> None:
        self.records = records

    def load(self, partition: int) -> tuple[int, dict[str, Any], str]:  # type: ignore[override]
        return 40, self.records, "0-0"


def test_a_new_owner_exports_the_open_alarms_it_restores_before_any_event() -> None:
    """A station in alarm that sends nothing more after a rebalance (the camera is off, the
    line stopped for the drift) still shows its alarm: the restored station slices' gauges go
    out with the restore, not with their next event."""
    before = _stage()
    _feed(before, 0, 40, cluster=2)
    opened = set(before.parts[0].slices["station=s1"].model.open)
    assert opened
    records = {sid: decode_record(encode_record({"state": e.model.snapshot(),
                                                 "applied": e.applied}))
               for sid, e in before.parts[0].slices.items()}
    after = _stage()
    after.parts = {}
    after.store = _RecordsStore(records)  # type: ignore[assignment]
    after.consumer = _Consumer()  # type: ignore[assignment]
    after.pending = {0}
    after._generation = 4  # the generation that assigned partition 0 (the consumer's)
    after._restore_pending()
    assert 0 in after.parts
    assert {k[2] for k, v in _open_alarms(after).items() if v == 1.0} == opened


class _KeepingStore(_CommittingStore):
    """A reachable store that keeps the last checkpoint's records (as encoded) and offsets."""

    def commit(self, epochs: Any, states: Any, offsets: Any, outbox: Any = (),
               summaries: Any = None, control_seen: Any = None, retired: Any = None) -> None:
        self.states, self.offsets = states, offsets


class _Pipeline:
    """The pipelined calls of ``CheckpointStore.claim`` and ``load`` on stored hashes (no
    server): each answered at once, the answers handed back by ``execute``."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data
        self.replies: list[Any] = []

    def incr(self, key: str) -> None:
        self.data[key] = self.data.get(key, 0) + 1
        self.replies.append(self.data[key])

    def hget(self, key: str, field: str) -> None:
        self.replies.append(self.data.get(key, {}).get(field.encode()))

    def hgetall(self, key: str) -> None:
        self.replies.append(dict(self.data.get(key, {})))

    def execute(self) -> list[Any]:
        return self.replies


class _Hashes:
    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data

    def pipeline(self, transaction: bool = True) -> _Pipeline:
        return _Pipeline(self.data)


class _LoadSpy(CheckpointStore):
    """The real store's claim and load; keeps what each load handed over."""

    loaded: list[StoredRecords]

    def load(self, partition: int) -> tuple[int | None, StoredRecords, str]:  # type: ignore[override]
        out = super().load(partition)
        self.loaded.append(out[1])
        return out


def test_a_restore_reads_the_stored_records_one_at_a_time_and_back_as_they_were(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The partition's records as a checkpoint stored them (encoded, in the state hash) come
    back through the store's load and the stage's restore as the slices that were snapshotted
    — states, event counts, applied source offsets — each record taken out of the loaded
    ``StoredRecords`` as it is restored: never all decoded at once, none twice, none left.
    The freed heap the records leave is trimmed once restored, and again once revoked."""
    trims: list[int] = []
    monkeypatch.setattr(detect_stage, "release_free_heap", lambda: trims.append(1) or True)
    before = _stage()
    before.store = kept = _KeepingStore()  # type: ignore[assignment]
    before.parts[0].next_offset = 0
    before.apply_batch(0, _batch(0, 0, 30))  # stations s1, s2 from source partitions 0-2
    before.apply_batch(0, [Msg(0, 30 + i, _update(30 + i, slice_id=f"lot=L{i % 6}",
                                                  template="lot", lot=f"L{i % 6}")
                               .model_dump_json().encode(), 0) for i in range(24)])
    assert before.checkpoint()
    snapshotted = _states(before)
    counts = {sid: e.model.n for sid, e in before.parts[0].slices.items()}
    assert len(snapshotted) == 8 and set(kept.states[0]) == set(snapshotted)
    store = _LoadSpy(_Hashes({  # type: ignore[arg-type]
        "dl:detect:offsets": {b"0": str(kept.offsets[0]).encode()},
        "dl:detect:state:0": {sid.encode(): raw for sid, raw in kept.states[0].items()},
        "dl:detect:control_seen": {b"0": b"5-0"}}))
    store.loaded = []
    after = _stage()
    after.parts = {}
    after.store = store
    after.consumer = consumer = _Consumer()
    after.pending, after._generation = {0}, 4
    restore = after.restore_slice
    left: list[int] = []

    def counting(snap: dict[str, Any]) -> SliceState:
        left.append(len(store.loaded[0]))  # records not handed over yet
        return restore(snap)  # type: ignore[return-value]

    after.restore_slice = counting
    after._restore_pending()
    assert left == list(range(7, -1, -1)) and len(store.loaded[0]) == 0
    assert _states(after) == snapshotted
    assert {sid: e.model.n for sid, e in after.parts[0].slices.items()} == counts
    part = after.parts[0]
    assert part.next_offset == consumer.seeks[0] == 54 and part.control_seen == "5-0"
    assert part.epoch == 1 and after.pending == set()
    assert len(trims) == 1
    after._restore_pending()  # nothing pending: nothing restored, nothing to trim
    assert len(trims) == 1
    after.store = _CommittingStore()  # type: ignore[assignment]
    after.on_partitions_revoked({TopicPartition("t", 0)})
    assert len(trims) == 2 and after.parts == {}


def test_a_shift_named_all_exports_no_gauges_over_its_station_s() -> None:
    """A station×shift cell whose shift is literally "all" has the label set of its station
    slice's gauges: publishing it replaced the station's record (its cluster shares went) and
    its retirement removed them all. Such a cell alarms but exports no gauges."""
    stage = _stage()
    stage.store = _CommittingStore()  # type: ignore[assignment]
    stage.consumer = _Consumer()  # type: ignore[assignment]
    _feed(stage, 0, 40, cluster=2)  # station=s1
    assert stage.checkpoint()

    def samples() -> dict[tuple[str, ...], float]:
        return {(s.name, *s.labels.values()): s.value
                for m in stage.metrics.slices.collect() for s in m.samples}

    before = samples()
    assert before
    cell = _update(40, source_offset=40, cluster=0, ood=True).model_copy(update={
        "slice_id": "station=s1|shift=all", "template": "station+shift"})
    stage.apply_batch(0, [Msg(0, 40, cell.model_dump_json().encode(), 0)])
    assert "station=s1|shift=all" in stage.parts[0].slices
    assert stage.checkpoint()
    assert samples() == before
    stage._unpublish_gauges(stage.parts[0].slices["station=s1|shift=all"])
    assert samples() == before


def test_an_alarm_that_clears_reads_0_after_the_next_checkpoint() -> None:
    stage = _stage()
    stage.store = _CommittingStore()  # type: ignore[assignment]
    stage.consumer = _Consumer()  # type: ignore[assignment]
    _feed(stage, 0, 40, cluster=2)
    assert stage.checkpoint() and 1.0 in _open_alarms(stage).values()
    model = stage.parts[0].slices["station=s1"].model
    offset = 40
    while model.open:  # events as in the baseline (0.6, 0.3, 0.1) until every alarm clears
        _feed(stage, offset, 1, cluster=(0, 0, 0, 0, 0, 0, 1, 1, 1, 2)[offset % 10],
              ood=offset % 50 == 0)
        offset += 1
        assert offset < 10_000
    assert any(m["kind"] == "clear" for m in stage.outbox)
    assert stage.checkpoint()
    assert set(_open_alarms(stage).values()) == {0.0}


# --- slice retirement ----------------------------------------------------------------------

DAY = 86400.0


class _RecordingStore(_CommittingStore):
    """A reachable store that keeps what each checkpoint wrote; ``fail`` commits first fail
    as an outage would."""

    def __init__(self, fail: int = 0) -> None:
        self.commits: list[SimpleNamespace] = []
        self.fail = fail

    def commit(self, epochs: Any, states: Any, offsets: Any, outbox: Any = (),  # type: ignore[override]
               summaries: Any = None, control_seen: Any = None, retired: Any = None) -> None:
        if self.fail:
            self.fail -= 1
            raise redis.ConnectionError("Redis is down")
        self.commits.append(SimpleNamespace(
            states={p: set(s) for p, s in states.items()}, offsets=dict(offsets),
            summaries=set(summaries or ()),
            retired={p: sorted(s) for p, s in (retired or {}).items()}))

    def landed(self, offsets: Any) -> bool:
        return bool(self.commits) and all(
            self.commits[-1].offsets.get(p) == o for p, o in offsets.items())


def _retiring(days: float = 1.0, fail: int = 0) -> DetectStage:
    """A stage that retires slices idle for ``days`` and sweeps at every checkpoint."""
    stage = _stage()
    stage.store = _RecordingStore(fail)  # type: ignore[assignment]
    stage.consumer = _Consumer()  # type: ignore[assignment]
    stage.retire_after_s, stage.retire_sweep_s = days * DAY, 0.0
    return stage


def _lot(offset: int, lot: str, day: float, **over: Any) -> Msg:
    """A lot slice's update at input offset ``offset``, ``day`` days of event time after T0."""
    upd = _update(offset, **{"slice_id": f"lot={lot}", "template": "lot", "lot": lot,
                             "ts": T0 + timedelta(days=day, seconds=offset), **over})
    return Msg(0, offset, upd.model_dump_json().encode(), 0)


def _retired_total(stage: DetectStage) -> float:
    return sum(s.value for m in stage.metrics.retired.collect() for s in m.samples
               if s.name.endswith("_total"))


def _skips(stage: DetectStage) -> dict[str, float]:
    return {s.labels["reason"]: s.value for m in stage.metrics.skipped.collect()
            for s in m.samples if s.name.endswith("_total") and s.value}


def test_idle_slices_are_retired_in_the_checkpoint_unless_an_alarm_is_open(
        caplog: pytest.LogCaptureFixture) -> None:
    """One slice per lot, for good: a lot idle past the horizon (event time, against the
    newest event of its partition) goes from memory and, in the checkpoint's transaction, from
    its state and summary fields; a lot with an open alarm stays."""
    stage = _retiring(days=1.0)
    old = [_lot(i, "L-old", 0.0) for i in range(20)]
    # cluster 2 of baseline s1 (p = 0.1) floods in: an alarm, still open at the lot's end
    alarmed = [_lot(i, "L-alarm", 0.0, cluster=2, baseline="s1") for i in range(20, 60)]
    stage.apply_batch(0, old + alarmed)
    assert stage.checkpoint()  # nothing idle yet: the partition's newest event is day 0
    assert stage.store.commits[-1].retired == {}  # type: ignore[attr-defined]
    assert stage.parts[0].slices["lot=L-alarm"].model.open
    stage.apply_batch(0, [_lot(i, "L-new", 2.0) for i in range(60, 65)])  # two days on
    with caplog.at_level(logging.INFO):
        assert stage.checkpoint()
    commit = stage.store.commits[-1]  # type: ignore[attr-defined]
    assert commit.retired == {0: ["lot=L-old"]} and commit.offsets == {0: 65}
    assert "lot=L-old" not in commit.states[0] | commit.summaries
    assert sorted(stage.parts[0].slices) == ["lot=L-alarm", "lot=L-new"]
    assert stage.parts[0].retired == {}
    assert _retired_total(stage) == 1.0
    (line,) = [r for r in caplog.records if r.getMessage() == "idle slices retired"]
    assert line.__dict__["retired"] == 1 and line.__dict__["by_partition"] == {0: 1}
    assert line.__dict__["live_slices"] == 2
    stage.apply_batch(0, [_lot(65, "L-new", 2.5)])
    assert stage.checkpoint() and stage.store.commits[-1].retired == {}  # type: ignore[attr-defined]


def test_a_retirement_waits_for_a_checkpoint_that_lands() -> None:
    """Redis down at the checkpoint that retires: the slice is out of memory already, and the
    next checkpoint that reaches Redis deletes it (and counts it), with its offsets."""
    stage = _retiring(days=1.0, fail=1)
    stage.apply_batch(0, [_lot(0, "L1", 0.0), _lot(1, "L2", 3.0)])
    assert stage._checkpoint_safely() is False
    assert list(stage.parts[0].slices) == ["lot=L2"] and list(stage.parts[0].retired) == [
        "lot=L1"]
    assert _retired_total(stage) == 0.0
    stage._redis_retry_at = 0.0
    assert stage._checkpoint_safely() is True
    commit = stage.store.commits[-1]  # type: ignore[attr-defined]
    assert commit.retired == {0: ["lot=L1"]} and commit.offsets == {0: 2}
    assert _retired_total(stage) == 1.0 and stage.parts[0].retired == {}


def test_updates_for_a_retired_slice_do_not_bring_its_old_events_back() -> None:
    """The applied source offsets that caught embed-stage duplicates went with the slice: a
    duplicate of one of its events (same source offset, later input offset), or a late label
    for one, is older than the cutoff and is skipped; a new event starts the lot afresh."""
    stage = _retiring(days=1.0)
    stage.apply_batch(0, [_lot(i, "L1", 0.0) for i in range(10)])
    stage.apply_batch(0, [_lot(10, "L2", 2.0)])
    assert stage.checkpoint() and "lot=L1" not in stage.parts[0].slices
    again = _update(3, slice_id="lot=L1", template="lot", lot="L1",
                    ts=T0 + timedelta(seconds=3))  # the embed stage's replay of event 3
    label = _update(4, slice_id="lot=L1", template="lot", lot="L1", ts=T0 + timedelta(seconds=4),
                    source_offset=99, label="scratch", error=True, distance=None, ood=None,
                    late_label=True)
    stage.apply_batch(0, [Msg(0, 11, again.model_dump_json().encode(), 0),
                          Msg(0, 12, label.model_dump_json().encode(), 0)])
    assert "lot=L1" not in stage.parts[0].slices
    assert stage.checkpoint() and _skips(stage) == {"retired": 2.0}
    stage.apply_batch(0, [_lot(13, "L1", 2.0)])  # the lot runs again
    assert stage.parts[0].slices["lot=L1"].model.n == 1


def test_an_idle_slice_is_retired_when_its_updates_come_back_whether_or_not_swept() -> None:
    """The sweep runs on wall time; the outcome must not: an update for a slice idle past the
    horizon starts it afresh even if the sweep has not removed it yet. Without sweeping, the
    old slice (n = 10) would go on."""
    stage = _retiring(days=1.0)
    stage.retire_sweep_s = math.inf  # never swept
    stage.apply_batch(0, [_lot(i, "L1", 0.0) for i in range(10)])
    stage.apply_batch(0, [_lot(10, "L2", 2.0), _lot(11, "L1", 2.0)])
    assert stage.parts[0].slices["lot=L1"].model.n == 1
    assert list(stage.parts[0].retired) == ["lot=L1"]
    assert stage.checkpoint()
    commit = stage.store.commits[-1]  # type: ignore[attr-defined]
    assert commit.retired == {} and "lot=L1" in commit.states[0]  # the new record replaces it
    assert _retired_total(stage) == 1.0


@settings(max_examples=25, deadline=None)
@given(cuts=st.lists(st.integers(1, 119), max_size=10))
def test_what_is_retired_does_not_depend_on_when_checkpoints_sweep(cuts: list[int]) -> None:
    """A stream where lots stop, come back past the horizon, and get embed-stage duplicates and
    late labels for their old events: the slices held and their states are the same whether a
    sweeping checkpoint follows every poll or only the end of the stream."""
    msgs: list[Msg] = []

    def add(lot: str, day: float, **over: Any) -> None:
        msgs.append(_lot(len(msgs), lot, day, **over))

    for k in range(40):  # L-steady advances the partition's event time over four days
        add("L-steady", k / 10)
        if k < 8:
            add("L-gone", k / 100)  # stops at day 0.07
        if k < 5 or 30 <= k < 35:
            add("L-back", k / 100 if k < 5 else k / 10)  # day 0 to 0.04, then from day 3
        if k in (25, 36):  # the embed stage's replay of L-gone's first event; a late label
            msgs.append(Msg(0, len(msgs), _update(
                len(msgs), slice_id="lot=L-gone", template="lot", lot="L-gone", ts=T0,
                source_partition=0, source_offset=0, label="scratch" if k == 36 else None,
                late_label=k == 36).model_dump_json().encode(), 0))
    assert len(msgs) <= 120
    each, once = _retiring(days=1.0), _retiring(days=1.0)
    edges = [0, *sorted(set(cuts)), len(msgs)]
    for a, b in zip(edges, edges[1:], strict=False):
        if a < b:
            each.apply_batch(0, msgs[a:b])
            assert each.checkpoint()
    once.apply_batch(0, msgs)
    assert once.checkpoint()
    assert sorted(once.parts[0].slices) == ["lot=L-back", "lot=L-steady"]
    assert _states(each) == _states(once)
    assert once.parts[0].slices["lot=L-back"].model.n == 5  # afresh: its five events of day 3
    assert _skips(each) == _skips(once) == {"retired": 2.0}


def test_retired_slices_gauges_are_removed_and_a_returning_one_keeps_its_own() -> None:
    """Per-slice gauges of a retired station go (a frozen copy would read as the station's
    present state); a station that comes back after the horizon publishes under its labels
    again, and the retirement of its old slice must not remove them."""
    stage = _retiring(days=1.0)
    stage.apply_batch(0, [Msg(0, i, _update(i).model_dump_json().encode(), 0)
                          for i in range(40)])  # stations s1 and s2, day 0
    assert stage.checkpoint()
    assert {s[1] for s in _series(stage)} == {"s1", "s2"}
    _feed(stage, 40, 5, ts=T0 + timedelta(days=2))  # station s1 only, two days on
    assert stage.checkpoint()
    assert {s[1] for s in _series(stage)} == {"s1"}
    assert sorted(stage.parts[0].slices) == ["station=s1"]
    stage.retire_sweep_s = math.inf  # s1 idles past the horizon and comes back unswept
    stage.apply_batch(0, [Msg(0, 45, _update(1, ts=T0 + timedelta(days=4))
                              .model_dump_json().encode(), 0)])  # s2, days later
    _feed(stage, 46, 1, ts=T0 + timedelta(days=4))  # s1, idle since day 2: afresh
    assert stage.parts[0].slices["station=s1"].model.n == 1
    assert stage.checkpoint()
    assert {s[1] for s in _series(stage)} == {"s1", "s2"}
    assert _retired_total(stage) == 2.0


def test_an_idle_slice_with_an_open_alarm_goes_on_when_its_updates_come_back() -> None:
    """Only a quiet slice restarts afresh after the horizon: restarting one with an open alarm
    would drop the alarm without the ``clear`` that resolves its incident. Its next event goes
    on the slice it has, which keeps the alarm until it clears."""
    stage = _retiring(days=1.0)
    stage.retire_sweep_s = math.inf  # not swept: the update decides, not the sweep's timing
    # cluster 2 of baseline s1 (p = 0.1) floods in: an alarm, still open at the lot's end
    stage.apply_batch(0, [_lot(i, "L-alarm", 0.0, cluster=2, baseline="s1") for i in range(40)])
    model = stage.parts[0].slices["lot=L-alarm"].model
    opened = set(model.open)
    assert opened and model.n == 40
    stage.outbox.clear()
    stage.apply_batch(0, [_lot(40, "L-new", 2.0),  # two days on: L-alarm is idle
                          _lot(41, "L-alarm", 2.0, cluster=0, baseline="s1")])
    entry = stage.parts[0].slices["lot=L-alarm"]
    assert entry.model is model and model.n == 41 and set(model.open) == opened
    assert "lot=L-alarm" not in stage.parts[0].retired
    assert [m for m in stage.outbox if m["kind"] == "clear"] == []  # still open, not lost
    assert stage.checkpoint() and stage.store.commits[-1].retired == {}  # type: ignore[attr-defined]
    assert _retired_total(stage) == 0.0


def test_a_slice_an_unusable_update_would_start_is_not_created() -> None:
    """An update that cannot apply (a cluster the reference does not have) to a slice not held
    is skipped, and leaves no empty slice behind (one that would be checkpointed, summarised
    and published with no event); the slice's first usable update starts it."""
    stage = _retiring(days=0.0)
    stage.apply_batch(0, [_lot(0, "L1", 0.0), _lot(1, "L2", 0.0, cluster=7)])
    assert sorted(stage.parts[0].slices) == ["lot=L1"]
    assert stage.checkpoint()
    commit = stage.store.commits[-1]  # type: ignore[attr-defined]
    assert commit.states == {0: {"lot=L1"}} and commit.summaries == {"lot=L1"}
    assert _skips(stage) == {"unusable": 1.0}
    stage.apply_batch(0, [_lot(2, "L2", 0.0)])
    assert stage.parts[0].slices["lot=L2"].model.n == 1


def test_an_idle_slice_whose_returning_update_is_unusable_is_retired_with_its_gauges() -> None:
    """The idle slice is retired when its next update starts a new one; if that update cannot
    apply, the new slice goes, and the gauges it took over go back to the retired one, which
    removes them at the checkpoint (left on the discarded slice, they stayed frozen)."""
    stage = _retiring(days=1.0)
    stage.retire_sweep_s = math.inf
    stage.apply_batch(0, [Msg(0, i, _update(i).model_dump_json().encode(), 0)
                          for i in range(40)])  # stations s1 and s2, day 0
    assert stage.checkpoint()
    assert {s[1] for s in _series(stage)} == {"s1", "s2"}
    stage.apply_batch(0, [Msg(0, 40, _update(41, ts=T0 + timedelta(days=2))
                              .model_dump_json().encode(), 0)])  # s2, two days on
    _feed(stage, 41, 1, ts=T0 + timedelta(days=2), cluster=7)  # s1, idle: unusable
    assert sorted(stage.parts[0].slices) == ["station=s2"]
    assert list(stage.parts[0].retired) == ["station=s1"]
    assert stage.checkpoint()
    assert stage.store.commits[-1].retired == {0: ["station=s1"]}  # type: ignore[attr-defined]
    assert {s[1] for s in _series(stage)} == {"s2"}


def test_a_late_label_is_not_activity_of_its_slice() -> None:
    """Idleness is the slice's newest *event* (README, slice retirement): a label is not one,
    even one dated after the slice's last event (the embed stage dates a label by its own
    event when its prediction entry predates the event's time being kept). Counted as
    activity, it kept an idle lot from retiring and moved the last-hour gauges' window to an
    hour without events."""
    stage = _retiring(days=1.0)
    stage.apply_batch(0, [_lot(i, "L1", 0.0) for i in range(10)])
    model = stage.parts[0].slices["lot=L1"].model
    last, before = model.last_time, model.gauges()
    label = _update(10, slice_id="lot=L1", template="lot", lot="L1",
                    ts=T0 + timedelta(days=0.9), source_offset=99, label="scratch",
                    error=True, distance=None, ood=None, late_label=True)
    stage.apply_batch(0, [Msg(0, 10, label.model_dump_json().encode(), 0)])
    assert "error_rate" in model.det.detectors  # the label was applied
    assert model.last_time == last and model.gauges()["cluster_shares"] == before[
        "cluster_shares"]
    assert stage.checkpoint() and stage.store.commits[-1].retired == {}  # type: ignore[attr-defined]
    stage.apply_batch(0, [_lot(11, "L2", 1.5)])  # the horizon passes L1's last event
    assert stage.checkpoint()
    assert stage.store.commits[-1].retired == {0: ["lot=L1"]}  # type: ignore[attr-defined]


def test_with_retirement_off_nothing_is_retired() -> None:
    stage = _retiring(days=0.0)
    stage.apply_batch(0, [_lot(0, "L1", 0.0), _lot(1, "L2", 300.0)])
    late = _update(2, slice_id="lot=L3", template="lot", lot="L3", ts=T0, label="scratch",
                   error=True, distance=None, ood=None, late_label=True)
    stage.apply_batch(0, [Msg(0, 2, late.model_dump_json().encode(), 0), _lot(3, "L1", 300.0)])
    assert stage.checkpoint()
    assert sorted(stage.parts[0].slices) == ["lot=L1", "lot=L2", "lot=L3"]
    assert stage.parts[0].slices["lot=L1"].model.n == 2
    assert stage.store.commits[-1].retired == {} and _retired_total(stage) == 0.0  # type: ignore[attr-defined]


def test_an_open_alarm_s_tally_counts_each_event_once_across_restores_and_replays() -> None:
    """A tally counts at apply time: the replays that follow a restart are skipped by source
    offset before they reach the slice, so its counts since onset are exactly-once too."""
    msgs = [Msg(0, i, _update(i, ood=i % 4 == 0 if i > 150 else i % 11 == 0).model_dump_json()
                .encode(), 1) for i in range(300)]
    whole, cut = _stage(), _stage()
    whole.apply_batch(0, msgs)
    cut.apply_batch(0, msgs[:200])
    tallies = []
    for entry in cut.parts[0].slices.values():
        back = decode_record(encode_record({"state": entry.model.snapshot(),
                                            "applied": entry.applied}))
        entry.model = SliceState.restore(back["state"], Baselines(), 20)
        tallies += entry.model.det.counts.tallies  # type: ignore[union-attr]
    assert tallies  # an alarm was open at the restart
    # the embed stage replays 80 of them (same source offsets, later input offsets)
    cut.apply_batch(0, [m._replace(offset=m.offset + 1000) for m in msgs[120:200]] + msgs[200:])
    dupes = {s.name: s.value for m in cut.metrics.duplicates.collect() for s in m.samples}
    assert dupes["driftline_detect_duplicates_total"] == 80
    assert cut.outbox == whole.outbox and _states(cut) == _states(whole)


class _FenceOnceStore(_EmptyStore):
    """A reachable store whose first commit finds partition 1 claimed by another worker; the
    later ones land and keep the outbox they carry."""

    def __init__(self) -> None:
        self.outboxes: list[list[dict[str, Any]]] = []
        self.fenced = False

    def control_after(self, after: str) -> list[tuple[str, str]]:
        return []

    def commit(self, epochs: Any, states: Any, offsets: Any, outbox: Any = (),
               *args: Any) -> None:
        if not self.fenced:
            self.fenced = True
            raise Fenced({1}, "were claimed by another worker")
        self.outboxes.append(list(outbox))


def _alarms_total(stage: DetectStage) -> float:
    return sum(s.value for m in stage.metrics.alarms.collect() for s in m.samples
               if s.name.endswith("_total"))


def _updates_total(stage: DetectStage) -> float:
    return sum(s.value for m in stage.metrics.updates.collect() for s in m.samples
               if s.name.endswith("_total"))


def test_work_read_again_after_a_fence_counts_its_alarms_and_skips_once() -> None:
    """A fence drops the kept partition's uncommitted work, which is read again from its last
    checkpoint: its alarms reach the book once, so the alarm counter must count them once (it
    counted them per reading, twice here), and a record skipped once in the log's effect is one
    skip. Updates applied count applications (the stall alert's progress): twice."""
    stage = _stage()
    stage.store = store = _FenceOnceStore()  # type: ignore[assignment]
    stage.consumer = _Consumer()  # type: ignore[assignment]
    stage.parts[1] = PartitionState(epoch=1, next_offset=None, slices={})
    batch = [Msg(0, i, _update(i, ood=True).model_dump_json().encode(), 0) for i in range(60)]
    batch.append(Msg(0, 60, b"{not json", 0))
    stage.apply_batch(0, batch)
    raised = sum(m["kind"] == "alarm" for m in stage.outbox)
    assert raised >= 2  # an OOD-rate alarm per station slice
    assert _alarms_total(stage) == 0 and _skips(stage) == {}  # not before they are committed
    assert stage._checkpoint_safely() and stage.pending == {0}  # fenced: 0 is loaded again
    assert _alarms_total(stage) == 0 and _skips(stage) == {}
    stage._redis_retry_at, stage._generation = 0.0, 4  # the consumer's generation
    stage._restore_pending()
    assert stage.consumer.from_start == {0}  # never checkpointed: read from the start
    stage.apply_batch(0, batch)
    assert stage._checkpoint_safely()
    (committed,) = store.outboxes
    assert sum(m["kind"] == "alarm" for m in committed) == raised
    assert _alarms_total(stage) == raised and _skips(stage) == {"unreadable": 1.0}
    assert _updates_total(stage) == 120


def test_alarms_of_a_checkpoint_that_fails_are_counted_when_it_lands() -> None:
    """Redis down at the checkpoint: the alarms stay in the outbox, uncounted (a crash now
    would have the next worker raise and count them), and count once the retry lands."""
    stage = _retiring(days=0.0, fail=1)
    stage.apply_batch(0, [Msg(0, i, _update(i, ood=True).model_dump_json().encode(), 0)
                          for i in range(60)])
    raised = sum(m["kind"] == "alarm" for m in stage.outbox)
    assert raised and not stage._checkpoint_safely()
    assert _alarms_total(stage) == 0
    assert stage._checkpoint_safely() and _alarms_total(stage) == raised
    assert stage.outbox == []


class _PollingConsumer(_Consumer):
    """Hands out scripted polls, then stops the stage; records how it was closed."""

    def __init__(self, stage: DetectStage, polls: list[dict[TopicPartition, list[Msg]]]) -> None:
        super().__init__()
        self.stage, self.polls, self.closed = stage, polls, False

    def partitions_for_topic(self, topic: str) -> set[int]:
        return {0}

    def subscribe(self, topics: Any, listener: Any = None) -> None:
        pass

    def poll(self, timeout_ms: int = 0, max_records: int | None = None) -> Any:
        if not self.polls:
            self.stage.stop()
            return {}
        return self.polls.pop(0)

    def close(self, autocommit: bool = True) -> None:
        self.closed = True


def test_an_error_while_applying_ends_the_loop_without_a_last_checkpoint() -> None:
    """A slice may be half updated by the update that failed, which its applied offsets do not
    hold: a last checkpoint would store that state, and the next owner would apply the update
    again on top. The loop ends with no checkpoint; a clean stop still writes one."""
    stage = _retiring()
    stage.interval = 3600.0  # only the last checkpoint
    tp = TopicPartition("t", 0)
    stage.consumer = _PollingConsumer(stage, [{tp: _batch(0, 0, 5)}])  # type: ignore[assignment]
    stage.run()
    assert [c.offsets for c in stage.store.commits] == [{0: 5}]  # type: ignore[attr-defined]

    stage = _retiring()
    stage.interval = 3600.0
    polls = [{tp: _batch(0, 0, 5)}, {tp: _batch(0, 5, 5)}]
    stage.consumer = _PollingConsumer(stage, polls)  # type: ignore[assignment]
    real = stage._apply

    def failing(part: PartitionState, msg: Any) -> bool | None:
        if msg.offset == 7:
            raise RuntimeError("a bug in a detector")
        return real(part, msg)

    stage._apply = failing  # type: ignore[method-assign]
    with pytest.raises(RuntimeError):
        stage.run()
    assert stage.store.commits == []  # type: ignore[attr-defined]
    assert stage.consumer.closed  # type: ignore[attr-defined]


def test_a_member_given_no_partition_is_ready() -> None:
    """An extra replica is ready (idle): a `maxSurge: 0` rollout waits for each new pod to be
    ready (deploy/k8s/README.md, "Scaling")."""
    stage = _stage()
    assert not stage.ready
    stage.on_partitions_assigned(set())
    assert stage.ready
