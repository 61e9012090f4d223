"""Exemplar thumbnails, made on demand from the event in Kafka and cached in Redis.

The hot path stores no image bytes. Each exemplar keeps its event's partition and offset in the
events topic; the first request for its thumbnail reads that one message (assign and seek, no
consumer group, nothing committed), checks that it is the same event, decodes the image at reduced
size and caches a small JPEG under ``dl:thumb:{event_id}`` for as long as resolved incidents are
kept. So a thumbnail can be had while the event is still in the topic (Kafka's retention, 7 days
by default); once made it stays. Events that carried a precomputed embedding have no image.
"""

from __future__ import annotations

import io
import logging
import time

from kafka import KafkaConsumer, TopicPartition
from PIL import Image, UnidentifiedImageError
from redis import Redis

from driftline.consumers.imaging import DEFAULT_LIMITS, ImageError, read_image_uri
from driftline.schema import EventRejected, parse_event

log = logging.getLogger(__name__)

THUMB_KEY = "dl:thumb:{}"
THUMB_PX = 160  # longest side; enough to see haze, glare or a wrong part at a glance
JPEG_QUALITY = 80


class ThumbnailUnavailable(Exception):
    """No thumbnail can be made; the message says why (the API answers 404 with it)."""


class Thumbnails:
    """Reads exemplar images from the events topic and keeps small JPEGs of them in Redis."""

    def __init__(self, redis: Redis, bootstrap: str, topic: str, *, ttl_s: float,
                 max_event_bytes: int, timeout_s: float = 10.0, max_px: int = THUMB_PX) -> None:
        self.redis, self.bootstrap, self.topic = redis, bootstrap, topic
        self.ttl_s, self.max_event_bytes = ttl_s, max_event_bytes
        self.timeout_s, self.max_px = timeout_s, max_px

    def get(self, event_id: str, partition: int | None, offset: int | None) -> bytes:
        """The JPEG thumbnail of ``event_id``, from the cache or made from the topic."""
        key = THUMB_KEY.format(event_id)
        cached = self.redis.get(key)
        if cached is not None:
            return bytes(cached)  # type: ignore[arg-type]
        if partition is None or offset is None:
            raise ThumbnailUnavailable(
                f"exemplar {event_id!r} was recorded before thumbnails existed: it has no "
                "events-topic position to read its image from")
        value = self._read(event_id, partition, offset)
        jpeg = self._thumbnail(event_id, value)
        self.redis.set(key, jpeg, ex=max(1, int(self.ttl_s)))
        return jpeg

    def _read(self, event_id: str, partition: int, offset: int) -> bytes:
        """The value at ``offset``, or ThumbnailUnavailable if retention removed it."""
        where = f"{self.topic}[{partition}] offset {offset}"
        try:
            consumer = KafkaConsumer(
                bootstrap_servers=self.bootstrap, group_id=None, enable_auto_commit=False,
                auto_offset_reset="earliest", client_id="driftline-thumbnails",
                request_timeout_ms=int(self.timeout_s * 1000) + 5000,
                bootstrap_timeout_ms=int(self.timeout_s * 1000),
                fetch_max_bytes=max(self.max_event_bytes, 52_428_800),
                max_partition_fetch_bytes=max(self.max_event_bytes, 1_048_576))
        except Exception as exc:  # broker down: tell the caller, do not hang the request
            raise ThumbnailUnavailable(f"cannot reach Kafka to read {where}: {exc}") from exc
        tp = TopicPartition(self.topic, partition)
        try:
            consumer.assign([tp])
            consumer.seek(tp, offset)
            deadline = time.monotonic() + self.timeout_s
            while time.monotonic() < deadline:
                for msg in consumer.poll(timeout_ms=500, max_records=1).get(tp, []):
                    if msg.offset != offset:
                        raise ThumbnailUnavailable(
                            f"{where} is no longer in Kafka (the topic's retention removed it; "
                            f"the oldest kept is {msg.offset})")
                    return bytes(msg.value)
        finally:
            consumer.close(autocommit=False)
        raise ThumbnailUnavailable(f"{where} could not be read within {self.timeout_s:.0f} s")

    def _thumbnail(self, event_id: str, value: bytes) -> bytes:
        try:
            event = parse_event(value, max_bytes=self.max_event_bytes)
        except EventRejected as exc:
            raise ThumbnailUnavailable(f"the event at that position is unreadable: {exc}") from exc
        if event.event_id != event_id:
            raise ThumbnailUnavailable(
                f"the events topic holds {event.event_id!r} where {event_id!r} was (was the "
                "topic recreated?)")
        data: bytes | None
        try:
            if event.image_uri is not None:
                data = read_image_uri(event.image_uri, limits=DEFAULT_LIMITS)
            else:
                data = event.image_bytes()
        except ImageError as exc:
            raise ThumbnailUnavailable(f"the event's image is unreadable: {exc}") from exc
        if data is None:
            raise ThumbnailUnavailable(
                f"{event_id!r} carried a precomputed embedding, not an image")
        try:
            with Image.open(io.BytesIO(data)) as img:
                if img.width * img.height > DEFAULT_LIMITS.max_pixels:
                    raise ThumbnailUnavailable(
                        f"the event's image is {img.width}x{img.height}, over the pixel limit")
                img.draft("RGB", (self.max_px, self.max_px))  # JPEG: decode at reduced scale
                small = img.convert("RGB")
                small.thumbnail((self.max_px, self.max_px))
                out = io.BytesIO()
                small.save(out, "JPEG", quality=JPEG_QUALITY)
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
            raise ThumbnailUnavailable(f"the event's image is undecodable: {exc}") from exc
        return out.getvalue()
