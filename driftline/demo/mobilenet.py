"""torchvision's MobileNetV2 as an ONNX graph, built from its ``state_dict`` without torch.

Batch-norm is folded into the convolutions and dropout (an identity at inference) is left out.

Graph contract
--------------
* input ``input``: float32 ``[N, 3, 224, 224]``, RGB scaled to [0, 1] then normalised with
  :data:`IMAGENET_MEAN` / :data:`IMAGENET_STD` *by the caller* (see
  :func:`driftline.demo.model.preprocess_imagenet`). Normalisation stays outside the graph so
  an embedder can configure it.
* outputs ``embedding`` ``[N, 1280]`` (global average pool of ``features.18``) and ``logits``
  ``[N, 1000]``.
* every block's output tensor is named after its torchvision module, ``features.0`` …
  ``features.18`` (e.g. ``features.13`` is ``[N, 96, 14, 14]``), so an intermediate layer can be
  exposed as an output later.

The graph is deterministic: the same weights always give byte-identical ONNX.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from driftline.demo.weights import WEIGHTS_SHA256

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
