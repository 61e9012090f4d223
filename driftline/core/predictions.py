"""Prediction baselines: which mix of predicted labels, and how much low confidence, to expect.

When the reference events carry the model's predictions, each baseline of
:mod:`driftline.core.baselines` (global, station, station×shift) also gets

* the distribution of predicted labels over a **bounded vocabulary**: the reference's most
  frequent labels (at most ``max_labels``) plus one last category, *other*, for every label
  outside it — those the reference saw rarely and those it never saw. The vocabulary bounds
  the prediction-mix CUSUM bank (``(L+1)·(E+F)`` members per slice) whatever the model's
  number of classes; a new label showing up is mass moving into *other*;
* a **low-confidence cut**: the ``quantile`` (e.g. 5 %) of the baseline's reference scores. An
  event is *low-confidence* when its score is below the cut, and the baseline's rate of that,
  ``(#{s < cut} + 1)/(n + 1)``, is the reference rate ``p0`` of the confidence CUSUM — the
  conformal rank argument of :func:`~driftline.core.baselines.ood_threshold`, mirrored: for a
  new score exchangeable with the reference it is the probability of falling below the cut
  (exactly, without ties), and it is never 0. Tied scores (a model saturating at 1.0) make
  the rate lower than the level; the rate, not the level, is what the detector uses.

Both are stated rates, point estimates from the baseline's reference sample (evidence, as the
cluster mix and the OOD rate of :mod:`driftline.core.baselines` are), and the detectors judge
against the same kind of bounds as those: per category, lower and upper bounds of the label mix
(:func:`~driftline.core.baselines.mix_bounds`), and the upper bound of the low-confidence rate
(:func:`~driftline.core.baselines.tail_rate_bound`, the OOD rate's argument mirrored), at the
reference's bound confidence (:func:`prediction_bounds`).

A baseline gets its own prediction statistics when it holds at least ``min_count`` reference
events with a prediction (the global one: at least :data:`MIN_GLOBAL`); otherwise its events
use the nearest ancestor's. The label distribution is smoothed toward the parent's (toward
uniform for ``global``) with ``alpha`` pseudo-counts per category, as cluster mixes are, so
every category — *other* included — has ``p > 0``. *Other* is then kept at least at the global
rate: labels the reference never predicted are a property of the model, not of a station, and
a station×shift's own zero count cannot tell rates below ``1/n`` apart — smoothing alone would
shrink *other* by ``alpha·K/(n + alpha·K)`` at each level (to about 1e-8 two levels down), and
two unseen labels would then make an alarm.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from numpy.typing import NDArray

from driftline.core.baselines import (
    DEFAULT_CONFIDENCE,
    GLOBAL,
    mix_bounds,
    smoothed,
    tail_rate_bound,
)

# The global baseline's least number of predictions: at a 5 % cut, one reference score below it.
MIN_GLOBAL = 20


def label_vocabulary(labels: Iterable[str], max_labels: int) -> tuple[str, ...]:
    """The ``max_labels`` most frequent labels, most frequent first (ties by name).

    >>> label_vocabulary(["ok", "scrap", "ok", "dent", "ok", "scrap", "chip"], 2)
    ('ok', 'scrap')
    """
    if max_labels < 1:
        raise ValueError("max_labels must be at least 1")
    counts = Counter(labels)
    return tuple(sorted(counts, key=lambda lb: (-counts[lb], lb))[:max_labels])


def label_codes(labels: Sequence[str | None], vocabulary: Sequence[str]) -> NDArray[np.int64]:
    """Category of each prediction: its index in ``vocabulary``, ``len(vocabulary)`` (*other*)
    for a label outside it, ``-1`` for no prediction.

    >>> label_codes(["ok", None, "chip", "scrap"], ("ok", "scrap")).tolist()
    [0, -1, 2, 1]
    """
    index = {lb: i for i, lb in enumerate(vocabulary)}
    other = len(vocabulary)
    return np.array([-1 if lb is None else index.get(lb, other) for lb in labels], np.int64)


def low_confidence_cut(scores: NDArray[np.floating], quantile: float) -> tuple[float, float, int]:
    """Cut at ``quantile`` of the scores, the rate of scores below it, and their count.

    An event is low-confidence when ``score < cut``; the rate is ``(#{s < cut} + 1)/(n + 1)``.

    >>> cut, rate, below = low_confidence_cut(np.arange(100.0), 0.05)
    >>> cut, round(rate, 4), below
    (5.0, 0.0594, 5)
    >>> low_confidence_cut(np.ones(99), 0.05)  # saturated scores: none below, rate 1/(n+1)
    (1.0, 0.01, 0)
    """
    if not 0.0 < quantile < 1.0:
        raise ValueError("quantile must be in (0, 1)")
    if len(scores) == 0:
        raise ValueError("no scores")
    cut = float(np.quantile(scores, quantile, method="higher"))
    below = int(np.count_nonzero(scores < cut))
    return cut, (below + 1) / (len(scores) + 1), below


def prediction_bounds(counts: NDArray[np.integer], prior: NDArray[np.float64], alpha: float,
                      p: NDArray[np.float64], below: int,
                      confidence: float = DEFAULT_CONFIDENCE,
                      ) -> tuple[NDArray[np.float64], NDArray[np.float64], float]:
    """What the prediction detectors judge a baseline against: the label mix's per-category
    lower and upper bounds, and the low-confidence rate's upper bound, at ``confidence``.

    The mix bounds are :func:`~driftline.core.baselines.mix_bounds` of the baseline's label
    ``counts`` with the prior and ``alpha`` its stated mix ``p`` was smoothed with, widened to
    hold ``p`` (whose *other* may have been raised to the global rate); the rate's is
    :func:`~driftline.core.baselines.tail_rate_bound` of the ``below`` of ``sum(counts)``
    scores under the cut.

    >>> counts, prior = np.array([160, 36, 4]), np.full(3, 1 / 3)
    >>> p = smoothed(counts, prior, 0.5)
    >>> lower, upper, low = prediction_bounds(counts, prior, 0.5, p, 9)
    >>> [round(float(x), 3) for x in (lower[0], p[0], upper[0])], round(low, 3)
    ([0.684, 0.797, 0.889], 0.109)
    """
    lower, upper = mix_bounds(counts, prior, alpha, confidence)
    return (np.minimum(lower, p), np.maximum(upper, p),
            tail_rate_bound(int(np.sum(counts)), below, confidence))


class PredictionRates(Protocol):
    """What the prediction detectors of one baseline judge against, one read-only object built
    once per baseline (:class:`driftline.reference.index.PredictionView`), so that a mix and a
    rate bound always come from the same baseline: the stated label mix ``p`` (its size is the
    detector's), its ``bounds`` (``(2, K)`` lower, upper) and the ``low_confidence_bound``."""

    @property
    def p(self) -> NDArray[np.float64]: ...
    @property
    def bounds(self) -> NDArray[np.float64]: ...
    @property
    def low_confidence_bound(self) -> float: ...


@dataclass(frozen=True)
class PredictionBaseline:
    """Expected prediction mix and low-confidence rate of one baseline: stated (``p``,
    ``low_confidence_rate``; evidence) and the bounds the detectors judge against (``p_lower``,
    ``p_upper``, ``low_confidence_rate_bound``; :func:`prediction_bounds`).

    ``parent`` is the nearest ancestor with its own prediction baseline (``None`` for global);
    ``counts``/``p`` are over the vocabulary's categories, *other* last.
    """

    key: str
    parent: str | None
    n: int
    counts: tuple[int, ...]
    p: tuple[float, ...]
    low_confidence_cut: float
    low_confidence_rate: float
    low_confidence_count: int
    p_lower: tuple[float, ...] = ()
    p_upper: tuple[float, ...] = ()
    low_confidence_rate_bound: float = math.nan


def build_prediction_baselines(
    codes: NDArray[np.integer], scores: NDArray[np.floating],
    cells: Mapping[str, tuple[str | None, NDArray[np.bool_]]], n_categories: int, *,
    min_count: int = 200, alpha: float = 0.5, quantile: float = 0.05,
    confidence: float = DEFAULT_CONFIDENCE,
) -> dict[str, PredictionBaseline]:
    """Prediction baselines for the cluster baselines' ``cells``.

    Parameters
    ----------
    codes
        Category of each reference event's prediction (:func:`label_codes`; ``-1``: none).
    scores
        Each event's prediction score (ignored where ``codes < 0``).
    cells
        Per cluster-baseline key, in parent-before-child order: its parent key and the mask of
        the reference events it covers (:func:`~driftline.core.baselines.baseline_cells`).
    n_categories
        Vocabulary size plus one (*other*).
    min_count, alpha, quantile
        Fewest predictions for a station or station×shift baseline, smoothing pseudo-counts per
        category, and the low-confidence quantile level.
    confidence
        Of the bounds the detectors judge against (:func:`prediction_bounds`).

    Returns
    -------
    dict
        Baselines with enough predictions, by key; a key left out uses its nearest ancestor's.

    Examples
    --------
    >>> codes = np.array([0] * 30 + [1] * 10 + [-1] * 5)
    >>> scores = np.linspace(0.5, 1.0, 45)
    >>> cells = {"global": (None, np.ones(45, bool))}
    >>> b = build_prediction_baselines(codes, scores, cells, 3, quantile=0.1)["global"]
    >>> b.n, b.counts, [round(x, 3) for x in b.p], round(b.low_confidence_rate, 3)
    (40, (30, 10, 0), [0.735, 0.253, 0.012], 0.122)
    >>> [round(x, 2) for x in b.p_upper], round(b.low_confidence_rate_bound, 2)  # 40 samples
    ([0.94, 0.54, 0.2], 0.32)
    """
    has = np.asarray(codes) >= 0
    out: dict[str, PredictionBaseline] = {}
    owner: dict[str, str | None] = {}  # cluster key -> key of the prediction baseline it uses
    for key, (parent, mask) in cells.items():
        inherited = owner.get(parent) if parent is not None else None
        cell = mask & has
        n = int(cell.sum())
        if n < (MIN_GLOBAL if key == GLOBAL else min_count):
            owner[key] = inherited
            continue
        counts = np.bincount(codes[cell], minlength=n_categories).astype(np.int64)
        prior = (np.asarray(out[inherited].p) if inherited is not None
                 else np.full(n_categories, 1.0 / n_categories))
        p = smoothed(counts, prior, alpha)
        root = out.get(GLOBAL)
        if root is not None and p[-1] < root.p[-1]:  # other: at least the global rate
            p[:-1] *= (1.0 - root.p[-1]) / p[:-1].sum()
            p[-1] = root.p[-1]
        cut, rate, below = low_confidence_cut(np.asarray(scores, np.float64)[cell], quantile)
        lower, upper, rate_bound = prediction_bounds(counts, prior, alpha, p, below, confidence)
        out[key] = PredictionBaseline(key, inherited, n, tuple(int(c) for c in counts),
                                      tuple(float(x) for x in p), cut, rate, below,
                                      tuple(float(x) for x in lower),
                                      tuple(float(x) for x in upper), rate_bound)
        owner[key] = key
    return out
