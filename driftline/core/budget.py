"""Thresholds from a false-alarm budget an operator can read.

"At most ``F`` false incidents per period ``T`` across the fleet" becomes a per-detector target
``γ`` (ARL0, in events) and a threshold ``h``:

1. A detector that restarts after each false alarm raises them as a renewal process with mean
   gap ``ARL0`` events, i.e. ``r / ARL0`` per second at ``r`` events/s (renewal-reward theorem).
2. The fleet rate is ``Σ_{slices s, detectors d} r_s / γ_{s,d}``. Requiring ``<= F / T`` and
   splitting it equally over the ``S·D`` detector instances gives ``γ_{s,d} = r_s·T·S·D / F``:
   a busy slice gets a larger ``γ`` in events and the same false-alarm rate in time. (Counting
   every alarm as an incident is conservative: alarms that the failure book merges count once.)
   With one ``r`` (events/s per station) for every slice, ``S`` must count a slice once per
   station it reads: every event updates one slice per template, so ``Σ_s r_s`` is
   ``stations × templates × r``, and that is the ``S·r`` the split needs — a shift or lot slice
   reading ``n`` stations at ``n·r`` false-alarms ``n`` times as often as a station slice.
3. A detector is a bank of ``M`` CUSUMs on likelihood ratios; ``h = ln γ + ln M`` gives
   ``ARL0 >= γ`` for the bank (:func:`~driftline.core.cusum.union_threshold`; Page 1954,
   Lorden 1971). Members are correlated, so this is conservative; :func:`tighten_threshold`
   finds by simulation under the baseline the smallest ``h`` whose measured ARL0 is ``>= γ``.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

from driftline.core.cusum import FloatArray, union_threshold
from driftline.core.simulate import LlrModel, simulate

DAY = 86400.0
_cache: dict[str, float] = {}


@dataclass(frozen=True)
class Budget:
    """Operator budget: ``false_incidents`` per ``period_s`` across ``n_slices`` × detectors.

    >>> b = Budget(false_incidents=1, period_s=30 * DAY, n_slices=120, detectors_per_slice=4,
    ...            event_rate=2.0)
    >>> f"{b.arl0():.3g}"
    '2.49e+09'
    >>> print(b.describe(bank_size=96))
    ≤ 1 false incident per 30 days across 120 slices × 4 detectors at 2 events/s per slice \
