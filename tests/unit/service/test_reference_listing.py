"""Another tool's ``manifest.json`` beside the references is skipped, not served (it made
``GET /api/v1/references`` answer 500 for every reference)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from driftline.config import load_settings
from driftline.reference.artifact import FORMAT, MANIFEST
from driftline.service import references_store as store
from driftline.service.app import create_app
from tests.unit.service.keyvalue import KeyValue
from tests.unit.service.populate import build_references

JUNK: dict[str, Any] = {
    "notes": {"reference_id": "abc", "clusters": ["x"]},
    "counts": {"reference_id": "abd", "source": {"events": "many"}},
    "show": {"reference_id": "abe", "clusters": {"items": [{"size": 1}]}},
    "marked": {"format": FORMAT, "format_version": 2, "reference_id": "abf",
               "source": {"events": "many"}},
    "no-id": {"format": FORMAT, "format_version": 2},
    "a-list": [1, 2],
}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("refs")
    build_references(root)
    for name, doc in JUNK.items():
        (root / f"zz-{name}").mkdir()
        (root / f"zz-{name}" / MANIFEST).write_text(json.dumps(doc))
    (root / "zz-broken").mkdir()
    (root / "zz-broken" / MANIFEST).write_text("{not json")
    (root / "zz-empty").mkdir()
    return root


def test_the_listing_skips_what_is_not_a_reference(root: Path) -> None:
    settings = load_settings(reference_dir=str(root / "ref-a"))
    client = TestClient(create_app(CollectorRegistry(), None, settings,
                                   redis_client=KeyValue()))  # type: ignore[arg-type]
    listed = client.get("/api/v1/references")
    assert listed.status_code == 200
    assert [r["name"] for r in listed.json()] == ["ref-a", "ref-b"]
    for rid in ("abc", "abd", "abe", "abf"):
        assert client.get(f"/api/v1/references/{rid}").status_code == 404


def test_each_skipped_manifest_is_warned_about_once(root: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    settings = load_settings(reference_dir=str(root / "ref-b"))
    store._SKIPPED.clear()
    with caplog.at_level(logging.WARNING, logger=store.__name__):
        store.candidates(settings)
        store.candidates(settings)
    skipped = [r.getMessage() for r in caplog.records if "is skipped" in r.getMessage()]
    assert len(skipped) == len(JUNK) + 1  # zz-broken too; zz-empty holds no manifest
    assert any("zz-marked" in m and "events" in m for m in skipped)
