"""The offline demo model: torchvision's ImageNet MobileNetV2 as ONNX in the cache, built
without torch, and the preprocessing its input expects.

The weights are fetched and verified by :mod:`driftline.demo.weights` (a legacy torch
checkpoint, read by :mod:`driftline.demo.torch_legacy`); :mod:`driftline.demo.mobilenet` builds
the graph and states its contract. The file is deterministic: the same weights always give
byte-identical ONNX.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from driftline.demo.mobilenet import IMAGENET_MEAN, IMAGENET_STD, build_onnx
from driftline.demo.torch_legacy import load_legacy_state_dict
from driftline.demo.weights import default_cache_dir, locate_weights

__all__ = ["MODEL_FILENAME", "build_demo_model", "default_cache_dir", "preprocess_imagenet"]

MODEL_FILENAME = "mobilenet_v2_demo.onnx"


def build_demo_model(cache_dir: Path | None = None, *, force: bool = False) -> Path:
    """Build (or reuse) ``cache_dir / "mobilenet_v2_demo.onnx"`` and return its path."""
    cache_dir = cache_dir or default_cache_dir()
    target = cache_dir / MODEL_FILENAME
    if target.is_file() and not force:
        return target
    model = build_onnx(load_legacy_state_dict(locate_weights(cache_dir)))
    data = model.SerializeToString(deterministic=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(
        dir=cache_dir, prefix=f".{MODEL_FILENAME}.", delete=False
    ) as tmp:
        tmp.write(data)
        tmp.flush()
        os.fsync(tmp.fileno())
    os.chmod(tmp.name, 0o644)  # NamedTemporaryFile creates 0600; the model is not secret
    os.replace(tmp.name, target)
    return target


def preprocess_imagenet(images: np.ndarray[Any, Any], size: int = 224) -> np.ndarray:
    """uint8 RGB ``[N, H, W, 3]`` → float32 ``[N, 3, size, size]``: bilinear resize, /255, mean/std.

    >>> preprocess_imagenet(np.zeros((2, 50, 60, 3), np.uint8)).shape
    (2, 3, 224, 224)
    """
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
    resized = (
        np.stack(
            [
                np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.BILINEAR))
                for img in images
            ]
        ).astype(np.float32)
        / 255.0
    )
    mean, std = np.array(IMAGENET_MEAN, np.float32), np.array(IMAGENET_STD, np.float32)
    return np.ascontiguousarray(((resized - mean) / std).transpose(0, 3, 1, 2))
