"""Offline demo data: OpenCV's sample images and video, and scikit-image's bundled pictures.

Layout under ``<cache>/demo-data/``:

* ``opencv/`` — the ``examples/data/`` folder of Debian's ``opencv-doc`` package, flattened
  (``opencv/vtest.avi``: a fixed-camera street scene, 795 frames of 768x576; about 90 stills);
* ``skimage/`` — PNGs of the images scikit-image ships inside its wheel (no download).

PyAV and scikit-image are the ``demo`` extra, imported only when used.
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from driftline.demo.model import default_cache_dir

OPENCV_PACKAGE = "opencv-doc"
VTEST_VIDEO = PurePosixPath("opencv/vtest.avi")  # relative to the directory fetch_demo_data returns
SKIMAGE_IMAGES = ("astronaut", "brick", "camera", "chelsea", "coffee", "coins", "grass", "gravel",
                  "hubble_deep_field", "immunohistochemistry", "moon", "page", "retina", "rocket",
                  "text")  # fmt: skip
_COMPLETE = ".complete"  # written last, so a half-finished fetch is redone


def fetch_demo_data(cache_dir: Path | None = None) -> Path:
    """Fetch (once) the demo images and video; return ``<cache>/demo-data``."""
    data_dir = (cache_dir or default_cache_dir()) / "demo-data"
    data_dir.mkdir(parents=True, exist_ok=True)
    _fetch_opencv(data_dir / "opencv")
    _write_skimage(data_dir / "skimage")
    return data_dir


def _fetch_opencv(target: Path) -> None:
    if (target / _COMPLETE).is_file():
        return
    apt_get, dpkg_deb = shutil.which("apt-get"), shutil.which("dpkg-deb")
    if apt_get is None or dpkg_deb is None:
        raise RuntimeError("fetching the OpenCV demo data needs Debian's apt-get and dpkg-deb")
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".opencv-") as tmp:
        # `apt-get download` writes into the working directory; as root apt warns that it cannot
        # drop privileges to `_apt` for a private temp dir, which is harmless.
        done = subprocess.run(  # noqa: S603 - fixed argv, no shell
            [apt_get, "download", OPENCV_PACKAGE], cwd=tmp, capture_output=True, text=True
        )
        debs = sorted(Path(tmp).glob(f"{OPENCV_PACKAGE}_*.deb"))
        if done.returncode != 0 or not debs:
            raise RuntimeError(
                f"`apt-get download {OPENCV_PACKAGE}` failed (exit {done.returncode}): "
                f"{done.stderr.strip() or done.stdout.strip()}. It needs a Debian/Ubuntu system "
                "whose apt sources list the package (run `apt-get update`) and a reachable mirror."
            )
        staging = Path(tmp) / "opencv"
        staging.mkdir()
        _extract_examples(dpkg_deb, debs[0], staging)
        if not (staging / VTEST_VIDEO.name).is_file():
            raise RuntimeError(f"{debs[0].name} has no examples/data/{VTEST_VIDEO.name}")
        (staging / _COMPLETE).touch()
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)


def _extract_examples(dpkg_deb: str, deb: Path, dest: Path) -> None:
    """Stream ``dpkg-deb --fsys-tarfile`` and keep only regular files under ``examples/data/``.

    Python's tarfile stands in for ``tar -x --wildcards '*/examples/data/*'`` so member paths can
    be checked and Debian's ``.gz``-compressed docs unpacked on the way.
    """
    proc = subprocess.Popen([dpkg_deb, "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)  # noqa: S603
    with proc, tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
        for member in tar:
            _, marker, rel = member.name.partition("/examples/data/")
            parts = PurePosixPath(rel).parts
            raw = tar.extractfile(member) if member.isfile() else None
            if not marker or raw is None or not parts or ".." in parts:
                continue
            out = dest.joinpath(*parts)
            gzipped = out.suffix == ".gz"
            out = out.with_suffix("") if gzipped else out
            out.parent.mkdir(parents=True, exist_ok=True)
            with raw, out.open("wb") as sink:
                shutil.copyfileobj(gzip.GzipFile(fileobj=raw) if gzipped else raw, sink)
    if proc.returncode != 0:
        raise RuntimeError(f"dpkg-deb --fsys-tarfile {deb.name} failed (exit {proc.returncode})")


def _write_skimage(target: Path) -> None:
    import skimage.data
    from PIL import Image

    target.mkdir(parents=True, exist_ok=True)
    for name in SKIMAGE_IMAGES:
        path = target / f"{name}.png"
        if path.is_file():
            continue
        image = np.asarray(getattr(skimage.data, name)())
        tmp = path.with_name(f".{path.name}.tmp")
        Image.fromarray(image).save(tmp, format="PNG")
        os.replace(tmp, path)


def read_video_frames(
    path: str | Path, every: int = 1, max_frames: int | None = None
) -> Iterator[np.ndarray[Any, Any]]:
    """Yield every ``every``-th frame as uint8 RGB ``[H, W, 3]``, at most ``max_frames`` of them."""
    import av

    if every < 1:
        raise ValueError("every must be >= 1")
    yielded = 0
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for index, frame in enumerate(container.decode(stream)):
            if max_frames is not None and yielded >= max_frames:
                return
            if index % every == 0:
                yield frame.to_ndarray(format="rgb24")
                yielded += 1
