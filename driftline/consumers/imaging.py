"""Image bytes → uint8 RGB array at the model's input size, quickly and defensively.

JPEG is decoded at reduced size with libjpeg-turbo's DCT scaling (through ``simplejpeg``): the
largest power-of-two reduction whose result still covers the target, so a 768×576 frame headed
for 224×224 is decoded at 384×288 — about a quarter of the IDCT and colour work — before the final
antialiased resize. That is the scale, and the very pixels, that :meth:`PIL.Image.Image.draft`
gives (references built before stay valid), without PIL's per-image overhead (~0.25 ms of ~2.9 ms
per frame). CMYK/YCCK JPEGs, other formats and anything simplejpeg refuses go through PIL, which
then decides whether the bytes are bad. libjpeg-turbo's 3/8 scale (288×216, then 216 → 224 rows
up) would save another ~0.2 ms but moves the embeddings (cosine ≈ 0.993 to these), and so every
reference's distances: not worth it. Huffman decoding (~1.2 ms for 110 kB) no scale can avoid.

What the model sees, whatever the file holds:

- EXIF orientation is applied (as :func:`PIL.ImageOps.exif_transpose` does), on both paths: the
  fast path reads the tag from the JPEG's APP1 segment itself (a few µs, no PIL) and decodes at
  the scale that covers the target once turned.
- 16-bit and float pixels are scaled to 8 bits by a fixed range, never per image (a darker
  frame must stay darker): ``I;16*`` by its full range (v / 257, so 12-bit data in a 16-bit
  container comes out at 1/16 brightness, in the reference as live); ``I`` (32-bit integers,
  which Pillow also uses for some 16-bit files) likewise, clipped to 0–65535; ``F`` as 0–1,
  clipped, NaN as 0. Without this ``convert("RGB")`` clips them, and nearly every frame is white.
- Alpha is dropped: each pixel's stored colour is used whatever its opacity (not composited on
  any background), and a palette's transparency likewise.

Every failure is a typed :class:`ImageError` whose ``reason`` is the dead-letter
:class:`~driftline.schema.RejectReason`: any exception while decoding one image's bytes (Pillow
has raised ``TypeError`` on a fuzzed TIFF) is that image's :class:`ImageDecodeError`.
"""

from __future__ import annotations

import binascii
import io
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlparse
from urllib.request import url2pathname

import numpy as np
import pybase64
import simplejpeg
from numpy.typing import NDArray
from PIL import Image, UnidentifiedImageError

from driftline.schema import RejectReason

Fit = Literal["stretch", "center_crop"]


class ImageError(ValueError):
    """An image cannot be used; ``reason`` is the dead-letter reason, ``detail`` says why."""

    reason: RejectReason = RejectReason.image_undecodable

    def __init__(self, detail: str) -> None:
        super().__init__(f"{self.reason.value}: {detail}")
        self.detail = detail


class ImageDecodeError(ImageError):
    """Not a decodable image (corrupt, truncated, unsupported format, unreadable URI)."""

    reason = RejectReason.image_undecodable


class ImageTooLargeError(ImageError):
    """Encoded bytes or decoded pixel count above the configured limit."""

    reason = RejectReason.image_too_large


@dataclass(frozen=True)
class ImageLimits:
    """Bounds that keep one hostile or broken image from exhausting a worker.

    ``allowed_roots``: if set, ``file://`` URIs must resolve inside one of these directories
    (events come from the network; they must not make the embedder read arbitrary host files).
    """

    max_bytes: int = 16 << 20
    max_pixels: int = 40_000_000
    formats: tuple[str, ...] = ("JPEG", "PNG", "BMP", "TIFF", "WEBP")
    allowed_roots: tuple[Path, ...] | None = None


DEFAULT_LIMITS = ImageLimits()


