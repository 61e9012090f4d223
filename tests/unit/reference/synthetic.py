"""Synthetic reference events with known structure (precomputed embeddings), a manifest
of small JPEG events, and edited copies of a built artifact."""

from __future__ import annotations

import base64
import io
import json
import shutil
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from driftline.reference.artifact import MANIFEST, content_id
from driftline.schema import Event

DIM = 16
CENTRES = 6
T0 = datetime(2026, 1, 5, 6, 0, tzinfo=UTC)


def centres(seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(CENTRES, DIM))
    return c / np.linalg.norm(c, axis=1, keepdims=True)


def sample(rng: np.random.Generator, which: np.ndarray, noise: float = 0.15) -> np.ndarray:
    x = centres()[which] + rng.normal(0, noise, (len(which), DIM))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# (station, shift, count, cluster mix over the 6 centres)
CELLS = [
    ("s1", "day", 400, [0.3, 0.3, 0.1, 0.1, 0.1, 0.1]),
    ("s1", "night", 200, [0.1, 0.1, 0.2, 0.2, 0.2, 0.2]),
    ("s2", "day", 250, [0.05, 0.05, 0.1, 0.1, 0.2, 0.5]),
    ("s2", "night", 50, [0.05, 0.05, 0.1, 0.1, 0.2, 0.5]),
    ("s3", "day", 50, [1 / 6] * 6),
]


def event(i: int, emb: np.ndarray, station: str, shift: str, **extra: Any) -> Event:
    ts = (T0 + timedelta(seconds=i)).isoformat().replace("+00:00", "Z")
    return Event.model_validate({"event_id": f"e{i}", "ts": ts, "station": station,
                                 "shift": shift, "lot": f"lot{i % 7}",
                                 "embedding": emb.tolist(), **extra})


def reference_events(seed: int = 0) -> tuple[list[Event], np.ndarray]:
    """Events and their true centre. Centre 2 is an error slice: 40 % errors vs 5 % elsewhere;
    centre 4 carries high losses."""
    rng = np.random.default_rng(seed)
    events, truth = [], []
    for station, shift, count, mix in CELLS:
        which = rng.choice(CENTRES, size=count, p=mix)
        for emb, c in zip(sample(rng, which), which, strict=True):
            wrong = rng.random() < (0.4 if c == 2 else 0.05)
            label = "ok" if rng.random() < 0.7 else "scratch"
            pred = ("scratch" if label == "ok" else "ok") if wrong else label
            loss = float(rng.gamma(2.0, 1.0 if c == 4 else 0.2))
            events.append(event(len(events), emb, station, shift, label=label, loss=loss,
                                prediction={"label": pred, "score": 0.9}))
            truth.append(c)
    return events, np.array(truth)


def image_manifest(path: Path, n: int = 40) -> Path:
    """A JSONL manifest of ``n`` events, each with a 32×24 JPEG of its own colour."""
    with path.open("w") as fh:
        for i in range(n):
            buf = io.BytesIO()
            Image.new("RGB", (32, 24), (i * 5, 100, 250 - i * 5)).save(buf, "JPEG")
            fh.write(json.dumps({
                "event_id": f"e{i}", "ts": f"2026-01-01T00:00:{i:02d}Z", "station": "s1",
                "shift": "day", "lot": "l1",
                "image": base64.b64encode(buf.getvalue()).decode()}) + "\n")
    return path


def events_manifest(directory: Path, n: int = 200) -> Path:
    """The first ``n`` of :func:`reference_events` as a manifest of precomputed embeddings."""
    events, _ = reference_events()
    path = directory / "ref.jsonl"
    path.write_text("\n".join(e.model_dump_json() for e in events[:n]) + "\n")
    return path


def variant(src: Path, dst: Path, edit: Callable[[dict[str, Any]], None],
            *, rehash: bool = True) -> Path:
    """A copy of the artifact ``src`` whose manifest ``edit`` changed, as a build would have
    written it (its content id recomputed) unless ``rehash`` is false."""
    shutil.copytree(src, dst)
    manifest = json.loads((dst / MANIFEST).read_text())
    edit(manifest)
    if rehash:
        manifest["reference_id"] = content_id(manifest)
    (dst / MANIFEST).write_text(json.dumps(manifest))
    return dst
