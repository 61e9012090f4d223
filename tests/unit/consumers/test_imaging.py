from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import simplejpeg
from PIL import Image

from driftline.consumers.imaging import (
    Fit,
    ImageDecodeError,
    ImageLimits,
    ImageTooLargeError,
    decode_image,
    load_image,
    read_image_uri,
)
from driftline.schema import RejectReason


def _encode(arr: np.ndarray, fmt: str = "JPEG", mode: str | None = None, **kw: object) -> bytes:
    img = Image.fromarray(arr)
    if mode is not None:
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _scene(h: int = 576, w: int = 768) -> np.ndarray:
    """A smooth test card: gradients plus a few blocks (JPEG-friendly, resize-stable)."""
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 255 // (w + h)], -1)
    arr[h // 4: h // 2, w // 4: w // 2] = (200, 30, 60)
    return arr.astype(np.uint8)


def test_jpeg_is_decoded_at_reduced_size_and_matches_full_decode(monkeypatch: pytest.MonkeyPatch
                                                                 ) -> None:
    data = _encode(_scene(), quality=95)
    shapes: list[tuple[int, ...]] = []
    original = simplejpeg.decode_jpeg

    def spy(*args: Any, **kwargs: Any) -> np.ndarray:
        out: np.ndarray = original(*args, **kwargs)
        shapes.append(out.shape)
        return out

    monkeypatch.setattr(simplejpeg, "decode_jpeg", spy)
    out = decode_image(data, (224, 224))
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    assert shapes == [(288, 384, 3)]  # DCT scale 1/2: the smallest that still covers 224×224
    full = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize(
        (224, 224), Image.Resampling.BILINEAR), np.int16)
    assert np.abs(out.astype(np.int16) - full).mean() < 2.0
    crop = decode_image(data, (224, 224), fit="center_crop")
    assert crop.shape == (224, 224, 3) and shapes[-1] == (288, 384, 3)  # 298×224 crop box covered


@pytest.mark.parametrize("fit", ["stretch", "center_crop"])
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_jpeg_fast_path_gives_the_pixels_of_pil_draft(fit: Fit, mode: str) -> None:
    """Same DCT scale, same libjpeg-turbo, same resize: references built before stay valid."""
    data = _encode(_scene(), mode=mode, quality=90)
    with Image.open(io.BytesIO(data)) as img:
        img.draft("RGB", (224, 200))
        via_pil = decode_image_pil(img.convert("RGB"), (200, 224), fit)
    np.testing.assert_array_equal(decode_image(data, (200, 224), fit=fit), via_pil)


def decode_image_pil(img: Image.Image, size: tuple[int, int], fit: Fit) -> np.ndarray:
    from driftline.consumers.imaging import _resize

    return np.asarray(_resize(img, size[1], size[0], fit))


def test_cmyk_jpeg_goes_through_pil() -> None:
    data = _encode(_scene(120, 160), mode="CMYK", quality=95)
    rgb = _encode(_scene(120, 160), quality=95)
    out = decode_image(data, (60, 80))
    assert out.shape == (60, 80, 3)
    assert np.abs(out.astype(int) - decode_image(rgb, (60, 80)).astype(int)).mean() < 8


def test_jpeg_pixel_limit_is_read_from_the_header() -> None:
    data = _encode(_scene(200, 300), quality=80)
    with pytest.raises(ImageTooLargeError):
        decode_image(data, (16, 16), limits=ImageLimits(max_pixels=200 * 300 - 1))
    with pytest.raises(ImageDecodeError):  # JPEG not allowed: PIL refuses the format
        decode_image(data, (16, 16), limits=ImageLimits(formats=("PNG",)))


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "1"])
def test_png_modes_become_rgb(mode: str) -> None:
    out = decode_image(_encode(_scene(60, 80), "PNG", mode=mode), (32, 48))
    assert out.shape == (32, 48, 3) and out.dtype == np.uint8


def test_center_crop_keeps_the_middle() -> None:
    arr = np.zeros((100, 300, 3), np.uint8)
    arr[:, :100] = (255, 0, 0)
    arr[:, 100:200] = (0, 255, 0)
    arr[:, 200:] = (0, 0, 255)
    data = _encode(arr, "PNG")
    crop = decode_image(data, (50, 50), fit="center_crop")
    inner = crop[:, 2:-2]  # the filter support reaches a pixel past the crop box
    assert (inner[..., 1] > 250).all() and (inner[..., [0, 2]] < 5).all()
    stretch = decode_image(data, (50, 60), fit="stretch")
    assert stretch[0, 0, 0] > 250 and stretch[0, -1, 2] > 250


@pytest.mark.parametrize("data", [b"", b"not an image", b"\xff\xd8\xff\xe0" + b"\0" * 50])
def test_garbage_is_undecodable(data: bytes) -> None:
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data, (16, 16))
    assert info.value.reason == RejectReason.image_undecodable == "image_undecodable"


