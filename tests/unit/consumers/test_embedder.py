from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import onnx
import pytest

from driftline.consumers.embedder import Embedder, EmbedderConfig, list_tensors
from driftline.consumers.imaging import (
    Base64Image,
    ImageDecodeError,
    ImageSource,
    ImageTooLargeError,
    decode_image,
)
from tests.unit.consumers.tiny_onnx import build_tiny_model, png, random_images

RNG = np.random.default_rng(7)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("m") / "tiny.onnx")


def _images(n: int, size: int = 16) -> np.ndarray:
    return random_images(RNG, n, size)


def test_defaults_come_from_the_model(tiny: Path) -> None:
    emb = Embedder(EmbedderConfig(model_path=tiny))
    assert (emb.input_name, emb.layout, emb.input_size) == ("input", "NCHW", (16, 16))
    assert emb.output_name == "embedding" and emb.dim == 8
    out = emb.embed_arrays(_images(5))
    assert out.shape == (5, 8) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    desc = emb.describe()
    assert desc["model_sha256"] == emb.model_sha256 and len(emb.model_sha256) == 64
    assert desc["output_shape"] == [8] and desc["dim"] == 8


def test_intermediate_tensor_pooled_equals_the_pooled_output(tiny: Path) -> None:
    x = _images(6)
    final = Embedder(EmbedderConfig(model_path=tiny)).embed_arrays(x)
    mid = Embedder(EmbedderConfig(model_path=tiny, output_name="features.1"))
    assert mid.output_shape == (8, 16, 16) and mid.dim == 8
    np.testing.assert_allclose(mid.embed_arrays(x), final, atol=1e-5)
    flat = Embedder(EmbedderConfig(model_path=tiny, output_name="features.0", pooling="none"))
    assert flat.dim == 8 * 16 * 16
    peak = Embedder(EmbedderConfig(model_path=tiny, output_name="features.0", pooling="max",
                                   l2_normalize=False))
    raw = Embedder(EmbedderConfig(model_path=tiny, output_name="features.0", pooling="none",
                                  l2_normalize=False)).embed_arrays(x).reshape(6, 8, 16, 16)
    np.testing.assert_allclose(peak.embed_arrays(x), raw.max(axis=(2, 3)), rtol=1e-6)


def test_unknown_tensor_names_close_matches(tiny: Path) -> None:
    with pytest.raises(ValueError, match=r"features\.1"):
        Embedder(EmbedderConfig(model_path=tiny, output_name="features.7"))
    names = [name for name, _ in list_tensors(tiny)]
    assert names[:2] == ["features.0", "features.1"]
    assert dict(list_tensors(tiny))["features.0"] == ["N", 8, 16, 16]


def test_given_geometry_is_checked_against_the_models_fixed_dims(tiny: Path,
                                                                  tmp_path: Path) -> None:
    """A wrong layout or size failed with onnxruntime's InvalidArgument traceback."""
    with pytest.raises(ValueError, match=r"layout NHWC .* 'input' \[N, 3, 16, 16\] has 16: "
                                         r"it reads as NCHW"):
        Embedder(EmbedderConfig(model_path=tiny, layout="NHWC"))
    with pytest.raises(ValueError, match=r"input_size 20x20 does not fit .*, whose images "
                                         r"are 16x16 \(NCHW\)"):
        Embedder(EmbedderConfig(model_path=tiny, input_size=(20, 20)))
    same = Embedder(EmbedderConfig(model_path=tiny, layout="NCHW", input_size=(16, 16)))
    assert (same.layout, same.input_size) == ("NCHW", (16, 16))
    model = onnx.load(str(tiny))
    model.graph.input[0].type.tensor_type.shape.dim[3].dim_param = "W"  # a free width
    onnx.save(model, str(tmp_path / "w.onnx"))
    assert Embedder(EmbedderConfig(model_path=tmp_path / "w.onnx",
                                   input_size=(16, 24))).input_size == (16, 24)
    with pytest.raises(ValueError, match=r"\[N, 3, 16, W\], whose images are 16xW"):
        Embedder(EmbedderConfig(model_path=tmp_path / "w.onnx", input_size=(24, 24)))


