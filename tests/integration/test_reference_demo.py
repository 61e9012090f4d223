"""A reference built from the real demo model and video: OOD calibration and separation.

Frames of ``vtest.avi`` (a fixed camera over a plaza, 795 frames at 10 fps) are JPEG-encoded
into events and split at random (fixed seed) into a reference (60 %) and held-out frames (40 %).

Why a random split rather than "reference = frames 0–500, held-out = 550–795": the video is a
sequence. Neighbouring frames are near-duplicates, and the people in the last minute stand in
places they never stood before, so a later segment really is further from the reference than
the reference's own frames are from each other (measured: every frame of 550–795 exceeded the
0–500 threshold). That is genuine drift, not a calibration error. The leave-one-out threshold is
calibrated for events *exchangeable* with the reference, and a random split makes held-out and
reference frames exchangeable: a held-out frame's nearest reference frame is drawn from the same
law as a reference frame's nearest *other* reference frame. (For references recorded as
sequences, ``exclude_within_s`` gives a threshold for independent new events.)
"""

from __future__ import annotations

import base64
import io
import math
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter
from scipy.stats import betabinom, norm

from driftline.consumers.embedder import Embedder, EmbedderConfig
from driftline.demo.data import VTEST_VIDEO, fetch_demo_data, read_video_frames
from driftline.demo.model import build_demo_model
from driftline.reference import Reference, build_reference
from driftline.schema import Event

pytestmark = pytest.mark.slow
T0 = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)
FPS = 10
ESPRESSO = 967


def _jpeg(frame: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _blur(frame: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(frame).filter(ImageFilter.GaussianBlur(5)))


def _dark(frame: np.ndarray) -> np.ndarray:
    return (frame * 0.3).astype(np.uint8)


@pytest.fixture(scope="module")
def model() -> Path:
    return build_demo_model()


@pytest.fixture(scope="module")
def video() -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """All frames, reference indices, held-out indices."""
    frames = list(read_video_frames(fetch_demo_data() / VTEST_VIDEO))
    assert len(frames) == 795
    order = np.random.default_rng(20260302).permutation(len(frames))
    return frames, np.sort(order[:477]), np.sort(order[477:])


def _events(frames: list[np.ndarray], idx: np.ndarray) -> list[Event]:
    return [Event.model_validate({
        "event_id": f"vtest-{i}", "station": "plaza-cam", "shift": "day", "lot": "vtest",
        "ts": (T0 + timedelta(seconds=i / FPS)).isoformat().replace("+00:00", "Z"),
        "image": base64.b64encode(_jpeg(frames[i])).decode()}) for i in idx]


def _exceeded(ref: Reference, emb: Embedder, frames: list[np.ndarray]) -> int:
    vectors, errors = emb.embed_images([_jpeg(f) for f in frames])
    assert not any(errors)
    _, dist = ref.assign(vectors)
    return int(np.count_nonzero(dist > ref.baseline_for("plaza-cam", "day").ood_threshold))


def _exceedance(ref: Reference, emb: Embedder, frames: list[np.ndarray]) -> float:
    return _exceeded(ref, emb, frames) / len(frames)


Z = 3.0
DEFF = 1.5  # the held-out count's variance over its BetaBinomial's, measured (see _accepted)


def _accepted(n_ref: int, beyond: int, n_held: int) -> tuple[float, float]:
    """Held-out frames beyond the threshold that a calibrated threshold allows.

    For a cut at an order statistic of ``n_ref`` exchangeable distances with ``beyond`` of them
    above it, the true exceedance rate ``U`` is Beta(beyond + 1, n_ref - beyond) over splits
    (mean: the stated rate) and independent held-out frames would count BetaBinomial(n_held,
    beyond + 1, n_ref - beyond): its central quantiles at Φ(-Z) a side are a Z = 3 window
    that allows for the threshold's own noise and for the skew of a count of about 3. Frames
    are not independent (people linger: neighbouring frames exceed together): over 200 other
    random splits the count's variance was 1.34× (embedding) and 1.50× (features.13) the
    BetaBinomial's, so the window is that law's at Φ(-Z·√DEFF) a side (one-sided 1.2e-4
    before inflation; Φ(-3) = 0.13 % for the inflated count in the normal approximation):
    [0, 15] of 318 held-out frames for beyond = 3 of 477, [0, 17] for beyond = 4.
    The 200 splits, both layers: 400 of 400 inside (and inside the plain Z = 3 window too)."""
    law = betabinom(n_held, beyond + 1, n_ref - beyond)
    tail = float(norm.cdf(-Z * math.sqrt(DEFF)))
    return float(law.ppf(tail)), float(law.isf(tail))


@pytest.mark.parametrize("layer", ["embedding", "features.13"])
def test_ood_is_calibrated_on_clean_frames_and_fires_on_blur_and_dark(
    model: Path, video: tuple[list[np.ndarray], np.ndarray, np.ndarray], tmp_path: Path,
    layer: str,
) -> None:
    frames, ref_idx, held_idx = video
    emb = Embedder(EmbedderConfig(model_path=model, output_name=layer, intra_op_threads=2))
    assert emb.dim == (1280 if layer == "embedding" else 96)  # features.13: [N, 96, 14, 14]
    ref = build_reference(_events(frames, ref_idx), emb, tmp_path / "ref")
    base = ref.baseline_for("plaza-cam", "day")
    assert base.key == "station=plaza-cam|shift=day" and ref.k == 7  # round(sqrt(477 / 10))
    assert ref.manifest["embedding"]["model"]["output_name"] == layer
    held = [frames[i] for i in held_idx]
    beyond = ref.manifest["baselines"]["items"][base.key]["ood_exceed"]
    assert base.ood_rate == (beyond + 1) / (len(ref_idx) + 1)
    low, high = _accepted(len(ref_idx), beyond, len(held))
    clean = _exceeded(ref, emb, held)
    assert low <= clean <= high, (clean, low, high, base.ood_rate)
    half = held[::2]
    assert _exceedance(ref, emb, [_blur(f) for f in half]) >= 0.9
    assert _exceedance(ref, emb, [_dark(f) for f in half]) >= 0.9


def test_embedder_preprocessing_matches_the_model_contract(model: Path) -> None:
    """Through the embedder's own decode + normalisation, coffee is still an espresso."""
    import skimage.data

    buf = io.BytesIO()
    Image.fromarray(skimage.data.coffee()).save(buf, format="PNG")
    logits = Embedder(EmbedderConfig(model_path=model, output_name="logits", pooling="none",
                                     l2_normalize=False))
    out, errors = logits.embed_images([buf.getvalue()])
    assert errors == [None] and int(out[0].argmax()) == ESPRESSO