@dataclass(frozen=True)
class Base64Image:
    """Base64 text of an encoded image, decoded where the image is (in a decode thread, next to
    the JPEG decode it overlaps with, rather than on the thread that parses events)."""

    text: str

    def decode(self, limits: ImageLimits = DEFAULT_LIMITS) -> bytes:
        if len(self.text) * 3 // 4 > limits.max_bytes + 2:
            raise ImageTooLargeError(f"~{len(self.text) * 3 // 4} bytes > max {limits.max_bytes}")
        try:
            return pybase64.b64decode(self.text)  # as Event.image_bytes: validated when parsed
        except (binascii.Error, ValueError) as exc:
            raise ImageDecodeError(f"invalid base64: {exc}") from None


ImageSource = bytes | str | Base64Image


def decode_image(
    data: bytes, size: tuple[int, int], *, fit: Fit = "stretch",
    limits: ImageLimits = DEFAULT_LIMITS,
) -> NDArray[np.uint8]:
    """Decode ``data`` to an RGB ``uint8`` array of shape ``(h, w, 3)`` for ``size = (h, w)``.

    ``fit="stretch"`` resizes the whole frame (drift can appear anywhere in a fixed camera's
    view, so nothing is cropped away); ``"center_crop"`` keeps the aspect ratio and crops.
    """
    if len(data) > limits.max_bytes:
        raise ImageTooLargeError(f"{len(data)} bytes > max {limits.max_bytes}")
    try:
        return _decode(data, size, fit, limits)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(str(exc)) from None
    except UnidentifiedImageError:  # its message is a BytesIO's address, which would vary in
        # a reference's source.first_skipped, and so its reference_id, from build to build
        raise ImageDecodeError(f"not an image of a format read here "
                               f"({', '.join(limits.formats)})") from None
    except MemoryError:  # the worker's trouble, not these bytes'
        raise
    except Exception as exc:  # noqa: BLE001 - whatever the decoder raises, these bytes are bad
        raise ImageDecodeError(f"{type(exc).__name__}: {exc}"[:500]) from None


def _decode(data: bytes, size: tuple[int, int], fit: Fit,
            limits: ImageLimits) -> NDArray[np.uint8]:
    height, width = size
    if data[:3] == _JPEG_SOI and "JPEG" in limits.formats:
        turn = _TRANSPOSE.get(_jpeg_orientation(data))
        decoded = _decode_jpeg(data, *_stored_target(width, height, turn), limits)
        if decoded is not None:
            img = Image.fromarray(decoded)
            return np.asarray(_resize(_turned(img, turn), width, height, fit), np.uint8)
    with Image.open(io.BytesIO(data), formats=limits.formats) as img:
        if img.width * img.height > limits.max_pixels:
            raise ImageTooLargeError(f"{img.width}x{img.height} pixels > max {limits.max_pixels}")
        if img.format == "JPEG":
            img.draft("RGB", _stored_target(width, height, _turn_of(img)))
        img.load()  # Pillow's TIFF loader turns the image itself, and drops the tag
        rgb = _turned(_to_rgb(img), _turn_of(img))
        return np.asarray(_resize(rgb, width, height, fit), dtype=np.uint8)


_ORIENTATION = 0x0112
# EXIF orientation → the transpose that shows the image upright (as ImageOps.exif_transpose)
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90,
}
_QUARTER_TURNS = (Image.Transpose.TRANSPOSE, Image.Transpose.ROTATE_270,
                  Image.Transpose.TRANSVERSE, Image.Transpose.ROTATE_90)


def _stored_target(width: int, height: int, turn: Image.Transpose | None) -> tuple[int, int]:
    """The target ``(width, height)`` in the stored image's axes (swapped by a quarter turn)."""
    return (height, width) if turn in _QUARTER_TURNS else (width, height)


def _turn_of(img: Image.Image) -> Image.Transpose | None:
    orientation = img.getexif().get(_ORIENTATION)
    return _TRANSPOSE.get(orientation) if isinstance(orientation, int) else None


def _turned(img: Image.Image, turn: Image.Transpose | None) -> Image.Image:
    return img if turn is None else img.transpose(turn)


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB, with 16-bit and float pixels scaled by a fixed range first (module docstring)."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        px = np.asarray(img, np.float64)
        if img.mode == "F":
            px = np.nan_to_num(px, nan=0.0) * 255.0
        else:
            px = px / 257.0  # 65535 → 255
        img = Image.fromarray(np.clip(np.rint(px), 0, 255).astype(np.uint8), "L")
    return img.convert("RGB")


