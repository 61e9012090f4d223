"""The streaming pipeline against the real broker and Redis: detection, crashes, scale-out."""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from driftline.consumers.repartition import partition_for
from driftline.localstack import Stack
from tests.integration.pipeline_support import (
    STEP,
    T0,
    Pipeline,
    Stream,
    Worker,
    checkpointed,
    detect_done,
    free_port,
    make_reference,
    outbox,
    states,
    wait_for,
)

pytestmark = pytest.mark.integration
_db = itertools.count(1)
APPLIED = "driftline_detect_slice_updates_total"  # a detect worker's, since it started


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_reference(tmp_path_factory.mktemp("ref") / "reference")


@pytest.fixture
def pipe(kafka_bootstrap: str, redis_url: str, reference: Path) -> Pipeline:
    base = re.sub(r"/\d+$", "", redis_url.rstrip("/"))
    p = Pipeline(kafka_bootstrap, f"{base}/{next(_db)}", reference)
    p.redis().flushdb()
    p.create_topics()
    return p


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[list[Worker]]:
    started: list[Worker] = []
    yield started
    for w in started:
        if w.alive():
            w.kill()
        # Shown by pytest only when the test fails: what each worker was doing at the end.
        print(f"--- {w.role} worker on port {w.port}, exit {w.proc.returncode} ---\n{w.log()}")


def start(pipe: Pipeline, role: str, tmp_path: Path, workers: list[Worker], *,
          ready: bool = True, **env: str) -> Worker:
    """Start a worker; by default wait until it owns partitions (its /readyz is 200)."""
    w = Worker(pipe, role, tmp_path, **env)
    workers.append(w)
    if ready:
        w.wait_ready()
    return w


def wait_detected(pipe: Pipeline, workers: list[Worker], n_events: int,
                  timeout: float = 180) -> None:
    """Wait until all 4 slice-updates of each of ``n_events`` good events are checkpointed."""
    def done() -> bool:
        for w in workers:
            assert w.alive() or w.proc.returncode in (0, -9), w.log()
        return detect_done(pipe, 4 * n_events)
    wait_for(done, timeout, "the detect stage to checkpoint every slice-update")


def counts(st: dict[str, dict[str, Any]]) -> dict[str, int]:
    return {sid: rec["state"]["detectors"]["n"] for sid, rec in st.items()}


def expected_counts(docs: list[dict[str, Any]]) -> dict[str, int]:
    c: Counter[str] = Counter()
    for d in docs:
        c[f"station={d['station']}"] += 1
        c[f"station={d['station']}|shift={d['shift']}"] += 1
        c[f"shift={d['shift']}"] += 1
        c[f"lot={d['lot']}"] += 1
    return dict(c)


def test_injected_change_is_detected_with_onset(
    pipe: Pipeline, tmp_path: Path, workers: list[Worker]
) -> None:
    change_at = 1500
    docs = Stream(n=2400, seed=5, change_station="s2", change_at=change_at).events()
    start(pipe, "all", tmp_path, workers)
    pipe.produce(docs)
    wait_detected(pipe, workers, len(docs))
    alarms = [a for a in outbox(pipe) if a["kind"] == "alarm"]
    by_slice = {a["slice_id"]: a for a in alarms}
    summary = pipe.redis().hget("dl:detect:summary", "station=s2")
    assert "station=s2" in by_slice, ([a["slice_id"] for a in alarms], summary)
    # Nothing changed at the other stations: no alarm on their station slices.
    assert not {"station=s1", "station=s3"} & set(by_slice)
    alarm = by_slice["station=s2"]
    injected = (T0 + change_at * STEP).timestamp()
    # s2 gets every third event, so one s2 event = 3 steps of event time.
    s2_events_late = (alarm["time"] - injected) / (3 * STEP.total_seconds())
    onset_error = abs(alarm["onset_time"] - injected) / (3 * STEP.total_seconds())
    assert 0 <= s2_events_late < 60, s2_events_late
    assert onset_error <= max(5, 0.25 * s2_events_late), (onset_error, s2_events_late)
    assert alarm["evidence"]["counts"]["ood"] > alarm["evidence"]["counts"]["ood_expected"]
    st = states(pipe)
    assert counts(st) == expected_counts(docs)
    assert workers[0].terminate() == 0, workers[0].log()


