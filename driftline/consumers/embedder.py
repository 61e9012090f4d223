"""ONNX embedder: any model, any graph output or intermediate tensor, pooled to a vector.

Decoding runs in a thread pool (libjpeg-turbo, PIL and numpy release the GIL). When onnxruntime
leaves cores free (fewer intra-op threads than cores, e.g. one embed worker per core), each batch
is decoded by one thread while ``session.run`` works on the one before, on a free core, and
:meth:`Embedder.prefetch` starts a coming call's first batch there too (the embed stage's loop,
one poll ahead, does that), so the model need not wait for it. When
onnxruntime uses every core, decoding beside it only preempts its threads, which then stall each
other at every operator's barrier: measured on two cores, overlapping gave 0.65–0.73 of bare
onnxruntime's images/s, decoding each batch on every core between two runs 0.78 (the CPU bound
is 0.80). So then batches alternate: decode on all cores, infer on all cores. onnxruntime's
workers do not spin-wait by default: alone it was no slower (197 vs 196 images/s), and spinning
workers keep the cores from the decoder after ``run`` returns (0.69 instead of 0.78).

A tensor of more than two dimensions is pooled over the axes its ``output_layout`` names: the
spatial axes of ``NCHW``/``NHWC`` maps, the tokens of ``NLC`` (``[N, tokens, hidden]``, as
transformers give: a hidden-size embedding, any class token averaged in with the others) or the
length of ``NCL``. ``"auto"`` takes a 4-D tensor in the input's layout only when its shape says
so — its spatial axes in that layout keep the input's aspect ratio (to within an output pixel)
and in the other layout do not — and refuses to guess otherwise, 3-D tensors included: pooling
the wrong axes gives an embedding that looks fine and means nothing.

The image input may be ``tensor(float)``, ``tensor(float16)`` or ``tensor(double)``: pixels are
normalised in float32 as configured, then cast to the input's type (a float16 input rounds them
to 11 significant bits, a double one takes them exactly). A ``tensor(uint8)`` input takes the
decoded pixels themselves, in the input's layout and colour order: its graph normalises them, so
the configured scale, mean and std must leave pixels unchanged (1; 0,0,0; 1,1,1). Outputs of any
float type become float32 embeddings.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Self

import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, model_validator

from driftline.consumers.imaging import (
    Fit,
    ImageError,
    ImageLimits,
    ImageSource,
    load_image,
)
from driftline.consumers.onnx_graph import ModelFileError, expose_tensor, list_tensors

__all__ = ["Embedder", "EmbedderConfig", "ModelFileError", "expose_tensor", "list_tensors"]


F32 = NDArray[np.float32]
Tensor = NDArray[Any]  # a batch as the model's input takes it: float32, float16, double or uint8
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Decode tasks per batch while onnxruntime runs the previous one on fewer threads than cores: one,
# for the free core; more would preempt onnxruntime's threads (see the module docstring).
OVERLAP_DECODE_TASKS = 1

OutputLayout = Literal["auto", "NC", "NCHW", "NHWC", "NLC", "NCL"]
# per layout: the tensor's rank and the axes pooled (batch axis 0 included in the count)
_OUTPUT_RANK = {"NC": 2, "NCHW": 4, "NHWC": 4, "NLC": 3, "NCL": 3}
_POOL_AXES: dict[str, tuple[int, ...]] = {
    "NC": (), "NCHW": (2, 3), "NHWC": (1, 2), "NLC": (1,), "NCL": (2,)}
# onnxruntime's name of an image input's element type → the array it is fed (module docstring)
_INPUT_DTYPES: dict[str, type[np.generic]] = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(uint8)": np.uint8}


class EmbedderConfig(BaseModel):
    """How to turn an image into the model's input and its output into an embedding.

    ``output_name`` is a graph output or any intermediate tensor (``None``: first output).
    ``input_size`` (h, w) and ``layout`` default to what the model's input shape declares.
    Pixels go ``x * scale``, then ``(x - mean) / std`` per channel, in ``color_order``: a BGR
    model's ``mean`` and ``std`` list blue first, and their default is ImageNet's in that order.
    ``output_layout`` names the axes of that tensor, for ``pooling`` (module docstring).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    model_path: Path
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    input_name: str | None = None
    input_size: tuple[PositiveInt, PositiveInt] | None = None
    layout: Literal["NCHW", "NHWC"] | None = None
    color_order: Literal["RGB", "BGR"] = "RGB"
    scale: PositiveFloat = 1.0 / 255.0
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[PositiveFloat, PositiveFloat, PositiveFloat] = IMAGENET_STD
    fit: Fit = "stretch"
    output_name: str | None = None
    pooling: Literal["avg", "max", "none"] = "avg"
    output_layout: OutputLayout = "auto"
    l2_normalize: bool = True
    batch_size: int = Field(default=32, ge=1)
    intra_op_threads: int = Field(default=0, ge=0, description="0: onnxruntime's default")
    inter_op_threads: int = Field(default=1, ge=0)
    spin_wait: bool = Field(default=False, description="onnxruntime workers busy-wait between "
                            "ops; off leaves those cycles to decoding when both share the cores")
    decode_threads: int | None = Field(default=None, ge=0, description="None: one per core; "
                                       "0: decode inline, no overlap")
    max_image_bytes: int = Field(default=16 << 20, ge=1)
    max_image_pixels: int = Field(default=40_000_000, ge=1)
    image_roots: tuple[Path, ...] | None = Field(
        default=None, description="file:// images must lie in one of these (None: anywhere)")

    @model_validator(mode="before")
    @classmethod
    def _imagenet_in_channel_order(cls, data: Any) -> Any:
        """ImageNet's mean and std are given red first: a BGR model's default lists blue first."""
        if isinstance(data, dict) and data.get("color_order") == "BGR":
            data = {"mean": IMAGENET_MEAN[::-1], "std": IMAGENET_STD[::-1], **data}
        return data

    @classmethod
    def from_description(cls, desc: dict[str, Any], model_path: Path, **runtime: Any) -> Self:
        """Rebuild the preprocessing recorded by :meth:`Embedder.describe` (e.g. in a reference)."""
        keys = ("input_name", "input_size", "layout", "color_order", "scale", "mean", "std",
                "fit", "output_name", "pooling", "l2_normalize")
        # references built before output_layout was recorded pooled as "auto" now does, or
        # pooled the wrong axes: "auto" refuses those
        layout = desc.get("output_layout", "auto")
        return cls(model_path=model_path, **{k: desc[k] for k in keys}, output_layout=layout,
                   **runtime)


