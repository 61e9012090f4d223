"""Bernoulli-rate change detection (OOD rate, low confidence, error rate): a bank of CUSUMs.

Each event carries a flag ``x ∈ {0, 1}`` and its own reference rate ``p0`` (the baseline's OOD
exceedance rate, the low-confidence quantile level, or the expected error of the event's
cluster). Member ``m`` is the alternative ``p1 = min(ρ_m·p0 + δ_m, (1 + p0)/2)``: multiplicative
increases ``ρ`` and, for rates near zero, additive shifts ``δ``. The cap keeps ``p1 < 1`` while
still above ``p0``. Increments are ``ln(p1/p0)`` for ``x = 1`` and ``ln((1-p1)/(1-p0))`` for
``x = 0`` (Page 1954; Reynolds & Stoumbos 1999 for the Bernoulli CUSUM).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Self

import numpy as np

from driftline.core.cusum import CusumBank, FloatArray, shared_float, union_threshold

OOD_ALTERNATIVES = ((2.0, 0.0), (3.0, 0.0), (5.0, 0.0), (10.0, 0.0))
CONFIDENCE_ALTERNATIVES = ((1.5, 0.0), (2.0, 0.0), (3.0, 0.0))
ERROR_ALTERNATIVES = ((1.5, 0.0), (2.0, 0.0), (3.0, 0.0), (1.0, 0.02), (1.0, 0.05), (1.0, 0.1))
_P0_FLOOR = 1e-9
_Rows = tuple[tuple[FloatArray, float], tuple[FloatArray, float]]
# Reference rates are few (one per baseline) and every slice's bank shares their tables.
_SHARED_TABLES = 1024
_tables: dict[tuple[tuple[tuple[float, float], ...], float], _Rows] = {}
_alternatives: dict[tuple[tuple[float, float], ...], tuple[tuple[float, float], ...]] = {}
# what a bank holds until its first event (always a new p0 then: NaN equals nothing): shared,
# never read
_NO_ROW: FloatArray = np.zeros(0)
_NO_ROW.setflags(write=False)
_NO_ROWS: _Rows = ((_NO_ROW, 0.0), (_NO_ROW, 0.0))
_NAN = float("nan")


def bernoulli_table(p0: float, alternatives: Sequence[tuple[float, float]]) -> FloatArray:
    """Increments for reference rate ``p0``: row 0 for ``x = 0``, row 1 for ``x = 1``.

    >>> bernoulli_table(float("nan"), OOD_ALTERNATIVES)
    Traceback (most recent call last):
    ...
    ValueError: reference rate p0 = nan is not finite
    """
    p0 = float(p0)
    if not math.isfinite(p0):  # the clamp below keeps NaN: a NaN statistic, never an alarm
        raise ValueError(f"reference rate p0 = {p0} is not finite")
    p0 = min(max(p0, _P0_FLOOR), 1.0 - _P0_FLOOR)
    alt = np.asarray(alternatives, dtype=np.float64).reshape(-1, 2)
    p1 = np.minimum(alt[:, 0] * p0 + alt[:, 1], 0.5 * (1.0 + p0))
    return np.stack([np.log1p(-p1) - np.log1p(-p0), np.log(p1) - np.log(p0)])


def _shared_rows(alternatives: tuple[tuple[float, float], ...], p0: float) -> _Rows:
    """:func:`bernoulli_table` rows with their largest increments, cached per ``p0``."""
    key = (alternatives, p0)
    rows = _tables.get(key)
    if rows is None:
        if len(_tables) >= _SHARED_TABLES:
            _tables.clear()
        table = bernoulli_table(p0, alternatives)
        rows = _tables[key] = ((table[0], float(table[0].max())),
                               (table[1], float(table[1].max())))
    return rows


class BernoulliCusum(CusumBank):
    """Bank of CUSUMs for an increase of a per-event Bernoulli rate.

    Parameters
    ----------
    alternatives
        ``(ρ, δ)`` pairs: post-change rate ``min(ρ·p0 + δ, (1 + p0)/2)``.
    arl0
        Target average run length under the baseline (events); default threshold
        ``ln(arl0) + ln(len(alternatives))``.
    threshold
        Explicit threshold; overrides ``arl0``.

    Examples
    --------
    >>> import numpy as np
    >>> det = BernoulliCusum(arl0=1000.0)
    >>> rng = np.random.default_rng(1)
    >>> flags = rng.random(5000) < 0.05  # the rate went from 1 % to 5 %
    >>> at = next(i for i, x in enumerate(flags) if det.update(bool(x), 0.01))
    >>> at < 1000, det.argmax["rho"] in (3.0, 5.0, 10.0)
    (True, True)

    References
    ----------
    E. S. Page, "Continuous inspection schemes", Biometrika 41, 1954.
    M. R. Reynolds, Z. G. Stoumbos, "A CUSUM chart for monitoring a proportion when inspecting
    continuously", J. Quality Technology 31, 1999.
    """

    __slots__ = ("alternatives", "_arl0", "_last_p0", "_rows", "_zero")
    kind = "bernoulli"

    def __init__(
        self,
        alternatives: Sequence[Sequence[float]] = OOD_ALTERNATIVES,
        *,
        arl0: float = 1e4,
        threshold: float | None = None,
    ) -> None:
        alts = tuple((float(r), float(d)) for r, d in alternatives)
        self.alternatives = _alternatives.setdefault(alts, alts)  # one tuple per set
        if not self.alternatives or any(
            r < 1.0 or d < 0.0 or (r == 1.0 and d == 0.0) for r, d in self.alternatives
        ):
            raise ValueError("alternatives must be increases: rho >= 1, delta >= 0, not both null")
        self._arl0 = shared_float(arl0)
        size = len(self.alternatives)
        super().__init__(size, union_threshold(arl0, size) if threshold is None else threshold)
        self._last_p0 = _NAN
        self._rows: _Rows = _NO_ROWS
        self._zero = True  # every S_m is exactly 0

    def update(self, flag: bool, p0: float, time: float | None = None) -> bool:
        """Feed one event's flag against its reference rate ``p0``; True while alarming."""
        if p0 != self._last_p0:
            self._rows = _shared_rows(self.alternatives, p0)
            self._last_p0 = p0
        inc, hi = self._rows[1 if flag else 0]
        if self._zero and hi <= 0.0:
            # Every S_m stays at 0 (the usual no-flag event): only the count moves. Onset stamps
            # of members at 0 are never read, so skipping them changes nothing observable.
            self._n += 1
            return False
        self._begin(time)
        self._s += inc
        alarm = self._finish(hi)
        self._zero = not self._s.any()
        return alarm

    def reset(self) -> None:
        super().reset()
        self._zero = True

    @classmethod
    def restore(cls, snap: dict[str, Any]) -> Self:
        det = super().restore(snap)
        det._zero = not det._s.any()
        return det

    def describe_member(self, m: int) -> dict[str, Any]:
        rho, delta = self.alternatives[m]
        return {"rho": rho, "delta": delta}

    def config(self) -> dict[str, Any]:
        return {"alternatives": [list(a) for a in self.alternatives], "arl0": self._arl0}


