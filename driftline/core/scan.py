"""Root-slice attribution by a greedy likelihood scan over recent events (pure numpy).

One physical change makes many slices alarm: a hazy lens at one station raises the OOD rate of
that station, of each of its station×shift slices, of the shifts and of the lots that ran
through it. Which slice *explains* the evidence? Over a window of recent events (each with its
slice values, an OOD flag and its baseline's exceedance rate ``p0``), each candidate slice ``S``
gets the Poisson log-likelihood ratio of "the OOD rate in ``S`` is ``λ`` times the baseline"
against "it is the baseline" (the spatial scan statistic of Kulldorff, 1997):

    LLR(S) = x ln(x / e) − (x − e)   if x > e, else 0,

with ``x`` the OOD events in ``S`` and ``e = Σ p0`` their expected number. A slice broader than
the change adds clean events (``e`` grows, ``x`` does not); a narrower one misses changed events
(``x`` shrinks): the maximum sits on the slice that matches the change. Exact ties (the same
events, e.g. a station whose only recent shift is the night) go to the narrower slice.

The scan is greedy: the best slice is a root; its events are removed ("explained away") and the
rest is scanned again, so two simultaneous changes give two roots, and a slice whose excess
vanishes once a root's events are removed is *related* to that root.

>>> import numpy as np
>>> station = np.array(["a", "a", "b", "b"] * 50)
>>> shift = np.array(["day"] * 100 + ["night"] * 100)
>>> ood = (station == "a") & (shift == "night")
>>> hits = scan({"station": station, "shift": shift}, ood, np.full(200, 0.01),
...             ["station", "shift", "station+shift"])
>>> [(h.template, h.values) for h in hits]
[('station+shift', {'station': 'a', 'shift': 'night'})]

References
----------
Kulldorff, M. (1997). A spatial scan statistic. Communications in Statistics — Theory and
Methods 26(6), 1481–1496. Neill, D. B. (2012). Fast subset scan for spatial pattern detection.
JRSS B 74(2), 337–360.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

BoolArray = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class Hit:
    """A root found by the scan: its slice, evidence and the events it explains."""

    template: str
    values: dict[str, str]
    llr: float
    n: int
    observed: int
    expected: float
    mask: BoolArray

    @property
    def slice_id(self) -> str:
        return "|".join(f"{d}={v}" for d, v in self.values.items())

    @property
    def rate_ratio(self) -> float:
        return self.observed / self.expected if self.expected > 0 else float("inf")


def poisson_llr(x: npt.NDArray[np.float64], e: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Kulldorff's Poisson LLR for an elevated rate, 0 where ``x <= e``."""
    x, e = np.asarray(x, np.float64), np.maximum(np.asarray(e, np.float64), 1e-12)
    with np.errstate(divide="ignore", invalid="ignore"):
        llr = np.where(x > e, x * np.log(np.where(x > 0, x / e, 1.0)) - (x - e), 0.0)
    return np.asarray(llr, np.float64)


def _candidates(cols: Mapping[str, npt.NDArray[np.str_]], templates: Sequence[str],
                live: BoolArray) -> list[tuple[str, dict[str, str], BoolArray]]:
    out = []
    for template in templates:
        dims = template.split("+")
        keys = np.array(["\x1f".join(v) for v in zip(*(cols[d] for d in dims), strict=True)])
        for key in np.unique(keys[live]):
            mask = (keys == key) & live
            out.append((template, dict(zip(dims, str(key).split("\x1f"), strict=True)), mask))
    return out


def scan(cols: Mapping[str, Sequence[str] | npt.NDArray[np.str_]],
         flags: Sequence[bool] | BoolArray, p0: Sequence[float] | npt.NDArray[np.float64],
         templates: Sequence[str], *,
         min_llr: float = 10.0, max_roots: int = 8, min_events: int = 5) -> list[Hit]:
    """Greedy scan: roots in order of evidence, each with the events it explains.

    ``cols`` maps each dimension to the events' values; ``flags`` are the events' OOD flags;
    ``p0`` their baselines' exceedance rates. A root needs ``llr >= min_llr`` (nats) and at least
    ``min_events`` OOD events.
    """
    arrays = {d: np.asarray(v).astype(str) for d, v in cols.items()}
    f = np.asarray(flags, bool)
    p = np.asarray(p0, np.float64)
    live = np.ones(f.size, bool)
    hits: list[Hit] = []
    while len(hits) < max_roots and live.any():
        cands = _candidates(arrays, templates, live)
        if not cands:
            break
        x = np.array([f[m].sum() for _, _, m in cands], np.float64)
        e = np.array([p[m].sum() for _, _, m in cands], np.float64)
        llr = poisson_llr(x, e)
        depth = np.array([len(t.split("+")) for t, _, _ in cands])
        # Highest LLR; exact ties (same events) to the narrower slice.
        best = int(np.lexsort((-depth, -np.round(llr, 9)))[0])
        if llr[best] < min_llr or x[best] < min_events:
            break
        template, values, mask = cands[best]
        hits.append(Hit(template, values, float(llr[best]), int(mask.sum()), int(x[best]),
                        float(e[best]), mask))
        live &= ~mask
    return hits


def explained_by(slice_mask: BoolArray, flags: BoolArray, p0: npt.NDArray[np.float64],
                 hits: Sequence[Hit]) -> int | None:
    """Index of the hit that removes most of a slice's OOD excess, or None if no hit does."""
    f = np.asarray(flags, bool)
    best, best_gain = None, 0.0
    base = float(poisson_llr(np.array([f[slice_mask].sum()]), np.array([p0[slice_mask].sum()]))[0])
    for i, h in enumerate(hits):
        rest = slice_mask & ~h.mask
        after = float(poisson_llr(np.array([f[rest].sum()]), np.array([p0[rest].sum()]))[0])
        gain = base - after
        if gain > best_gain:
            best, best_gain = i, gain
    return best
