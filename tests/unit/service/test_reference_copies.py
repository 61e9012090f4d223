"""Two directories holding one reference id (a backup copy that sorts first): activation and
start-up use the directory asked for and recorded, not the first by name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from driftline import runner
from driftline.service.app import create_app
from driftline.service.keys import ACTIVE_REFERENCE_KEY
from tests.unit.service.admin import AUTH, admin_settings, reference_id
from tests.unit.service.keyvalue import KeyValue
from tests.unit.service.populate import build_references


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("refs")
    _, b = build_references(root)
    shutil.copytree(b, root / "ref-a0-bak")
    return root


def test_activation_asks_which_copy_and_records_the_one_named(root: Path) -> None:
    """The backup, sorting first, was recorded (and started on) when ref-b was meant."""
    settings, redis = admin_settings(root), KeyValue()
    client = TestClient(create_app(CollectorRegistry(), None, settings,
                                   redis_client=redis))  # type: ignore[arg-type]
    rid = reference_id(root / "ref-b")
    ambiguous = client.post(f"/api/v1/references/{rid}/activate", headers=AUTH)
    assert ambiguous.status_code == 409
    assert "ref-a0-bak, ref-b" in ambiguous.json()["detail"]
    done = client.post(f"/api/v1/references/{rid}/activate", headers=AUTH,
                       json={"name": "ref-b"})
    assert done.status_code == 200 and done.json()["path"] == str((root / "ref-b").resolve())
    rows = client.get("/api/v1/references", headers=AUTH).json()
    assert [r["name"] for r in rows if r["activated"]] == ["ref-b"]
    assert client.get(f"/api/v1/references/{rid}", headers=AUTH).json()["name"] == "ref-b"
    again = client.post(f"/api/v1/references/{rid}/activate", headers=AUTH)
    assert again.status_code == 200 and again.json()["path"] == done.json()["path"]


def test_start_up_uses_the_recorded_copy(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings, redis = admin_settings(root), KeyValue()
    monkeypatch.setattr(runner, "store_client", lambda url, **kw: redis)
    b = (root / "ref-b").resolve()
    redis.set(ACTIVE_REFERENCE_KEY, json.dumps({"reference_id": reference_id(b), "path": str(b)}))
    assert runner.load_active_reference(settings).path == (root / "ref-b").resolve()
