"""``driftline`` commands: option checks and start-up errors, without a stack."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import uvicorn
from typer.testing import CliRunner

from driftline import runner
from driftline.cli import app
from driftline.config import ConfigError, load_settings
from driftline.consumers.embedder import Embedder, EmbedderConfig
from tests.unit.consumers.tiny_onnx import build_tiny_model


@pytest.fixture
def uvicorn_runs(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The servers `driftline serve` would run (none is started)."""
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append(kw))
    return calls


class NoService:
    """Stands in for the stages: `driftline run` must stop before it starts any."""

    def __init__(self, *args: Any) -> None:
        raise AssertionError("the stages were started")


@pytest.mark.parametrize("command", ["serve", "run"])
@pytest.mark.parametrize("port", ["0", "70000", "-1"])
def test_a_port_out_of_range_is_refused_naming_the_option(
        monkeypatch: pytest.MonkeyPatch, uvicorn_runs: list[dict[str, Any]], command: str,
        port: str) -> None:
    """70000 failed with an OverflowError traceback; 0 silently served on DRIFTLINE_API_PORT."""
    monkeypatch.setattr(runner, "Service", NoService)
    result = CliRunner().invoke(app, [command, "--port", port])
    assert result.exit_code == 2, result.output
    assert "Invalid value for '--port'" in result.output
    assert uvicorn_runs == []


def test_serve_uses_the_port_given_else_the_setting(
        monkeypatch: pytest.MonkeyPatch, uvicorn_runs: list[dict[str, Any]]) -> None:
    from driftline.service.app import serve

    monkeypatch.setenv("DRIFTLINE_API_PORT", "8123")
    assert CliRunner().invoke(app, ["serve", "--port", "65535"]).exit_code == 0
    assert CliRunner().invoke(app, ["serve"]).exit_code == 0
    serve(load_settings(api_port=8123), port=0)  # 0 is a port (any free one), not "unset"
    assert [call["port"] for call in uvicorn_runs] == [65535, 8123, 0]


@pytest.fixture
def no_activation(monkeypatch: pytest.MonkeyPatch) -> None:
    """No reference activated through the API (and no Redis asked): the configured one counts."""
    from driftline.service import references_store

    monkeypatch.setattr(references_store, "activation", lambda client: None)
    monkeypatch.setattr(runner, "ensure_topics", lambda *args, **kw: None)


@pytest.mark.usefixtures("no_activation")
@pytest.mark.parametrize(("made", "why"), [
    ("dir", "no manifest.json"), (None, "no such directory"),
    ("file", "a file, not a directory")])
def test_run_names_a_reference_dir_that_holds_no_reference(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, made: str | None, why: str) -> None:
    """It was an uncaught ReferenceError traceback not naming the setting; a path that is not
    there (a typo) or is a file says so, not only that no manifest was found."""
    ref = tmp_path / "ref"
    if made == "dir":
        ref.mkdir()
    elif made == "file":
        ref.write_text("{}")
    monkeypatch.setenv("DRIFTLINE_REFERENCE_DIR", str(ref))
    result = CliRunner().invoke(app, ["run", "book"])
    assert result.exit_code == 2, result.output
    assert result.output.splitlines()[-1] == (f"driftline: DRIFTLINE_REFERENCE_DIR: "
                                              f"{ref} is not a reference: {why}")


@pytest.mark.usefixtures("no_activation")
def test_run_names_an_unset_reference_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DRIFTLINE_REFERENCE_DIR", "")
    result = CliRunner().invoke(app, ["run", "detect"])
    assert result.exit_code == 2, result.output
    assert result.output.splitlines()[-1].startswith(
        "driftline: DRIFTLINE_REFERENCE_DIR is not set; build one")


@pytest.fixture
def built_with(tmp_path: Path) -> SimpleNamespace:
    """A reference (its manifest's model description) built with a tiny model."""
    model = build_tiny_model(tmp_path / "tiny.onnx")
    desc = Embedder(EmbedderConfig(model_path=model)).describe()
    return SimpleNamespace(reference_id="r", manifest={"embedding": {"model": desc}},
                           model_sha256=desc["model_sha256"])  # as Reference reads it


