"""Thumbnails made at once are bounded, the decode included: each can hold ~160 MB."""

from __future__ import annotations

import base64
import io
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

from driftline.service.thumbnails import MAX_CONCURRENT, Thumbnails, ThumbnailUnavailable
from tests.unit.service.keyvalue import KeyValue


def _event(offset: int) -> bytes:
    """The event at ``offset`` of the events topic: ``e<offset>`` with a small PNG."""
    buf = io.BytesIO()
    Image.new("RGB", (320, 240), (offset * 40 % 256, 90, 30)).save(buf, "PNG")
    return json.dumps({"event_id": f"e{offset}", "ts": "2026-11-23T08:00:00Z", "station": "s1",
                       "shift": "day", "lot": "L1",
                       "image": base64.b64encode(buf.getvalue()).decode()}).encode()


def test_a_decode_counts_against_the_thumbnails_made_at_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the Kafka reads were counted: once its read was done, each viewer request for an
    uncached exemplar started one more decode (an image of the pixel limit, as a 130 kB PNG,
    holds ~160 MB while decoded; 16 requests at once held 4 GB, the API pod's limit is 1 GiB)."""
    thumbs = Thumbnails(KeyValue(), "unused:9092", "ev", ttl_s=60,  # type: ignore[arg-type]
                        max_event_bytes=1 << 20)
    monkeypatch.setattr(thumbs, "_read", lambda partition, offset: _event(offset))
    decoding, finish = threading.Semaphore(0), threading.Event()
    decode = thumbs._thumbnail

    def held(event_id: str, value: bytes) -> bytes:
        decoding.release()
        assert finish.wait(10)
        return decode(event_id, value)

    monkeypatch.setattr(thumbs, "_thumbnail", held)
    with ThreadPoolExecutor(MAX_CONCURRENT) as pool:
        made = [pool.submit(thumbs.get, f"e{i}", 0, i) for i in range(MAX_CONCURRENT)]
        for _ in range(MAX_CONCURRENT):  # every one read, all decoding now
            assert decoding.acquire(timeout=10)
        with pytest.raises(ThumbnailUnavailable, match="being made already") as refused:
            thumbs.get("e9", 0, 9)
        assert refused.value.transient  # the API's 503: ask again in a few seconds
        finish.set()
        assert all(Image.open(io.BytesIO(f.result())).format == "JPEG" for f in made)
    assert Image.open(io.BytesIO(thumbs.get("e9", 0, 9))).size == (160, 120)


@pytest.mark.parametrize(("mode", "fmt"), [
    ("RGB", "PNG"), ("RGBA", "PNG"), ("L", "PNG"), ("LA", "PNG"), ("P", "PNG"), ("1", "PNG"),
    ("I;16", "PNG"), ("CMYK", "JPEG"), ("F", "TIFF"),  # TIFF: uncompressed, 1.2 MB
])
def test_every_image_mode_makes_a_small_rgb_jpeg(mode: str, fmt: str) -> None:
    """Made small before it is converted (a full-size RGB copy doubled a decode's memory):
    the modes the resize does not take are converted first."""
    buf = io.BytesIO()
    Image.new(mode, (640, 480)).save(buf, fmt)
    doc = json.loads(_event(0))
    doc["image"] = base64.b64encode(buf.getvalue()).decode()
    thumbs = Thumbnails(KeyValue(), "unused:9092", "ev", ttl_s=60,  # type: ignore[arg-type]
                        max_event_bytes=8 << 20)
    with Image.open(io.BytesIO(thumbs._thumbnail("e0", json.dumps(doc).encode()))) as small:
        assert (small.format, small.mode, small.size) == ("JPEG", "RGB", (160, 120))
