"""Cells without a baseline of their own, and whether the one they fall back to fits them.

A station or station×shift with fewer than ``min_count`` reference samples gets no baseline:
its events are judged against its parent's (:func:`driftline.core.baselines.resolve`). When
the cell's own reference events already hold another cluster mix than that parent — a
station whose camera sees other parts, a night shift under other light — its unchanged live
events look like drift to the cluster-mix detector, and its slices alarm from the first hour.
The build records each such cell with a G-test of its reference cluster counts against the
mix it is judged against, so that ``reference build`` and ``reference show`` can say so
before the stages run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy.stats import chi2

from driftline.core.baselines import Baseline, resolve, station_key, station_shift_key

# A cell whose reference mix fits its fallback worse than this is named: at 0.001, one cell in
# a thousand that does fit is named by chance; one that does not fit alarms on unchanged data.
MISFIT_P = 1e-3


def g_test(counts: NDArray[np.integer], p: Sequence[float]) -> float:
    """P-value of the likelihood-ratio (G) test of ``counts`` against the mix ``p``.

    >>> round(g_test(np.array([10, 10]), [0.5, 0.5]), 3)
    1.0
    >>> g_test(np.array([40, 0]), [0.5, 0.5]) < 1e-6
    True
    """
    c = np.asarray(counts, np.float64)
    expected = c.sum() * np.asarray(p, np.float64)
    seen = c > 0
    g = 2.0 * float(np.sum(c[seen] * np.log(c[seen] / expected[seen])))
    return float(chi2.sf(max(g, 0.0), len(c) - 1))


def fallback_cells(clusters: NDArray[np.integer], stations: Sequence[str],
                   shifts: Sequence[str], baselines: Mapping[str, Baseline], k: int
                   ) -> dict[str, dict[str, Any]]:
    """Per station and station×shift with reference samples but no baseline of its own: its
    ``n``, the baseline its events are judged against and the G-test ``p_value`` of its
    reference cluster counts against that baseline's mix (stations first, then their shifts)."""
    st = np.asarray(stations, dtype=object)
    sh = np.asarray(shifts, dtype=object)
    cl = np.asarray(clusters)
    out: dict[str, dict[str, Any]] = {}
    for station in sorted(set(st.tolist())):
        in_station = st == station
        cells = [(station_key(station), in_station, ""), *(
            (station_shift_key(station, shift), in_station & (sh == shift), shift)
            for shift in sorted(set(sh[in_station].tolist())))]
        for key, mask, shift in cells:
            if key in baselines:
                continue
            against = resolve(baselines, station, shift)  # a station without one: global
            counts = np.bincount(cl[mask], minlength=k)
            out[key] = {"n": int(mask.sum()), "judged_against": against,
                        "p_value": float(f"{g_test(counts, baselines[against].p):.3g}")}
    return out


def misfits(fallbacks: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The fallback cells whose reference mix does not fit the baseline they are judged against."""
    return [key for key, f in fallbacks.items() if f["p_value"] < MISFIT_P]


def misfit_cells(manifest: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """A reference manifest's misfit fallback cells (:func:`misfits`), each with its ``n``,
    ``judged_against`` and ``p_value``; none for a reference built before they were
    recorded."""
    cells = (manifest.get("baselines") or {}).get("fallbacks") or {}
    return {key: dict(cells[key]) for key in misfits(cells)}
