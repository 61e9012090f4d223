"""The detect stage's checkpoint store against a real Redis: fencing names the stale
partitions, and a Redis that stops answering mid-transaction is an outage, not a fence."""

from __future__ import annotations

import json
import re
import shutil
import time

import pytest
import redis

from driftline.consumers.checkpoint import (
    REDIS_ERRORS,
    CheckpointStore,
    Fenced,
    encode_record,
    store_client,
)
from driftline.localstack import start_stack

pytestmark = pytest.mark.integration


@pytest.fixture
def url(redis_url: str) -> str:
    base = re.sub(r"/\d+$", "", redis_url.rstrip("/"))
    client = redis.Redis.from_url(f"{base}/14")
    client.flushdb()
    return f"{base}/14"


def test_fenced_names_the_partitions_another_worker_claimed(url: str) -> None:
    mine, theirs = CheckpointStore(store_client(url)), CheckpointStore(store_client(url))
    epochs = mine.claim([0, 1])
    theirs.claim([1])
    with pytest.raises(Fenced) as fenced:
        mine.commit(epochs, {0: {}, 1: {}}, {0: 10, 1: 20})
    assert fenced.value.stale == {1}
    assert mine.load(0)[0] is None  # nothing written: the transaction is all or nothing


def test_a_redis_that_stops_answering_mid_checkpoint_is_an_outage_not_a_fence(url: str) -> None:
    """redis-py turns a timeout while a key is WATCHed into WatchError; the store must not read
    that as another worker's claim (which would drop every partition)."""
    store = CheckpointStore(store_client(url, socket_timeout_s=0.3), wait_s=0.0)
    epochs = store.claim([0])
    admin = redis.Redis.from_url(url)
    admin.execute_command("CLIENT", "PAUSE", "1500", "WRITE")  # reads answer, writes wait
    try:
        with pytest.raises(REDIS_ERRORS) as failed:
            store.commit(epochs, {0: {}}, {0: 42})
        assert not isinstance(failed.value, Fenced)
    finally:
        admin.execute_command("CLIENT", "UNPAUSE")
    time.sleep(0.1)
    store.commit(epochs, {0: {}}, {0: 42})  # the epoch still holds: the next try succeeds
    assert store.load(0)[0] == 42


def test_a_checkpoint_whose_reply_was_lost_is_not_written_twice(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The transaction lands but its reply is lost (a connection dropped after EXEC): the
    retry must see that the offsets already read as ours and not add the alarms again."""
    store = CheckpointStore(store_client(url), wait_s=5.0)
    epochs = store.claim([0])
    real = CheckpointStore._commit_once
    calls = []

    def lands_then_loses_the_reply(self: CheckpointStore, *args: object) -> None:
        real(self, *args)  # type: ignore[arg-type]
        calls.append(1)
        if len(calls) == 1:
            raise redis.ConnectionError("connection lost after EXEC")

    monkeypatch.setattr(CheckpointStore, "_commit_once", lands_then_loses_the_reply)
    store.commit(epochs, {0: {}}, {0: 10}, [{"kind": "alarm", "slice_id": "station=s1"}])
    assert calls == [1]  # retried, but found it had landed
    assert store.r.xlen(store.outbox_key) == 1
    assert store.load(0)[0] == 10


def test_a_redis_that_cannot_write_to_its_disk_is_an_outage() -> None:
    """``MISCONF`` (a full disk, a failed snapshot): Redis refuses writes until it can persist.
    The stages must wait it out as an outage, not crash on every restart. A Redis of its own,
    whose data directory disappears under it, so that its next snapshot fails."""
    with start_stack(["redis"]) as own:
        if own.is_external("redis"):
            pytest.skip("DRIFTLINE_REDIS_URL names a server this test must not break")
        admin = redis.Redis.from_url(own.redis_url)
        store = CheckpointStore(store_client(own.redis_url), wait_s=0.0)
        epochs = store.claim([0])
        shutil.rmtree(str(admin.config_get("dir")["dir"]))
        admin.config_set("save", "3600 1")  # refuses writes only where snapshots are configured
        admin.config_set("stop-writes-on-bgsave-error", "yes")
        admin.bgsave()
        deadline = time.monotonic() + 30
        while admin.info("persistence")["rdb_last_bgsave_status"] != "err":
            assert time.monotonic() < deadline, "the snapshot did not fail"
            time.sleep(0.1)
        with pytest.raises(REDIS_ERRORS, match="unable to persist"):
            store.commit(epochs, {0: {}}, {0: 42})
        with pytest.raises(REDIS_ERRORS, match="unable to persist"):
            store.claim([1])  # a worker restarting meanwhile
        admin.config_set("stop-writes-on-bgsave-error", "no")  # the disk is fixed
        store.commit(epochs, {0: {}}, {0: 42})
        assert store.load(0)[0] == 42


def test_a_checkpoint_s_records_are_freed_when_it_returns(url: str) -> None:
    """Without waiting for a garbage collection: a retry wrapper made per call referred to
    itself, and that cycle kept every checkpoint's encoded records alive until one."""
    import gc
    import weakref

    class Records(dict):  # type: ignore[type-arg]  # a dict that a weak reference can watch
        pass

    store = CheckpointStore(store_client(url))
    epochs = store.claim([0])
    states = Records({"station=s1": encode_record({"state": {}, "applied": {}})})
    summaries = Records({"station=s1": b"{}"})
    watched = [weakref.ref(states), weakref.ref(summaries)]
    gc.collect()
    gc.disable()
    try:
        store.commit(epochs, {0: states}, {0: 7}, summaries=summaries)
        del states, summaries
        assert [w() for w in watched] == [None, None]
    finally:
        gc.enable()
    assert store.load(0)[0] == 7


def test_a_checkpoint_whose_reply_never_came_is_not_written_again_by_the_next(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """During an outage each checkpoint is one attempt, so the store's own retry never sees a
    transaction that landed with its reply lost: the stage's next checkpoint must write only
    the alarms raised since, not that one's again."""
    from tests.unit.consumers.test_detect_stage import _batch, _Consumer, _stage

    stage = _stage()
    stage.consumer = _Consumer()  # type: ignore[assignment]
    stage.store = CheckpointStore(store_client(url), wait_s=0.0)
    stage.parts[0].epoch = stage.store.claim([0])[0]
    real = CheckpointStore._commit_once
    lost = [True]

    def lands_then_loses_the_reply(self: CheckpointStore, *args: object) -> None:
        real(self, *args)  # type: ignore[arg-type]
        if lost.pop() if lost else False:
            raise redis.TimeoutError("Timeout reading from socket")

    monkeypatch.setattr(CheckpointStore, "_commit_once", lands_then_loses_the_reply)
    alarm = {"kind": "alarm", "template": "station", "detector": "ood_rate"}
    stage.apply_batch(0, _batch(0, 0, 10))
    stage.outbox.append({**alarm, "slice_id": "station=s1"})
    assert stage._checkpoint_safely() is False  # the reply was lost: unknown whether it landed
    stage.apply_batch(0, _batch(0, 10, 10))
    stage.outbox.append({**alarm, "slice_id": "station=s2"})
    assert stage._checkpoint_safely() is True
    written = [json.loads(f[b"alarm"])["slice_id"]
               for _, f in stage.store.r.xrange(stage.store.outbox_key)]
    assert written == ["station=s1", "station=s2"]
    assert stage.store.load(0)[0] == 20 and stage.outbox == []
    alarms = {s.labels["detector"]: s.value for m in stage.metrics.alarms.collect()
              for s in m.samples if s.name.endswith("_total")}
    assert alarms == {"ood_rate": 2.0}