class ErrorRateCusum(BernoulliCusum):
    """Error-rate increase against the expected error of each event's cluster.

    ``cluster_error`` holds the reference error rate ``e_c`` per cluster (from labelled reference
    data); :meth:`update_cluster` uses ``p0 = e_c``. :meth:`update` takes ``p0`` directly, e.g.
    when the expected error is computed upstream.

    >>> det = ErrorRateCusum(cluster_error=[0.01, 0.2], arl0=500.0)
    >>> det.update_cluster(True, 0)  # an error where 1 % was expected
    False
    >>> det.argmax
    {'rho': 1.0, 'delta': 0.1}
    """

    __slots__ = ("cluster_error",)
    kind = "error_rate"

    def __init__(
        self,
        alternatives: Sequence[Sequence[float]] = ERROR_ALTERNATIVES,
        *,
        cluster_error: Sequence[float] | None = None,
        arl0: float = 1e4,
        threshold: float | None = None,
    ) -> None:
        super().__init__(alternatives, arl0=arl0, threshold=threshold)
        self.cluster_error = None if cluster_error is None else [float(e) for e in cluster_error]

    def update_cluster(self, error: bool, cluster: int, time: float | None = None) -> bool:
        """Feed one labelled event of ``cluster``; ``p0`` is that cluster's reference error."""
        if self.cluster_error is None:
            raise ValueError("no per-cluster reference error rates configured")
        return self.update(error, self.cluster_error[cluster], time)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "cluster_error": self.cluster_error}