def test_a_path_that_is_no_onnx_model_raises_a_model_file_error(tiny: Path,
                                                                 tmp_path: Path) -> None:
    from driftline.consumers.embedder import ModelFileError, expose_tensor

    (tmp_path / "text.onnx").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (tmp_path / "empty.onnx").write_bytes(b"")
    (tmp_path / "dir.onnx").mkdir()
    cases = {"text.onnx": r"not an ONNX model: .*text\.onnx \(not an ONNX protobuf\)",
             "empty.onnx": r"not an ONNX model: .*empty\.onnx \(an empty file\)",
             "dir.onnx": r"not an ONNX model: .*dir\.onnx \(a directory\)",
             "gone.onnx": r"model not found: .*gone\.onnx"}
    for name, message in cases.items():
        with pytest.raises(ModelFileError, match=message):
            Embedder(EmbedderConfig(model_path=tmp_path / name))
        with pytest.raises(ModelFileError, match=message):
            expose_tensor(tmp_path / name, None)
        with pytest.raises(ModelFileError, match=message):
            list_tensors(tmp_path / name)
    model = onnx.load(str(tiny))  # a valid protobuf onnxruntime cannot run
    model.graph.node[1].op_type = "NoSuchOp"
    onnx.save(model, str(tmp_path / "odd.onnx"))
    with pytest.raises(ModelFileError, match=r"onnxruntime cannot load the model .*odd\.onnx"):
        Embedder(EmbedderConfig(model_path=tmp_path / "odd.onnx"))


def test_nhwc_model_matches_nchw_and_normalisation_is_exact(tmp_path: Path) -> None:
    x = _images(4)
    nchw = Embedder(EmbedderConfig(model_path=build_tiny_model(tmp_path / "a.onnx")))
    nhwc_path = build_tiny_model(tmp_path / "b.onnx", nhwc=True)
    nhwc = Embedder(EmbedderConfig(model_path=nhwc_path))
    assert nhwc.layout == "NHWC"
    np.testing.assert_allclose(nhwc.embed_arrays(x), nchw.embed_arrays(x), atol=1e-5)
    # the NHWC model's first node transposes its input: exposing it reads the normalised tensor
    seen = Embedder(EmbedderConfig(model_path=nhwc_path, output_name="nchw", pooling="none",
                                   l2_normalize=False, scale=0.5, mean=(1, 2, 3),
                                   std=(2, 4, 8), color_order="BGR"))
    expect = (x[..., ::-1] * 0.5 - np.array([1, 2, 3])) / np.array([2, 4, 8])
    got = seen.embed_arrays(x).reshape(4, 3, 16, 16).transpose(0, 2, 3, 1)
    np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-5)


def test_a_bgr_model_gets_imagenet_normalisation_in_its_own_channel_order(tmp_path: Path) -> None:
    """The default mean and std are ImageNet's, red first; a BGR model's first channel is blue,
    so it gets them blue first: each colour normalised as an RGB model normalises it."""
    x = _images(4)
    path = build_tiny_model(tmp_path / "b.onnx", nhwc=True)
    seen = {order: Embedder(EmbedderConfig(model_path=path, output_name="nchw", pooling="none",
                                           l2_normalize=False, color_order=order))
            for order in ("RGB", "BGR")}
    rgb, bgr = (seen[o].embed_arrays(x).reshape(4, 3, 16, 16) for o in ("RGB", "BGR"))
    np.testing.assert_allclose(bgr, rgb[:, ::-1], rtol=1e-5, atol=1e-5)
    assert seen["BGR"].describe()["mean"] == [0.406, 0.456, 0.485]
    assert seen["BGR"].describe()["std"] == [0.225, 0.224, 0.229]
    given = EmbedderConfig(model_path=path, color_order="BGR", mean=(1, 2, 3))
    assert given.mean == (1, 2, 3) and given.std == (0.225, 0.224, 0.229)


def test_wrong_array_shape_is_refused(tiny: Path) -> None:
    emb = Embedder(EmbedderConfig(model_path=tiny))
    with pytest.raises(ValueError, match="expected"):
        emb.embed_arrays(_images(2, size=17))


@pytest.mark.parametrize("ort_threads", [0, 1])  # 0: every core, so no decode beside inference
@pytest.mark.parametrize("threads", [0, 1, 2, None])
def test_embed_images_batches_and_errors(tiny: Path, threads: int | None, ort_threads: int) -> None:
    x = _images(11)
    sources: list[ImageSource] = [png(a) for a in x]
    sources[3] = b"garbage"
    sources[5] = Base64Image(base64.b64encode(png(x[5])).decode())
    sources[6] = Base64Image("not base64!")
    sources[8] = png(_images(1, size=64)[0])  # valid, resized to 16×16
    sources[9] = "file:///nonexistent/x.png"
    emb = Embedder(EmbedderConfig(model_path=tiny, batch_size=4, decode_threads=threads,
                                  intra_op_threads=ort_threads, max_image_pixels=32 * 32))
    assert not emb.overlap_decode or (threads != 0 and ort_threads == 1)
    out, errors = emb.embed_images(sources)
    assert out.shape == (11, 8)
    assert [i for i, e in enumerate(errors) if e is not None] == [3, 6, 8, 9]
    assert all(isinstance(errors[i], ImageDecodeError) for i in (3, 6, 9))
    assert isinstance(errors[8], ImageTooLargeError)
    assert np.isnan(out[[3, 6, 8, 9]]).all()
    good = [i for i in range(11) if errors[i] is None]
    np.testing.assert_allclose(out[good], emb.embed_arrays(x[good]), atol=1e-6)
    emb.close()


