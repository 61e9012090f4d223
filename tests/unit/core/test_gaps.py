"""Onsets across gaps in a slice's event stream: a shift slice sees its shift, then nothing for
16 hours. Noise-level evidence from before a gap must not date a change after it into the
previous shift; substantial evidence keeps its onset; streams without gaps are untouched."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from driftline.core.baselines import DetectorBaseline
from driftline.core.bernoulli import BernoulliCusum
from driftline.core.cusum import GAP_ALPHA
from driftline.core.slices import EventUpdate, SliceDetectors
from tests.unit.core.roundtrip import assert_slice_round_trip

P0 = 0.02
B = DetectorBaseline.exact([0.9, 0.1], P0)
PACE = 20.0  # seconds between events while the slice is observed
GAP = 16 * 3600.0


def _window(rng: np.random.Generator, n: int, rate: float, t0: float) -> list[EventUpdate]:
    return [EventUpdate(ood=bool(rng.random() < rate), baseline=B, time=t0 + PACE * i)
            for i in range(n)]


def _two_shifts(seed: int, n1: int = 300, n2: int = 4000) -> tuple[list[EventUpdate], float]:
    """``n1`` events at OOD rate ``P0``, a 16-hour gap, then ``n2`` at three times ``P0``;
    returns the events and the time of the first one after the gap."""
    rng = np.random.default_rng(seed)
    first = _window(rng, n1, P0, 0.0)
    resume = first[-1].time + GAP  # type: ignore[operator]
    return first + _window(rng, n2, 3 * P0, resume), resume


def _first_onset(sd: SliceDetectors, events: list[EventUpdate]) -> float | None:
    for e in events:
        alarms = sd.update(e)
        if alarms:
            return alarms[0].onset_time
    return None


def test_noise_before_a_gap_does_not_date_a_change_after_it_into_the_previous_shift() -> None:
    """No change before the gap: the onset lands before it only where the statistic at the gap
    reached ln(M / GAP_ALPHA), which no change does in at most GAP_ALPHA of runs (2 in 200
    here). Without the gap rule it lands before the gap whenever the alarming member (a small
    ρ, for a x3 rate) is above zero there: 39 runs in 200."""
    runs = 200
    early = 0
    for seed in range(runs):
        events, resume = _two_shifts(seed)
        onset = _first_onset(SliceDetectors(arl0=1e5), events)
        assert onset is not None  # a x3 rate is found within the second shift
        early += onset < resume
    limit = stats.binom.ppf(0.999, runs, GAP_ALPHA)  # the bound, with a 1-in-1000 tolerance
    assert early <= limit, (early, limit)


def test_substantial_evidence_before_a_gap_keeps_its_onset() -> None:
    """A change that started well before the gap: the statistic there is far above
    ln(M / GAP_ALPHA), so the onset stays at the change, in the previous shift."""
    rng = np.random.default_rng(3)
    events = _window(rng, 200, P0, 0.0) + _window(rng, 100, 10 * P0, 200 * PACE)
    events += _window(rng, 2000, 10 * P0, events[-1].time + GAP)  # type: ignore[operator]
    sd = SliceDetectors(arl0=1e12)  # no alarm before the gap
    for e in events[:300]:
        assert not sd.update(e)
    assert sd.detectors["ood_rate"].statistic > sd.detectors["ood_rate"].gap_evidence
    onset = _first_onset(sd, events[300:])
    assert onset is not None and 150 * PACE <= onset <= 210 * PACE


def test_without_gaps_onsets_are_those_of_the_plain_bank() -> None:
    """Poisson event times (and bursts sharing a timestamp): no interval is a gap, so every
    alarm's onset is exactly the bank's own."""
    rng = np.random.default_rng(11)
    times = np.cumsum(rng.exponential(PACE, 20_000) * (rng.random(20_000) < 0.8))
    flags = rng.random(20_000) < np.where(np.arange(20_000) % 4000 < 2000, P0, 5 * P0)
    sd, bank = SliceDetectors(arl0=1e3), BernoulliCusum(arl0=1e3)
    onsets = []
    for t, x in zip(times.tolist(), flags.tolist(), strict=True):
        alarms = sd.update(EventUpdate(ood=x, baseline=B, time=t))
        bank_alarm = bank.update(x, P0, t)
        assert bool(alarms) == bank_alarm
        if alarms:
            assert (alarms[0].onset_index, alarms[0].onset_time) == (bank.onset_index,
                                                                    bank.onset_time)
            onsets.append(alarms[0].onset_time)
    assert len(onsets) > 10


def test_a_gap_is_measured_against_the_slice_s_own_pace() -> None:
    """The same 16 hours is no gap for a slice that sees an event every few hours."""
    slow = [EventUpdate(ood=i == 30, baseline=B, time=3 * 3600.0 * i) for i in range(31)]
    slow.append(EventUpdate(ood=True, baseline=B, time=slow[-1].time + GAP))  # type: ignore[operator]
    sd = SliceDetectors(arl0=1e3)
    for e in slow:
        sd.update(e)
    assert sd.detectors["ood_rate"].onset_index == 30  # the flag before the 16 hours


@settings(max_examples=20, deadline=None)
@given(cut=st.integers(0, 700), seed=st.integers(0, 2**16))
def test_snapshot_round_trip_across_a_gap(cut: int, seed: int) -> None:
    events, _ = _two_shifts(seed, n1=300, n2=400)
    events = [EventUpdate(cluster=int(e.ood or 0), baseline=B, ood=e.ood, time=e.time)
              for e in events]
    a = SliceDetectors(arl0=1e3)
    assert_slice_round_trip(a, events, cut)