def test_detect_worker_sigkill_gives_the_same_states(
    kafka_bootstrap: str, redis_url: str, reference: Path, tmp_path: Path,
    workers: list[Worker],
) -> None:
    """Embed once; detect twice over the same slice-updates (same order per slice): once
    uninterrupted, once SIGKILLed twice mid-stream. States must be equal, exactly.

    The stage applies the whole stream in a fraction of a second, so the killed run is fed a
    copy of the slice-updates in parts (same partitions, same order): each kill lands while
    the rest of the stream is still to come, and after updates applied since the worker's
    last checkpoint, which its restart must read and apply again."""
    base = re.sub(r"/\d+$", "", redis_url.rstrip("/"))
    pipe = Pipeline(kafka_bootstrap, f"{base}/{next(_db)}", reference)
    pipe.redis().flushdb()
    pipe.create_topics()
    docs = Stream(n=2000, seed=6, change_station="s1", change_at=1300).events()
    total = 4 * len(docs)
    pipe.produce(docs)
    embed = start(pipe, "embed", tmp_path, workers)
    wait_for(lambda: sum(pipe.end_offsets(pipe.updates_topic).values()) >= total,
             180, "the embed stage to produce every slice-update")
    embed.terminate()
    updates = sorted(pipe.read_topic(pipe.updates_topic), key=lambda m: (m.offset, m.partition))
    assert len(updates) == total

    clean = Pipeline(kafka_bootstrap, f"{base}/{next(_db)}", reference, name=pipe.name)
    clean.redis().flushdb()
    w = start(clean, "detect", tmp_path, workers, DRIFTLINE_DETECT_GROUP=f"clean-{pipe.name}")
    wait_detected(clean, workers, len(docs))
    w.terminate()

    crashy = Pipeline(kafka_bootstrap, f"{base}/{next(_db)}", reference)
    crashy.redis().flushdb()
    crashy.create_topics()
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all",
                             max_in_flight_requests_per_connection=1)
    fed = 0

    def feed(upto: int) -> None:
        nonlocal fed
        for m in updates[fed:upto]:
            producer.send(crashy.updates_topic, key=m.key, value=m.value, partition=m.partition,
                          headers=m.headers)
        producer.flush()
        fed = upto

    def stored() -> int:
        return sum(checkpointed(crashy).values())

    # Checkpoints 5 s apart while a kill is prepared: the one that covers the updates fed so
    # far is followed by a few hundred more, applied (the worker's counter says so) and
    # killed well before the next checkpoint is due.
    slow = {"DRIFTLINE_DETECT_GROUP": f"crashy-{pipe.name}",
            "DRIFTLINE_CHECKPOINT_INTERVAL_MS": "5000"}
    for fraction in (0.3, 0.6):
        w = start(crashy, "detect", tmp_path, workers, **slow)
        restored = stored()  # where this worker starts reading
        feed(int(fraction * total))
        wait_for(lambda: stored() == fed, 30, f"a checkpoint of the first {fed} updates",
                 every=0.05)
        feed(fed + 400)
        wait_for(lambda w=w, r=restored: w.metric(APPLIED) >= fed - r, 10,
                 f"the worker to apply the first {fed} updates", every=0.02)
        w.kill()
        killed_at = stored()
        print(f"killed with {killed_at} of {fed} fed updates checkpointed, {total} in all")
        assert killed_at < fed, ("the worker checkpointed every update it applied before the "
                                 f"kill: nothing to replay ({killed_at} of {fed})")
        assert fed < total and sum(counts(states(crashy)).values()) < total, \
            "the stream ended before the kill: nothing to test"
    start(crashy, "detect", tmp_path, workers, DRIFTLINE_DETECT_GROUP=f"crashy-{pipe.name}")
    feed(total)
    producer.close()
    wait_detected(crashy, workers, len(docs))

    a, b = states(clean), states(crashy)
    assert counts(a) == expected_counts(docs)
    assert counts(b) == counts(a)
    assert b == a  # detector states, applied offsets, exemplars: identical
    oa, ob = outbox(clean), outbox(crashy)
    key = lambda m: (m["slice_id"], m["detector"], m["kind"], m["slice_n"])  # noqa: E731
    diff = [(x, y) for x, y in zip(sorted(oa, key=key), sorted(ob, key=key), strict=False)
            if x != y]
    assert len(oa) == len(ob) and not diff, (len(oa), len(ob), diff[:1])


