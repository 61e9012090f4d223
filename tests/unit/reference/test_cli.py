from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from driftline.reference.cli import app
from tests.unit.consumers.tiny_onnx import build_tiny_model
from tests.unit.reference.synthetic import reference_events

runner = CliRunner(env={"COLUMNS": "400"})  # a wide error box: messages on one line


def test_build_and_show(tmp_path: Path) -> None:
    events, _ = reference_events()
    manifest = tmp_path / "ref.jsonl"
    manifest.write_text("\n".join(e.model_dump_json() for e in events) + "\n")
    out = tmp_path / "ref"
    result = runner.invoke(app, ["build", "--manifest", str(manifest), "--out", str(out),
                                 "--k", "6", "--min-count", "100"])
    assert result.exit_code == 0, result.output
    assert "wrote reference" in result.output
    shown = runner.invoke(app, ["show", str(out)])
    assert shown.exit_code == 0, shown.output
    text = shown.output
    assert "clusters: K=6 (given)" in text and "AGGRESSOR" in text
    assert "station=s1|shift=night" in text and "precomputed embeddings" in text
    assert "station=s2 ×" in text
    again = runner.invoke(app, ["build", "--manifest", str(manifest), "--out", str(out)])
    assert again.exit_code == 2 and "not empty" in again.output


def test_bad_manifest_line_and_bad_reference(tmp_path: Path) -> None:
    events, _ = reference_events()
    manifest = tmp_path / "ref.jsonl"
    manifest.write_text(events[0].model_dump_json() + "\n" + '{"event_id": "x"}\n')
    result = runner.invoke(app, ["build", "--manifest", str(manifest), "--out",
                                 str(tmp_path / "o")])
    assert result.exit_code == 2 and "ref.jsonl:2" in result.output
    shown = runner.invoke(app, ["show", str(tmp_path)])
    assert shown.exit_code == 2 and "no manifest.json" in shown.output


def test_layers(tmp_path: Path) -> None:
    model = build_tiny_model(tmp_path / "tiny.onnx")
    result = runner.invoke(app, ["layers", str(model)])
    assert result.exit_code == 0
    assert "features.1\t['N', 8, 16, 16]" in result.output



def _lines(n: int = 200) -> list[str]:
    return [e.model_dump_json() for e in reference_events()[0][:n]]


def test_a_manifest_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    bom = tmp_path / "bom.jsonl"  # as Windows editors save UTF-8
    bom.write_bytes(b"\xef\xbb\xbf" + "\n".join(_lines()).encode() + b"\n")
    result = runner.invoke(app, ["build", "--manifest", str(bom), "--out", str(tmp_path / "a"),
                                 "--k", "2", "--min-count", "50"])
    assert result.exit_code == 0, result.output


def test_a_binary_manifest_is_named_with_its_line(tmp_path: Path) -> None:
    binary = tmp_path / "ref.jsonl"
    binary.write_bytes("\n".join(_lines(2)).encode() + b"\n\xff\xd8\xff\xe0 JFIF\n")
    result = runner.invoke(app, ["build", "--manifest", str(binary), "--out",
                                 str(tmp_path / "b")])
    assert result.exit_code == 2, result.output
    assert f"{binary}:3: not UTF-8 text (byte 0xff at column 1)" in result.output


def test_a_directory_is_no_manifest(tmp_path: Path) -> None:
    result = runner.invoke(app, ["build", "--manifest", str(tmp_path), "--out",
                                 str(tmp_path / "c")])
    assert result.exit_code == 2 and "'--manifest'" in result.output, result.output
    assert "is a directory" in result.output


@pytest.mark.parametrize("text", ["", "\n  \n\t\n"], ids=["empty", "blank"])
def test_a_manifest_without_events_says_so(tmp_path: Path, text: str) -> None:
    """Not '0 usable reference events; need at least 10 for K=2 (skipped: none)'."""
    manifest = tmp_path / "ref.jsonl"
    manifest.write_text(text)
    result = runner.invoke(app, ["build", "--manifest", str(manifest), "--out",
                                 str(tmp_path / "o")])
    assert result.exit_code == 2, result.output
    assert (f"driftline reference build: the manifest {manifest} holds no events (it is empty "
            "or its lines are blank)") in result.output


@pytest.mark.parametrize(("line", "said"), [
    ("{not json", "Invalid JSON: key must be a string at column 2"),
    ('{"event_id": "x"', "Invalid JSON: EOF while parsing an object at column 16"),
    ("[1, 2]", "Input should be an object"),
    ('{"event_id": "x", "ts": "2026-01-01T00:00:00Z", "station": "s", "shift": "d", '
     '"lot": "l", "embedding": [1e39]}',
     "embedding: must contain only finite numbers of at most 3.403e+38 in magnitude"),
    ('{"event_id": "x", "ts": "2026-01-01T00:00:00Z", "station": "s", "shift": "d", '
     '"lot": "l", "embedding": [1.0], "image": "AA=="}',
     "payload_conflict: exactly one of image/image_uri/embedding, got image, embedding"),
], ids=["json", "eof", "array", "field", "event"])
def test_a_bad_manifest_line_says_why_in_its_own_terms(
    tmp_path: Path, line: str, said: str
) -> None:
    """Not 'ref.jsonl:3: event: Invalid JSON: ... at line 1 column 2' (every manifest line is
    line 1 of its JSON document; 'event' named no field) nor pydantic's 'Value error, '."""
    manifest = tmp_path / "ref.jsonl"
    manifest.write_text("\n".join([*_lines(2), line]) + "\n")
    result = runner.invoke(app, ["build", "--manifest", str(manifest), "--out",
                                 str(tmp_path / "o")])
    assert result.exit_code == 2, result.output
    assert f"driftline reference build: {manifest}:3: {said}" in result.output
