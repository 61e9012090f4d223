"""Prediction baselines: bounded vocabulary, fallback to the parent, smoothing, the *other*
floor, and a low-confidence rate that holds for fresh scores."""

from __future__ import annotations

import math

import numpy as np
import pytest

from driftline.core.baselines import baseline_cells, smoothed
from driftline.core.predictions import (
    MIN_GLOBAL,
    build_prediction_baselines,
    label_codes,
    label_vocabulary,
    low_confidence_cut,
)


def test_vocabulary_is_bounded_and_the_rest_is_other() -> None:
    labels = ["ok"] * 50 + ["scrap"] * 20 + ["dent"] * 5 + ["chip"] * 5 + ["crack"]
    vocab = label_vocabulary(labels, 3)
    assert vocab == ("ok", "scrap", "chip")  # ties by name: chip before dent
    codes = label_codes([*labels, None, "never-seen"], vocab)
    assert codes.tolist()[-2:] == [-1, 3]
    assert np.bincount(codes[codes >= 0]).tolist() == [50, 20, 5, 7]
    with pytest.raises(ValueError, match="max_labels"):
        label_vocabulary(labels, 0)


def _cells() -> tuple[list[str], list[str]]:
    stations = ["s1"] * 600 + ["s2"] * 300 + ["s3"] * 60
    shifts = (["day"] * 400 + ["night"] * 200) + (["day"] * 250 + ["night"] * 50) + ["day"] * 60
    return stations, shifts


def test_baselines_fall_back_smooth_toward_their_parent_and_keep_other() -> None:
    rng = np.random.default_rng(3)
    stations, shifts = _cells()
    n = len(stations)
    codes = rng.choice(3, n, p=[0.7, 0.3, 0.0])  # "other" never predicted
    codes[250:400] = -1  # s1 day: 150 of its 400 events carry no prediction
    scores = rng.uniform(0.5, 1.0, n)
    cells = baseline_cells(stations, shifts, min_count=100)
    got = build_prediction_baselines(codes, scores, cells, 3, min_count=290, alpha=0.5,
                                     quantile=0.05)
    # cluster baselines: global, s1, s1 day, s1 night, s2, s2 day (s2 night and s3 too small);
    # below 290 predictions (s1 day: 250, s1 night: 200, s2 day: 250) their events use the
    # nearest ancestor's
    assert set(cells) == {"global", "station=s1", "station=s1|shift=day",
                          "station=s1|shift=night", "station=s2", "station=s2|shift=day"}
    assert set(got) == {"global", "station=s1", "station=s2"}
    assert got["station=s1"].n == 600 - 150 and got["global"].n == n - 150
    assert got["station=s2"].parent == "global" and got["station=s1"].parent == "global"
    root = np.array(got["global"].p)
    np.testing.assert_allclose(root, smoothed(np.array(got["global"].counts), np.full(3, 1 / 3),
                                              0.5))
    for key in ("station=s1", "station=s2"):
        b = got[key]
        p, raw = np.array(b.p), smoothed(np.array(b.counts), root, 0.5)
        assert p.sum() == pytest.approx(1.0) and (p > 0).all()
        assert raw[-1] < root[-1] and p[-1] == root[-1]  # other kept at the global rate
        np.testing.assert_allclose(p[:-1] / p[:-1].sum(), raw[:-1] / raw[:-1].sum())


def test_too_few_predictions_make_no_baseline() -> None:
    cells = {"global": (None, np.ones(MIN_GLOBAL + 5, bool))}
    codes = np.full(MIN_GLOBAL + 5, -1)
    codes[: MIN_GLOBAL - 1] = 0
    assert build_prediction_baselines(codes, np.ones(codes.size), cells, 2) == {}
    codes[: MIN_GLOBAL] = 0
    assert set(build_prediction_baselines(codes, np.ones(codes.size), cells, 2)) == {"global"}


def test_low_confidence_rate_holds_for_fresh_scores() -> None:
    """The stated rate is the probability that a fresh score from the reference's law falls
    below the cut. Over R references of n scores each, the mean stated rate and the mean
    measured rate (m fresh scores per reference) agree within 3 standard errors of their
    difference (the per-reference differences are independent)."""
    rng = np.random.default_rng(11)
    n, m, runs, q = 400, 4000, 60, 0.05
    diffs = []
    for _ in range(runs):
        ref = rng.beta(8.0, 1.5, n)
        cut, rate, below = low_confidence_cut(ref, q)
        assert below == int((ref < cut).sum()) and rate == (below + 1) / (n + 1)
        diffs.append(float(np.mean(rng.beta(8.0, 1.5, m) < cut)) - rate)
    d = np.array(diffs)
    assert abs(d.mean()) < 3 * d.std(ddof=1) / math.sqrt(runs)
    assert abs(float(np.mean(d))) < 0.005


def test_tied_scores_state_the_rate_they_have() -> None:
    scores = np.r_[np.full(970, 1.0), np.linspace(0.3, 0.9, 30)]  # a model saturating at 1.0
    cut, rate, below = low_confidence_cut(scores, 0.05)
    assert cut == 1.0 and below == 30 and rate == pytest.approx(31 / 1001)
    with pytest.raises(ValueError):
        low_confidence_cut(scores, 1.0)
