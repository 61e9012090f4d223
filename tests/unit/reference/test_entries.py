"""``driftline reference show`` on a manifest whose cluster entries are not what a build
writes: one line naming the file and the field, exit 2 — it was a bare KeyError traceback
(a missing ``size`` or ``id``), or a table printing ``size`` "many"."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from driftline.reference import build_reference
from driftline.reference.artifact import MANIFEST
from driftline.reference.cli import app
from driftline.reference.entries import EntryError, check_clusters
from tests.unit.reference.synthetic import reference_events, variant

runner = CliRunner(env={"COLUMNS": "400"})


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    events, _ = reference_events()
    out = tmp_path_factory.mktemp("refs") / "ref"
    build_reference(events, None, out, k=6, min_count=100)
    return out


def format1(edit: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    """``edit`` in a format-1 artifact, whose id does not cover its manifest."""
    def both(doc: dict[str, Any]) -> None:
        edit(doc)
        doc["format_version"] = 1
    return both


def cluster(n: int, **fields: Any) -> Callable[[dict[str, Any]], None]:
    """An edit of cluster ``n``'s entry: each field set to its value, or removed if None."""
    def edit(doc: dict[str, Any]) -> None:
        item = doc["clusters"]["items"][n]
        for k, v in fields.items():
            if v is None:
                del item[k]
            else:
                item[k] = v
    return edit


def test_a_built_manifest_passes(built: Path) -> None:
    check_clusters(json.loads((built / MANIFEST).read_text()))
    with pytest.raises(EntryError, match=r"^clusters: null, not an object$"):
        check_clusters({})


@pytest.mark.parametrize(("edit", "field"), [
    (cluster(2, size=None), "clusters.items[2].size: missing"),
    (format1(cluster(2, size="many")), "clusters.items[2].size: 'many' is not an integer"),
    (cluster(4, id=None), "clusters.items[4].id: missing"),
    (format1(cluster(1, id=3)), "clusters.items[1].id: 3, not its position 1"),
    (cluster(0, share=True), "clusters.items[0].share: True is not a number"),
    (format1(cluster(5, lift=[{"field": "station"}])),
     "clusters.items[5].lift[0].value: missing"),
    (cluster(3, performance={"cluster": 3}), "clusters.items[3].performance.labelled: missing"),
    (format1(cluster(0, exemplars=[7])),
     "clusters.items[0].exemplars[0]: a number, not an event id"),
    (lambda d: d["clusters"]["items"].__setitem__(1, "cluster one"),
     "clusters.items[1]: a string, not an object"),
    (format1(lambda d: d["clusters"]["items"].pop()), "clusters.items: 5 entries for k=6"),
])
def test_show_names_the_file_and_the_field(built: Path, tmp_path: Path,
                                           edit: Callable[[dict[str, Any]], None],
                                           field: str) -> None:
    ref = variant(built, tmp_path / "ref", edit)
    shown = runner.invoke(app, ["show", str(ref)])
    assert shown.exit_code == 2, shown.output
    assert shown.output == f"driftline reference show: {ref / MANIFEST}: {field}\n"


def test_other_sections_a_build_writes_otherwise_are_named_without_a_traceback(
        built: Path, tmp_path: Path) -> None:
    ref = variant(built, tmp_path / "ref", format1(lambda d: d["ood"].pop("quantile")))
    shown = runner.invoke(app, ["show", str(ref)])
    assert shown.exit_code == 2, shown.output
    assert shown.output == (f"driftline reference show: {ref / MANIFEST}: not what a build "
                            "writes (KeyError: 'quantile')\n")