→ γ = 2.49e+09 events (one false alarm per 39.4 years per detector), h = ln γ + ln 96 = 26.2
    """

    false_incidents: float
    period_s: float
    n_slices: int
    detectors_per_slice: int
    event_rate: float

    def __post_init__(self) -> None:
        if min(self.false_incidents, self.period_s, self.event_rate) <= 0.0:
            raise ValueError("false_incidents, period_s and event_rate must be positive")
        if self.n_slices < 1 or self.detectors_per_slice < 1:
            raise ValueError("need at least one slice and one detector")

    def arl0(self, event_rate: float | None = None) -> float:
        """``γ = r·T·S·D / F`` in events, for a slice at ``event_rate`` (default: the fleet's)."""
        r = self.event_rate if event_rate is None else event_rate
        n = self.n_slices * self.detectors_per_slice
        return r * self.period_s * n / self.false_incidents

    def threshold(self, bank_size: int, event_rate: float | None = None) -> float:
        """Analytic threshold ``ln γ + ln M`` for a bank of ``bank_size`` CUSUMs."""
        return union_threshold(self.arl0(event_rate), bank_size)

    def describe(self, bank_size: int | None = None) -> str:
        """One line an operator can check against the on-call policy."""
        g = self.arl0()
        days = self.period_s / DAY
        years = g / self.event_rate / (365.25 * DAY)
        s = "" if self.false_incidents == 1 else "s"
        text = (
            f"≤ {self.false_incidents:g} false incident{s} per {days:g} days across "
            f"{self.n_slices} slices × {self.detectors_per_slice} detectors at "
            f"{self.event_rate:g} events/s per slice → γ = {g:.3g} events "
            f"(one false alarm per {years:.3g} years per detector)"
        )
        if bank_size is not None:
            text += f", h = ln γ + ln {bank_size} = {self.threshold(bank_size):.3g}"
        return text


def tighten_threshold(
    model: LlrModel,
    probs: FloatArray,
    arl0: float,
    *,
    n_runs: int = 400,
    seed: int = 0,
    horizon_factor: float = 2.0,
    step: float = 0.05,
    margin_se: float = 1.0,
    max_simulated: float = 2e4,
) -> float:
    """Smallest ``h`` (on a grid of ``step``) whose simulated ARL0 under ``probs`` is ``>= arl0``.

    Runs are censored at ``horizon_factor·arl0`` events; the ARL0 at each grid threshold is the
    censored-exponential estimate ``Σ min(T_i, L) / #{T_i <= L}`` (CUSUM run lengths under the
    baseline are close to exponential for large ARL0; Siegmund 1985, ch. II), lowered by
    ``margin_se`` of its standard errors (``estimate/√#alarms``) so the promise errs on the safe
    side. Never above the analytic :func:`~driftline.core.cusum.union_threshold`.

    Targets above ``max_simulated`` events (a fleet budget gives 10⁸–10¹⁰) are too long to
    simulate. ``ln ARL0`` grows about linearly in ``h`` (slope 1 for large ``h``; Siegmund 1985,
    ch. X), so the threshold is calibrated at ``g0 = max_simulated`` and ``g0/16`` and
    extended along that secant, with slope at most 1 (measured slopes are 0.9–1 and rise toward
    1, which makes this err high). An asymptotic argument: the union bound is the guarantee.

    Deterministic for a given ``seed``; cached per process on the model, ``probs`` and arguments.

    >>> from driftline.core.simulate import bernoulli_model
    >>> m = bernoulli_model(0.01, [(2.0, 0.0), (3.0, 0.0), (5.0, 0.0), (10.0, 0.0)])
    >>> h = tighten_threshold(m, np.array([0.99, 0.01]), 300.0, n_runs=200)
    >>> h < union_threshold(300.0, 4)
    True
    """
    bank = int(model.base.shape[1] * model.base.shape[2])
    if arl0 > max_simulated:
        h0, h1 = (
            tighten_threshold(
                model,
                probs,
                g,
                n_runs=n_runs,
                seed=seed,
                step=step,
                horizon_factor=horizon_factor,
                margin_se=margin_se,
                max_simulated=max_simulated,
            )
            for g in (max_simulated, max_simulated / 16)
        )
        slope = min(math.log(16) / max(h0 - h1, 1e-9), 1.0)
        return min(h0 + math.log(arl0 / max_simulated) / slope, union_threshold(arl0, bank))
    upper = union_threshold(arl0, bank)
    digest = hashlib.sha256()
    for a in (model.base, model.diff, model.row, model.base_of, np.asarray(probs, np.float64)):
        digest.update(np.ascontiguousarray(a).tobytes())
    digest.update(repr((arl0, n_runs, seed, horizon_factor, step, margin_se)).encode())
    key = digest.hexdigest()
    if key not in _cache:
        grid = np.arange(step, upper + 0.5 * step, step)
        horizon = math.ceil(horizon_factor * arl0)
        sim = simulate([model], [grid.tolist()], probs, n_runs=n_runs, horizon=horizon, seed=seed)
        events = np.maximum((~sim[0].censored).sum(axis=0), 1)
        arl = sim[0].times.sum(axis=0) / events
        ok = np.flatnonzero(arl * (1.0 - margin_se / np.sqrt(events)) >= arl0)
        _cache[key] = float(min(grid[ok[0]], upper)) if ok.size else upper
    return _cache[key]
