"""Exemplar thumbnails, made on demand from the event in Kafka and cached in Redis.

The hot path stores no image bytes. Each exemplar keeps its event's partition and offset in the
events topic; the first request for its thumbnail reads that one message (assign and seek, no
consumer group, nothing committed), checks that it is the same event, decodes the image at reduced
size and caches a small JPEG under ``dl:thumb:{partition}:{offset}:{event_id}``, kept for as
long as resolved incidents after its last view. So a thumbnail can be had while the event is still
in the topic (Kafka's retention, 7 days by default); once made and viewed it stays. Events that
carried a precomputed embedding have no image.

Failures say why: :class:`ThumbnailUnavailable` with ``transient`` set when trying again later may
work (Kafka unreachable, slow, or too many reads at once; the API answers 503), unset when it
cannot (past retention, no image, another event at that offset; 404).
"""

from __future__ import annotations

import io
import logging
import threading
import time
from dataclasses import replace
from pathlib import Path

from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError
from PIL import Image, UnidentifiedImageError
from redis import Redis

from driftline.consumers.imaging import DEFAULT_LIMITS, ImageError, read_image_uri
from driftline.schema import EventRejected, parse_event

log = logging.getLogger(__name__)

THUMB_KEY = "dl:thumb:{}:{}:{}"  # partition, offset, event id
THUMB_PX = 160  # longest side; enough to see haze, glare or a wrong part at a glance
JPEG_QUALITY = 80
# Thumbnails made at once per API process, read and decoded: each holds a request thread for
# up to ``timeout_s``, and its decode up to ~4 bytes per pixel (160 MB for an image of
# DEFAULT_LIMITS.max_pixels, which a PNG of 130 kB can hold). The decode counts too: with only
# the reads counted, each viewer request for an uncached exemplar could start another decode.
MAX_CONCURRENT = 4
# Any broker since Kafka 2.1 answers requests at this level; giving it spares the constructor
# the version probe, a network call whose failure leaves kafka-python's I/O thread running.
KAFKA_API_VERSION = (2, 8)


class ThumbnailUnavailable(Exception):
    """No thumbnail can be made; the message says why. ``transient``: it may work later."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class Thumbnails:
    """Reads exemplar images from the events topic and keeps small JPEGs of them in Redis."""

    def __init__(self, redis: Redis, bootstrap: str, topic: str, *, ttl_s: float,
                 max_event_bytes: int, timeout_s: float = 10.0, max_px: int = THUMB_PX,
                 image_roots: tuple[Path, ...] | None = None) -> None:
        self.redis, self.bootstrap, self.topic = redis, bootstrap, topic
        # file:// images: the embed stage's bounds and roots (DRIFTLINE_IMAGE_ROOTS), so the
        # API serves no file the stage would not read
        self.limits = replace(DEFAULT_LIMITS, allowed_roots=image_roots)
        self.ttl_s, self.max_event_bytes = ttl_s, max_event_bytes
        self.timeout_s, self.max_px = timeout_s, max_px
        self._making = threading.BoundedSemaphore(MAX_CONCURRENT)

    def get(self, event_id: str, partition: int | None, offset: int | None) -> bytes:
        """The JPEG thumbnail of ``event_id``, from the cache (its expiry pushed back) or made
        from the topic."""
        if partition is None or offset is None:
            raise ThumbnailUnavailable(
                f"exemplar {event_id!r} was recorded before thumbnails existed: it has no "
                "events-topic position to read its image from")
        key = THUMB_KEY.format(partition, offset, event_id)
        ttl = max(1, int(self.ttl_s))
        cached = self.redis.getex(key, ex=ttl)
        if cached is not None:
            return bytes(cached)  # type: ignore[arg-type]
        if not self._making.acquire(blocking=False):
            raise ThumbnailUnavailable(
                f"{MAX_CONCURRENT} thumbnails are being made already; try again in a few "
                "seconds", transient=True)
        try:
            jpeg = self._thumbnail(event_id, self._read(partition, offset))
        finally:
            self._making.release()
        self.redis.set(key, jpeg, ex=ttl)
        return jpeg

    def _read(self, partition: int, offset: int) -> bytes:
        """The value at ``offset``, or ThumbnailUnavailable if retention removed it."""
        where = f"{self.topic}[{partition}] offset {offset}"
        consumer = KafkaConsumer(  # no network call here (api_version given)
            bootstrap_servers=self.bootstrap, group_id=None, enable_auto_commit=False,
            auto_offset_reset="earliest", client_id="driftline-thumbnails",
            api_version=KAFKA_API_VERSION, request_timeout_ms=int(self.timeout_s * 1000) + 5000,
            fetch_max_bytes=max(self.max_event_bytes, 52_428_800),
            max_partition_fetch_bytes=max(self.max_event_bytes, 1_048_576))
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
                    if msg.value is None:
                        raise ThumbnailUnavailable(f"{where} is a tombstone (no value)")
                    return bytes(msg.value)
        except KafkaError as exc:
            raise ThumbnailUnavailable(f"cannot read {where} from Kafka: {exc!r}",
                                       transient=True) from exc
        finally:
            consumer.close(autocommit=False)
        raise ThumbnailUnavailable(
            f"{where} could not be read within {self.timeout_s:.0f} s (is Kafka at "
            f"{self.bootstrap} up?)", transient=True)

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
        if event.image_uri is not None:
            try:
                data = read_image_uri(event.image_uri, limits=self.limits)
            except ImageError:  # the reason names a path on the API's host: log it, not say it
                log.warning("thumbnail: image_uri unreadable here",
                            extra={"event_id": event_id, "uri": event.image_uri[:300]})
                raise ThumbnailUnavailable(
                    f"{event_id!r} names its image by file:// URI, which this API host cannot "
                    "read (the image lives on the inference host)") from None
        else:
            data = event.image_bytes()
        if data is None:
            raise ThumbnailUnavailable(
                f"{event_id!r} carried a precomputed embedding, not an image")
        try:
            with Image.open(io.BytesIO(data), formats=DEFAULT_LIMITS.formats) as img:
                if img.width * img.height > DEFAULT_LIMITS.max_pixels:
                    raise ThumbnailUnavailable(
                        f"the event's image is {img.width}x{img.height}, over the pixel limit")
                img.draft("RGB", (self.max_px, self.max_px))  # JPEG: decode at reduced scale
                # made small in place, then converted: a full-size RGB copy first doubled a
                # large PNG's memory (modes other than these are converted first, as before)
                full = img if img.mode in ("RGB", "RGBA", "L") else img.convert("RGB")
                full.thumbnail((self.max_px, self.max_px))
                small = full.convert("RGB")
                out = io.BytesIO()
                small.save(out, "JPEG", quality=JPEG_QUALITY)
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
            raise ThumbnailUnavailable(f"the event's image is undecodable: {exc}") from exc
        return out.getvalue()
