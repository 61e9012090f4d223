"""Pooling axes are declared, never guessed; one image's failure never fails its batch."""

from __future__ import annotations

import io
import struct
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from driftline.consumers import embedder as embedder_module
from driftline.consumers.embedder import Embedder, EmbedderConfig
from driftline.consumers.imaging import (
    ImageDecodeError,
    ImageSource,
)
from tests.unit.consumers.tiny_onnx import build_tiny_model, png, random_images

RNG = np.random.default_rng(11)
HIDDEN = 8
PLAIN = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0), "decode_threads": 0}


def _images(n: int, size: int = 16) -> np.ndarray:
    return random_images(RNG, n, size)


@pytest.fixture(scope="module")
def vit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ViT-like model: 4×4 patches → ``tokens`` [N, 16 tokens, HIDDEN] (and the patch map)."""
    w = np.random.default_rng(0).normal(0, 0.5, (HIDDEN, 3, 4, 4)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["input", "w"], ["patches"], strides=[4, 4]),
             helper.make_node("Reshape", ["patches", "shape"], ["flat"]),
             helper.make_node("Transpose", ["flat"], ["tokens"], perm=[0, 2, 1])]
    graph = helper.make_graph(
        nodes, "vit", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                     ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["N", 16, HIDDEN])],
        initializer=[numpy_helper.from_array(w, "w"),
                     numpy_helper.from_array(np.array([0, HIDDEN, -1], np.int64), "shape")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path_factory.mktemp("vit") / "vit.onnx"
    onnx.save(model, str(path))
    return path


def test_tokens_are_refused_in_auto_and_pooled_over_tokens_as_nlc(vit: Path) -> None:
    with pytest.raises(ValueError, match="output_layout to NLC"):
        Embedder(EmbedderConfig(model_path=vit, **PLAIN))
    emb = Embedder(EmbedderConfig(model_path=vit, output_layout="NLC", l2_normalize=False,
                                  **PLAIN))
    assert emb.output_shape == (16, HIDDEN) and emb.dim == HIDDEN
    x = _images(3)
    tokens = Embedder(EmbedderConfig(model_path=vit, pooling="none", l2_normalize=False,
                                     **PLAIN)).embed_arrays(x).reshape(3, 16, HIDDEN)
    np.testing.assert_allclose(emb.embed_arrays(x), tokens.mean(axis=1), rtol=1e-5, atol=1e-6)
    ncl = Embedder(EmbedderConfig(model_path=vit, output_layout="NCL", pooling="max",
                                  l2_normalize=False, **PLAIN))
    np.testing.assert_allclose(ncl.embed_arrays(x), tokens.max(axis=2), rtol=1e-6)
    assert emb.describe()["output_layout"] == "NLC"


def test_a_map_whose_layout_differs_from_the_input_is_refused_until_named(
    tmp_path: Path,
) -> None:
    # an NHWC-input model (TF/Keras export) transposes to NCHW inside: its conv maps are NCHW
    path = build_tiny_model(tmp_path / "m.onnx", nhwc=True)
    with pytest.raises(ValueError, match=r"reads as NCHW but the input is NHWC.*output_layout"):
        Embedder(EmbedderConfig(model_path=path, output_name="features.1", **PLAIN))
    mid = Embedder(EmbedderConfig(model_path=path, output_name="features.1",
                                  output_layout="NCHW", l2_normalize=False, **PLAIN))
    own = Embedder(EmbedderConfig(model_path=path, l2_normalize=False, **PLAIN))  # its own GAP
    x = _images(4)
    assert mid.dim == 8
    np.testing.assert_allclose(mid.embed_arrays(x), own.embed_arrays(x), rtol=1e-5, atol=1e-6)


def test_auto_keeps_maps_in_the_input_layout_and_records_it(tmp_path: Path) -> None:
    tiny = build_tiny_model(tmp_path / "m.onnx")
    mid = Embedder(EmbedderConfig(model_path=tiny, output_name="features.1"))
    assert mid.output_layout == "NCHW" and mid.describe()["output_layout"] == "NCHW"
    assert Embedder(EmbedderConfig(model_path=tiny)).describe()["output_layout"] == "NC"
    again = Embedder(EmbedderConfig.from_description(mid.describe(), tiny))
    assert again.config.output_layout == "NCHW" and again.describe() == mid.describe()
    before = {k: v for k, v in mid.describe().items() if k != "output_layout"}
    old = Embedder(EmbedderConfig.from_description(before, tiny))  # a reference made before
    assert old.config.output_layout == "auto" and old.output_layout == "NCHW"


def test_a_map_that_reads_both_ways_is_refused(tmp_path: Path) -> None:
    cube = build_tiny_model(tmp_path / "m.onnx", channels=16)  # features.1: [N, 16, 16, 16]
    with pytest.raises(ValueError, match="both NCHW and NHWC"):
        Embedder(EmbedderConfig(model_path=cube, output_name="features.1"))
    flat = Embedder(EmbedderConfig(model_path=cube, output_name="features.1", pooling="none"))
    assert flat.dim == 16 ** 3 and flat.output_layout == "auto"


def test_a_layout_of_the_wrong_rank_is_refused(tmp_path: Path) -> None:
    tiny = build_tiny_model(tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="output_layout NHWC is for 4-D"):
        Embedder(EmbedderConfig(model_path=tiny, output_layout="NHWC"))


def test_keeps_aspect_within_an_output_pixel() -> None:
    keeps = embedder_module._keeps_aspect
    assert keeps((96, 14, 14), "NCHW", (224, 224))
    assert not keeps((96, 14, 14), "NHWC", (224, 224))
    assert keeps((64, 10, 16), "NCHW", (300, 500))  # ceil(300/32), ceil(500/32)
    assert keeps((1280, 1, 1), "NCHW", (224, 224)) and not keeps((3, 1, 1), "NHWC", (224, 224))


def _bad_tiff() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (1, 2, 3)).save(buf, "TIFF")
    data = bytearray(buf.getvalue())
    (ifd,) = struct.unpack_from("<I", data, 4)
    (count,) = struct.unpack_from("<H", data, ifd)
    for at in range(ifd + 2, ifd + 2 + 12 * count, 12):
        if struct.unpack_from("<H", data, at)[0] == 273:  # StripOffsets as SRATIONAL
            struct.pack_into("<HI", data, at + 2, 10, 1)
    return bytes(data)


@pytest.mark.parametrize("threads", [0, 2])
def test_a_corrupt_tiff_fails_alone(tmp_path: Path, threads: int) -> None:
    emb = Embedder(EmbedderConfig(model_path=build_tiny_model(tmp_path / "m.onnx"),
                                  decode_threads=threads))
    x = _images(3)
    out, errors = emb.embed_images([png(x[0]), _bad_tiff(), png(x[2])])
    assert isinstance(errors[1], ImageDecodeError) and errors[0] is errors[2] is None
    np.testing.assert_allclose(out[[0, 2]], emb.embed_arrays(x[[0, 2]]), atol=1e-5)


@pytest.mark.parametrize("threads", [0, 2])
def test_an_unforeseen_failure_is_raised_for_the_stage_to_judge(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, threads: int,
) -> None:
    """Not turned into that image's error here: the embed stage tells a bad event from a
    broken worker (EmbedStage.process_guarded)."""
    emb = Embedder(EmbedderConfig(model_path=build_tiny_model(tmp_path / "m.onnx"),
                                  decode_threads=threads, batch_size=2))
    real = embedder_module.load_image

    def flaky(source: ImageSource, *args: Any, **kwargs: Any) -> np.ndarray:
        if source == b"boom":
            raise KeyError("library bug")
        return real(source, *args, **kwargs)

    monkeypatch.setattr(embedder_module, "load_image", flaky)
    x = _images(2)
    with pytest.raises(KeyError, match="library bug"):
        emb.embed_images([png(x[0]), b"boom", png(x[1])])