def _jpeg_orientation(data: bytes) -> int:
    """The EXIF orientation in a JPEG's APP1 segment (1, upright, if none or unreadable)."""
    pos, end = 2, len(data)
    while pos + 4 <= end and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xDA, 0xD9) or 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return 1  # start of scan or of frame: the EXIF segment comes before both
        (length,) = struct.unpack_from(">H", data, pos + 2)
        if marker == 0xE1 and data[pos + 4:pos + 10] == b"Exif\0\0":
            return _tiff_orientation(data[pos + 10:pos + 2 + length])
        pos += 2 + length
    return 1


def _tiff_orientation(tiff: bytes) -> int:
    """Orientation (tag 0x0112, SHORT) from IFD0 of the TIFF structure inside an EXIF segment."""
    order = {b"II": "<", b"MM": ">"}.get(tiff[:2])
    if order is None or len(tiff) < 8:
        return 1
    (ifd,) = struct.unpack_from(order + "I", tiff, 4)
    if ifd + 2 > len(tiff):
        return 1
    (count,) = struct.unpack_from(order + "H", tiff, ifd)
    for at in range(ifd + 2, min(ifd + 2 + 12 * count, len(tiff) - 11), 12):
        tag, kind, _, value = struct.unpack_from(order + "HHIH", tiff, at)
        if tag == _ORIENTATION:
            return value if kind == 3 else 1
    return 1


_JPEG_SOI = b"\xff\xd8\xff"
_TURBO_COLORSPACES = ("YCbCr", "Gray")  # CMYK/YCCK (Adobe inversion) are left to PIL


