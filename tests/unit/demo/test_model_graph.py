"""The MobileNetV2 ONNX graph, built from random weights (no download) and checked against numpy."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from driftline.demo.mobilenet import BLOCK_OUTPUTS, build_onnx
from driftline.demo.model import preprocess_imagenet

BLOCKS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
          (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))  # fmt: skip


def random_state(seed: int = 0) -> dict[str, np.ndarray]:
    """A torchvision-shaped MobileNetV2 state dict with random weights and batch-norm stats."""
    rng = np.random.default_rng(seed)
    state: dict[str, np.ndarray] = {}

    def conv(name: str, shape: tuple[int, ...]) -> None:
        fan_in = int(np.prod(shape[1:]))
        state[f"{name}.weight"] = rng.normal(0, np.sqrt(1 / fan_in), shape).astype(np.float32)

    def bn(name: str, n: int) -> None:
        state[f"{name}.weight"] = rng.uniform(0.5, 1.5, n).astype(np.float32)
        state[f"{name}.bias"] = rng.normal(0, 0.1, n).astype(np.float32)
        state[f"{name}.running_mean"] = rng.normal(0, 0.1, n).astype(np.float32)
        state[f"{name}.running_var"] = rng.uniform(0.5, 2.0, n).astype(np.float32)
        state[f"{name}.num_batches_tracked"] = np.array(0, np.int64)

    conv("features.0.0", (32, 3, 3, 3))
    bn("features.0.1", 32)
    index, inp = 1, 32
    for t, c, n, _ in BLOCKS:
        for _ in range(n):
            p, hidden, layer = f"features.{index}.conv", inp * t, 0
            if t != 1:
                conv(f"{p}.0.0", (hidden, inp, 1, 1))
                bn(f"{p}.0.1", hidden)
                layer = 1
            conv(f"{p}.{layer}.0", (hidden, 1, 3, 3))
            bn(f"{p}.{layer}.1", hidden)
            conv(f"{p}.{layer + 1}", (c, hidden, 1, 1))
            bn(f"{p}.{layer + 2}", c)
            index, inp = index + 1, c
    conv("features.18.0", (1280, 320, 1, 1))
    bn("features.18.1", 1280)
    state["classifier.1.weight"] = rng.normal(0, 0.03, (1000, 1280)).astype(np.float32)
    state["classifier.1.bias"] = rng.normal(0, 0.1, 1000).astype(np.float32)
    return state


def conv_bn_ref(x: np.ndarray, state: dict[str, np.ndarray], conv: str, bn: str,
                stride: int, relu6: bool) -> np.ndarray:  # fmt: skip
    """Unfolded reference: conv (dense or depthwise, 'same' padding), batch-norm, ReLU6."""
    w = state[f"{conv}.weight"].astype(np.float64)
    k = w.shape[-1]
    xp = np.pad(x, ((0, 0), (0, 0), (k // 2, k // 2), (k // 2, k // 2)))
    h = (x.shape[2] + 2 * (k // 2) - k) // stride + 1
    taps = [xp[:, :, i : i + stride * h : stride, j : j + stride * h : stride]
            for i in range(k) for j in range(k)]  # fmt: skip
    if w.shape[1] == 1 and k > 1:  # depthwise
        y = sum(tap * w[None, :, 0, i // k, i % k, None, None] for i, tap in enumerate(taps))
    else:
        y = sum(
            np.einsum("nchw,oc->nohw", tap, w[:, :, i // k, i % k]) for i, tap in enumerate(taps)
        )
    g, b, m, v = (state[f"{bn}.{s}"][None, :, None, None]
                  for s in ("weight", "bias", "running_mean", "running_var"))  # fmt: skip
    y = (y - m) / np.sqrt(v + 1e-5) * g + b
    return np.clip(y, 0, 6) if relu6 else y


@pytest.fixture(scope="module")
def state() -> dict[str, np.ndarray]:
    return random_state()


@pytest.fixture(scope="module")
def session(state: dict[str, np.ndarray]) -> ort.InferenceSession:
    model = build_onnx(state)
    for name in ("features.0", "features.2", "features.3"):
        model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_graph_contract(state: dict[str, np.ndarray]) -> None:
    model = build_onnx(state)
    produced = {out for node in model.graph.node for out in node.output}
    assert set(BLOCK_OUTPUTS) <= produced
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["embedding", "logits"]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    assert not any(node.op_type == "BatchNormalization" for node in model.graph.node)
    onnx.checker.check_model(model, full_check=True)


def test_same_weights_give_identical_bytes(state: dict[str, np.ndarray]) -> None:
    first = build_onnx(state).SerializeToString(deterministic=True)
    assert build_onnx(dict(state)).SerializeToString(deterministic=True) == first


def test_folded_layers_match_unfolded_reference(
    state: dict[str, np.ndarray], session: ort.InferenceSession
) -> None:
    x = np.random.default_rng(1).normal(0, 1, (2, 3, 224, 224)).astype(np.float32)
    emb, logits, f0, f2, f3 = session.run(None, {"input": x})
    assert emb.shape == (2, 1280) and logits.shape == (2, 1000)
    np.testing.assert_allclose(
        f0, conv_bn_ref(x, state, "features.0.0", "features.0.1", 2, True), atol=1e-4
    )
    # features.3 is a stride-1 block with 24 -> 24 channels, so it has the residual connection.
    p = "features.3.conv"
    y = conv_bn_ref(f2, state, f"{p}.0.0", f"{p}.0.1", 1, True)
    y = conv_bn_ref(y, state, f"{p}.1.0", f"{p}.1.1", 1, True)
    y = conv_bn_ref(y, state, f"{p}.2", f"{p}.3", 1, False)
    np.testing.assert_allclose(f3, f2 + y, atol=1e-3, rtol=1e-4)


def test_preprocess_imagenet_normalises_to_nchw() -> None:
    images = np.full((2, 30, 40, 3), 255, np.uint8)
    out = preprocess_imagenet(images)
    assert out.shape == (2, 3, 224, 224) and out.dtype == np.float32
    np.testing.assert_allclose(out[0, :, 0, 0], (1 - np.array([0.485, 0.456, 0.406])) /
                               np.array([0.229, 0.224, 0.225]), rtol=1e-5)  # fmt: skip
    with pytest.raises(ValueError, match="uint8"):
        preprocess_imagenet(images.astype(np.float32))
