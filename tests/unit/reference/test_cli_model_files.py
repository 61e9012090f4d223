"""A model path that names no ONNX model is refused with its path and why, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from driftline.reference.cli import app
from tests.unit.reference.synthetic import image_manifest

runner = CliRunner(env={"COLUMNS": "400"})  # a wide error box: messages on one line


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return image_manifest(tmp_path_factory.mktemp("manifest") / "ref.jsonl")


@pytest.fixture
def bad(tmp_path: Path) -> dict[str, Path]:
    """Files that are no ONNX model: text, an empty file, a directory."""
    (tmp_path / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (tmp_path / "empty.onnx").write_bytes(b"")
    (tmp_path / "dir.onnx").mkdir()
    return {"text": tmp_path / "passwd", "empty": tmp_path / "empty.onnx",
            "dir": tmp_path / "dir.onnx"}


def test_layers_refuses_what_is_not_a_model(bad: dict[str, Path]) -> None:
    result = runner.invoke(app, ["layers", str(bad["text"])])
    assert result.exit_code == 2, result.output
    assert f"not an ONNX model: {bad['text']} (not an ONNX protobuf)" in result.output
    result = runner.invoke(app, ["layers", str(bad["empty"])])  # printed nothing, exit 0
    assert result.exit_code == 2, result.output
    assert f"not an ONNX model: {bad['empty']} (an empty file)" in result.output
    result = runner.invoke(app, ["layers", str(bad["dir"])])
    assert result.exit_code == 2 and "is a directory" in result.output, result.output


def test_build_refuses_what_is_not_a_model(manifest: Path, bad: dict[str, Path],
                                           tmp_path: Path) -> None:
    for kind, said in [("text", "(not an ONNX protobuf)"), ("empty", "(an empty file)")]:
        result = runner.invoke(app, ["build", "--manifest", str(manifest), "--out",
                                     str(tmp_path / "ref"), "--model", str(bad[kind])])
        assert result.exit_code == 2, result.output
        assert f"not an ONNX model: {bad[kind]} {said}" in result.output
    result = runner.invoke(app, ["build", "--manifest", str(manifest), "--out",
                                 str(tmp_path / "ref"), "--model", str(bad["dir"])])
    assert result.exit_code == 2 and "'--model'" in result.output, result.output
    assert "is a directory" in result.output
    assert not (tmp_path / "ref").exists()


def test_a_missing_default_model_says_how_to_get_one(
    manifest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DRIFTLINE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("DRIFTLINE_MODEL_PATH", raising=False)
    result = runner.invoke(app, ["build", "--manifest", str(manifest), "--out",
                                 str(tmp_path / "ref")])
    assert result.exit_code == 2, result.output
    for hint in ("--model", "DRIFTLINE_MODEL_PATH", "driftline model build-demo",
                 str(tmp_path / "cache" / "mobilenet_v2_demo.onnx")):
        assert hint in result.output, result.output
    monkeypatch.setenv("DRIFTLINE_MODEL_PATH", str(tmp_path / "gone.onnx"))
    result = runner.invoke(app, ["build", "--manifest", str(manifest), "--out",
                                 str(tmp_path / "ref")])
    assert result.exit_code == 2, result.output
    assert f"model not found: {tmp_path / 'gone.onnx'} (DRIFTLINE_MODEL_PATH)" in result.output
