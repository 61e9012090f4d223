"""A second k-unknown reference for the detection benchmark: the Shiryaev–Roberts mixture.

The oracle-ε bank in ``detection.py`` is K CUSUMs that know the shift size ε but not which
cluster moved, stopped at their maximum. The Bayes-flavoured alternative for the same knowledge
is the mixture Shiryaev–Roberts statistic with a uniform prior over the cluster,

    R_k(n) = (1 + R_k(n-1)) · q_k(x_n) / p(x_n),    stop when  (1/K) Σ_k R_k(n) >= A,

which is (asymptotically) optimal for a change among K known alternatives with an unknown one
in force (Pollak 1985; Tartakovsky, Nikiforov & Basseville 2014, §7.3 and §8.3; Xie &
Siegmund 2013 for the multi-stream form). If it too pays far more than the optimal CUSUM that
knows k, the price is that of not knowing k, not of how driftline's bank is built.

Streams are drawn exactly as :func:`driftline.core.simulate.simulate` draws them (same seed, same
chunking), so the figures share common random numbers with the other references.
"""

from __future__ import annotations

import math

import numpy as np

from driftline.core.simulate import _CHUNK  # the draw layout to reproduce, not an API


def passages(
    lr: np.ndarray,
    log_thresholds: np.ndarray,
    probs: np.ndarray,
    *,
    n_runs: int,
    horizon: int,
    seed: int,
    post: np.ndarray | None = None,
    change_at: int = 0,
) -> np.ndarray:
    """First passage times ``(n_runs, G)`` (1-based events; ``horizon`` if censored) of the
    uniform-prior mixture SR statistic over the grid of ``ln A`` values.

    ``lr[k, o]`` is the likelihood ratio of outcome ``o`` under alternative ``k``.
    """
    grid = np.sort(np.asarray(log_thresholds, dtype=np.float64))
    rng = np.random.default_rng(seed)
    cum = [np.cumsum(probs)] + ([np.cumsum(post)] if post is not None else [])
    k = lr.shape[0]
    r = np.zeros((n_runs, k))
    times = np.full((n_runs, grid.size), horizon, np.int64)
    passed = np.zeros(n_runs, np.int64)
    act = np.arange(n_runs)
    u = rng.random((_CHUNK, n_runs))
    for t in range(horizon):
        if t % _CHUNK == 0 and t:
            u = rng.random((_CHUNK, n_runs))
        if not act.size:
            break
        c = cum[1] if post is not None and t >= change_at else cum[0]
        o = np.minimum(np.searchsorted(c, u[t % _CHUNK], side="right"), c.size - 1)[act]
        r = (1.0 + r) * lr[:, o].T
        with np.errstate(divide="ignore"):
            stat = np.log(r.mean(axis=1))
        level = np.searchsorted(grid, stat, side="right")
        for i in np.flatnonzero(level > passed[act]):
            times[act[i], passed[act[i]] : level[i]] = t + 1
            passed[act[i]] = level[i]
        keep = passed[act] < grid.size
        if not keep.all():
            act, r = act[keep], r[keep]
    return times


def tune(lr: np.ndarray, probs: np.ndarray, arl0: float, *, n_runs: int, seed: int = 0) -> float:
    """Smallest ``ln A`` (step 0.02) whose simulated mean run length under ``probs`` is at least
    ``arl0`` (runs censored at ``8·arl0``; SR run lengths are nearly exponential, so the mean of
    the censored runs divided by the alarm fraction estimates the ARL0)."""
    grid = np.arange(0.0, math.log(arl0) + math.log(lr.shape[0]) + 1.0, 0.02)
    horizon = int(8 * arl0)
    t = passages(lr, grid, probs, n_runs=n_runs, horizon=horizon, seed=seed)
    alarmed = (t < horizon).sum(axis=0)
    est = t.sum(axis=0) / np.maximum(alarmed, 1)
    ok = np.flatnonzero(est >= arl0)
    return float(grid[ok[0]] if ok.size else grid[-1])


def delay(
    lr: np.ndarray,
    log_a: float,
    probs: np.ndarray,
    post: np.ndarray,
    *,
    n_runs: int,
    horizon: int,
    nu: int,
    seed: int,
) -> float:
    """Conditional mean detection delay for a change at ``nu`` (runs that alarmed before ``nu``
    dropped)."""
    t = passages(
        lr, np.array([log_a]), probs, n_runs=n_runs, horizon=nu + horizon, seed=seed,
        post=post, change_at=nu,
    )[:, 0]
    ok = t > nu
    return float((t[ok] - nu).mean())
