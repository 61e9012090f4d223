"""Greedy likelihood scan: the three plant scenarios, simultaneous changes, ties, no change."""

from __future__ import annotations

import numpy as np
import pytest

from driftline.core.scan import explained_by, poisson_llr, scan

TEMPLATES = ["station", "station+shift", "shift", "lot"]
STATIONS = ("cam-1", "cam-2", "surf-1", "surf-2")
SHIFTS = ("day", "evening", "night")


def plant(affected, seed: int = 0, n: int = 900, p_hit: float = 0.9, p0: float = 0.01):
    """Stations take turns; shifts every 150 rounds; two lots in use, rotating every 75."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        shift = SHIFTS[(i // 150) % 3]
        for st in STATIONS:
            lot = f"L{i // 75 + int(rng.integers(0, 2))}"
            hit = affected(i, st, shift, lot)
            rows.append((st, shift, lot, rng.random() < (p_hit if hit else p0)))
    cols = {d: np.array([r[k] for r in rows]) for k, d in enumerate(("station", "shift", "lot"))}
    return cols, np.array([r[3] for r in rows]), np.full(len(rows), p0)


def roots(cols, flags, p0):
    return [h.slice_id for h in scan(cols, flags, p0, TEMPLATES)]


def test_lot_across_every_station_is_rooted_at_the_lot() -> None:
    assert roots(*plant(lambda i, st, sh, lot: lot == "L5")) == ["lot=L5"]


def test_one_station_optics_is_rooted_at_the_station() -> None:
    assert roots(*plant(lambda i, st, sh, lot: st == "surf-1" and i >= 200)) == [
        "station=surf-1"]


def test_one_shift_at_one_station_is_rooted_at_station_and_shift() -> None:
    got = roots(*plant(lambda i, st, sh, lot: st == "cam-2" and sh == "night"))
    assert got == ["station=cam-2|shift=night"]


def test_three_simultaneous_changes_give_three_roots() -> None:
    cols, flags, p0 = plant(lambda i, st, sh, lot: lot == "L3" or (
        st == "cam-2" and sh == "night") or (st == "surf-1" and i >= 500))
    assert sorted(roots(cols, flags, p0)) == [
        "lot=L3", "station=cam-2|shift=night", "station=surf-1"]


@pytest.mark.parametrize("seed", range(5))
def test_no_change_gives_no_root(seed: int) -> None:
    # 3,600 events at p0=1%: the largest slice LLR under no change stays far below 10 nats.
    assert roots(*plant(lambda *_: False, seed=seed)) == []


def test_exact_tie_goes_to_the_narrower_slice() -> None:
    cols = {"station": np.array(["a"] * 40), "shift": np.array(["night"] * 40)}
    flags = np.array([True] * 30 + [False] * 10)
    hits = scan(cols, flags, np.full(40, 0.01), ["station", "station+shift"])
    assert hits[0].template == "station+shift"


def test_related_slices_are_explained_by_their_root() -> None:
    cols, flags, p0 = plant(lambda i, st, sh, lot: st == "cam-2" and sh == "night")
    hits = scan(cols, flags, p0, TEMPLATES)
    night = cols["shift"] == "night"
    assert explained_by(night, flags, p0, hits) == 0
    clean = cols["station"] == "cam-1"
    assert explained_by(clean, flags, p0, hits) is None


def test_poisson_llr_matches_its_formula() -> None:
    x, e = np.array([10.0, 2.0, 0.0]), np.array([2.0, 4.0, 1.0])
    expected = [10 * np.log(5) - 8, 0.0, 0.0]
    np.testing.assert_allclose(poisson_llr(x, e), expected)