@dataclass(frozen=True)
class Prefetch:
    """A call's first batch, decoding ahead of :meth:`Embedder.embed_images`."""

    sources: Sequence[ImageSource]
    errors: list[ImageError | None]
    first: tuple[Tensor, list[Future[None]]]


class Embedder:
    """Images or uint8 arrays in, float32 embeddings ``[N, dim]`` out.

    A model path that names no usable ONNX model raises :class:`ModelFileError`; settings
    that do not fit the model, ``ValueError`` naming the setting.
    """

    def __init__(self, config: EmbedderConfig) -> None:
        self.config = config
        model_bytes, self.output_name = expose_tensor(config.model_path, config.output_name)
        self.model_sha256 = hashlib.sha256(config.model_path.read_bytes()).hexdigest()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = config.intra_op_threads
        opts.inter_op_num_threads = config.inter_op_threads
        if not config.spin_wait:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self._session = ort.InferenceSession(model_bytes, opts,
                                                 providers=list(config.providers))
        except Exception as exc:  # noqa: BLE001 - onnxruntime's errors share no base class
            raise ModelFileError(f"onnxruntime cannot load the model {config.model_path}: "
                                 f"{exc}") from exc
        inp = _pick_input(self._session, config.input_name)
        self.input_name: str = inp.name
        self.input_dtype = _input_dtype(inp.name, inp.type, config,
                                        len(self._session.get_inputs()))
        self.layout, self.input_size = _input_geometry(inp.name, inp.shape, config.layout,
                                                       config.input_size)
        self._fixed_batch = inp.shape[0] if isinstance(inp.shape[0], int) else None
        self._limits = ImageLimits(max_bytes=config.max_image_bytes,
                                   max_pixels=config.max_image_pixels,
                                   allowed_roots=config.image_roots or None)
        std = np.asarray(config.std, np.float32)
        per_channel = (3, 1, 1) if self.layout == "NCHW" else (3,)
        self._mul: F32 = (config.scale / std).astype(np.float32).reshape(per_channel)
        self._add: F32 = (np.asarray(config.mean, np.float32) / std).astype(
            np.float32).reshape(per_channel)
        cores = usable_cpus()
        threads = cores if config.decode_threads is None else config.decode_threads
        self._pool = (ThreadPoolExecutor(threads, thread_name_prefix="decode")
                      if threads > 0 else None)
        self.decode_threads = threads
        self.overlap_decode = 0 < config.intra_op_threads < cores and self._pool is not None
        # decodes beside the model go through one thread, in turn: on the core onnxruntime
        # leaves free, a call's next batch and a prefetched call's first batch do not run at
        # once (two decode threads beside the model would preempt it)
        self._ahead_pool = (ThreadPoolExecutor(OVERLAP_DECODE_TASKS,
                                               thread_name_prefix="decode-ahead")
                            if self.overlap_decode else None)
        raw = self._raw(np.zeros_like(self._alloc(self._fixed_batch or 1)))
        self.output_shape: tuple[int, ...] = raw.shape[1:]
        self.output_layout: OutputLayout = _output_layout(
            self.output_name, self.output_shape, config.output_layout, config.pooling,
            self.layout, self.input_size)
        self.dim = int(self._pool_output(raw).shape[1])

    def close(self) -> None:
        for pool in (self._pool, self._ahead_pool):
            if pool is not None:
                pool.shutdown(wait=True)

    def describe(self) -> dict[str, Any]:
        """Model identity and preprocessing, as recorded in a reference artifact."""
        c = self.config
        return {
            "model_sha256": self.model_sha256, "model_file": c.model_path.name,
            "input_name": self.input_name, "input_size": list(self.input_size),
            "layout": self.layout, "color_order": c.color_order, "scale": c.scale,
            "mean": list(c.mean), "std": list(c.std), "fit": c.fit,
            "output_name": self.output_name, "output_shape": list(self.output_shape),
            "output_layout": self.output_layout, "pooling": c.pooling,
            "l2_normalize": c.l2_normalize, "dim": self.dim,
        }

    def preprocess(self, images: NDArray[np.uint8]) -> Tensor:
        """RGB ``uint8`` images ``[N, h, w, 3]`` at :attr:`input_size` → the model input, of
        its type (:attr:`input_dtype`)."""
        if images.ndim != 4 or images.shape[1:] != (*self.input_size, 3):
            raise ValueError(f"expected [N, {self.input_size[0]}, {self.input_size[1]}, 3] "
                             f"uint8, got {images.shape}")
        tensor = self._alloc(len(images))
        for i, img in enumerate(images):
            self._normalise_into(img, tensor[i])
        return tensor

    def embed_arrays(self, images: NDArray[np.uint8]) -> F32:
        """Embed RGB ``uint8`` images ``[N, h, w, 3]`` already at :attr:`input_size`."""
        bs = self.config.batch_size
        chunks = [self._infer(self.preprocess(images[s:s + bs])) for s in range(0, len(images), bs)]
        if not chunks:
            self.preprocess(images)  # shape check
        return np.concatenate(chunks) if chunks else np.empty((0, self.dim), np.float32)

    def prefetch(self, sources: Sequence[ImageSource]) -> Prefetch | None:
        """Start decoding the first batch of ``sources`` on the core onnxruntime leaves free,
        while the model may still run an earlier call; pass the result to :meth:`embed_images`
        with the same ``sources``. Without it, each call's first batch is decoded before its
        first model run. None (nothing started) when decoding does not overlap the model."""
        if self._ahead_pool is None or not sources:
            return None
        errors: list[ImageError | None] = [None] * len(sources)
        first = self._submit(sources, 0, errors, OVERLAP_DECODE_TASKS, self._ahead_pool)
        return Prefetch(sources, errors, first)

    def embed_images(
        self, sources: Sequence[ImageSource], prefetched: Prefetch | None = None,
    ) -> tuple[F32, list[ImageError | None]]:
        """Embed encoded images (``bytes``, :class:`Base64Image`) or ``file://`` URIs (``str``).

        Returns ``(embeddings [N, dim], errors)``: a failed item has a NaN row and its
        :class:`ImageError` (whose ``reason`` is the dead-letter reason) at the same index.
        Any other exception (a bug, a broken session) is raised: the embed stage decides
        whether one event or the worker is at fault
        (:meth:`~driftline.consumers.embed_stage.EmbedStage.process_guarded`).
        ``prefetched``: :meth:`prefetch` of the same ``sources``, its first batch decoding.
        """
        if prefetched is not None and prefetched.sources is not sources:
            raise ValueError("prefetched was started for other sources")
        out = np.full((len(sources), self.dim), np.nan, np.float32)
        bs = self.config.batch_size
        starts = list(range(0, len(sources), bs))
        if prefetched is not None:
            errors, pending = prefetched.errors, [prefetched.first]
        else:
            errors = [None] * len(sources)
            pending = ([self._submit(sources, starts[0], errors, self.decode_threads)]
                       if starts else [])
        for n, start in enumerate(starts):
            if n and not self.overlap_decode:  # every core decodes this batch, then infers it
                pending.append(self._submit(sources, start, errors, self.decode_threads))
            tensor = _join(pending.pop())
            if self.overlap_decode and n + 1 < len(starts):  # the next one on the free core
                pending.append(self._submit(sources, starts[n + 1], errors, OVERLAP_DECODE_TASKS,
                                            self._ahead_pool))
            ok = np.array([e is None for e in errors[start:start + bs]])
            if ok.any():
                rows = np.flatnonzero(ok) + start
                out[rows] = self._infer(tensor if ok.all() else tensor[ok])
        return out, errors

    def _submit(self, sources: Sequence[ImageSource], start: int, errors: list[ImageError | None],
                parts: int, pool: ThreadPoolExecutor | None = None,
                ) -> tuple[Tensor, list[Future[None]]]:
        stop = min(start + self.config.batch_size, len(sources))
        tensor = self._alloc(stop - start)

        def work(lo: int, hi: int) -> None:
            for i in range(lo, hi):
                try:
                    img = load_image(sources[i], self.input_size, fit=self.config.fit,
                                     limits=self._limits)
                    self._normalise_into(img, tensor[i - start])
                except ImageError as exc:
                    errors[i] = exc

        pool = pool or self._pool
        if pool is None:
            work(start, stop)
            return tensor, []
        cuts = np.linspace(start, stop, max(1, parts) + 1).astype(int)
        return tensor, [pool.submit(work, int(lo), int(hi))
                        for lo, hi in zip(cuts[:-1], cuts[1:], strict=True) if hi > lo]

    def _alloc(self, n: int) -> Tensor:
        h, w = self.input_size
        shape = (n, 3, h, w) if self.layout == "NCHW" else (n, h, w, 3)
        return np.empty(shape, self.input_dtype)

    def _normalise_into(self, img: NDArray[np.uint8], dst: Tensor) -> None:
        if self.config.color_order == "BGR":
            img = img[..., ::-1]
        if self.layout == "NCHW":
            img = img.transpose(2, 0, 1)
        if dst.dtype == np.uint8:  # the graph normalises
            dst[...] = img
            return
        # float16 and double inputs: normalised in float32 as for float32 models, then cast
        out = dst if dst.dtype == np.float32 else np.empty(dst.shape, np.float32)
        np.multiply(img, self._mul, out=out)
        out -= self._add
        if out is not dst:
            dst[...] = out

    def _infer(self, tensor: Tensor) -> F32:
        n = len(tensor)
        fixed = self._fixed_batch
        if fixed is not None and n != fixed:
            return np.concatenate([self._infer_padded(tensor[i:i + fixed], fixed)
                                   for i in range(0, n, fixed)])
        return self._pool_output(self._raw(tensor))

    def _infer_padded(self, part: Tensor, fixed: int) -> F32:
        padded = np.zeros((fixed, *part.shape[1:]), part.dtype)
        padded[:len(part)] = part
        return self._pool_output(self._raw(padded))[:len(part)]

    def _raw(self, tensor: Tensor) -> F32:
        (raw,) = self._session.run([self.output_name], {self.input_name: tensor})
        return np.asarray(raw, np.float32)

    def _pool_output(self, raw: F32) -> F32:
        axes = _POOL_AXES.get(self.output_layout, ())
        if axes and self.config.pooling != "none":
            raw = raw.mean(axis=axes) if self.config.pooling == "avg" else raw.max(axis=axes)
        emb = raw.reshape(len(raw), -1).astype(np.float32, copy=False)
        if self.config.l2_normalize:
            emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        return emb


