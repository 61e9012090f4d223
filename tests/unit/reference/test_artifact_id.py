"""``reference_id`` names the whole reference, and a manifest edited after the build is refused."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from driftline.reference import ReferenceError, build_reference, load_reference
from driftline.reference.artifact import content_id
from tests.unit.reference.synthetic import reference_events


@pytest.fixture(scope="module")
def refs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Siblings built from the same events: same arrays, different baselines or thresholds."""
    events, _ = reference_events()
    root = tmp_path_factory.mktemp("refs")
    for name, kw in {"q99": {}, "q90": {"quantile": 0.90}, "min50": {"min_count": 50},
                     "alpha5": {"alpha": 5.0}, "q99-again": {}}.items():
        build_reference(events, None, root / name, k=6, **kw)
    return root


def _manifest(path: Path) -> dict:  # type: ignore[type-arg]
    return json.loads((path / "manifest.json").read_text())


def test_id_covers_baselines_and_thresholds_not_the_build_time(refs: Path) -> None:
    ids = {p.name: load_reference(p).reference_id for p in sorted(refs.iterdir())}
    assert len({ids["q99"], ids["q90"], ids["min50"], ids["alpha5"]}) == 4, ids
    assert ids["q99-again"] == ids["q99"]  # a rebuild of the same content is the same reference
    for name in ("q99", "q90"):  # identical arrays: only the manifest tells them apart
        arrays = _manifest(refs / name)["arrays"]
        assert arrays["embeddings"]["sha256"] == _manifest(refs / "q99")["arrays"][
            "embeddings"]["sha256"]
    doc = _manifest(refs / "q99")
    doc["created_at"] = "1999-01-01T00:00:00Z"
    assert content_id(doc) == ids["q99"]


def test_the_api_finds_the_reference_it_was_asked_for(refs: Path) -> None:
    from driftline.config import load_settings
    from driftline.service import references_store as store

    settings = load_settings(reference_dir=refs / "q99")
    for name in ("q90", "min50", "alpha5"):
        found = store.find(settings, load_reference(refs / name).reference_id)
        assert found is not None and found.path.name == name


@pytest.mark.parametrize("edit", ["threshold", "rate", "p", "min_count", "array_hash"])
def test_edited_manifest_is_refused(refs: Path, tmp_path: Path, edit: str) -> None:
    copy = tmp_path / "ref"
    shutil.copytree(refs / "q99", copy)
    doc = _manifest(copy)
    glob = doc["baselines"]["items"]["global"]
    if edit == "threshold":
        glob["ood_threshold"] *= 1.5
    elif edit == "rate":
        glob["ood_rate"] = 0.001
    elif edit == "p":
        glob["p"] = [1 / 6] * 6
    elif edit == "min_count":
        doc["baselines"]["min_count"] = 1
    else:  # an array and its recorded hash replaced together
        doc["arrays"]["distances"]["sha256"] = "0" * 64
    (copy / "manifest.json").write_text(json.dumps(doc, indent=2))
    with pytest.raises(ReferenceError, match=rf"{copy}/manifest.json was modified after the "
                                             r"build: its content hashes to \w{16}, not to its "
                                             rf"reference_id '{doc['reference_id']}'"):
        load_reference(copy)


def test_created_at_may_change(refs: Path, tmp_path: Path) -> None:
    copy = tmp_path / "ref"
    shutil.copytree(refs / "q99", copy)
    doc = _manifest(copy)
    doc["created_at"] = "2030-01-01T00:00:00Z"
    (copy / "manifest.json").write_text(json.dumps(doc))
    assert load_reference(copy).reference_id == doc["reference_id"]


def test_format_1_is_still_read_with_a_warning(refs: Path, tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    """Artifacts written before the id covered the manifest: arrays checked, manifest not."""
    copy = tmp_path / "old"
    shutil.copytree(refs / "q99", copy)
    doc = _manifest(copy)
    doc["format_version"], doc["reference_id"] = 1, "d08fbd15c529ead7"
    (copy / "manifest.json").write_text(json.dumps(doc))
    with caplog.at_level(logging.WARNING, logger="driftline.reference.artifact"):
        ref = load_reference(copy)
    assert ref.reference_id == "d08fbd15c529ead7"
    assert "format 1" in caplog.text and "rebuild" in caplog.text
