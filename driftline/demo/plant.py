"""A simulated plant for the factory demo: stations, shifts, lots, and three injected incidents.

Four stations send a JPEG every ``period_s`` seconds of event time:

* ``cam-1`` — a fixed camera over a hallway (frames of opencv-doc's ``vtest.avi``);
* ``cam-2`` — a robot-cell camera looking at a calibration board (opencv-doc's ``left*.jpg`` and
  ``right*.jpg`` stills);
* ``surf-1``, ``surf-2`` — surface inspection (scikit-image's brick, gravel and grass textures).

Every image is a random crop of its station's pool, so the clean stream is stationary. Shifts
(day, evening, night) follow each other every ``shift_events`` events per station; two supplier
lots are in use at any time and rotate every ``lot_events``. Three things go wrong at known
event times, each a physical change:

* **haze** — ``surf-1``'s lens hazes gradually (blur growing over ``ramp_events`` events);
* **lot** — one supplier lot's surfaces differ (colour and texture) at every station;
* **night** — darker lighting on the night shift at ``cam-2``.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from driftline.demo.data import VTEST_VIDEO, read_video_frames

SHIFTS = ("day", "evening", "night")
STATIONS = ("cam-1", "cam-2", "surf-1", "surf-2")
T0 = datetime(2026, 11, 16, 6, 0, tzinfo=UTC)
SIZE = (320, 240)


@dataclass(frozen=True)
class Injection:
    """One injected incident: what, the root slice it must be attributed to, and when."""

    name: str
    description: str
    root: dict[str, str]
    start: datetime


@dataclass(frozen=True)
class PlantConfig:
    period_s: float = 4.0  # per station, in event time
    shift_events: int = 150  # per station per shift
    lot_events: int = 75  # per station before a lot rotates
    ref_days: int = 1
    stream_days: int = 2
    ramp_events: int = 60
    seed: int = 0


def load_pools(data_dir: Path, seed: int = 0) -> dict[str, list[Image.Image]]:
    """Each station's source images (decoded once)."""
    frames = [Image.fromarray(f) for f in read_video_frames(data_dir / VTEST_VIDEO, every=4)]
    ocv = data_dir / "opencv"
    board = [Image.open(p).convert("RGB") for p in sorted(ocv.glob("left[0-9]*.jpg"))
             + sorted(ocv.glob("right[0-9]*.jpg"))]
    sk = data_dir / "skimage"
    tex = {n: Image.open(sk / f"{n}.png").convert("RGB") for n in ("brick", "gravel", "grass")}
    return {"cam-1": frames, "cam-2": board,
            "surf-1": [tex["brick"], tex["brick"], tex["gravel"]],
            "surf-2": [tex["grass"], tex["gravel"], tex["grass"]]}


def _crop(img: Image.Image, rng: np.random.Generator, station: str) -> Image.Image:
    w, h = img.size
    frac = rng.uniform(0.85, 1.0) if station.startswith("cam") else rng.uniform(0.35, 0.6)
    cw, ch = int(w * frac), int(h * frac)
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    out = img.crop((x, y, x + cw, y + ch)).resize(SIZE, Image.Resampling.BILINEAR)
    if station.startswith("surf") and rng.random() < 0.5:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return out


def haze(img: Image.Image, strength: float) -> Image.Image:
    """A hazing lens: blur (radius up to 5 px) and veiling glare (contrast down)."""
    if strength <= 0:
        return img
    out = img.filter(ImageFilter.GaussianBlur(radius=5.0 * strength))
    return ImageEnhance.Contrast(out).enhance(1.0 - 0.4 * strength)


def dark(img: Image.Image) -> Image.Image:
    """Night lighting: a third of the light and a warm cast."""
    arr = np.asarray(img, np.float32) * np.array([0.38, 0.33, 0.28], np.float32)
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def bad_lot(img: Image.Image) -> Image.Image:
    """A supplier lot with a different coating: colours rotated, texture coarsened."""
    r, g, b = img.split()
    out = Image.merge("RGB", (b, r, g))
    out = ImageEnhance.Color(out).enhance(1.8)
    return out.filter(ImageFilter.MaxFilter(3))


def to_jpeg_b64(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return base64.b64encode(buf.getvalue()).decode()


class Plant:
    """Generates the reference manifest and the stream with its injections."""

    def __init__(self, pools: dict[str, list[Image.Image]], config: PlantConfig) -> None:
        self.pools, self.cfg = pools, config
        day = config.shift_events * len(SHIFTS)
        s0 = config.ref_days * day  # first stream event index (per station)
        self.bad_lot_index = (s0 + config.shift_events) // config.lot_events + 1
        self.night_from = s0 + 2 * config.shift_events
        self.haze_from = s0 + day + config.shift_events // 3
        self.injections = [
            Injection("haze", "surf-1 lens hazes gradually (growing blur)",
                      {"station": "surf-1"}, self.time(self.haze_from, 0)),
            Injection("lot", "supplier lot with different surfaces at every station",
                      {"lot": self.lot_name(self.bad_lot_index)},
                      self.time((self.bad_lot_index - 1) * config.lot_events, 0)),
            Injection("night", "darker night-shift lighting at cam-2",
                      {"station": "cam-2", "shift": "night"},
                      self.time(self.night_from, STATIONS.index("cam-2"))),
        ]

    def time(self, index: int, station_no: int) -> datetime:
        """Event time of a station's ``index``-th event (stations staggered within a period)."""
        step = self.cfg.period_s
        return T0 + timedelta(seconds=index * step + station_no * step / len(STATIONS))

    @staticmethod
    def lot_name(k: int) -> str:
        return f"L{2600 + k}"

    def _lots(self, i: int, rng: np.random.Generator) -> str:
        # Two lots in use at once, overlapping by half: lot k runs from (k-1)·L to (k+1)·L.
        k = i // self.cfg.lot_events
        return self.lot_name(k + int(rng.integers(0, 2)))

    def events(self, first: int, last: int) -> Iterator[dict[str, Any]]:
        """Events with per-station index in ``[first, last)``, in event-time order."""
        rng = np.random.default_rng([self.cfg.seed, first])
        for i in range(first, last):
            shift = SHIFTS[(i // self.cfg.shift_events) % len(SHIFTS)]
            for n, station in enumerate(STATIONS):
                lot = self._lots(i, rng)
                pool = self.pools[station]
                img = _crop(pool[int(rng.integers(0, len(pool)))], rng, station)
                if lot == self.lot_name(self.bad_lot_index):
                    img = bad_lot(img)
                if station == "cam-2" and shift == "night" and i >= self.night_from:
                    img = dark(img)
                if station == "surf-1" and i >= self.haze_from:
                    img = haze(img, min(1.0, (i - self.haze_from + 1) / self.cfg.ramp_events))
                yield {"event_id": f"{station}-{i}", "ts": self.time(i, n).isoformat(),
                       "station": station, "shift": shift, "lot": lot, "model_version": "v3",
                       "image": to_jpeg_b64(img)}

    def reference_events(self) -> Iterator[dict[str, Any]]:
        day = self.cfg.shift_events * len(SHIFTS)
        return self.events(0, self.cfg.ref_days * day)

    def stream_events(self) -> Iterator[dict[str, Any]]:
        day = self.cfg.shift_events * len(SHIFTS)
        s0 = self.cfg.ref_days * day
        return self.events(s0, s0 + self.cfg.stream_days * day)
