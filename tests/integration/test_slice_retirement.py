"""Slice retirement against a real Redis: an idle lot's state and summary fields are deleted
by the checkpoint transaction that commits the partition's offsets (a fenced one deletes
nothing), a restored partition does not hold it, and a lot with an open alarm is kept."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
from kafka import TopicPartition
from prometheus_client import CollectorRegistry

from driftline.consumers.checkpoint import CheckpointStore, store_client
from driftline.consumers.detect_stage import DetectStage
from driftline.consumers.slice_state import SliceState, UpdateView
from driftline.core.slices import SliceDetectors
from driftline.metrics import ConsumerMetrics, DetectMetrics
from tests.unit.consumers.test_detect_stage import Baselines, Msg, _Consumer, _lot

pytestmark = pytest.mark.integration

DB, PREFIX = 15, "dl:test-retire"
DAY = 86400.0


@pytest.fixture
def store(redis_url: str) -> Iterator[CheckpointStore]:
    url = re.sub(r"/\d+$", "", redis_url.rstrip("/")) + f"/{DB}"
    s = CheckpointStore(store_client(url), prefix=PREFIX, wait_s=5.0)
    s.reset()
    yield s
    s.reset()


def _stage(store: CheckpointStore) -> DetectStage:
    """A detect worker on ``store`` that retires slices idle for a day, owning partition 0."""
    baselines = Baselines()

    def new_slice(u: UpdateView) -> SliceState:
        return SliceState(u.slice_id, u.template, SliceDetectors(arl0=50.0, bucket_seconds=60.0),
                          baselines, 20)

    reg = CollectorRegistry()
    stage = DetectStage(_Consumer(), "t", store, new_slice,  # type: ignore[arg-type]
                        lambda snap: SliceState.restore(snap, baselines, 20),
                        DetectMetrics(reg), ConsumerMetrics(reg), retire_after_s=DAY)
    stage.on_partitions_assigned({TopicPartition("t", 0)})
    stage._restore_pending()  # claims partition 0 and loads it from Redis
    assert stage.pending == set()
    return stage


def _fields(store: CheckpointStore) -> tuple[set[str], set[str], dict[int, int]]:
    r: Any = store.r
    return ({k.decode() for k in r.hkeys(store._k("state", 0))},
            {k.decode() for k in r.hkeys(store.summary_key)}, store.stored_offsets())


def test_an_idle_lot_is_deleted_with_the_offsets_and_an_alarmed_one_is_kept(
        store: CheckpointStore) -> None:
    first = _stage(store)
    day0 = [_lot(i, "L-old", 0.0) for i in range(20)] + [
        # cluster 2 of baseline s1 (p = 0.1) floods in: an alarm, still open at the lot's end
        _lot(i, "L-alarm", 0.0, cluster=2, baseline="s1") for i in range(20, 60)]
    first.apply_batch(0, day0)
    assert first.checkpoint()
    written = ({"lot=L-old", "lot=L-alarm"}, {"lot=L-old", "lot=L-alarm"}, {0: 60})
    assert _fields(store) == written

    later: list[Msg] = [_lot(i, "L-new", 2.0) for i in range(60, 65)]  # two days on
    first.apply_batch(0, later)
    store.claim([0])  # another worker takes the partition meanwhile (bumps its epoch)
    assert first._checkpoint_safely()  # fenced: none of the transaction lands...
    assert _fields(store) == written  # ...neither the deletions nor the offsets

    second = _stage(store)  # the new owner reads from offset 60 and replays day 2
    assert sorted(second.parts[0].slices) == ["lot=L-alarm", "lot=L-old"]
    second.apply_batch(0, later)
    assert second.checkpoint()
    assert _fields(store) == ({"lot=L-alarm", "lot=L-new"}, {"lot=L-alarm", "lot=L-new"},
                              {0: 65})
    assert sum(s.value for m in second.metrics.retired.collect() for s in m.samples
               if s.name.endswith("_total")) == 1.0

    third = _stage(store)  # a rebalance: the restored partition does not hold the old lot
    part = third.parts[0]
    assert sorted(part.slices) == ["lot=L-alarm", "lot=L-new"]
    assert part.slices["lot=L-alarm"].model.open
    assert part.cutoff == part.slices["lot=L-new"].model.last_time - DAY  # type: ignore[operator]
    assert store.r.hget(store.summary_key, "lot=L-old") is None