def usable_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup v2 CPU quota (a container
    limit of 2 CPUs on a 64-core node is 2, where ``os.cpu_count()`` says 64).

    >>> 1 <= usable_cpus() <= (os.cpu_count() or 1)
    True
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    n = cpus or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota readable: the affinity mask is the limit
    return n


def _join(pending: tuple[Tensor, list[Future[None]]]) -> Tensor:
    tensor, futures = pending
    for fut in futures:
        fut.result()
    return tensor


def _pick_input(session: ort.InferenceSession, name: str | None) -> Any:
    inputs = session.get_inputs()
    if name is None:
        if len(inputs) != 1:
            raise ValueError(f"model has {len(inputs)} inputs; set input_name to one of "
                             f"{[i.name for i in inputs]}")
        return inputs[0]
    for inp in inputs:
        if inp.name == name:
            return inp
    raise ValueError(f"input_name {name!r} is not one of the model's inputs "
                     f"{[i.name for i in inputs]}")


def _input_dtype(name: str, onnx_type: str, config: EmbedderConfig,
                 inputs: int) -> np.dtype[Any]:
    """The array type input ``name`` of ``onnx_type`` (e.g. ``tensor(float16)``) is fed; a type
    no image is fed as, or a uint8 input with pixels normalised before it, fail here rather
    than as onnxruntime's error at the first batch."""
    dtype = _INPUT_DTYPES.get(onnx_type)
    if dtype is None:
        *known, last = _INPUT_DTYPES
        raise ValueError(f"the model's input {name!r} is {onnx_type}; images are fed as "
                         f"{', '.join(known)} or {last}"
                         + ("; set input_name to its image input" if inputs > 1 else ""))
    if dtype is np.uint8:
        reset = [f"{setting} to {identity}" for setting, identity, unchanged in (
            ("scale", "1", config.scale == 1), ("mean", "0,0,0", config.mean == (0, 0, 0)),
            ("std", "1,1,1", config.std == (1, 1, 1))) if not unchanged]
        if reset:
            settings = reset[0] if len(reset) == 1 else f"{', '.join(reset[:-1])} and {reset[-1]}"
            raise ValueError(f"the model's input {name!r} is {onnx_type}: it takes uint8 pixels "
                             "as decoded and normalises them in its graph, so they must reach "
                             f"it unchanged; set {settings}")
    return np.dtype(dtype)


