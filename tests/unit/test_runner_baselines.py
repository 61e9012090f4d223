"""What the detect stage judges against when a manifest's stored bounds are unusable (NaN,
null, empty, not around the stated rates): computed from the counts, or the stated rates,
with a warning naming the baseline — never a NaN that switches a detector off."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pytest

from driftline.core.bernoulli import BernoulliCusum
from driftline.reference.index import prediction_views
from driftline.runner import detector_baseline

ITEM: dict[str, Any] = {"parent": None, "n": 500, "counts": [250, 250], "p": [0.5, 0.5],
                        "ood_rate": 0.01, "ood_exceed": 4}
BAD_MIX: list[dict[str, Any]] = [
    {"p_lower": [0.4, float("nan")], "p_upper": [0.6, 0.6]},
    {"p_lower": [0.4, None], "p_upper": [0.6, 0.6]},
    {"p_lower": [], "p_upper": []},  # a (2, 0) array
    {"p_lower": [0.4], "p_upper": [0.6, 0.6]},  # ragged
    {"p_lower": [0.55, 0.4], "p_upper": [0.6, 0.6]},  # lower above p
    {"p_lower": [0.4, 0.4], "p_upper": [0.6, 1.5]},
    {"p_lower": [0.4, 0.4]},  # half of them
]
BAD_RATE: list[Any] = [float("nan"), None, float("inf"), 0.001, "x"]


@pytest.mark.parametrize("bad", BAD_RATE)
def test_an_unusable_ood_bound_is_computed_from_the_counts(
    bad: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A NaN bound gave ``max(nan, rate) == nan``, and a Bernoulli bank fed NaN never alarms."""
    want = detector_baseline("global", {"global": ITEM}, {})
    with caplog.at_level(logging.WARNING):
        got = detector_baseline("global", {"global": {**ITEM, "ood_rate_bound": bad}}, {})
    assert got.ood_bound == want.ood_bound > ITEM["ood_rate"]
    assert [r.baseline for r in caplog.records if r.levelno == logging.WARNING] == ["global"]
    det = BernoulliCusum(arl0=1e3)
    assert sum(det.update(True, got.ood_bound) for _ in range(200)) > 0


@pytest.mark.parametrize("bad", BAD_MIX)
def test_unusable_mix_bounds_are_computed_from_the_counts(
    bad: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    want = detector_baseline("global", {"global": ITEM}, {})
    with caplog.at_level(logging.WARNING):
        got = detector_baseline("global", {"global": {**ITEM, **bad}}, {})
    assert got.bounds.shape == (2, 2) and np.isfinite(got.bounds).all()
    np.testing.assert_array_equal(got.bounds, want.bounds)
    assert [r.baseline for r in caplog.records if r.levelno == logging.WARNING] == ["global"]


def test_without_counts_unusable_bounds_fall_back_to_the_stated_rates(
    caplog: pytest.LogCaptureFixture
) -> None:
    bare = {"parent": None, "p": [0.5, 0.5], "ood_rate": 0.01, "p_lower": [float("nan")] * 2,
            "p_upper": [0.6, 0.6], "ood_rate_bound": None}
    with caplog.at_level(logging.WARNING):
        got = detector_baseline("station=s1", {"station=s1": bare}, {})
    np.testing.assert_array_equal(got.bounds, [[0.5, 0.5], [0.5, 0.5]])
    assert got.ood_bound == 0.01
    assert {r.baseline for r in caplog.records if r.levelno == logging.WARNING} == {"station=s1"}


def _manifest(**stored: Any) -> dict[str, Any]:
    item = {"parent": None, "p": [0.5, 0.3, 0.2], "counts": [50, 30, 20], "n": 100,
            "low_confidence_cut": 0.5, "low_confidence_rate": 0.05, "low_confidence_count": 5,
            **stored}
    return {"baselines": {"items": {"global": {"parent": None}}},
            "predictions": {"labels": ["ok", "scratch"], "items": {"global": item}}}


@pytest.mark.parametrize("bad", [
    {"p_lower": [0.4, float("nan"), 0.1], "p_upper": [0.6, 0.4, 0.3],
     "low_confidence_rate_bound": 0.08},
    {"p_lower": [], "p_upper": [], "low_confidence_rate_bound": 0.08},
    {"p_lower": [0.4, 0.2, 0.1], "p_upper": [0.6, 0.4, 0.3],
     "low_confidence_rate_bound": float("nan")},
    {"p_lower": [0.4, 0.2, 0.1], "p_upper": [0.6, 0.4, 0.3], "low_confidence_rate_bound": None},
])
def test_unusable_prediction_bounds_are_computed_from_the_counts(
    bad: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    want = prediction_views(_manifest())["global"]
    with caplog.at_level(logging.WARNING):
        got = prediction_views(_manifest(**bad))["global"]
    np.testing.assert_array_equal(got.bounds, want.bounds)
    assert got.low_confidence_bound == want.low_confidence_bound
    assert np.isfinite(got.bounds).all() and got.bounds.shape == (2, 3)
    assert [r.baseline for r in caplog.records if r.levelno == logging.WARNING] == ["global"]
    good = {"p_lower": [0.4, 0.2, 0.1], "p_upper": [0.6, 0.4, 0.3],
            "low_confidence_rate_bound": 0.08}
    kept = prediction_views(_manifest(**good))["global"]
    assert kept.bounds.tolist() == [good["p_lower"], good["p_upper"]]
    assert kept.low_confidence_bound == 0.08


def test_the_arrays_detectors_judge_against_are_read_only() -> None:
    """Increment tables are cached by array identity: what the detect stage builds from a
    manifest cannot change in place."""
    b = detector_baseline("global", {"global": ITEM}, {})
    v = prediction_views(_manifest())["global"]
    for a in (b.p, b.bounds, v.p, v.bounds):
        assert not a.flags.writeable
        with pytest.raises(ValueError, match="read-only"):
            a[0] = 0.0
