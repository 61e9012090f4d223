"""Cluster-mix (and prediction-mix) change detection: a bank of one-parameter CUSUMs.

For each category ``k`` and each level in a small grid, two one-parameter alternatives to the
event's baseline distribution ``p`` (which may differ from event to event):

* **into k** — mass ``ε`` moves into ``k`` from everywhere, ``q = (1-ε)p + ε·e_k``; an event in
  category ``c`` adds ``ln((1-ε) + ε/p_k)`` if ``c = k`` and ``ln(1-ε)`` otherwise;
* **out of k** — a fraction ``f`` of ``k``'s mass leaves and is spread proportionally,
  ``q_k = (1-f)p_k`` and ``q_c = p_c(1 + f·p_k/(1-p_k))``; an event adds ``ln(1-f)`` if
  ``c = k`` and ``ln(1 + f·p_k/(1-p_k))`` otherwise. (A relative fraction keeps the family valid
  for every ``p``; an absolute mass ``ε`` is the fraction ``ε/p_k``.)

The statistic is the bank's maximum, which is the CUSUM form of a GLR over the finite family
(Page 1954; Lorden 1971; Tartakovsky, Nikiforov & Basseville 2014, §8.3 on banks and mixtures).

A baseline known only through a reference sample is given as **bounds** instead of ``p``: an
array of shape ``(2, K)``, the lower and upper confidence bounds of each category's share
(:func:`driftline.core.baselines.mix_bounds`). "Into k" members then judge against ``p_k`` at
its upper bound and "out of k" members against its lower bound — each member's least favourable
law — so the bank's threshold keeps its guarantee whenever the true mix is within the bounds
(a robust CUSUM; Unnikrishnan, Veeravalli & Meyn 2011). The increments are still one table per
baseline, looked up per event. ``p`` itself is the case ``lower = upper = p``.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np

from driftline.core.cusum import CusumBank, FloatArray, shared_float, union_threshold

# Four masses and two fractions: benchmarks/detection.py measured the same delays (within its
# ±3 %) as the earlier 5 + 4 grid, at two thirds of the state; 0.4 keeps large shifts' onsets sharp.
DEFAULT_EPSILONS = (0.02, 0.05, 0.12, 0.4)
DEFAULT_FRACTIONS = (0.5, 0.95)
_P_FLOOR = 1e-12
_SHARED_TABLES = 512  # baselines are few (global, stations, station×shift): share their tables

_Tables = tuple[FloatArray, tuple[float, ...]]
_Key = tuple[int, tuple[float, ...], tuple[float, ...]]
_cache: dict[_Key, tuple[weakref.ref[FloatArray], _Tables]] = {}
_grids: dict[tuple[float, ...], tuple[float, ...]] = {}  # one tuple per grid, shared by banks
# what a bank holds until its first event: shared, never written (the first event replaces it)
_NO_TABLE: FloatArray = np.zeros((0, 0))
_NO_TABLE.setflags(write=False)


def _grid(values: Sequence[float]) -> tuple[float, ...]:
    key = tuple(float(v) for v in values)
    return _grids.setdefault(key, key)


def mix_tables(
    p: FloatArray, epsilons: Sequence[float], fractions: Sequence[float]
) -> tuple[FloatArray, FloatArray]:
    """Per-event increments for baseline ``p``: ``(base, diff)``, each of shape ``(K, E+F)``.

    An event in category ``c`` adds ``base`` to every member and ``diff[c]`` to row ``c``.
    ``p`` is a probability vector, or bounds of shape ``(2, K)`` (lower, upper; see the module
    docstring): "into" members then use the upper row, "out of" members the lower one.

    >>> p = np.full(4, 0.25)
    >>> exact = mix_tables(p, [0.1], [0.5])
    >>> same = mix_tables(np.stack([p, p]), [0.1], [0.5])
    >>> all(np.array_equal(a, b) for a, b in zip(exact, same))
    True
    >>> base, diff = mix_tables(np.array([[0.2] * 4, [0.3] * 4]), [0.1], [0.5])
    >>> bool((base + diff)[0, 0] < exact[0][0, 0] + exact[1][0, 0])  # a smaller "into" step
    True
    >>> mix_tables(np.array([0.5, np.nan, 0.5]), [0.1], [0.5])
    Traceback (most recent call last):
    ...
    ValueError: baseline share nan is not finite (at 1 in the mix)
    """
    p = np.asarray(p, dtype=np.float64)
    bad = np.argwhere(~np.isfinite(p))
    if bad.size:  # NaN fails every comparison: the sum check below let a NaN mix through
        at = tuple(int(i) for i in bad[0])
        raise ValueError(f"baseline share {p[at]} is not finite (at {at[0] if p.ndim == 1 else at}"
                         f" in the {'bounds' if p.ndim == 2 else 'mix'})")
    if p.ndim == 2:
        if p.shape[0] != 2 or not ((p[0] >= 0.0) & (p[0] <= p[1]) & (p[1] <= 1.0)).all():
            raise ValueError("bounds must be (lower, upper) rows with 0 <= lower <= upper <= 1")
        lower, upper = (np.clip(row, _P_FLOOR, 1.0 - _P_FLOOR) for row in p)
    elif p.ndim != 1 or abs(float(p.sum()) - 1.0) > 1e-6:
        raise ValueError("baseline must be a probability vector")
    else:
        lower = upper = np.clip(p, _P_FLOOR, 1.0 - _P_FLOOR)
    eps = np.asarray(epsilons, dtype=np.float64)
    frac = np.asarray(fractions, dtype=np.float64)
    hi, lo = upper[:, None], lower[:, None]
    with np.errstate(divide="ignore"):
        into_hit = np.log((1.0 - eps) + eps / hi)
        into_base = np.broadcast_to(np.log1p(-eps), into_hit.shape)
        out_hit = np.broadcast_to(np.log1p(-frac), (upper.size, frac.size))
        out_base = np.log1p(frac * (lo / (1.0 - lo)))
    base = np.concatenate([into_base, out_base], axis=1)
    diff = np.concatenate([into_hit, out_hit], axis=1) - base
    return base, diff


def _shared_tables(
    p: FloatArray, epsilons: tuple[float, ...], fractions: tuple[float, ...]
) -> _Tables:
    """Per category ``c``, the whole bank's increment for an event in ``c`` (``base``, with row
    ``c`` replaced by ``base[c] + diff[c]``), flattened: shape ``(K, K·(E+F))``; and its
    largest element (the bank's bound step). Shared by every bank judging against ``p`` (a
    baseline or its bounds: the same array object, so the table is found by identity)."""
    key = (id(p), epsilons, fractions)
    hit = _cache.get(key)
    if hit is not None and hit[0]() is p:
        return hit[1]
    base, diff = mix_tables(p, epsilons, fractions)
    k = base.shape[0]
    inc = np.broadcast_to(base, (k, *base.shape)).copy()
    inc[np.arange(k), np.arange(k)] += diff
    inc = inc.reshape(k, -1)
    tables = (inc, tuple(inc.max(axis=1).tolist()))
    if len(_cache) >= _SHARED_TABLES:  # more baselines than a reference has: start over
        _cache.clear()
    _cache[key] = (weakref.ref(p), tables)
    return tables


class ClusterMixCusum(CusumBank):
    """Bank of "mass moved into / out of category k" CUSUMs over a categorical stream.

    Parameters
    ----------
    n_categories
        Number of categories ``K`` (reference clusters, or predicted labels).
    arl0
        Target average run length under the baseline, in events; sets the default threshold
        :func:`~driftline.core.cusum.union_threshold` ``(arl0, K·(E+F))``.
    epsilons
        Masses ``ε`` moved into a category.
    fractions
        Fractions ``f`` of a category's mass moved out of it.
    threshold
        Explicit threshold (e.g. tightened by simulation); overrides ``arl0``.

    Examples
    --------
    >>> import numpy as np
    >>> p = np.full(4, 0.25)
    >>> det = ClusterMixCusum(4, arl0=1000.0)
    >>> rng = np.random.default_rng(0)
    >>> before = [det.update(int(c), p) for c in rng.choice(4, 300)]
    >>> shifted = rng.choice(4, 2000, p=[0.55, 0.15, 0.15, 0.15])
    >>> at = next(i for i, c in enumerate(shifted) if det.update(int(c), p, time=300.0 + i))
    >>> det.argmax["direction"], det.argmax["category"], det.onset_index is not None
    ('into', 0, True)

    References
    ----------
    E. S. Page, "Continuous inspection schemes", Biometrika 41, 1954.
    G. Lorden, "Procedures for reacting to a change in distribution", Ann. Math. Stat. 42, 1971.
    A. Tartakovsky, I. Nikiforov, M. Basseville, *Sequential Analysis*, CRC Press, 2014.
    J. Unnikrishnan, V. V. Veeravalli, S. P. Meyn, "Minimax robust quickest change detection",
    IEEE Trans. Information Theory 57, 2011.
    """

    __slots__ = ("epsilons", "fractions", "n_categories", "_arl0", "_width", "_last_p",
                 "_inc", "_hi")
    kind = "cluster_mix"

    def __init__(
        self,
        n_categories: int,
        *,
        arl0: float = 1e4,
        epsilons: Sequence[float] = DEFAULT_EPSILONS,
        fractions: Sequence[float] = DEFAULT_FRACTIONS,
        threshold: float | None = None,
    ) -> None:
        self.epsilons = _grid(epsilons)
        self.fractions = _grid(fractions)
        if not all(0.0 < e < 1.0 for e in self.epsilons) or not all(
            0.0 < f <= 1.0 for f in self.fractions
        ):
            raise ValueError("need 0 < epsilon < 1 and 0 < fraction <= 1")
        if n_categories < 2:
            raise ValueError("need at least two categories")
        self.n_categories = int(n_categories)
        self._arl0 = shared_float(arl0)
        self._width = len(self.epsilons) + len(self.fractions)
        size = self.n_categories * self._width
        super().__init__(size, union_threshold(arl0, size) if threshold is None else threshold)
        self._last_p: FloatArray | None = None
        self._inc: FloatArray = _NO_TABLE  # per category: the bank's increments
        self._hi: tuple[float, ...] = ()  # per category: its largest increment

    def update(self, category: int, baseline: FloatArray, time: float | None = None) -> bool:
        """Feed one event in ``category`` judged against ``baseline`` (a probability vector, or
        its ``(2, K)`` lower/upper bounds: see the module docstring); True while alarming."""
        if baseline is not self._last_p:
            if baseline.shape not in ((self.n_categories,), (2, self.n_categories)):
                raise ValueError(f"baseline must have shape ({self.n_categories},) or "
                                 f"(2, {self.n_categories})")
            self._inc, self._hi = _shared_tables(baseline, self.epsilons, self.fractions)
            self._last_p = baseline
        if not 0 <= category < self.n_categories:
            raise ValueError(f"category {category} outside 0..{self.n_categories - 1}")
        self._begin(time)
        self._s += self._inc[category]
        return self._finish(self._hi[category])

    def describe_member(self, m: int) -> dict[str, Any]:
        k, j = divmod(m, self._width)
        n_eps = len(self.epsilons)
        if j < n_eps:
            return {"category": k, "direction": "into", "epsilon": self.epsilons[j]}
        return {"category": k, "direction": "out", "fraction": self.fractions[j - n_eps]}

    def config(self) -> dict[str, Any]:
        return {
            "n_categories": self.n_categories,
            "arl0": self._arl0,
            "epsilons": list(self.epsilons),
            "fractions": list(self.fractions),
        }


class PredictionMixCusum(ClusterMixCusum):
    """The same bank over predicted-label categories (baseline: the reference prediction mix)."""

    __slots__ = ()
    kind = "prediction_mix"
