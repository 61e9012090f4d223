"""A tiny conv net written with ``onnx.helper``: conv → relu → global pool → (embedding, logits);
the same net taking and giving other tensor types; and random test images for it."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from driftline.consumers.embedder import IMAGENET_MEAN, IMAGENET_STD


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


def with_input_type(src: Path, dst: Path, elem_type: int, *, normalise: bool = False,
                    output_type: int | None = None) -> Path:
    """The model at ``src`` taking its input ``image`` as ``elem_type`` (a ``TensorProto`` type):
    a Cast to float in front of the old input; with ``normalise``, then x/255 and ImageNet's
    mean/std in the graph, as exports that take uint8 pixels do. ``output_type``: every output
    cast to that type at the end, as fp16 or double exports give them."""
    model = onnx.load(str(src))
    graph = model.graph
    (old,) = graph.input
    dims = [d.dim_value or d.dim_param for d in old.type.tensor_type.shape.dim]
    nchw = dims[1] == 3
    shape = [1, 3, 1, 1] if nchw else [3]
    pre = [helper.make_node("Cast", ["image"], ["cast"], to=TensorProto.FLOAT)]
    if normalise:
        consts = {"k_scale": np.full(shape, 1 / 255), "k_mean": np.reshape(IMAGENET_MEAN, shape),
                  "k_std": np.reshape(IMAGENET_STD, shape)}
        graph.initializer.extend(numpy_helper.from_array(v.astype(np.float32), k)
                                 for k, v in consts.items())
        pre += [helper.make_node("Mul", ["cast", "k_scale"], ["scaled"]),
                helper.make_node("Sub", ["scaled", "k_mean"], ["centred"]),
                helper.make_node("Div", ["centred", "k_std"], [old.name])]
    else:
        pre[0].output[0] = old.name
    post = []
    if output_type is not None:
        for out in graph.output:
            inner = out.name + ".f32"
            for node in graph.node:
                node.input[:] = [inner if t == out.name else t for t in node.input]
                node.output[:] = [inner if t == out.name else t for t in node.output]
            post.append(helper.make_node("Cast", [inner], [out.name], to=output_type))
            out.type.tensor_type.elem_type = output_type
    nodes = [*pre, *graph.node, *post]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.input[:]
    graph.input.append(helper.make_tensor_value_info("image", elem_type, dims))
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))
    return dst