def _input_geometry(
    name: str, shape: list[Any], layout: str | None, size: tuple[int, int] | None,
) -> tuple[Literal["NCHW", "NHWC"], tuple[int, int]]:
    """The input's layout and (h, w): as given, checked against the model's fixed dims (a
    mismatch fails here, not as onnxruntime's error at the first batch), else as declared."""
    declared = f"the model's input {name!r} [{', '.join(_dim(d) for d in shape)}]"
    if len(shape) != 4:
        raise ValueError(f"image input must be 4-D, {declared} is {len(shape)}-D")
    if layout is None:
        layout = "NCHW" if shape[1] == 3 else "NHWC" if shape[3] == 3 else None
        if layout is None:
            raise ValueError(f"cannot tell NCHW from NHWC in {declared}; set layout")
    else:
        axis, other = (1, 3) if layout == "NCHW" else (3, 1)
        if isinstance(shape[axis], int) and shape[axis] != 3:
            raise ValueError(
                f"layout {layout} puts the 3 colour channels on axis {axis}, where {declared} "
                f"has {shape[axis]}" + (f": it reads as {'NHWC' if other == 3 else 'NCHW'}"
                                        if shape[other] == 3 else ""))
    spatial = shape[2:4] if layout == "NCHW" else shape[1:3]
    if size is None:
        if not all(isinstance(d, int) for d in spatial):
            raise ValueError(f"{declared} has dynamic spatial dims; set input_size")
        size = (int(spatial[0]), int(spatial[1]))
    elif any(isinstance(d, int) and d != s for d, s in zip(spatial, size, strict=True)):
        raise ValueError(f"input_size {size[0]}x{size[1]} does not fit {declared}, whose "
                         f"images are {_dim(spatial[0])}x{_dim(spatial[1])} ({layout})")
    return ("NCHW" if layout == "NCHW" else "NHWC"), size


