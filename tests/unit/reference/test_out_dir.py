"""``--out`` / ``out_dir``: checked before anything is embedded; ``--overwrite`` replaces a
reference and nothing else."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from driftline.reference import ReferenceError, build_reference, load_reference
from driftline.reference import build as build_module
from driftline.reference.cli import app
from tests.unit.reference.synthetic import events_manifest, reference_events

runner = CliRunner(env={"COLUMNS": "400"})  # a wide error box: messages on one line


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return events_manifest(tmp_path_factory.mktemp("manifest"))


def _build(manifest: Path, out: Path | str, *flags: str) -> tuple[int, str]:
    result = runner.invoke(app, ["build", "--manifest", str(manifest), "--out", str(out),
                                 "--k", "2", "--min-count", "50", *flags])
    return result.exit_code, result.output


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_overwrite_replaces_a_reference(manifest: Path, tmp_path: Path) -> None:
    out = tmp_path / "ref"
    assert _build(manifest, out)[0] == 0
    first = load_reference(out).reference_id
    code, output = _build(manifest, out, "--alpha", "2")
    assert code == 2 and "'--out'" in output and "pass --overwrite" in output, output
    code, output = _build(manifest, out, "--alpha", "2", "--overwrite")
    assert code == 0, output
    assert load_reference(out).reference_id != first
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no leftovers


def test_overwrite_refuses_a_directory_that_is_not_only_a_reference(
    manifest: Path, tmp_path: Path
) -> None:
    user = tmp_path / "work"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    code, output = _build(manifest, user, "--overwrite")
    assert code == 2 and "'--out'" in output and "is not a reference" in output, output
    ref = tmp_path / "ref"
    assert _build(manifest, ref)[0] == 0
    (ref / "README").write_text("mine")
    before = _tree(tmp_path)
    code, output = _build(manifest, ref, "--overwrite")
    assert code == 2 and "also README" in output, output
    assert _tree(tmp_path) == before


def test_the_working_directory_and_the_manifests_are_never_out(
    manifest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run from the manifest's folder, ``--out . --overwrite`` deleted the manifest."""
    here = tmp_path / "here"
    here.mkdir()
    copy = here / "ref.jsonl"
    copy.write_bytes(manifest.read_bytes())
    (here / "other.txt").write_text("x")
    before = _tree(tmp_path)
    monkeypatch.chdir(here)
    for out in (".", "./", str(here), str(tmp_path)):
        code, output = _build(copy, out, "--overwrite")
        assert code == 2 and "working directory" in output, (out, output)
    monkeypatch.chdir(tmp_path)
    code, output = _build(copy, here, "--overwrite")
    assert code == 2 and f"holds {copy}" in output, output
    assert _tree(tmp_path) == before


def test_a_file_in_the_way_is_named_before_embedding(
    manifest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def embed(*args: object, **kwargs: object) -> None:
        raise AssertionError("embedded before --out was checked")

    monkeypatch.setattr(build_module, "collect", embed)
    afile = tmp_path / "afile"
    afile.write_text("abc")
    code, output = _build(manifest, afile, "--overwrite")
    assert code == 2 and "'--out'" in output and "is not a directory" in output, output
    code, output = _build(manifest, afile / "sub")
    assert code == 2 and f"{afile} is not a directory" in output, output
    assert afile.read_text() == "abc"
    events, _ = reference_events()
    with pytest.raises(ReferenceError, match="is not a directory"):
        build_reference(events, None, afile / "sub")


def test_the_library_refuses_to_overwrite_what_is_not_a_reference(tmp_path: Path) -> None:
    events, _ = reference_events()
    (tmp_path / "data.csv").write_text("1,2\n")
    with pytest.raises(ReferenceError, match="is not a reference"):
        build_reference(events[:200], None, tmp_path, k=2, overwrite=True)
    assert (tmp_path / "data.csv").read_text() == "1,2\n"


def test_help_says_what_overwrite_replaces() -> None:
    result = runner.invoke(app, ["build", "--help"])
    assert "only a directory holding a reference" in result.output


def _no_space(*args: object, **kwargs: object) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _read_only(*args: object, **kwargs: object) -> None:
    raise PermissionError(errno.EROFS, os.strerror(errno.EROFS), "/refs/.ref.x")


@pytest.mark.parametrize(("target", "fault", "said"), [
    (np, "save", "No space left on device"),  # the disk fills while the arrays are written
    (tempfile, "mkdtemp", "Read-only file system (/refs/.ref.x)"),  # a read-only mount
])
def test_a_write_that_fails_is_one_line_naming_out_and_keeps_the_old_reference(
    manifest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, target: object,
    fault: str, said: str,
) -> None:
    """A write failing after the whole manifest was embedded (no space, a read-only file system,
    which os.access does not see) stopped the build with a traceback, exit 1."""
    out = tmp_path / "ref"
    assert _build(manifest, out)[0] == 0
    before = _tree(tmp_path)
    monkeypatch.setattr(target, fault, _no_space if fault == "save" else _read_only)
    code, output = _build(manifest, out, "--overwrite", "--alpha", "2")
    assert code == 2, output
    assert output.strip() == (f"driftline reference build: cannot write the reference to {out}: "
                              f"{said}")
    assert _tree(tmp_path) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no leftovers


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_the_reference_gets_the_permissions_mkdir_would_give(
    manifest: Path, tmp_path: Path, umask: int
) -> None:
    """Not mkdtemp's owner-only 0o700: a service running as another user reads it."""
    before = os.umask(umask)
    try:
        code, output = _build(manifest, tmp_path / "ref")
    finally:
        os.umask(before)
    assert code == 0, output
    ref = tmp_path / "ref"
    assert oct(ref.stat().st_mode & 0o777) == oct(0o777 & ~umask)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in ref.iterdir()}
    assert "manifest.json" in modes and "embeddings.npy" in modes
    assert set(modes.values()) == {oct(0o666 & ~umask)}, modes
