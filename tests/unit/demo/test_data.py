"""Demo-data helpers on tiny local inputs: a hand-built .deb and a generated video."""

from __future__ import annotations

import gzip
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from driftline.demo.data import _extract_examples, read_video_frames

DPKG_DEB = shutil.which("dpkg-deb")


@pytest.mark.skipif(DPKG_DEB is None, reason="needs Debian's dpkg-deb")
def test_extract_keeps_only_examples_data_and_gunzips(tmp_path: Path) -> None:
    assert DPKG_DEB is not None
    root = tmp_path / "pkg"
    data = root / "usr/share/doc/opencv-doc/examples/data"
    (data / "dnn").mkdir(parents=True)
    (data / "vtest.avi").write_bytes(b"avi")
    (data / "dnn" / "classes.txt.gz").write_bytes(gzip.compress(b"tench\n"))
    (root / "usr/share/doc/opencv-doc/README").write_text("not data")
    (root / "DEBIAN").mkdir()
    (root / "DEBIAN/control").write_text(
        "Package: opencv-doc\nVersion: 1\nArchitecture: all\nMaintainer: t <t@example.org>\n"
        "Description: test\n"
    )
    deb = tmp_path / "opencv-doc_1_all.deb"
    subprocess.run([DPKG_DEB, "--build", "--root-owner-group", str(root), str(deb)],
                   check=True, capture_output=True)  # fmt: skip
    dest = tmp_path / "out"
    dest.mkdir()

    _extract_examples(DPKG_DEB, deb, dest)

    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()) == [
        "dnn/classes.txt",
        "vtest.avi",
    ]
    assert (dest / "dnn/classes.txt").read_text() == "tench\n"


def test_read_video_frames_steps_and_stops(tmp_path: Path) -> None:
    av = pytest.importorskip("av")
    path = tmp_path / "clip.avi"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(12):
            image = np.full((48, 64, 3), i * 20, np.uint8)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        out.mux(stream.encode())

    frames = list(read_video_frames(path))
    assert len(frames) == 12 and frames[0].shape == (48, 64, 3) and frames[0].dtype == np.uint8
    assert len(list(read_video_frames(path, every=5))) == 3  # frames 0, 5, 10
    assert len(list(read_video_frames(path, every=2, max_frames=4))) == 4
    with pytest.raises(ValueError, match="every"):
        next(read_video_frames(path, every=0))