def _decode_jpeg(data: bytes, width: int, height: int,
                 limits: ImageLimits) -> NDArray[np.uint8] | None:
    """RGB at PIL draft's DCT scale for the target, or ``None``: let PIL try (and judge)."""
    try:
        h, w, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    if w * h > limits.max_pixels:
        raise ImageTooLargeError(f"{w}x{h} pixels > max {limits.max_pixels}")
    if colorspace not in _TURBO_COLORSPACES or w < 1 or h < 1:
        return None
    # PIL's draft rule, for the same pixels: the largest power-of-two scale that still covers
    # the target in both dimensions (then so does a centre crop's box)
    factor = next(f for f in (8, 4, 2, 1) if f <= max(1, min(w // width, h // height)))
    min_w, min_h = -(-w // factor), -(-h // factor)
    try:
        rgb: NDArray[np.uint8] = simplejpeg.decode_jpeg(
            data, colorspace="RGB", min_height=min_h, min_width=min_w)
    except ValueError:  # corrupt, truncated, or a libjpeg warning in strict mode
        return None
    return rgb


def _resize(img: Image.Image, width: int, height: int, fit: Fit) -> Image.Image:
    if fit == "center_crop":
        scale = max(width / img.width, height / img.height)
        cw, ch = width / scale, height / scale
        left, top = (img.width - cw) / 2, (img.height - ch) / 2
        box = (left, top, left + cw, top + ch)
        return img.resize((width, height), Image.Resampling.BILINEAR, box=box)
    if img.size == (width, height):
        return img
    return img.resize((width, height), Image.Resampling.BILINEAR)


# Pseudo-filesystems: their files look regular but are the kernel's (a process's pipes,
# memory, devices); no image lives there. /dev/shm is a plain tmpfs, where a camera process on
# the same host may hand its frames over.
_SYSTEM_ROOTS = (Path("/proc"), Path("/dev"), Path("/sys"))
_SHARED_MEMORY = Path("/dev/shm")  # noqa: S108 - a place to read from, not a temp file


def read_image_uri(uri: str, *, limits: ImageLimits = DEFAULT_LIMITS) -> bytes:
    """Read the bytes behind a ``file://`` URI: a regular file, outside ``/proc``, ``/dev``
    (but ``/dev/shm``) and ``/sys`` and inside ``limits.allowed_roots`` if set; other schemes
    and oversized files are refused too. Nothing here blocks: a FIFO or a pipe
    (``/proc/self/fd/1`` under Docker) would hold a decode thread for good.

    The place is checked twice: on the path as resolved before opening it, and on the file
    actually opened (its path as the kernel names the descriptor, where ``/proc`` is mounted),
    so that a symlink swapped in between the two (someone who can write under an image root
    pointing a link at ``/etc/shadow`` at the right moment) is refused, not read."""
    parsed = urlparse(uri)
    if parsed.scheme != "file" or parsed.netloc not in ("", "localhost"):
        raise ImageDecodeError(f"only local file:// URIs are supported, got {uri[:200]!r}")
    path = Path(url2pathname(unquote(parsed.path)))
    if any(ord(c) < 0x20 or c == "\x7f" for c in str(path)):
        raise ImageDecodeError(f"{str(path)[:200]!r}: control character in the path")
    try:
        real = path.resolve()  # symlinks followed: a link into /proc is refused as /proc
    except (OSError, RuntimeError, ValueError) as exc:  # a symlink loop, say
        raise ImageDecodeError(f"cannot resolve {path}: {exc}") from None
    # both as written and as resolved: /proc/self/fd/N resolves to whatever N is open on
    _check_place(path, real, limits, written=path)
    try:
        # stat first, so that a device is never opened; non-blocking, so that a FIFO put
        # there since opens at once (and is refused by fstat) instead of waiting for a writer
        if not stat.S_ISREG(os.stat(real).st_mode):
            raise ImageDecodeError(f"{path} is not a regular file")
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
        with open(fd, "rb") as fh:
            st = os.fstat(fh.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise ImageDecodeError(f"{path} is not a regular file")
            opened = _opened_path(fd)
            if opened is not None:
                _check_place(path, opened, limits)
            if st.st_size > limits.max_bytes:
                raise ImageTooLargeError(f"{path}: {st.st_size} bytes > max {limits.max_bytes}")
            data = fh.read(limits.max_bytes + 1)
    except ImageError:
        raise
    except (OSError, ValueError) as exc:  # ValueError: what open() raises for a NUL byte
        raise ImageDecodeError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}"
                               ) from None
    if len(data) > limits.max_bytes:  # the file grew between stat and read
        raise ImageTooLargeError(f"{path}: more than {limits.max_bytes} bytes")
    return data


def _check_place(path: Path, real: Path, limits: ImageLimits, written: Path | None = None,
                 ) -> None:
    """Refuse ``path`` if ``real`` (where it leads) or ``written`` (the path as given) is a
    system file, or ``real`` lies outside ``limits.allowed_roots`` (resolved too)."""
    if any(p.is_relative_to(root) and not p.is_relative_to(_SHARED_MEMORY)
           for p in (real, written) if p is not None for root in _SYSTEM_ROOTS):
        raise ImageDecodeError(f"{path} is a system file, not an image")
    if limits.allowed_roots is not None and not any(
            real.is_relative_to(root.resolve()) for root in limits.allowed_roots):
        raise ImageDecodeError(f"{path} is outside the allowed image roots")


def _opened_path(fd: int) -> Path | None:
    """The path of the file open on ``fd``, as the kernel names it; None without ``/proc``."""
    try:
        name = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None
    return Path(name.removesuffix(" (deleted)"))


def load_image(
    source: ImageSource, size: tuple[int, int], *, fit: Fit = "stretch",
    limits: ImageLimits = DEFAULT_LIMITS,
) -> NDArray[np.uint8]:
    """Decode encoded bytes, a ``file://`` URI given as ``str``, or :class:`Base64Image`."""
    if isinstance(source, str):
        data = read_image_uri(source, limits=limits)
    elif isinstance(source, Base64Image):
        data = source.decode(limits)
    else:
        data = source
    return decode_image(data, size, fit=fit, limits=limits)
