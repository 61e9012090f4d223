"""The statistics' flags of ``reference build`` are range-checked, naming the flag, before the
manifest is read: out of range they crashed in faiss or numpy, or built a broken reference."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from driftline.reference import build_reference
from driftline.reference.cli import app
from tests.unit.reference.synthetic import events_manifest, reference_events

runner = CliRunner(env={"COLUMNS": "400"})  # a wide error box: messages on one line


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return events_manifest(tmp_path_factory.mktemp("manifest"))


@pytest.mark.parametrize("flags", [
    ["--k", "0"], ["--k", "-1"], ["--k", "1"],
    ["--quantile", "1.5"], ["--quantile", "0"], ["--quantile", "nan"],
    ["--alpha", "-1"], ["--alpha", "0"],
    ["--min-count", "-3"], ["--min-count", "0"],
    ["--exclude-window", "-5"],
    ["--pca-dim", "0"],
    ["--bound-confidence", "1"],
    ["--confidence-quantile", "0"],
    ["--error-quantile", "0.4"],
    ["--seed", str(2 ** 31)],
])
def test_out_of_range_values_name_their_flag(manifest: Path, tmp_path: Path,
                                             flags: list[str]) -> None:
    result = runner.invoke(app, ["build", "--manifest", str(manifest), "--out",
                                 str(tmp_path / "ref"), *flags])
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '{flags[0]}': {flags[1]}" in result.output
    assert not (tmp_path / "ref").exists()


def test_a_pca_dimension_beyond_the_data_names_its_flag(manifest: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["build", "--manifest", str(manifest), "--out",
                                 str(tmp_path / "ref"), "--k", "2", "--pca-dim", "50"])
    assert result.exit_code == 2, result.output
    assert "Invalid value for '--pca-dim': 50: must be at most 16" in result.output


def test_the_edges_of_the_ranges_build(manifest: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["build", "--manifest", str(manifest), "--out",
                                 str(tmp_path / "ref"), "--k", "2", "--min-count", "1",
                                 "--exclude-window", "0", "--alpha", "5", "--seed", "-3"])
    assert result.exit_code == 0, result.output


def test_the_library_checks_the_same_ranges(tmp_path: Path) -> None:
    from driftline.reference.parameters import ParameterError

    events, _ = reference_events()
    for kw in ({"k": 1}, {"quantile": 0.0}, {"alpha": -1.0}, {"min_count": 0},
               {"exclude_within_s": -5.0}):
        with pytest.raises(ParameterError, match=next(iter(kw))):
            build_reference(events[:200], None, tmp_path / "ref", **kw)  # type: ignore[arg-type]
    assert not (tmp_path / "ref").exists()
