"""Budget arithmetic and threshold tightening."""

from __future__ import annotations

import math

import numpy as np
import pytest

from driftline.core import budget as budget_mod
from driftline.core.budget import DAY, Budget, tighten_threshold
from driftline.core.cusum import union_threshold
from driftline.core.simulate import mix_model


def test_equal_split_meets_the_fleet_rate() -> None:
    b = Budget(
        false_incidents=2, period_s=7 * DAY, n_slices=50, detectors_per_slice=5, event_rate=0.5
    )
    # fleet false alarms per second = Σ r / γ over S·D detector instances
    fleet = b.n_slices * b.detectors_per_slice * b.event_rate / b.arl0()
    assert fleet * b.period_s == pytest.approx(b.false_incidents)
    assert b.arl0(event_rate=5.0) == pytest.approx(10 * b.arl0())  # busier slice: more events
    assert b.threshold(144) == pytest.approx(math.log(b.arl0()) + math.log(144))
    text = b.describe(bank_size=144)
    assert "≤ 2 false incidents per 7 days across 50 slices × 5 detectors" in text
    assert f"{b.arl0():.3g}" in text
    with pytest.raises(ValueError):
        Budget(0, DAY, 1, 1, 1.0)
    with pytest.raises(ValueError):
        Budget(1, DAY, 0, 1, 1.0)


def test_tightening_is_deterministic_cached_and_below_the_union_bound() -> None:
    p = np.full(4, 0.25)
    model = mix_model([p], (0.05, 0.2), (0.5,))
    budget_mod._cache.clear()
    h1 = tighten_threshold(model, p, 300.0, n_runs=200, seed=7)
    assert len(budget_mod._cache) == 1
    assert tighten_threshold(model, p, 300.0, n_runs=200, seed=7) == h1
    budget_mod._cache.clear()
    assert tighten_threshold(model, p, 300.0, n_runs=200, seed=7) == h1
    assert 0.0 < h1 < union_threshold(300.0, model.base.size)


def test_thresholds_beyond_simulation_are_extrapolated_and_keep_arl0() -> None:
    # Calibrated at 500/16 and 500 events and extended along that secant of ln ARL0(h) to
    # 8000: the measured ARL0 should still reach 0.9·γ (3 standard errors of slack, see
    # test_detection_stats for the derivation).
    from driftline.core.simulate import simulate

    p = np.full(6, 1 / 6)
    model = mix_model([p], (0.05, 0.2), (0.5, 0.9))
    h500 = tighten_threshold(model, p, 500.0, seed=3)
    h = tighten_threshold(model, p, 8000.0, seed=3, max_simulated=500.0)
    assert h >= h500 + math.log(16.0)
    t = simulate([model], [[h]], p, n_runs=300, horizon=400_000, seed=4)[0].times[:, 0]
    assert t.mean() >= 0.9 * 8000.0 - 3 * t.std(ddof=1) / math.sqrt(t.size)
    huge = tighten_threshold(model, p, 1e12, seed=3, max_simulated=500.0)
    assert huge <= union_threshold(1e12, model.base.size)
