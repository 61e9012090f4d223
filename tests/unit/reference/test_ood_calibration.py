"""Small baselines state OOD exceedance rates that held-out samples reproduce (statistical).

Twelve stations × two shifts of 150 reference samples each, all from one law, so every
baseline's held-out rate can be measured on fresh draws of that law. A threshold with ``k`` of
``n`` reference samples beyond it has a true exceedance rate distributed as Beta(k+1, n−k)
around the stated ``(k+1)/(n+1)``: its squared relative error has expectation
``(n−k) / ((k+1)(n+2))``, at most ``1/(k+1)``. With the 99th percentile of 150 samples
(k = 1) that is 0.49 — a stated 1.3 % hides anything from 0.2 % to 3 %; with at least
``MIN_TAIL`` samples beyond every threshold it is at most ``1/(MIN_TAIL+1)``.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from driftline.core.baselines import MIN_TAIL
from driftline.reference import build_reference
from tests.unit.reference.synthetic import CENTRES, event, sample

STATIONS, SHIFTS, PER_CELL, HELD_OUT = 12, ("day", "night"), 150, 40_000
NOISE = 0.3  # wide clusters: nearest-neighbour distances spread out


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, int, int, float, float]]:
    """Per baseline: key, n, samples beyond its threshold, stated rate, held-out rate."""
    rng = np.random.default_rng(20260311)
    n_ref = STATIONS * len(SHIFTS) * PER_CELL
    x = sample(rng, rng.choice(CENTRES, n_ref), noise=NOISE)
    events = [event(i, x[i], f"s{i % STATIONS}", SHIFTS[(i // STATIONS) % 2])
              for i in range(n_ref)]
    ref = build_reference(events, None, tmp_path_factory.mktemp("cal") / "ref", min_count=100)
    _, dist = ref.assign(sample(rng, rng.choice(CENTRES, HELD_OUT), noise=NOISE))
    items = ref.manifest["baselines"]["items"]
    return [(key, b["n"], b["ood_exceed"], b["ood_rate"],
             float(np.mean(dist > b["ood_threshold"]))) for key, b in items.items()]


def test_every_threshold_has_min_tail_samples_beyond_it(
        measured: list[tuple[str, int, int, float, float]]) -> None:
    assert len(measured) == 1 + STATIONS + STATIONS * len(SHIFTS)
    for key, n, k, stated, _ in measured:
        assert k >= MIN_TAIL - 1, (key, n, k)  # the 99th percentile of 300 has 2 beyond
        assert stated == pytest.approx((k + 1) / (n + 1))
    glob = next(m for m in measured if m[0] == "global")
    assert glob[2] >= 0.01 * glob[1] - 1  # 3600 samples: the 99th percentile itself


def test_small_baselines_held_out_rate_matches_the_stated_rate(
        measured: list[tuple[str, int, int, float, float]]) -> None:
    # Each baseline: the held-out rate within the Beta(k+1, n-k) interval of its true rate
    # (widened by the held-out draws' binomial noise), at a family-wise level of 1 %.
    level = 0.01 / len(measured)
    for key, n, k, stated, held in measured:
        lo, hi = stats.beta.ppf([level / 2, 1 - level / 2], k + 1, n - k)
        slack = stats.norm.ppf(1 - level / 2) * np.sqrt(stated * (1 - stated) / HELD_OUT)
        assert lo - slack <= held <= hi + slack, (key, n, k, stated, held)
    # Together: the mean squared relative error is what MIN_TAIL promises, not what the
    # 99th percentile of 150 samples gives (0.49). The mean of 37 such terms has a relative
    # sd of about sqrt(2/37) = 0.23, so twice the promise is more than four sd away.
    rel = np.array([(held - stated) / stated for _, _, _, stated, held in measured])
    held_noise = np.mean([(1 - s) / (s * HELD_OUT) for _, _, _, s, _ in measured])
    promise = 1 / (MIN_TAIL + 1) + held_noise
    assert np.mean(rel**2) <= 2 * promise, (np.mean(rel**2), promise)
