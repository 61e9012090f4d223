"""A thumbnail of a file:// image reads only what the embed stage may read: inside
DRIFTLINE_IMAGE_ROOTS when they are set."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from driftline.service.thumbnails import Thumbnails, ThumbnailUnavailable


def _event(uri: str) -> bytes:
    return json.dumps({"event_id": "e1", "ts": "2026-11-23T08:00:00Z", "station": "s1",
                       "shift": "day", "lot": "L1", "image_uri": uri}).encode()


def test_file_images_outside_the_image_roots_are_not_served(tmp_path: Path) -> None:
    frames, elsewhere = tmp_path / "frames", tmp_path / "secrets"
    frames.mkdir()
    elsewhere.mkdir()
    for d in (frames, elsewhere):
        Image.new("RGB", (64, 48), (200, 10, 10)).save(d / "x.png")
    thumbs = Thumbnails(None, "unused:9092", "ev", ttl_s=60, max_event_bytes=1 << 20,  # type: ignore[arg-type]
                        image_roots=(frames,))
    small = thumbs._thumbnail("e1", _event((frames / "x.png").as_uri()))
    assert Image.open(io.BytesIO(small)).format == "JPEG"
    with pytest.raises(ThumbnailUnavailable, match="cannot read"):
        thumbs._thumbnail("e1", _event((elsewhere / "x.png").as_uri()))
