"""Exemplar thumbnails read from a real Kafka topic and cached in a real Redis: the reasons
given when no thumbnail can be made (the happy path through the API is in test_api.py)."""

from __future__ import annotations

import base64
import io
import json
import re
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from kafka import KafkaAdminClient, KafkaProducer, TopicPartition
from PIL import Image

from driftline.consumers.kafka_io import ensure_topics
from driftline.service.thumbnails import THUMB_KEY, Thumbnails, ThumbnailUnavailable
from tests.integration.pipeline_support import free_port

pytestmark = pytest.mark.integration


def _jpeg(size: tuple[int, int]) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, format="JPEG")
    return base64.b64encode(buf.getvalue()).decode()


def _event(eid: str, **payload: Any) -> bytes:
    doc = {"event_id": eid, "ts": "2026-11-02T06:00:00+00:00", "station": "s1", "shift": "day",
           "lot": "L0", **payload}
    return json.dumps(doc).encode()


@pytest.fixture
def topic(kafka_bootstrap: str) -> str:
    name = f"thumbs-{uuid.uuid4().hex[:8]}.events"
    ensure_topics(kafka_bootstrap, {name: 1})
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    for value in (_event("tall", image=_jpeg((300, 900))),         # offset 0
                  _event("emb", embedding=[0.1, 0.2, 0.3]),        # offset 1
                  _event("wide", image=_jpeg((1000, 200))),        # offset 2
                  _event("broken", image=base64.b64encode(b"not an image").decode()),  # 3
                  _event("late", image=_jpeg((64, 48)))):          # offset 4
        producer.send(name, value, partition=0)
    producer.flush()
    producer.close()
    return name


@pytest.fixture
def cache(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(re.sub(r"/\d+$", "/12", redis_url.rstrip("/")))
    client.flushdb()
    yield client
    client.close()


def thumbs(cache: redis.Redis, bootstrap: str, topic: str) -> Thumbnails:
    return Thumbnails(cache, bootstrap, topic, ttl_s=3600, max_event_bytes=8 << 20,
                      timeout_s=5)


def test_thumbnails_keep_aspect_and_are_cached_with_a_ttl(
    cache: redis.Redis, kafka_bootstrap: str, topic: str
) -> None:
    t = thumbs(cache, kafka_bootstrap, topic)
    for eid, offset, size in (("tall", 0, (53, 160)), ("wide", 2, (160, 32)),
                              ("late", 4, (64, 48))):  # small images are not enlarged
        img = Image.open(io.BytesIO(t.get(eid, 0, offset)))
        assert img.format == "JPEG" and img.size == size, (eid, img.size)
        key = THUMB_KEY.format(0, offset, eid)
        assert 0 < cache.ttl(key) <= 3600
        cache.expire(key, 5)
        t.get(eid, 0, offset)  # a view renews the expiry
        assert cache.ttl(key) > 5


@pytest.mark.parametrize(("eid", "offset", "reason"), [
    ("emb", 1, "precomputed embedding, not an image"),
    ("broken", 3, "undecodable"),
    ("someone-else", 2, "holds 'wide' where 'someone-else' was"),
    ("tall", None, "before thumbnails existed"),
])
def test_no_thumbnail_says_why(cache: redis.Redis, kafka_bootstrap: str, topic: str,
                               eid: str, offset: int | None, reason: str) -> None:
    with pytest.raises(ThumbnailUnavailable, match=re.escape(reason)) as err:
        thumbs(cache, kafka_bootstrap, topic).get(eid, 0, offset)
    assert not err.value.transient  # trying again would not help: the API answers 404
    assert not cache.keys("dl:thumb:*")


def test_event_past_retention_is_named(cache: redis.Redis, kafka_bootstrap: str,
                                       topic: str) -> None:
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    try:  # what retention does: the log now starts at offset 3
        admin.delete_records({TopicPartition(topic, 0): 3})
    finally:
        admin.close()
    with pytest.raises(ThumbnailUnavailable, match="no longer in Kafka.*oldest kept is 3") as err:
        thumbs(cache, kafka_bootstrap, topic).get("tall", 0, 0)
    assert not err.value.transient
    img = Image.open(io.BytesIO(thumbs(cache, kafka_bootstrap, topic).get("late", 0, 4)))
    assert img.size == (64, 48)


def test_unreachable_broker_is_transient_and_leaves_no_thread(cache: redis.Redis) -> None:
    before = {t.ident for t in threading.enumerate()}
    t = Thumbnails(cache, f"127.0.0.1:{free_port()}", "nowhere", ttl_s=60,
                   max_event_bytes=1 << 20, timeout_s=2)
    for _ in range(3):
        with pytest.raises(ThumbnailUnavailable, match=r"nowhere\[0\] offset 0 could not be read "
                           r"within 2 s \(is Kafka at 127\.0\.0\.1:\d+ up\?\)") as err:
            t.get("x", 0, 0)
        assert err.value.transient  # the API answers 503: worth trying again
    time.sleep(0.5)
    left = [th.name for th in threading.enumerate() if th.ident not in before]
    assert not left, left  # each read's Kafka client is closed, its I/O thread gone
