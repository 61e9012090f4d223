"""A tiny conv net written with ``onnx.helper``: conv → relu → global pool → (embedding, logits);
and random test images for it."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from PIL import Image


def random_images(rng: np.random.Generator, n: int, size: int = 16) -> np.ndarray:
    """``n`` random RGB images, ``[n, size, size, 3]`` uint8."""
    return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def build_tiny_model(
    path: Path, *, size: int = 16, channels: int = 8, nhwc: bool = False,
    fixed_batch: int | None = None, seed: int = 0,
) -> Path:
    """Input ``input`` [N,3,size,size] (or NHWC); outputs ``embedding`` [N,C], ``logits`` [N,4].

    Intermediate tensors are named ``features.0`` (conv, 4-D) and ``features.1`` (relu, 4-D).
    """
    rng = np.random.default_rng(seed)
    batch: int | str = fixed_batch if fixed_batch is not None else "N"
    in_shape = [batch, size, size, 3] if nhwc else [batch, 3, size, size]
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.5, (channels, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.normal(0, 0.1, channels).astype(np.float32), "b"),
        numpy_helper.from_array(rng.normal(0, 0.5, (channels, 4)).astype(np.float32), "fc_w"),
        numpy_helper.from_array(np.zeros(4, np.float32), "fc_b"),
    ]
    nodes = []
    x = "input"
    if nhwc:
        nodes.append(helper.make_node("Transpose", [x], ["nchw"], perm=[0, 3, 1, 2]))
        x = "nchw"
    nodes += [
        helper.make_node("Conv", [x, "w", "b"], ["features.0"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["features.0"], ["features.1"]),
        helper.make_node("GlobalAveragePool", ["features.1"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["embedding"], axis=1),
        helper.make_node("MatMul", ["embedding", "fc_w"], ["mm"]),
        helper.make_node("Add", ["mm", "fc_b"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, in_shape)],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [batch, channels]),
         helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 4])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path
