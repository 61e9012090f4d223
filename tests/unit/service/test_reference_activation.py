"""Activation refuses a reference the stages could not start on, and start-up falls back to
the configured reference when the activated one cannot be used after all."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from driftline import runner
from driftline.config import ConfigError, Settings, load_settings
from driftline.reference.artifact import MANIFEST, ReferenceError, file_sha256
from driftline.service import references_store as store
from driftline.service.app import create_app
from driftline.service.keys import ACTIVE_REFERENCE_KEY
from tests.unit.reference.synthetic import variant
from tests.unit.service.keyvalue import KeyValue
from tests.unit.service.populate import build_references

# what a build through an ONNX model records (Embedder.describe), minus the model's identity
PREPROCESSING = {"input_name": None, "input_size": [32, 32], "layout": "NCHW",
                 "color_order": "RGB", "scale": 1 / 255, "mean": [0.485, 0.456, 0.406],
                 "std": [0.229, 0.224, 0.225], "fit": "stretch", "output_name": None,
                 "pooling": "avg", "l2_normalize": True}


def with_model(sha256: str) -> Callable[[dict[str, Any]], None]:
    def edit(manifest: dict[str, Any]) -> None:
        manifest["embedding"]["model"] = {**PREPROCESSING, "model_sha256": sha256,
                                          "model_file": "model.onnx"}
    return edit


@pytest.fixture(scope="module")
def refs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("refs")
    a, b = build_references(root)
    model = root.parent / "model.onnx"
    model.write_bytes(b"not really a model, but a file with a sha256")
    sha = file_sha256(model)

    def format1_without_baselines(m: dict[str, Any]) -> None:
        m["format_version"] = 1
        m["reference_id"] = "f1f1f1f1f1f1f1f1"
        del m["baselines"]

    def other_dim(m: dict[str, Any]) -> None:
        m["embedding"]["input_dim"] += 1

    return {"a": a, "b": b, "model": model,
            "img": variant(a, root / "ref-img", with_model(sha)),
            "img2": variant(b, root / "ref-img2", with_model(sha)),
            "other_model": variant(a, root / "ref-other-model", with_model("f" * 64)),
            "f1": variant(a, root / "ref-f1", format1_without_baselines, rehash=False),
            "dim": variant(b, root / "ref-dim", other_dim)}


def settings_for(configured: Path, refs: dict[str, Path]) -> Settings:
    return load_settings(reference_dir=str(configured), model_path=str(refs["model"]))


def candidate(settings: Settings, path: Path) -> store.Candidate:
    return next(c for c in store.candidates(settings) if c.path == path.resolve())


def test_a_reference_of_the_configured_model_and_kind_is_activated(
        refs: dict[str, Path]) -> None:
    for configured, other in ((refs["a"], refs["b"]), (refs["img"], refs["img2"])):
        client = KeyValue()
        settings = settings_for(configured, refs)
        doc = store.activate(client, settings, candidate(settings, other), "adm")  # type: ignore[arg-type]
        assert json.loads(client.kv[ACTIVE_REFERENCE_KEY])["path"] == doc["path"] == str(
            other.resolve())


@pytest.mark.parametrize(("configured", "name", "why"), [
    ("img", "other_model", "configured model (DRIFTLINE_MODEL_PATH) has sha256 [0-9a-f]{64}: "
     "the embed workers refuse it at start-up. Set DRIFTLINE_MODEL_PATH to the model it was "
     "built with"),
    ("a", "img", "built from images through an ONNX model, but the stages now run on"),
    ("img", "a", "built from precomputed embeddings, but the stages now run on"),
    ("a", "dim", "its embeddings have dimension"),
    ("a", "f1", "KeyError: 'baselines'"),
])
def test_a_reference_the_stages_could_not_start_on_is_refused(
        refs: dict[str, Path], configured: str, name: str, why: str) -> None:
    """It was activated (200) and every embed worker then exited at start-up on the model's
    sha256, or every role on a KeyError of the manifest."""
    client = KeyValue()
    settings = settings_for(refs[configured], refs)
    with pytest.raises(ReferenceError, match=why.replace("(", r"\(").replace(")", r"\)")):
        store.activate(client, settings, candidate(settings, refs[name]), "adm")  # type: ignore[arg-type]
    assert ACTIVE_REFERENCE_KEY not in client.kv


@pytest.mark.parametrize("name", ["other_model", "f1"])
def test_start_up_falls_back_to_the_configured_reference_loudly(
        refs: dict[str, Path], name: str, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """An activation recorded before these checks (or a model changed since) left every worker
    unable to start: a ConfigError on the model, a bare KeyError on the manifest."""
    client = KeyValue()
    path = refs[name].resolve()
    client.set(ACTIVE_REFERENCE_KEY, json.dumps({"reference_id": json.loads(
        (path / MANIFEST).read_text())["reference_id"], "path": str(path)}))
    monkeypatch.setattr(runner, "store_client", lambda url, **kw: client)
    with caplog.at_level(logging.ERROR):
        ref = runner.load_active_reference(settings_for(refs["img"], refs))
    assert ref.path == refs["img"].resolve()
    assert f"THE REFERENCE ACTIVATED THROUGH THE API ({path}) CANNOT BE USED" in caplog.text


def test_a_usable_activated_reference_is_loaded_and_a_broken_configured_one_stops(
        refs: dict[str, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    client = KeyValue()
    monkeypatch.setattr(runner, "store_client", lambda url, **kw: client)
    settings = settings_for(refs["img"], refs)
    store.activate(client, settings, candidate(settings, refs["img2"]), "adm")  # type: ignore[arg-type]
    assert runner.load_active_reference(settings).path == refs["img2"].resolve()
    with pytest.raises(ConfigError, match="DRIFTLINE_REFERENCE_DIR"):
        runner.load_active_reference(settings_for(tmp_path / "missing", refs))


def test_the_api_says_what_a_refused_activation_means() -> None:
    """The activation's 409 read "the incident's lifecycle does not allow this step"."""
    app = create_app(CollectorRegistry(), None, load_settings(), redis_client=KeyValue())  # type: ignore[arg-type]
    paths = app.openapi()["paths"]
    why = paths["/api/v1/references/{reference_id}/activate"]["post"]["responses"]["409"]
    assert "lifecycle" not in why["description"] and "model" in why["description"]
    incident = next(op["responses"]["409"]["description"] for path, ops in paths.items()
                    if "/incidents/" in path for op in ops.values() if "409" in op["responses"])
    assert "lifecycle" in incident


