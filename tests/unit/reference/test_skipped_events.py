"""Skipped reference events are counted per reason, the first of each with its event and why:
40 unreadable images were reported as ``{'image_undecodable': 40}``, no path, no reason."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from driftline.consumers.embedder import Embedder
from driftline.reference import ReferenceError, build_reference, load_reference
from driftline.reference.cli import app
from driftline.schema import Event
from tests.unit.consumers.tiny_onnx import build_tiny_model
from tests.unit.reference.synthetic import DIM, event, image_manifest, reference_events

runner = CliRunner(env={"COLUMNS": "400"})  # a wide error box: messages on one line


def _unreadable(i: int) -> str:
    return json.dumps({"event_id": f"gone{i}", "ts": "2026-01-01T00:01:00Z", "station": "s1",
                       "shift": "day", "lot": "l1", "image_uri": f"file:///nonexistent/x{i}.jpg"})


def test_the_summary_and_show_give_the_first_of_each_reason(tmp_path: Path) -> None:
    manifest = image_manifest(tmp_path / "ref.jsonl")
    with manifest.open("a") as fh:
        fh.write("".join(_unreadable(i) + "\n" for i in range(3)))
    model = build_tiny_model(tmp_path / "m.onnx")
    result = runner.invoke(app, ["build", "--manifest", str(manifest), "--out",
                                 str(tmp_path / "ref"), "--model", str(model), "--k", "2",
                                 "--min-count", "10"])
    assert result.exit_code == 0, result.output
    said = ("skipped 3 image_undecodable, the first: event gone0 (line 41): cannot read "
            "/nonexistent/x0.jpg: No such file or directory")
    assert said in result.output
    assert said in runner.invoke(app, ["show", str(tmp_path / "ref")]).output


def test_no_usable_event_says_why(tmp_path: Path) -> None:
    manifest = tmp_path / "ref.jsonl"
    manifest.write_text("".join(_unreadable(i) + "\n" for i in range(40)))
    result = runner.invoke(app, ["build", "--manifest", str(manifest), "--out",
                                 str(tmp_path / "ref"), "--model",
                                 str(build_tiny_model(tmp_path / "m.onnx"))])
    assert result.exit_code == 2, result.output
    assert ("0 usable reference events; need at least 10 for K=2 (skipped: image_undecodable 40 "
            "(first: event gone0 (line 1): cannot read /nonexistent/x0.jpg: No such file or "
            "directory))"
            ) in result.output


def test_the_manifest_keeps_the_first_skipped_event_of_each_reason(tmp_path: Path) -> None:
    events, _ = reference_events()
    events = [*events[:100], events[3], event(500, np.ones(DIM + 1), "s1", "day"), events[7]]
    ref = build_reference(events, None, tmp_path / "r", k=2)
    source = ref.manifest["source"]
    assert source["skipped"] == {"duplicate_event_id": 2, "embedding_dim": 1}
    assert source["first_skipped"] == {
        "duplicate_event_id": "event e3: an earlier event has its id",
        "embedding_dim": f"event e500: {DIM + 1} dimensions where 100 of the 101 events have "
                         f"{DIM}"}
    with pytest.raises(ReferenceError, match=r"skipped: duplicate_event_id 1 \(first: event e0"):
        build_reference([events[0], events[0]], None, tmp_path / "few", k=2)


def test_an_image_the_model_embeds_as_nan_or_inf_is_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model that overflows on some images (a float16 export) gave faiss's k-means NaN rows:
    the build stopped with faiss's traceback once the whole manifest was embedded. Such an
    event is skipped as the embed stage dead-letters it, ``embedding_not_finite``."""
    real = Embedder.embed_images

    def overflowing(self: Embedder, sources: Any, prefetched: Any = None) -> Any:
        emb, errors = real(self, sources, prefetched)
        emb[3], emb[5, 0] = np.nan, np.inf
        return emb, errors

    monkeypatch.setattr(Embedder, "embed_images", overflowing)
    out = tmp_path / "ref"
    result = runner.invoke(app, ["build", "--manifest", str(image_manifest(tmp_path / "m.jsonl")),
                                 "--out", str(out), "--model",
                                 str(build_tiny_model(tmp_path / "m.onnx")), "--k", "2",
                                 "--min-count", "10"])
    assert result.exit_code == 0, result.output
    assert ("skipped 2 embedding_not_finite, the first: event e3 (line 4): the model's "
            "embedding of this image holds NaN or infinite values") in result.output
    ref = load_reference(out)
    assert ref.manifest["source"]["events"] == 38
    assert np.isfinite(np.load(out / "embeddings.npy")).all()