def wrong_model(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / "other.onnx"
    if kind == "another model":
        return build_tiny_model(path, seed=1)
    path.write_bytes(b"not a model")
    return path


@pytest.mark.usefixtures("no_activation")
@pytest.mark.parametrize("kind", ["missing", "not onnx", "another model"])
def test_run_names_a_model_the_reference_was_not_built_with(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, built_with: SimpleNamespace,
        kind: str) -> None:
    """A missing file raised FileNotFoundError, a wrong one failed in onnxruntime (e.g. "tensor
    'embedding' is not produced by any node") before the check that names the model expected."""
    monkeypatch.setattr(runner, "load_active_reference", lambda settings: built_with)
    model = tmp_path / "absent.onnx" if kind == "missing" else wrong_model(tmp_path, kind)
    monkeypatch.setenv("DRIFTLINE_MODEL_PATH", str(model))
    result = CliRunner().invoke(app, ["run", "embed"])
    assert result.exit_code == 2, result.output
    expected = built_with.manifest["embedding"]["model"]["model_sha256"][:12]
    line = result.output.splitlines()[-1]
    assert line.startswith(f"driftline: DRIFTLINE_MODEL_PATH: {model} ")
    assert line.endswith(f"the reference was built with tiny.onnx (sha256 {expected}…)")


def test_an_unset_model_path_names_the_demo_model_it_looked_for(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, built_with: SimpleNamespace) -> None:
    monkeypatch.delenv("DRIFTLINE_MODEL_PATH", raising=False)
    settings = load_settings(cache_dir=tmp_path / "cache")
    with pytest.raises(ConfigError, match=r"^DRIFTLINE_MODEL_PATH: not set, and the demo model "
                                          r".*mobilenet_v2_demo.onnx cannot be read"):
        runner.make_embedder(settings, built_with)  # type: ignore[arg-type]


def test_the_model_the_reference_was_built_with_is_used(
        tmp_path: Path, built_with: SimpleNamespace) -> None:
    embedder = runner.make_embedder(load_settings(model_path=tmp_path / "tiny.onnx"),
                                    built_with)  # type: ignore[arg-type]
    try:
        assert embedder.model_sha256 == built_with.manifest["embedding"]["model"]["model_sha256"]
    finally:
        embedder.close()


@pytest.mark.parametrize(("public_url", "warned"), [(None, True), ("https://dl.plant", False)])
def test_a_book_run_apart_warns_when_its_alert_links_are_guessed(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        public_url: str | None, warned: bool) -> None:
    """`run book --port 9101` with no DRIFTLINE_PUBLIC_URL linked every alert to its own probe
    port, which serves no API; the links now keep the API's configured address, and the
    start-up says they are a guess."""
    monkeypatch.delenv("DRIFTLINE_API_PORT", raising=False)
    monkeypatch.delenv("DRIFTLINE_PUBLIC_URL", raising=False)
    if public_url:
        monkeypatch.setenv("DRIFTLINE_PUBLIC_URL", public_url)
    seen: list[str] = []

    def start(service: runner.Service) -> None:
        seen.append(service.settings.public_url)
        raise ConfigError("stopped here")

    monkeypatch.setattr(runner.Service, "start", start)
    monkeypatch.setattr("driftline.cli.configure_logging", lambda *a, **k: None)
    with caplog.at_level(logging.WARNING, logger="driftline.cli"):
        result = CliRunner().invoke(app, ["run", "book", "--port", "9101"])
    assert result.exit_code == 2, result.output
    assert seen == [public_url or "http://127.0.0.1:8080"]
    lines = [r.getMessage() for r in caplog.records if r.name == "driftline.cli"]
    assert bool(lines) == warned
    assert not lines or lines[0].startswith("DRIFTLINE_PUBLIC_URL is not set")