def test_embed_worker_sigkill_duplicates_are_skipped(
    kafka_bootstrap: str, redis_url: str, reference: Path, tmp_path: Path,
    workers: list[Worker],
) -> None:
    """An embed worker SIGKILLed after its batch's slice-updates reached the broker but before
    the batch's offsets were committed: its restart reads the batch again and sends those
    updates again. The detect stage skips every duplicate by source offset: counts stay
    exact, and its duplicates counter holds as many as the replay produced."""
    base = re.sub(r"/\d+$", "", redis_url.rstrip("/"))
    pipe = Pipeline(kafka_bootstrap, f"{base}/{next(_db)}", reference, event_partitions=1)
    pipe.redis().flushdb()
    pipe.create_topics()
    docs = Stream(n=3000, seed=8).events()
    total = 4 * len(docs)
    detect = start(pipe, "detect", tmp_path, workers)
    small = {"DRIFTLINE_EMBED_BATCH_SIZE": "16"}
    embed = start(pipe, "embed", tmp_path, workers, **small)
    group = pipe.env()["DRIFTLINE_EMBED_GROUP"]
    updates = [TopicPartition(pipe.updates_topic, p) for p in range(pipe.partitions)]
    events = TopicPartition(pipe.events_topic, 0)
    watch = KafkaConsumer(bootstrap_servers=kafka_bootstrap)
    probe = KafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=group,
                          enable_auto_commit=False)

    def produced() -> int:
        return sum(watch.end_offsets(updates).values())

    def committed() -> int:
        return probe.committed(events) or 0

    # The window: a batch's updates are on the broker, its offsets not committed yet. Stop
    # the worker when it looks in it, check once nothing it sent can still land, and kill it
    # there; otherwise let it go on and look again.
    pipe.produce(docs)
    sent = 0
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            done = committed()
            if done >= len(docs):
                break
            if produced() <= 4 * done:
                continue
            embed.pause()
            time.sleep(0.3)  # requests it sent before it stopped are answered
            sent, done = produced(), committed()
            if sent > 4 * done:
                embed.kill()
                break
            embed.resume()
        else:
            raise AssertionError("no batch caught between its updates and its commit")
    finally:
        watch.close()
        probe.close()
    assert not embed.alive(), "the stream ended before a kill between a batch's updates " \
        "and its commit: nothing to replay"
    start(pipe, "embed", tmp_path, workers, **small)
    wait_for(lambda: detect_done(pipe, total) and sum(counts(states(pipe)).values()) >= total,
             180, "every event applied")
    st = states(pipe)
    assert counts(st) == expected_counts(docs)
    dupes = sum(pipe.end_offsets(pipe.updates_topic).values()) - total
    # the batch in flight at the kill, read again from its last commit: at least the updates
    # that were on the broker then
    assert dupes >= sent - 4 * done > 0, (dupes, sent, done)
    assert detect.alive(), detect.log()
    assert detect.metric("driftline_detect_duplicates_total") == dupes
    print(f"killed with events up to {done} committed and {sent} updates sent; the replay "
          f"produced {dupes} duplicate slice-updates, all skipped")


def test_scale_out_no_loss_no_double_count(
    pipe: Pipeline, tmp_path: Path, workers: list[Worker]
) -> None:
    docs = Stream(n=4000, seed=9).events()
    start(pipe, "embed", tmp_path, workers)
    d1 = start(pipe, "detect", tmp_path, workers)
    d2 = start(pipe, "detect", tmp_path, workers)
    pipe.produce(docs[:1500])
    wait_for(lambda: sum(counts(states(pipe)).values()) >= 2000, 120, "first updates")
    d3 = start(pipe, "detect", tmp_path, workers)
    pipe.produce(docs[1500:3000])
    wait_for(lambda: sum(counts(states(pipe)).values()) >= 8000, 120, "more updates")
    assert d1.terminate() == 0, d1.log()
    pipe.produce(docs[3000:])
    wait_detected(pipe, [d2, d3], len(docs))
    wait_for(lambda: sum(counts(states(pipe)).values()) >= 4 * len(docs), 120, "all updates")
    assert counts(states(pipe)) == expected_counts(docs)


