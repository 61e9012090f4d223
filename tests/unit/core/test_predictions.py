"""Prediction baselines: bounded vocabulary, fallback to the parent, smoothing, the *other*
floor, a low-confidence rate that holds for fresh scores, and bounds that keep the prediction
detectors' false-alarm promise on a small reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import beta

from driftline.core.baselines import (
    DEFAULT_CONFIDENCE,
    baseline_cells,
    smoothed,
    tail_rate_bound,
)
from driftline.core.bernoulli import CONFIDENCE_ALTERNATIVES
from driftline.core.cusum import union_threshold
from driftline.core.mix import DEFAULT_EPSILONS, DEFAULT_FRACTIONS
from driftline.core.predictions import (
    MIN_GLOBAL,
    build_prediction_baselines,
    label_codes,
    label_vocabulary,
    low_confidence_cut,
    prediction_bounds,
)
from driftline.core.simulate import bernoulli_model, mix_model, simulate


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
    difference (two-sided 0.27 %; the per-reference differences are independent).

    That standard error follows from the law, not the measured spread (which a rate that
    scatters more would widen): the cut is the ``below + 1``-th smallest of n continuous
    scores, so the true share below it is ``U ~ Beta(below + 1, n - below)``, of mean exactly
    the stated ``(below + 1) / (n + 1)``, and m fresh scores measure ``U`` with binomial
    error: the difference has mean 0 and variance ``Var U + E[U(1 - U)] / m``."""
    rng = np.random.default_rng(11)
    n, m, runs, q = 400, 4000, 60, 0.05
    diffs, belows = [], set()
    for _ in range(runs):
        ref = rng.beta(8.0, 1.5, n)
        cut, rate, below = low_confidence_cut(ref, q)
        assert below == int((ref < cut).sum()) and rate == (below + 1) / (n + 1)
        belows.add(below)
        diffs.append(float(np.mean(rng.beta(8.0, 1.5, m) < cut)) - rate)
    (below,) = belows  # n and q fix the cut's rank
    a, b = below + 1, n - below
    mean_u, var_u = a / (a + b), a * b / ((a + b) ** 2 * (a + b + 1))
    sd = math.sqrt(var_u + (mean_u - mean_u**2 - var_u) / m)
    d = np.array(diffs)
    assert abs(d.mean()) < 3 * sd / math.sqrt(runs), (d.mean(), sd, d.std(ddof=1))


def test_tied_scores_state_the_rate_they_have() -> None:
    scores = np.r_[np.full(970, 1.0), np.linspace(0.3, 0.9, 30)]  # a model saturating at 1.0
    cut, rate, below = low_confidence_cut(scores, 0.05)
    assert cut == 1.0 and below == 30 and rate == pytest.approx(31 / 1001)
    with pytest.raises(ValueError):
        low_confidence_cut(scores, 1.0)


# -- the prediction detectors judge a small reference against its bounds -----------------------
#
# As tests/unit/core/test_baseline_bounds.py does for the cluster mix and the OOD rate, by
# simulation at a small γ with the true law of each run drawn from what the reference allows:
# whenever the bounds hold, P(alarm within L events) <= L/γ, so over the draws it is at most
# L/γ + (1 - confidence). Tolerance: Z = 3 binomial standard errors, fixed seeds.

Z = 3.0


def _limit_and_se(horizon: int, gamma: float, runs: int) -> tuple[float, float]:
    limit = horizon / gamma + (1 - DEFAULT_CONFIDENCE)
    return limit, math.sqrt(limit * (1 - limit) / runs)


def test_the_confidence_detector_keeps_the_budget_on_a_small_baseline() -> None:
    # One 200-score global baseline, cut at 5 %: the true low-confidence rate U is
    # Beta(k + 1, n - k) over reference samples (k scores below the cut); one run per stratum.
    rng = np.random.default_rng(8)
    n, runs, gamma, horizon = 200, 1000, 5e4, 5_000
    b = build_prediction_baselines(np.zeros(n, np.int64), rng.random(n),
                                   {"global": (None, np.ones(n, bool))}, 2)["global"]
    k = b.low_confidence_count
    assert b.low_confidence_rate_bound == tail_rate_bound(n, k) > b.low_confidence_rate
    u = beta.ppf((np.arange(runs) + 0.5) / runs, k + 1, n - k)
    h = union_threshold(gamma, len(CONFIDENCE_ALTERNATIVES))
    measured = {}
    for name, p0 in (("stated", b.low_confidence_rate), ("bound", b.low_confidence_rate_bound)):
        res = simulate([bernoulli_model(p0, CONFIDENCE_ALTERNATIVES)], [[h]],
                       np.stack([1 - u, u], axis=1), n_runs=runs, horizon=horizon, seed=3)[0]
        measured[name] = float((~res.censored[:, 0]).mean())
    limit, se = _limit_and_se(horizon, gamma, runs)
    assert measured["bound"] <= limit + Z * se, measured  # 0 of 1000 measured
    assert measured["stated"] > limit + Z * se, measured  # before: 0.171, the promise broken


def test_the_prediction_mix_keeps_the_budget_on_a_small_baseline() -> None:
    # A 200-prediction global baseline of four labels and *other* (never predicted); the true
    # mix of each run drawn from the Dirichlet posterior whose mean is the stated p.
    rng = np.random.default_rng(9)
    n, runs, gamma, horizon, k = 200, 600, 3e4, 3_000, 5
    codes = rng.choice(k, n, p=[0.8, 0.1, 0.06, 0.04, 0.0])
    b = build_prediction_baselines(codes, rng.random(n), {"global": (None, np.ones(n, bool))},
                                   k)["global"]
    prior = np.full(k, 1 / k)
    lower, upper, _ = prediction_bounds(np.array(b.counts), prior, 0.5, np.array(b.p),
                                        b.low_confidence_count)
    assert b.p_lower == tuple(lower) and b.p_upper == tuple(upper)
    assert (lower < np.array(b.p)).all() and (np.array(b.p) < upper).all()
    laws = rng.dirichlet(np.array(b.counts) + 0.5 * k * prior, size=runs)
    h = union_threshold(gamma, k * (len(DEFAULT_EPSILONS) + len(DEFAULT_FRACTIONS)))
    measured = {}
    for name, judged in (("stated", np.array(b.p)), ("bound", np.stack([lower, upper]))):
        res = simulate([mix_model([judged], DEFAULT_EPSILONS, DEFAULT_FRACTIONS)], [[h]], laws,
                       n_runs=runs, horizon=horizon, seed=4)[0]
        measured[name] = float((~res.censored[:, 0]).mean())
    limit, se = _limit_and_se(horizon, gamma, runs)
    assert measured["bound"] <= limit + Z * se, measured  # 0 of 600 measured
    assert measured["stated"] > limit + Z * se, measured  # before: 0.54


def test_prediction_bounds_hold_the_stated_mix_with_other_raised_to_the_global_rate() -> None:
    # a station×shift that never predicted *other*: its p keeps the global rate of other, and
    # its bounds hold p whatever the Beta quantiles of its own counts say
    counts, prior = np.array([300, 0]), np.array([0.5, 0.5])
    p = np.array([0.2, 0.8])  # as if raised far beyond what the counts allow
    lower, upper, rate = prediction_bounds(counts, prior, 0.5, p, 14)
    assert (lower <= p).all() and (p <= upper).all() and upper[1] == 0.8
    assert rate == tail_rate_bound(300, 14)