def test_truncated_jpeg_is_undecodable() -> None:
    data = _encode(_scene(), quality=90)
    with pytest.raises(ImageDecodeError):
        decode_image(data[: len(data) // 2], (64, 64))


def test_format_outside_the_allow_list_is_undecodable() -> None:
    with pytest.raises(ImageDecodeError):
        decode_image(_encode(_scene(20, 20), "GIF"), (16, 16))
    limits = ImageLimits(formats=("GIF",))
    gif = _encode(_scene(20, 20), "GIF")
    assert decode_image(gif, (16, 16), limits=limits).shape == (16, 16, 3)


def test_too_many_bytes_or_pixels() -> None:
    data = _encode(_scene(200, 300), "PNG")
    with pytest.raises(ImageTooLargeError) as info:
        decode_image(data, (16, 16), limits=ImageLimits(max_bytes=len(data) - 1))
    assert info.value.reason == "image_too_large"
    with pytest.raises(ImageTooLargeError):
        decode_image(data, (16, 16), limits=ImageLimits(max_pixels=200 * 300 - 1))
    assert decode_image(data, (16, 16), limits=ImageLimits(max_pixels=200 * 300)).shape[0] == 16


def test_file_uri(tmp_path: Path) -> None:
    path = tmp_path / "with space.png"
    path.write_bytes(_encode(_scene(40, 40), "PNG"))
    uri = path.as_uri()
    assert "%20" in uri
    assert read_image_uri(uri) == path.read_bytes()
    assert load_image(uri, (8, 8)).shape == (8, 8, 3)
    assert read_image_uri(uri, limits=ImageLimits(allowed_roots=(tmp_path,)))
    with pytest.raises(ImageDecodeError, match="outside"):
        read_image_uri(uri, limits=ImageLimits(allowed_roots=(tmp_path / "other",)))
    with pytest.raises(ImageTooLargeError):
        read_image_uri(uri, limits=ImageLimits(max_bytes=10))
    with pytest.raises(ImageDecodeError, match="cannot read"):
        read_image_uri((tmp_path / "missing.png").as_uri())
    for bad in ("http://example.com/a.png", "file://otherhost/a.png", "/plain/path.png"):
        with pytest.raises(ImageDecodeError, match="file://"):
            read_image_uri(bad)


@pytest.mark.parametrize("uri", ["file:///tmp/a%00b.jpg", "file:///tmp/a%0Ab.jpg"])
def test_control_characters_in_a_uri_are_undecodable_not_a_value_error(uri: str) -> None:
    with pytest.raises(ImageDecodeError, match="control character"):
        read_image_uri(uri)
    with pytest.raises(ImageDecodeError):
        load_image(uri, (8, 8))


def test_a_fifo_is_refused_at_once(tmp_path: Path) -> None:
    """A FIFO (or a pipe, as ``/proc/self/fd/1`` is in a container) with no writer would block
    a decode thread in ``open`` for good."""
    import os
    import threading

    fifo = tmp_path / "frame.jpg"
    os.mkfifo(fifo)
    outcome: list[BaseException | bytes] = []

    def read() -> None:
        try:
            outcome.append(read_image_uri(fifo.as_uri()))
        except BaseException as exc:  # noqa: BLE001 - judged below
            outcome.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(5)
    if reader.is_alive():  # release the reader before failing
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        reader.join(5)
        pytest.fail("read_image_uri blocked on a FIFO")
    assert isinstance(outcome[0], ImageDecodeError)
    assert "not a regular file" in str(outcome[0])


def test_only_regular_files_outside_system_directories_are_read(tmp_path: Path) -> None:
    with pytest.raises(ImageDecodeError, match="not a regular file"):
        read_image_uri(tmp_path.as_uri())
    for system in ("/proc/self/status", "/proc/self/fd/1", "/dev/zero", "/dev/null",
                   "/sys/kernel/mm"):
        with pytest.raises(ImageDecodeError, match="system file"):
            read_image_uri(Path(system).as_uri())
    link = tmp_path / "innocent.jpg"
    link.symlink_to("/proc/self/environ")
    with pytest.raises(ImageDecodeError, match="system file"):
        read_image_uri(link.as_uri())


def test_a_directory_swapped_for_a_link_between_the_check_and_the_open_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The race someone with write access under an image root could run: ``cam1`` is a
    directory inside the root when the path is resolved and checked, and a symlink to another
    directory (outside the root, or /proc) when the file is opened. The file actually opened
    is checked too, so the read is refused."""
    root, outside = tmp_path / "images", tmp_path / "secrets"
    (root / "cam1").mkdir(parents=True)
    (root / "cam1" / "self").mkdir()  # so that .../cam1/self/environ resolves inside the root
    (root / "cam1" / "self" / "environ").write_bytes(b"frame")
    outside.mkdir()
    (outside / "self").mkdir()
    (outside / "self" / "environ").write_bytes(b"secret")
    uri = (root / "cam1" / "self" / "environ").as_uri()
    limits = ImageLimits(allowed_roots=(root,))
    assert read_image_uri(uri, limits=limits) == b"frame"
    real_open = os.open
    for target, refusal, limit in (
            (outside, "outside the allowed image roots", limits),
            (Path("/proc"), "system file", ImageLimits())):
        def swap_then_open(name: Any, flags: int, *args: Any, _to: Path = target) -> int:
            (root / "cam1").rename(root / "cam1.moved")
            (root / "cam1").symlink_to(_to)
            return real_open(name, flags, *args)

        monkeypatch.setattr(os, "open", swap_then_open)
        with pytest.raises(ImageDecodeError, match=refusal):
            read_image_uri(uri, limits=limit)
        monkeypatch.setattr(os, "open", real_open)
        (root / "cam1").unlink()
        (root / "cam1.moved").rename(root / "cam1")


def test_frames_handed_over_in_shared_memory_are_read() -> None:
    """/dev/shm is a plain tmpfs, not a device: a camera process may leave its frames there."""
    shm = Path("/dev/shm")  # noqa: S108 - read from, as a plant's camera process would
    if not shm.is_dir():
        pytest.skip("no /dev/shm here")
    frame = shm / f"driftline-test-{os.getpid()}.bin"
    frame.write_bytes(b"\xff\xd8 not really a jpeg")
    try:
        assert read_image_uri(frame.as_uri()) == b"\xff\xd8 not really a jpeg"
        limited = ImageLimits(allowed_roots=(shm,))
        assert read_image_uri(frame.as_uri(), limits=limited).startswith(b"\xff\xd8")
    finally:
        frame.unlink()
