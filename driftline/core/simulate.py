"""Vectorised Monte Carlo of CUSUM banks: many independent runs advanced in lock-step.

Used to calibrate thresholds (:func:`driftline.core.budget.tighten_threshold`) and by the
detection benchmark. A :class:`LlrModel` says how an outcome index ``o`` (a cluster, a flag, or a
(baseline, cluster) pair) moves the bank's ``(K, J)`` statistics: every member gets
``base[base_of[o]]`` and row ``row[o]`` also gets ``diff[o]``. A run adds them as the online
detectors do — row ``row[o]`` gets the precomputed sum ``base + diff`` in one addition, the
other rows ``base`` — so a simulated run equals the detector fed with the same events, bit for
bit (adding ``base`` and then ``diff`` rounds twice: 1e-10 apart after 20,000 events).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from driftline.core.bernoulli import bernoulli_table
from driftline.core.cusum import FloatArray
from driftline.core.mix import mix_tables

IntArray = npt.NDArray[np.int64]
_CHUNK = 512  # random draws per call: amortises generator overhead without much memory


@dataclass(frozen=True)
class LlrModel:
    """How outcome ``o`` moves a bank: ``base (B, K, J)``, ``diff (O, J)``, ``row``, ``base_of``."""

    base: FloatArray
    diff: FloatArray
    row: IntArray
    base_of: IntArray

    @property
    def n_outcomes(self) -> int:
        return int(self.diff.shape[0])


def mix_model(
    baselines: Sequence[FloatArray], epsilons: Sequence[float], fractions: Sequence[float]
) -> LlrModel:
    """Cluster-mix bank; outcome ``b·K + c`` is "event of baseline ``b`` in cluster ``c``"."""
    tables = [mix_tables(p, epsilons, fractions) for p in baselines]
    k = tables[0][0].shape[0]
    return LlrModel(
        base=np.stack([b for b, _ in tables]),
        diff=np.concatenate([d for _, d in tables]),
        row=np.tile(np.arange(k), len(tables)),
        base_of=np.repeat(np.arange(len(tables)), k),
    )


def bernoulli_model(p0: float, alternatives: Sequence[Sequence[float]]) -> LlrModel:
    """Bernoulli bank; outcome 0 is "no flag", 1 is "flag"."""
    table = bernoulli_table(p0, [(a[0], a[1]) for a in alternatives])
    return LlrModel(
        np.zeros((1, 1, table.shape[1])), table, np.zeros(2, np.int64), np.zeros(2, np.int64)
    )


def single_model(llr: Sequence[float]) -> LlrModel:
    """One CUSUM whose increment for outcome ``o`` is ``llr[o]`` (e.g. the optimal CUSUM)."""
    values = np.asarray(llr, dtype=np.float64).reshape(-1, 1)
    n = values.shape[0]
    return LlrModel(np.zeros((1, 1, 1)), values, np.zeros(n, np.int64), np.zeros(n, np.int64))


@dataclass(frozen=True)
class Passages:
    """First passages per run and threshold: run lengths ``times (R, G)`` (1-based events),
    ``censored`` where the horizon came first, ``onsets`` (0-based start of the excursion that
    crossed, -1 if not tracked or censored)."""

    times: IntArray
    censored: npt.NDArray[np.bool_]
    onsets: IntArray


class _Runs:
    """Active runs of one bank with their first-passage bookkeeping."""

    def __init__(self, model: LlrModel, grid: FloatArray, n_runs: int, onset: bool) -> None:
        self.m, self.grid, self.onset = model, np.sort(grid), onset
        # per outcome, its row's whole increment: one addition, as the online bank's table
        self.hit = model.base[model.base_of, model.row] + model.diff
        _, k, j = model.base.shape
        self.s = np.zeros((n_runs, k, j))
        self.start = np.zeros((n_runs, k * j), np.int64) if onset else None
        self.act = np.arange(n_runs)
        self.passed = np.zeros(n_runs, np.int64)
        g = self.grid.size
        self.times = np.full((n_runs, g), -1, np.int64)
        self.onsets = np.full((n_runs, g), -1, np.int64)

    def step(self, t: int, outcomes: IntArray) -> None:
        o = outcomes[self.act]
        s, m = self.s, self.m
        was_zero = s == 0.0 if self.onset else None
        each, rows = np.arange(o.size), m.row[o]
        hit = s[each, rows] + self.hit[o]
        s += m.base[0] if m.base.shape[0] == 1 else m.base[m.base_of[o]]
        s[each, rows] = hit
        np.maximum(s, 0.0, out=s)
        flat = s.reshape(o.size, -1)
        if self.start is not None and was_zero is not None:
            np.copyto(self.start, t, where=was_zero.reshape(o.size, -1) & (flat > 0.0))
        top = flat.max(axis=1)
        level = np.searchsorted(self.grid, top, side="right")
        runs = self.act
        for i in np.flatnonzero(level > self.passed[runs]):
            r = runs[i]
            self.times[r, self.passed[r] : level[i]] = t + 1
            if self.start is not None:
                self.onsets[r, self.passed[r] : level[i]] = self.start[i, int(flat[i].argmax())]
            self.passed[r] = level[i]
        keep = self.passed[runs] < self.grid.size
        if keep.sum() < 0.75 * runs.size:
            self.act, self.s = runs[keep], s[keep]
            if self.start is not None:
                self.start = self.start[keep]

    def result(self, horizon: int) -> Passages:
        censored = self.times < 0
        return Passages(np.where(censored, horizon, self.times), censored, self.onsets)


def simulate(
    models: Sequence[LlrModel],
    grids: Sequence[Sequence[float]],
    probs: FloatArray,
    *,
    n_runs: int,
    horizon: int,
    seed: int,
    post: FloatArray | None = None,
    change_at: int = 0,
    onset: bool = False,
) -> list[Passages]:
    """Run ``n_runs`` streams through every model (common random numbers) until each run has
    passed every threshold in its model's grid, or ``horizon`` events.

    Outcomes are drawn from ``probs`` before event ``change_at`` and from ``post`` (if given)
    from then on. Either may also hold one law per run, shape ``(n_runs, O)`` — e.g. true laws
    drawn from what a reference sample allows. Deterministic for a given ``seed``.
    """
    rng = np.random.default_rng(seed)
    laws = [probs] + ([post] if post is not None else [])
    cum = [np.cumsum(np.asarray(law, np.float64), axis=-1) for law in laws]
    if any(c.ndim == 2 and c.shape[0] != n_runs for c in cum):
        raise ValueError("per-run laws need one row per run")
    runs = [
        _Runs(m, np.asarray(g, dtype=np.float64), n_runs, onset)
        for m, g in zip(models, grids, strict=True)
    ]
    u = rng.random((_CHUNK, n_runs))
    for t in range(horizon):
        if t % _CHUNK == 0 and t:
            u = rng.random((_CHUNK, n_runs))
        if not any(r.act.size for r in runs):
            break
        c = cum[1] if post is not None and t >= change_at else cum[0]
        ut = u[t % _CHUNK]
        if c.ndim == 1:
            outcomes = np.minimum(np.searchsorted(c, ut, side="right"), c.size - 1)
        else:  # the same rule row by row: how many of the run's cumulative sums are <= u
            outcomes = np.minimum((c <= ut[:, None]).sum(axis=1), c.shape[1] - 1)
        for r in runs:
            if r.act.size:
                r.step(t, outcomes)
    return [r.result(horizon) for r in runs]
