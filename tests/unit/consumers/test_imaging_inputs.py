"""Decoding is total (every failure is typed), orientation and bit depth come out as shown."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from PIL import Image, ImageOps

from driftline.consumers import imaging
from driftline.consumers.imaging import ImageDecodeError, decode_image
from driftline.schema import RejectReason


def _encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _tiff_with_rational_strip_offsets() -> bytes:
    """A TIFF whose StripOffsets tag is typed SRATIONAL, as a fuzzer found: Pillow then raises
    ``TypeError: 'IFDRational' object cannot be interpreted as an integer`` when loading."""
    data = bytearray(_encode(Image.new("RGB", (4, 4), (10, 20, 30)), "TIFF"))
    assert data[:4] == b"II*\x00"
    (ifd,) = struct.unpack_from("<I", data, 4)
    (count,) = struct.unpack_from("<H", data, ifd)
    for at in range(ifd + 2, ifd + 2 + 12 * count, 12):
        if struct.unpack_from("<H", data, at)[0] == 273:
            struct.pack_into("<HI", data, at + 2, 10, 1)  # type SRATIONAL, one value
            return bytes(data)
    raise AssertionError("no StripOffsets tag")


def test_corrupt_tiff_is_undecodable_not_a_type_error() -> None:
    with pytest.raises(ImageDecodeError) as info:
        decode_image(_tiff_with_rational_strip_offsets(), (8, 8))
    assert info.value.reason == RejectReason.image_undecodable
    assert "TypeError" in info.value.detail


@pytest.mark.parametrize("data", [_encode(Image.new("RGB", (8, 8)), "PNG"),
                                  _encode(Image.new("RGB", (8, 8)), "JPEG")])
def test_any_exception_while_decoding_is_the_images(monkeypatch: pytest.MonkeyPatch,
                                                    data: bytes) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("decoder bug")

    monkeypatch.setattr(imaging.Image, "open", broken)
    monkeypatch.setattr(imaging.simplejpeg, "decode_jpeg_header", broken)
    with pytest.raises(ImageDecodeError, match="RuntimeError: decoder bug"):
        decode_image(data, (8, 8))


@pytest.mark.parametrize(("mode", "value", "fmt", "expected"), [
    ("I;16", 30000, "PNG", 117),  # 30000 / 257 = 116.7: scaled by the full 16-bit range
    ("I;16", 1000, "PNG", 4),
    ("I;16B", 65535, "TIFF", 255),
    ("I;16", 0, "TIFF", 0),
    ("I", 30000, "TIFF", 117),  # 32-bit integers are read as 16-bit
    ("I", 100_000, "TIFF", 255),  # beyond 16 bits: clipped
    ("F", 0.5, "TIFF", 128),  # floats as 0–1
    ("F", 7.0, "TIFF", 255),
    ("F", -1.0, "TIFF", 0),
])
def test_deep_pixels_are_scaled_by_a_fixed_range(mode: str, value: float, fmt: str,
                                                 expected: int) -> None:
    out = decode_image(_encode(Image.new(mode, (24, 16), value), fmt), (8, 12))
    assert out.shape == (8, 12, 3)
    assert (out == expected).all(), out.reshape(-1, 3)[0]


def test_sixteen_bit_gradient_keeps_its_order() -> None:
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (16, 1))
    out = decode_image(_encode(Image.fromarray(ramp), "PNG"), (16, 64))
    row = out[8, :, 0].astype(int)
    assert row[0] == 0 and row[-1] == 255 and (np.diff(row) >= 0).all()


def test_alpha_is_dropped_not_composited() -> None:
    clear_white = _encode(Image.new("RGBA", (16, 16), (255, 255, 255, 0)), "PNG")
    assert (decode_image(clear_white, (8, 8)) == 255).all()


def _card(w: int = 96, h: int = 64) -> Image.Image:
    """Four flat quadrants of different colours: any turn or flip moves them."""
    arr = np.zeros((h, w, 3), np.uint8)
    arr[: h // 2, : w // 2] = (250, 0, 0)
    arr[: h // 2, w // 2:] = (0, 250, 0)
    arr[h // 2:, : w // 2] = (0, 0, 250)
    arr[h // 2:, w // 2:] = (250, 250, 250)
    return Image.fromarray(arr)


def _with_orientation(img: Image.Image, orientation: int, fmt: str = "JPEG") -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[0x010F] = "maker"  # an entry before orientation's, so IFD0 is really walked
    return _encode(img, fmt, exif=exif, **({"quality": 95} if fmt == "JPEG" else {}))


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "TIFF"])
def test_exif_orientation_is_applied(orientation: int, fmt: str) -> None:
    data = _with_orientation(_card(), orientation, fmt)
    with Image.open(io.BytesIO(data)) as img:
        upright = np.asarray(ImageOps.exif_transpose(img).convert("RGB"))
    out = decode_image(data, upright.shape[:2])  # same size: no resize, no DCT scaling
    assert np.abs(out.astype(int) - upright).mean() < 3


@pytest.mark.parametrize("orientation", range(1, 9))
def test_fast_jpeg_path_turns_like_pil_and_decodes_at_the_turned_scale(
    monkeypatch: pytest.MonkeyPatch, orientation: int,
) -> None:
    # stored 768x576; a quarter turn shows it 576 wide, 768 tall: a (300, 100) target then
    # allows a 1/2 DCT scale, unturned only 1/1
    data = _with_orientation(_card(768, 576), orientation)
    sizes: list[tuple[int, int]] = []
    decode = imaging.simplejpeg.decode_jpeg

    def spy(data: bytes, **kw: int) -> np.ndarray:
        out = decode(data, **kw)
        sizes.append(out.shape[:2])
        return out

    monkeypatch.setattr(imaging.simplejpeg, "decode_jpeg", spy)
    fast = decode_image(data, (300, 100))
    assert sizes == [(288, 384) if orientation >= 5 else (576, 768)]
    monkeypatch.setattr(imaging, "_decode_jpeg", lambda *a: None)  # PIL's draft path
    slow = decode_image(data, (300, 100))
    assert np.abs(fast.astype(int) - slow).max() <= 2
    with Image.open(io.BytesIO(data)) as img:
        upright = np.asarray(ImageOps.exif_transpose(img).convert("RGB").resize((100, 300)))
    assert np.abs(fast.astype(int) - upright).mean() < 3


@pytest.mark.parametrize("data", [
    b"\xff\xd8\xff\xe1\x00\x04",  # APP1 shorter than its signature
    b"\xff\xd8\xff\xe1\x00\x10Exif\x00\x00II*\x00\xff\xff\xff\x7f",  # IFD0 beyond the end
    b"\xff\xd8\xff\xe1\x00\x14Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff",  # 65535 entries
    b"\xff\xd8" + b"\xff" * 40,
])
def test_unreadable_exif_counts_as_upright(data: bytes) -> None:
    assert imaging._jpeg_orientation(data) == 1
