"""A cell too small for a baseline of its own is judged against its parent's; the build says so,
and warns when its reference events already hold another cluster mix (it would alarm on
unchanged data)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from driftline.core.baselines import build_baselines
from driftline.reference.artifact import MANIFEST
from driftline.reference.cli import app
from driftline.reference.fallbacks import fallback_cells, misfits
from driftline.reference.index import load_reference
from driftline.runner import warn_of_misfit_fallbacks
from tests.unit.reference.synthetic import reference_events

runner = CliRunner(env={"COLUMNS": "400"})


def _build(tmp_path: Path, min_count: int) -> tuple[str, dict]:
    events, _ = reference_events()
    manifest = tmp_path / "ref.jsonl"
    manifest.write_text("\n".join(e.model_dump_json() for e in events) + "\n")
    out = tmp_path / f"ref{min_count}"
    built = runner.invoke(app, ["build", "--manifest", str(manifest), "--out", str(out),
                                "--k", "6", "--min-count", str(min_count)])
    assert built.exit_code == 0, built.output
    shown = runner.invoke(app, ["show", str(out)])
    assert shown.exit_code == 0, shown.output
    assert shown.output in built.output  # build prints the same summary
    return shown.output, json.loads((out / MANIFEST).read_text())["baselines"]


def test_cells_whose_mix_differs_from_their_fallback_are_named(tmp_path: Path) -> None:
    # s1 (600) and s1 day (400) have baselines; s1 night (200: another mix than s1's) falls
    # back to s1, and s2 (300: its own mix) to global, as does s3 (50, uniform, like global)
    text, baselines = _build(tmp_path, 400)
    cells = baselines["fallbacks"]
    assert cells["station=s1|shift=night"]["judged_against"] == "station=s1"
    assert cells["station=s2"] == {**cells["station=s2"], "n": 300, "judged_against": "global"}
    assert {"station=s1|shift=night", "station=s2"} <= set(misfits(cells))
    assert "station=s1" not in cells and "station=s1|shift=day" not in cells
    assert "WARNING: " in text and "raise alarms" in text and "lower --min-count" in text
    night = next(line for line in text.splitlines() if "station=s1|shift=night" in line
                 and "judged against" in line)
    assert "200  judged against station=s1" in night


def test_cells_whose_mix_fits_their_fallback_are_not_warned_about(tmp_path: Path) -> None:
    # with 100: s2 night (50 events of s2's own mix) falls back to s2, s3 (uniform) to global
    text, baselines = _build(tmp_path, 100)
    assert baselines["fallbacks"]["station=s2|shift=night"]["judged_against"] == "station=s2"
    assert "station=s2|shift=night" not in misfits(baselines["fallbacks"])
    assert "cells have fewer than 100 reference events" in text
    # a baseline that exists does not fall back: its parent column names what it is smoothed to
    assert "falls back to" not in text and text.count("smoothed toward") == 2


def test_fallback_cells_against_numpy() -> None:
    rng = np.random.default_rng(3)
    # station a: 300 events, two shifts of one mix; b: 60 events, a mix of its own
    clusters = np.concatenate([rng.choice(4, 300, p=[0.4, 0.4, 0.1, 0.1]),
                               rng.choice(4, 60, p=[0.05, 0.05, 0.45, 0.45])])
    stations = ["a"] * 300 + ["b"] * 60
    shifts = ["day", "night"] * 150 + ["day"] * 60
    base = build_baselines(clusters, rng.random(360), stations, shifts, 4, min_count=200)
    cells = fallback_cells(clusters, stations, shifts, base, 4)
    assert set(cells) == {"station=a|shift=day", "station=a|shift=night", "station=b",
                          "station=b|shift=day"}
    assert cells["station=a|shift=night"]["judged_against"] == "station=a"
    assert cells["station=b|shift=day"] == {**cells["station=b"], "judged_against": "global"}
    assert misfits(cells) == ["station=b", "station=b|shift=day"]


def test_the_detect_stage_warns_at_start_up_of_cells_that_misfit(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Whoever reads a false alarm at 3 a.m. sees the worker's log, not ``reference show``:
    the detect stage names the misfit cells when it starts on such a reference."""
    _build(tmp_path, 400)
    caplog.set_level(logging.WARNING, logger="driftline.runner")
    bad = warn_of_misfit_fallbacks(load_reference(tmp_path / "ref400"))
    assert {"station=s1|shift=night", "station=s2"} <= set(bad)
    (line,) = [r for r in caplog.records if r.name == "driftline.runner"]
    assert f"{len(bad)} station or station×shift cells" in line.getMessage()
    cells = line.__dict__["cells"]
    assert cells["station=s2"].startswith("300 events, judged against global, p = ")
    caplog.clear()
    _build(tmp_path, 100)
    assert warn_of_misfit_fallbacks(load_reference(tmp_path / "ref100")) == []
    assert not [r for r in caplog.records if r.name == "driftline.runner"]