def _dim(d: Any) -> str:
    """A declared dim as written: its size, its symbol, or ``?``."""
    return "?" if d is None else str(d)


def _output_layout(
    name: str, shape: tuple[int, ...], wanted: OutputLayout, pooling: str,
    input_layout: str, input_size: tuple[int, int],
) -> OutputLayout:
    """The layout of output ``name`` (``shape`` without the batch axis); refuses to guess."""
    dims = f"{name!r} [N, {', '.join(map(str, shape))}]"
    rank = len(shape) + 1
    if wanted != "auto":
        if rank != _OUTPUT_RANK[wanted]:
            raise ValueError(f"output_layout {wanted} is for {_OUTPUT_RANK[wanted]}-D tensors; "
                             f"{dims} is {rank}-D")
        return wanted
    if rank == 2:
        return "NC"
    if pooling == "none":
        return "auto"  # flattened as it is: no axis to choose
    if rank == 3:
        raise ValueError(f"cannot tell which axis of {dims} to pool: set output_layout to NLC "
                         "([N, tokens, hidden]: pooled over tokens) or NCL ([N, channels, "
                         "length]), or pooling to none")
    if rank != 4:
        raise ValueError(f"{dims} is {rank}-D; pooling takes 3-D (output_layout NLC or NCL) "
                         "or 4-D (NCHW or NHWC) tensors: set pooling to none to flatten it")
    fits = [lay for lay in ("NCHW", "NHWC") if _keeps_aspect(shape, lay, input_size)]
    if fits == [input_layout]:
        return "NCHW" if input_layout == "NCHW" else "NHWC"
    if not fits:
        why = "its shape fits neither NCHW nor NHWC"
    elif len(fits) == 2:
        why = "its shape reads as both NCHW and NHWC"
    else:
        why = f"its shape reads as {fits[0]} but the input is {input_layout}"
    raise ValueError(f"cannot tell the channel axis of {dims}: {why}; set output_layout to "
                     "NCHW or NHWC")


def _keeps_aspect(shape: tuple[int, ...], layout: str, input_size: tuple[int, int]) -> bool:
    """Whether ``shape`` [C, H, W] (NCHW) or [H, W, C] has the input's aspect ratio, to within
    one output pixel on each axis (strided layers round each side by less than one)."""
    h, w = shape[1:3] if layout == "NCHW" else shape[0:2]
    h_in, w_in = input_size
    return abs(h * w_in - w * h_in) < h_in + w_in