def test_a_late_label_for_an_event_the_manifest_lacks_is_counted(tmp_path: Path) -> None:
    """Late labels whose ids match no event (a typo, a prefix another export adds) vanished:
    the reference said '0 labelled' with no word of the labels it had been given."""
    events, _ = reference_events()
    events = [e.model_copy(update={"label": None, "loss": None}) for e in events[:100]]

    def late(event_id: str) -> Event:
        return Event.model_validate({"event_id": event_id, "ts": "2026-01-05T06:00:00Z",
                                     "station": "s1", "shift": "day", "lot": "l",
                                     "label": "ok"})

    ref = build_reference([late("img-e1"), *events, late("e2"), late("img-e3"), late("img-e1")],
                          None, tmp_path / "r", k=2)
    source = ref.manifest["source"]
    assert source["skipped"] == {"unknown_event": 2}
    assert source["first_skipped"] == {"unknown_event": "event img-e1: a label or loss for an "
                                       "event id that no event of the manifest has"}
    assert ref.manifest["performance"]["labelled"] == 1  # e2's


def test_a_file_that_is_no_image_gives_the_same_reference_id_every_build(tmp_path: Path) -> None:
    """Pillow's message for bytes of no known format names the BytesIO's address
    ('cannot identify image file <_io.BytesIO object at 0x7f…>'): kept in source.first_skipped,
    which the content id covers, it gave the same build a new reference_id each run."""
    manifest = image_manifest(tmp_path / "ref.jsonl")
    (tmp_path / "notes.jpg").write_text("not a picture")
    with manifest.open("a") as fh:
        fh.write(json.dumps({"event_id": "notes", "ts": "2026-01-01T00:01:00Z", "station": "s1",
                             "shift": "day", "lot": "l1",
                             "image_uri": (tmp_path / "notes.jpg").as_uri()}) + "\n")
    model = build_tiny_model(tmp_path / "m.onnx")
    ids = []
    for out in ("a", "b"):
        result = runner.invoke(app, ["build", "--manifest", str(manifest), "--out",
                                     str(tmp_path / out), "--model", str(model), "--k", "2",
                                     "--min-count", "10"])
        assert result.exit_code == 0, result.output
        assert ("skipped 1 image_undecodable, the first: event notes (line 41): not an image of "
                "a format read here (JPEG, PNG, BMP, TIFF, WEBP)") in result.output
        ids.append(load_reference(tmp_path / out).reference_id)
    assert ids[0] == ids[1]


def test_the_most_common_embedding_dimension_is_kept_not_the_first(tmp_path: Path) -> None:
    """A first row of an odd dimension made the other 99 the odd ones: the build went on
    with 1 event, or said '1 usable reference events'."""
    events, _ = reference_events()
    odd = event(500, np.ones(5), "s1", "day")
    manifest = tmp_path / "ref.jsonl"
    manifest.write_text("\n".join(e.model_dump_json() for e in [odd, *events[:99]]) + "\n")
    result = runner.invoke(app, ["build", "--manifest", str(manifest), "--out",
                                 str(tmp_path / "ref"), "--k", "2", "--min-count", "10"])
    assert result.exit_code == 0, result.output
    assert ("skipped 1 embedding_dim, the first: event e500 (line 1): 5 dimensions where 99 of "
            f"the 100 events have {DIM}") in result.output
    assert load_reference(tmp_path / "ref").manifest["source"]["events"] == 99


def test_embedding_dimensions_without_a_most_common_one_are_refused(tmp_path: Path) -> None:
    events, _ = reference_events()
    mixed = [*events[:30], *(event(500 + i, np.ones(5), "s1", "day") for i in range(30)),
             event(600, np.ones(3), "s1", "day")]
    with pytest.raises(ReferenceError, match=r"no most common dimension \(30 of dimension 5, "
                       rf"30 of dimension {DIM}, 1 of dimension 3\)"):
        build_reference(mixed, None, tmp_path / "r", k=2)