def test_malformed_events_go_to_the_dlq_with_reasons(
    pipe: Pipeline, tmp_path: Path, workers: list[Worker]
) -> None:
    good = Stream(n=1000, seed=10).events()
    bad_kinds: list[tuple[bytes | dict[str, Any], str]] = [
        (b"{not json", "malformed_json"),
        (b"\xff\xfe\x00", "invalid_utf8"),
        (b"[1,2,3]", "not_an_object"),
        ({**good[0], "station": None}, "invalid_field"),
        ({k: v for k, v in good[0].items() if k != "lot"}, "missing_field"),
        ({**good[0], "ts": "yesterday"}, "invalid_field"),
        ({**good[0], "image": "aGVsbG8="}, "payload_conflict"),
        ({**good[0], "embedding": [0.1, 0.2]}, "embedding_dim"),
        ({**good[0], "embedding": None, "image": "aGVsbG8="}, "unknown_reference"),
        ({**{k: v for k, v in good[0].items() if k != "embedding"}, "label": "x",
          "event_id": "never-seen"}, "unknown_event"),
    ]
    stream: list[dict[str, Any] | bytes] = []
    expected: Counter[str] = Counter()
    for i, doc in enumerate(good):
        stream.append(doc)
        bad, reason = bad_kinds[i % len(bad_kinds)]
        if isinstance(bad, dict):
            bad = {**bad, "event_id": f"bad-{i}"} if reason != "unknown_event" else bad
        stream.append(bad)
        expected[reason] += 1
    start(pipe, "all", tmp_path, workers)
    pipe.produce(stream)
    wait_for(lambda: sum(pipe.end_offsets(pipe.dlq_topic).values()) >= 1000, 180,
             "1000 dead letters")
    wait_detected(pipe, workers, len(good))

    letters = [json.loads(m.value) for m in pipe.read_topic(pipe.dlq_topic)]
    assert Counter(d["reason"] for d in letters) == expected
    assert all(d["detail"] and d["value_b64"] is not None for d in letters)
    assert counts(states(pipe)) == expected_counts(good)
    assert workers[0].alive(), workers[0].log()


def test_reset_request_from_the_book_restarts_the_slice(
    pipe: Pipeline, tmp_path: Path, workers: list[Worker]
) -> None:
    """On-call resolved an incident: the book asks for a reset, the owning worker applies it
    once (its control cursor is checkpointed with the state), even across a restart."""
    docs = Stream(n=1500, seed=12, change_station="s3", change_at=900).events()
    w = start(pipe, "detect", tmp_path, workers)
    start(pipe, "embed", tmp_path, workers)
    pipe.produce(docs)
    wait_detected(pipe, workers, len(docs))
    before = states(pipe)["station=s3"]["state"]
    assert before["open"], "the change at s3 should have opened an alarm"
    eid = pipe.redis().xadd("dl:detect:control", {"reset": "station=s3"}).decode()
    wait_for(lambda: not states(pipe)["station=s3"]["state"]["open"], 60, "the reset")
    after = states(pipe)["station=s3"]["state"]
    assert all(max(d["s"]) == 0.0 for d in after["detectors"]["detectors"].values())
    assert after["detectors"]["n"] == before["detectors"]["n"]  # counts are kept
    assert w.terminate() == 0, w.log()
    start(pipe, "detect", tmp_path, workers)
    more = Stream(n=300, seed=13).events()
    pipe.produce([{**d, "event_id": f"more-{i}", "ts": docs[-1]["ts"]} for i, d in enumerate(more)])
    wait_detected(pipe, workers, len(docs) + len(more))
    # The control cursor was checkpointed with the state, so the restarted worker does not
    # apply the same reset again, and the new events were applied on top of the reset state.
    seen = {v.decode() for v in pipe.redis().hgetall("dl:detect:control_seen").values()}
    assert eid in seen
    assert states(pipe)["station=s3"]["state"]["detectors"]["n"] == after["detectors"]["n"] + 100


def test_the_book_starts_and_opens_incidents_with_the_broker_down(
    pipe: Pipeline, tmp_path: Path, workers: list[Worker]
) -> None:
    """``driftline run book`` needs no broker: it pages through Alertmanager from Redis's
    outbox, and its producer to the alerts topic is made at its first send."""
    from driftline.alerts.book import FailureBook
    from tests.unit.alerts.synthetic import alarm

    down = f"127.0.0.1:{free_port()}"
    w = start(pipe, "book", tmp_path, workers, DRIFTLINE_KAFKA_BOOTSTRAP=down,
              DRIFTLINE_ALERTMANAGER_URL="")
    pipe.redis().xadd("dl:detect:outbox", {"alarm": json.dumps(alarm("station=s3", 1.0))})
    book = FailureBook(pipe.redis())
    wait_for(lambda: [i.root.slice_id for i in book.active()] == ["station=s3"], 60,
             "the incident")
    wait_for(lambda: "kafka alert delivery failed" in w.log(), 60,
             "a delivery to Kafka tried (and to be tried again)")
    assert w.alive(), w.log()
    assert w.terminate() == 0, w.log()


