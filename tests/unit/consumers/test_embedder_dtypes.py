"""Models whose image input is not float32: float16 and double get the float32 normalisation
cast to their type, uint8 the pixels themselves; any other type is refused at start-up (each
failed there with onnxruntime's INVALID_ARGUMENT "unexpected input data type")."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto

from driftline.consumers.embedder import Embedder, EmbedderConfig
from tests.unit.consumers.tiny_onnx import build_tiny_model, png, random_images, with_input_type

RNG = np.random.default_rng(17)
IDENTITY: dict[str, Any] = {"scale": 1.0, "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}
# float16 keeps 11 significant bits: rounding moves a value by at most 2^-11 of itself. The
# float16 model rounds twice, its input and its output; the conv, ReLU and average pool in
# between carry the input's relative error to each output component (about, not exactly: sums of
# terms of both signs), so a unit-norm embedding's components move by a few times 2^-11 at most
# (measured over 20 models × 50 images: under 2.6e-4, about half of 2^-11)
FP16_ATOL = 4 * 2.0**-11


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("dtypes")
    base = build_tiny_model(d / "f32.onnx")
    return {
        "float": base,
        "float16": with_input_type(base, d / "f16.onnx", TensorProto.FLOAT16,
                                   output_type=TensorProto.FLOAT16),
        "double": with_input_type(base, d / "f64.onnx", TensorProto.DOUBLE,
                                  output_type=TensorProto.DOUBLE),
        "uint8": with_input_type(base, d / "u8.onnx", TensorProto.UINT8, normalise=True),
    }


def _images(n: int) -> np.ndarray:
    return random_images(RNG, n)


def test_a_float32_model_is_fed_as_before(models: dict[str, Path]) -> None:
    """Bit for bit: pixels × scale/std − mean/std in float32, what onnxruntime returns for it."""
    x = _images(5)
    emb = Embedder(EmbedderConfig(model_path=models["float"], l2_normalize=False))
    c = emb.config
    std = np.asarray(c.std, np.float32)
    mul = (c.scale / std).astype(np.float32)[:, None, None]
    add = (np.asarray(c.mean, np.float32) / std)[:, None, None]
    expect = np.multiply(x.transpose(0, 3, 1, 2), mul, dtype=np.float32) - add
    tensor = emb.preprocess(x)
    assert tensor.dtype == np.float32
    np.testing.assert_array_equal(tensor, expect)
    bare = ort.InferenceSession(str(models["float"]), providers=["CPUExecutionProvider"])
    (direct,) = bare.run(["embedding"], {"input": expect})
    np.testing.assert_array_equal(emb.embed_arrays(x), direct)


def test_float16_and_double_models_get_the_float32_normalisation_cast(
        models: dict[str, Path]) -> None:
    """Their outputs (float16, double) come out as float32 embeddings too."""
    x = _images(9)
    twin = Embedder(EmbedderConfig(model_path=models["float"]))
    half = Embedder(EmbedderConfig(model_path=models["float16"], batch_size=4))
    double = Embedder(EmbedderConfig(model_path=models["double"], batch_size=4))
    normalised = twin.preprocess(x)
    assert half.preprocess(x).dtype == np.float16 and double.preprocess(x).dtype == np.float64
    np.testing.assert_array_equal(half.preprocess(x), normalised.astype(np.float16))
    np.testing.assert_array_equal(double.preprocess(x), normalised)
    want = twin.embed_arrays(x)
    for emb in (half, double):
        got = emb.embed_arrays(x)
        assert got.dtype == np.float32 and got.shape == want.shape
        out, errors = emb.embed_images([png(a) for a in x])  # decoded into the model's type
        assert errors == [None] * 9
        np.testing.assert_array_equal(out, got)
        emb.close()
    # the double model casts the exact float32 values back: its embedding is the twin's
    np.testing.assert_array_equal(double.embed_arrays(x), want)
    np.testing.assert_allclose(half.embed_arrays(x), want, rtol=0, atol=FP16_ATOL)
    # a reference records no input type: the model (its sha256) has it
    again = Embedder(EmbedderConfig.from_description(half.describe(), models["float16"]))
    assert again.input_dtype == np.float16 and again.describe() == half.describe()


def test_a_uint8_model_gets_the_pixels_and_normalises_them_itself(
        models: dict[str, Path], tmp_path: Path) -> None:
    x = _images(7)
    emb = Embedder(EmbedderConfig(model_path=models["uint8"], batch_size=4, **IDENTITY))
    tensor = emb.preprocess(x)
    assert tensor.dtype == np.uint8
    np.testing.assert_array_equal(tensor, x.transpose(0, 3, 1, 2))
    # the graph's x/255 and ImageNet mean/std vs the embedder's: float32 rounding apart
    want = Embedder(EmbedderConfig(model_path=models["float"])).embed_arrays(x)
    got = emb.embed_arrays(x)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    out, errors = emb.embed_images([png(a) for a in x])
    assert errors == [None] * 7
    np.testing.assert_array_equal(out, got)
    emb.close()
    # a fixed batch of 4 pads the last 3 images with black pixels
    fixed = with_input_type(build_tiny_model(tmp_path / "f4.onnx", fixed_batch=4),
                            tmp_path / "u8f4.onnx", TensorProto.UINT8, normalise=True)
    np.testing.assert_allclose(
        Embedder(EmbedderConfig(model_path=fixed, **IDENTITY)).embed_arrays(x), got, atol=1e-6)
    # NHWC and BGR: what the graph's Cast sees is the pixels, reordered, as they are
    nhwc = with_input_type(build_tiny_model(tmp_path / "h.onnx", nhwc=True),
                           tmp_path / "u8h.onnx", TensorProto.UINT8)
    seen = Embedder(EmbedderConfig(model_path=nhwc, output_name="input", pooling="none",
                                   l2_normalize=False, color_order="BGR", **IDENTITY))
    assert seen.layout == "NHWC"
    np.testing.assert_array_equal(seen.embed_arrays(x).reshape(x.shape), x[..., ::-1])


@pytest.mark.parametrize(("settings", "named"), [
    ({}, "set scale to 1, mean to 0,0,0 and std to 1,1,1"),  # the defaults: ImageNet's
    ({**IDENTITY, "mean": (0.5, 0.0, 0.0)}, "set mean to 0,0,0"),
    ({**IDENTITY, "scale": 0.5, "std": (1.0, 2.0, 1.0)}, "set scale to 1 and std to 1,1,1"),
])
def test_a_uint8_model_refuses_normalisation_before_it(
        models: dict[str, Path], settings: dict[str, Any], named: str) -> None:
    with pytest.raises(ValueError, match="'image' is tensor\\(uint8\\): it takes uint8 pixels") \
            as info:
        Embedder(EmbedderConfig(model_path=models["uint8"], **settings))
    assert str(info.value).endswith(named)


@pytest.mark.parametrize("elem_type", [TensorProto.INT64, TensorProto.BOOL, TensorProto.INT8],
                         ids=["int64", "bool", "int8"])
def test_other_input_types_are_refused_naming_input_and_type(
        models: dict[str, Path], tmp_path: Path, elem_type: int) -> None:
    path = with_input_type(models["float"], tmp_path / "odd.onnx", elem_type)
    onnx_type = f"tensor({TensorProto.DataType.Name(elem_type).lower()})"
    with pytest.raises(ValueError, match=re.escape(
            f"the model's input 'image' is {onnx_type}; images are fed as tensor(float), "
            "tensor(float16), tensor(double) or tensor(uint8)")):
        Embedder(EmbedderConfig(model_path=path, **IDENTITY))
