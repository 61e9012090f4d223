"""``GET /api/v1/references/{id}`` on a manifest whose cluster entries are not what a build
writes: 409 naming the file and the field, as activation answers an unusable reference (it
answered 500); the listing still shows the reference, and activation names the field too."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from driftline.reference.artifact import MANIFEST
from driftline.service.app import create_app
from tests.unit.reference.synthetic import variant
from tests.unit.service.admin import AUTH, admin_settings
from tests.unit.service.admin import reference_id as rid
from tests.unit.service.keyvalue import KeyValue
from tests.unit.service.populate import build_references


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("refs")
    a, b = build_references(root)
    variant(b, root / "ref-rehashed",
            lambda d: d["clusters"]["items"][2].update(size="many"))
    # ref-b itself edited by hand (its id no longer its content's): the listing reads
    # manifests, not arrays or hashes
    doc = json.loads((b / MANIFEST).read_text())
    del doc["clusters"]["items"][1]["id"]
    (b / MANIFEST).write_text(json.dumps(doc))
    return root


@pytest.fixture
def client(root: Path) -> TestClient:
    return TestClient(create_app(CollectorRegistry(), None, admin_settings(root),
                                 redis_client=KeyValue()),  # type: ignore[arg-type]
                      raise_server_exceptions=False)


@pytest.mark.parametrize(("name", "field"), [
    ("ref-rehashed", "clusters.items[2].size: 'many' is not an integer"),
    ("ref-b", "clusters.items[1].id: missing"),
])
def test_the_detail_names_the_file_and_the_field(root: Path, client: TestClient, name: str,
                                                 field: str) -> None:
    path = (root / name).resolve()
    got = client.get(f"/api/v1/references/{rid(path)}", headers=AUTH)
    assert got.status_code == 409, got.text
    assert got.json() == {"detail": f"reference {rid(path)} cannot be shown: "
                                    f"{path / MANIFEST}: {field}"}
    rows: list[dict[str, Any]] = client.get("/api/v1/references", headers=AUTH).json()
    assert name in [r["name"] for r in rows]


def test_activation_names_the_field(root: Path, client: TestClient) -> None:
    path = (root / "ref-rehashed").resolve()
    got = client.post(f"/api/v1/references/{rid(path)}/activate", headers=AUTH)
    assert got.status_code == 409
    assert got.json()["detail"] == (
        f"reference {rid(path)} cannot be activated: {path / MANIFEST}: "
        "clusters.items[2].size: 'many' is not an integer")


def test_the_api_says_what_a_refused_detail_means(client: TestClient) -> None:
    why = client.app.openapi()["paths"]["/api/v1/references/{reference_id}"]["get"]  # type: ignore[attr-defined]
    assert "names the file and the field" in why["responses"]["409"]["description"]
