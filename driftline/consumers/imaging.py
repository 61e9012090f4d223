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

Every failure is a typed :class:`ImageError` whose ``reason`` is the dead-letter
:class:`~driftline.schema.RejectReason`; nothing here raises anything else for bad input.
"""

from __future__ import annotations

import binascii
import io
import os
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
    height, width = size
    if data[:3] == _JPEG_SOI and "JPEG" in limits.formats:
        decoded = _decode_jpeg(data, width, height, limits)
        if decoded is not None:
            return np.asarray(_resize(Image.fromarray(decoded), width, height, fit), np.uint8)
    try:
        with Image.open(io.BytesIO(data), formats=limits.formats) as img:
            if img.width * img.height > limits.max_pixels:
                raise ImageTooLargeError(
                    f"{img.width}x{img.height} pixels > max {limits.max_pixels}")
            if img.format == "JPEG":
                img.draft("RGB", (width, height))
            rgb = img.convert("RGB") if img.mode != "RGB" else img
            rgb.load()
            return np.asarray(_resize(rgb, width, height, fit), dtype=np.uint8)
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(str(exc)) from None
    except ImageError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageDecodeError(f"{type(exc).__name__}: {exc}"[:500]) from None


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


def read_image_uri(uri: str, *, limits: ImageLimits = DEFAULT_LIMITS) -> bytes:
    """Read the bytes behind a ``file://`` URI, refusing other schemes and oversized files."""
    parsed = urlparse(uri)
    if parsed.scheme != "file" or parsed.netloc not in ("", "localhost"):
        raise ImageDecodeError(f"only local file:// URIs are supported, got {uri[:200]!r}")
    path = Path(url2pathname(unquote(parsed.path)))
    if limits.allowed_roots is not None:
        real = path.resolve()
        if not any(real.is_relative_to(root.resolve()) for root in limits.allowed_roots):
            raise ImageDecodeError(f"{path} is outside the allowed image roots")
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size > limits.max_bytes:
                raise ImageTooLargeError(f"{path}: {size} bytes > max {limits.max_bytes}")
            data = fh.read(limits.max_bytes + 1)
    except OSError as exc:
        raise ImageDecodeError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > limits.max_bytes:  # the file grew between stat and read
        raise ImageTooLargeError(f"{path}: more than {limits.max_bytes} bytes")
    return data


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
