"""Every preprocessing setting of the embedder can be given to `driftline reference build`."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from typer.testing import CliRunner

from driftline.reference.cli import app
from driftline.reference.index import load_reference
from tests.unit.consumers.tiny_onnx import build_tiny_model
from tests.unit.reference.synthetic import image_manifest

runner = CliRunner()


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return image_manifest(tmp_path_factory.mktemp("manifest") / "ref.jsonl")


@pytest.fixture(scope="module")
def dynamic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with dynamic spatial dims, as many exported models declare."""
    d = tmp_path_factory.mktemp("dyn")
    model = onnx.load(str(build_tiny_model(d / "fixed.onnx")))
    for dim in model.graph.input[0].type.tensor_type.shape.dim[2:]:
        dim.dim_param = "H"
    onnx.save(model, str(d / "dyn.onnx"))
    return d / "dyn.onnx"


def _build(manifest: Path, out: Path, model: Path, *flags: str) -> tuple[int, str]:
    result = runner.invoke(app, ["build", "--manifest", str(manifest), "--out", str(out),
                                 "--model", str(model), "--k", "2", "--min-count", "10",
                                 *flags])
    return result.exit_code, result.output


def test_dynamic_input_needs_and_takes_input_size(manifest: Path, dynamic: Path,
                                                  tmp_path: Path) -> None:
    code, output = _build(manifest, tmp_path / "a", dynamic)
    assert code == 2 and "set input_size (--input-size)" in output
    code, output = _build(manifest, tmp_path / "b", dynamic, "--input-size", "20x12")
    assert code == 0, output
    assert load_reference(tmp_path / "b").manifest["embedding"]["model"]["input_size"] == [20, 12]


def test_every_preprocessing_flag_is_recorded(manifest: Path, tmp_path: Path) -> None:
    model = build_tiny_model(tmp_path / "m.onnx")
    code, output = _build(
        manifest, tmp_path / "ref", model, "--input-name", "input", "--layout", "NCHW",
        "--color-order", "BGR", "--scale", "1", "--mean", "100,110,120", "--std", "50,60,70",
        "--fit", "center_crop", "--embedding-layer", "features.1", "--output-layout", "NCHW",
        "--pooling", "max", "--no-l2-normalize")
    assert code == 0, output
    desc = load_reference(tmp_path / "ref").manifest["embedding"]["model"]
    assert {k: desc[k] for k in ("input_name", "layout", "color_order", "scale", "mean", "std",
                                 "fit", "output_name", "output_layout", "pooling",
                                 "l2_normalize")} == {
        "input_name": "input", "layout": "NCHW", "color_order": "BGR", "scale": 1.0,
        "mean": [100.0, 110.0, 120.0], "std": [50.0, 60.0, 70.0], "fit": "center_crop",
        "output_name": "features.1", "output_layout": "NCHW", "pooling": "max",
        "l2_normalize": False}
    shown = runner.invoke(app, ["show", str(tmp_path / "ref")])
    assert "features.1 [8, 16, 16] NCHW pooling max" in shown.output, shown.output


@pytest.mark.parametrize(("flags", "named"), [
    (["--input-size", "224"], "--input-size"),
    (["--input-size", "0x16"], "--input-size"),
    (["--mean", "0.5,0.5"], "--mean"),
    (["--std", "0.2,0,0.2"], "--std"),
    (["--scale", "-1"], "--scale"),
    (["--layout", "CHW"], "--layout"),
    (["--color-order", "RBG"], "--color-order"),
    (["--output-layout", "NWC"], "--output-layout"),
    (["--input-name", "pixels"], "--input-name"),
    (["--layout", "NHWC"], "--layout"),  # the model's input is [N, 3, 16, 16]
    (["--input-size", "20x20"], "--input-size"),
])
def test_bad_values_name_their_flag(manifest: Path, tmp_path: Path, flags: list[str],
                                    named: str) -> None:
    code, output = _build(manifest, tmp_path / "ref", build_tiny_model(tmp_path / "m.onnx"),
                          *flags)
    assert code == 2 and named in output, output
    assert not (tmp_path / "ref").exists()


def test_a_uint8_model_is_built_with_pixels_left_as_they_are(manifest: Path,
                                                              tmp_path: Path) -> None:
    """A model normalising uint8 pixels in its graph: the default 1/255 and ImageNet mean/std
    are refused naming their flags; reset, the reference builds and the stages rebuild it."""
    from onnx import TensorProto

    from driftline.consumers.embedder import Embedder
    from tests.unit.consumers.tiny_onnx import with_input_type

    model = with_input_type(build_tiny_model(tmp_path / "f.onnx"), tmp_path / "u8.onnx",
                            TensorProto.UINT8, normalise=True)
    code, output = _build(manifest, tmp_path / "a", model)
    assert code == 2, output
    assert ("takes uint8 pixels" in output and "set scale (--scale) to 1, mean (--mean) to "
            "0,0,0 and std (--std) to 1,1,1" in " ".join(output.split())), output
    code, output = _build(manifest, tmp_path / "b", model, "--scale", "1", "--mean", "0,0,0",
                          "--std", "1,1,1")
    assert code == 0, output
    ref = load_reference(tmp_path / "b")
    assert Embedder(ref.embedder_config(model)).input_dtype == "uint8"


def test_an_ambiguous_layer_names_the_output_layout_flag(manifest: Path, tmp_path: Path) -> None:
    model = build_tiny_model(tmp_path / "m.onnx", nhwc=True)
    code, output = _build(manifest, tmp_path / "ref", model, "--embedding-layer", "features.1")
    assert code == 2 and "--output-layout" in output, output


def test_flags_are_checked_before_the_manifest_is_read(tmp_path: Path) -> None:
    result = runner.invoke(app, ["build", "--manifest", "/dev/null", "--out", str(tmp_path),
                                 "--std", "1,0,1"])
    assert result.exit_code == 2 and "--std" in result.output, result.output


def test_preprocessing_flags_are_refused_for_precomputed_embeddings(tmp_path: Path) -> None:
    """Validated, then silently ignored, they would let a user believe they applied."""
    from tests.unit.reference.synthetic import reference_events

    events, _ = reference_events()
    manifest = tmp_path / "ref.jsonl"
    manifest.write_text("\n".join(e.model_dump_json() for e in events) + "\n")
    result = runner.invoke(app, ["build", "--manifest", str(manifest), "--out",
                                 str(tmp_path / "ref"), "--color-order", "BGR", "--scale", "1"])
    assert result.exit_code == 2
    assert "precomputed embeddings" in result.output
    assert "--color-order" in result.output and "--scale" in result.output
    assert not (tmp_path / "ref").exists()