def test_the_api_asks_again_which_reference_is_active_once_redis_answers(
        refs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Redis down when the API first needs its reference: it serves the configured one and
    asks again later, not for the rest of its life (the stages would run the activated one)."""
    import redis as redis_lib

    from driftline.service import context as context_module
    from driftline.service.context import ServiceContext

    class Flaky(KeyValue):
        down = True

        def get(self, key: str) -> bytes | None:
            if self.down:
                raise redis_lib.ConnectionError("Redis is restarting")
            return super().get(key)

    settings = settings_for(refs["a"], refs)
    client = Flaky()
    client.down = False
    store.activate(client, settings, candidate(settings, refs["b"]), "adm")  # type: ignore[arg-type]
    client.down = True
    ctx = ServiceContext(settings=settings, redis=client, book=None, tokens=[])  # type: ignore[arg-type]
    first = ctx.reference()
    assert first is not None and first.reference_id == json.loads(
        (refs["a"] / MANIFEST).read_text())["reference_id"]
    client.down = False
    assert ctx.reference() is first  # not asked again before REFERENCE_RETRY_S
    monkeypatch.setattr(context_module, "REFERENCE_RETRY_S", 0.0)
    ctx._reference_retry_at = 0.0
    now = ctx.reference()
    assert now is not None and now.reference_id == json.loads(
        (refs["b"] / MANIFEST).read_text())["reference_id"]
    assert ctx.reference() is now