def test_redis_and_broker_restarts_mid_stream_lose_nothing(
    stack: Stack, pipe: Pipeline, tmp_path: Path, workers: list[Worker]
) -> None:
    """Restart Redis, then the Kafka broker, while events flow: the pipeline resumes by
    itself and every event is counted exactly once."""
    if stack.is_external("redis") or stack.is_external("kafka"):
        pytest.skip("needs the stack's own Redis and Kafka to restart them")
    docs = Stream(n=2400, seed=14).events()
    w = start(pipe, "all", tmp_path, workers)
    pipe.produce(docs[:800])
    wait_for(lambda: sum(counts(states(pipe)).values()) >= 1000, 180, "first updates")
    stack.restart("redis")
    pipe.produce(docs[800:1600])
    wait_for(lambda: sum(counts(states(pipe)).values()) >= 4000, 180, "updates after Redis")
    stack.restart("kafka")
    pipe.produce(docs[1600:])
    wait_detected(pipe, workers, len(docs), timeout=300)
    assert counts(states(pipe)) == expected_counts(docs)
    assert w.alive(), w.log()


def _assignments(w: Worker) -> int:
    """How many times the group handed this worker partitions (its whole log)."""
    return w.log_path.read_text(errors="replace").count("partitions assigned")


def test_hand_over_during_a_redis_outage_evicts_no_one(
    stack: Stack, pipe: Pipeline, tmp_path: Path, workers: list[Worker]
) -> None:
    """Redis goes down, events keep coming, and one of two detect workers is SIGKILLed: the
    survivor keeps polling (checkpoints retried, updates applied in memory), takes the dead
    worker's partitions in one rebalance although their state cannot be loaded yet (listeners
    do not wait on Redis: heartbeats would), stays in the group while Redis is down for twice
    the session, and once Redis is back every update counts exactly once."""
    if stack.is_external("redis"):
        pytest.skip("needs the stack's own Redis to stop it")
    session = {"DRIFTLINE_KAFKA_SESSION_TIMEOUT_MS": "6000"}
    docs = Stream(n=1600, seed=21).events()
    start(pipe, "embed", tmp_path, workers)
    survivor = start(pipe, "detect", tmp_path, workers, **session)
    doomed = start(pipe, "detect", tmp_path, workers, **session)
    pipe.produce(docs[:800])
    wait_detected(pipe, workers, 800)
    before = _assignments(survivor)  # at its start and when the other one joined
    stack.stop_service("redis")
    try:
        pipe.produce(docs[800:1200])
        time.sleep(3)  # the survivor applies some in memory, its checkpoints failing
        doomed.kill()
        wait_for(lambda: _assignments(survivor) > before, 60, "the dead worker's partitions")
        time.sleep(12)  # two sessions with Redis down and the partitions not loaded
        assert survivor.alive(), survivor.log()
    finally:
        stack.start_service("redis")
    pipe.produce(docs[1200:])
    wait_detected(pipe, [survivor], len(docs))
    assert counts(states(pipe)) == expected_counts(docs)
    log = survivor.log_path.read_text(errors="replace")
    assert _assignments(survivor) == before + 1, log[-6000:]
    assert "Redis unreachable" in log and "Redis reachable again" in log
    assert survivor.alive()


def _repartition(pipe: Pipeline, partitions: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "driftline.cli", "detect", "repartition",
         "--partitions", str(partitions)],
        env=pipe.env(), capture_output=True, text=True, timeout=120)


def test_growing_the_slice_updates_topic_keeps_every_slice_whole(
    pipe: Pipeline, tmp_path: Path, workers: list[Worker]
) -> None:
    """`driftline detect repartition` refuses while a stage runs, then grows the topic and
    moves each slice's state to its new partition: afterwards every slice is one record in the
    partition its id hashes to, and counts are exact across the change."""
    docs = Stream(n=1200, seed=23).events()
    embed = start(pipe, "embed", tmp_path, workers)
    detect = start(pipe, "detect", tmp_path, workers)
    pipe.produce(docs[:600])
    wait_detected(pipe, workers, 600)
    refused = _repartition(pipe, 6)
    assert refused.returncode == 2 and "stop the embed and detect stages" in refused.stderr
    assert embed.terminate() == 0 and detect.terminate() == 0
    done = _repartition(pipe, 6)
    assert done.returncode == 0, done.stderr
    assert len(pipe.end_offsets(pipe.updates_topic)) == 6
    start(pipe, "embed", tmp_path, workers)
    start(pipe, "detect", tmp_path, workers)
    pipe.produce(docs[600:])
    wait_detected(pipe, workers, len(docs))
    r = pipe.redis()
    where: dict[str, list[int]] = {}
    for key in r.scan_iter(match="dl:detect:state:*"):
        for sid in r.hkeys(key):
            where.setdefault(sid.decode(), []).append(int(key.decode().rsplit(":", 1)[1]))
    assert all(len(ps) == 1 for ps in where.values()), where  # no slice split in two
    assert {sid: ps[0] for sid, ps in where.items()} == {
        sid: partition_for(sid, 6) for sid in where}
    assert counts(states(pipe)) == expected_counts(docs)