def test_the_embed_stage_reads_file_uris_only_inside_the_image_roots(
        tiny: Path, tmp_path: Path) -> None:
    from types import SimpleNamespace

    from driftline.config import load_settings
    from driftline.runner import make_embedder

    inside, outside = tmp_path / "cams", tmp_path / "etc"
    inside.mkdir()
    outside.mkdir()
    for folder in (inside, outside):
        (folder / "a.png").write_bytes(png(_images(1)[0]))
    ref = SimpleNamespace(manifest={"embedding": {
        "model": Embedder(EmbedderConfig(model_path=tiny)).describe()}})
    uris = [(inside / "a.png").as_uri(), (outside / "a.png").as_uri()]
    for roots, refused in (([str(inside)], [1]), ([], [])):
        settings = load_settings(model_path=tiny, image_roots=roots)
        emb = make_embedder(settings, ref)  # type: ignore[arg-type]
        try:
            _, errors = emb.embed_images(uris)
        finally:
            emb.close()
        assert [i for i, e in enumerate(errors) if e is not None] == refused
        assert all("outside the allowed image roots" in str(errors[i]) for i in refused)


def test_empty_input_and_all_failures(tiny: Path) -> None:
    emb = Embedder(EmbedderConfig(model_path=tiny))
    out, errors = emb.embed_images([])
    assert out.shape == (0, 8) and errors == []
    out, errors = emb.embed_images([b"x", b"y"])
    assert np.isnan(out).all() and all(e is not None for e in errors)


def test_fixed_batch_model_is_padded(tmp_path: Path) -> None:
    x = _images(7)
    fixed = Embedder(EmbedderConfig(
        model_path=build_tiny_model(tmp_path / "f.onnx", fixed_batch=4), batch_size=32))
    free = Embedder(EmbedderConfig(model_path=build_tiny_model(tmp_path / "d.onnx")))
    np.testing.assert_allclose(fixed.embed_arrays(x), free.embed_arrays(x), atol=1e-6)


def test_description_round_trip(tiny: Path) -> None:
    a = Embedder(EmbedderConfig(model_path=tiny, output_name="features.1", fit="center_crop",
                                color_order="BGR", pooling="max"))
    b = Embedder(EmbedderConfig.from_description(a.describe(), tiny, batch_size=3))
    assert b.describe() == a.describe()
    data = png(_images(1, size=40)[0])
    np.testing.assert_array_equal(a.embed_images([data])[0], b.embed_images([data])[0])
    assert decode_image(data, (16, 16), fit="center_crop").shape == (16, 16, 3)


def test_a_prefetched_first_batch_embeds_as_a_plain_call(tiny: Path) -> None:
    """One poll ahead, the embed stage starts decoding a call's first batch on the free core
    before the call; the result is the same, errors at the same indices."""
    x = _images(10)
    sources: list[ImageSource] = [png(a) for a in x]
    sources[1] = b"garbage"  # in the prefetched first batch
    sources[6] = b"garbage too"  # in a later one
    emb = Embedder(EmbedderConfig(model_path=tiny, batch_size=4, decode_threads=2,
                                  intra_op_threads=1))
    assert emb.overlap_decode
    early = emb.prefetch(sources)
    assert early is not None and emb.prefetch([]) is None
    out, errors = emb.embed_images(sources, early)
    plain, plain_errors = emb.embed_images(sources)
    assert [i for i, e in enumerate(errors) if e is not None] == [1, 6]
    assert [type(e) for e in errors] == [type(e) for e in plain_errors]
    np.testing.assert_array_equal(out, plain)  # NaN rows included
    with pytest.raises(ValueError, match="other sources"):
        emb.embed_images(list(sources), emb.prefetch(sources))
    emb.close()
    every_core = Embedder(EmbedderConfig(model_path=tiny, decode_threads=2, intra_op_threads=0))
    assert every_core.prefetch(sources) is None  # decoding beside the model would preempt it
    every_core.close()
