"""The reference embedding space: PCA, spherical k-means and leave-one-out distances (faiss)."""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np
from numpy.typing import NDArray

from driftline.reference.artifact import ReferenceError
from driftline.reference.index import F32, unit_rows


def fit_pca(x: F32, dim: int) -> tuple[F32, F32, float]:
    """Principal axes of unit-norm rows: ``(mean [D], components [dim, D], explained share)``."""
    if not 1 <= dim <= min(x.shape):
        raise ReferenceError(f"PCA dimension {dim} must be in [1, {min(x.shape)}]")
    mean = x.mean(axis=0, dtype=np.float64)
    centred = x.astype(np.float64) - mean
    eigval, eigvec = np.linalg.eigh(centred.T @ centred)
    top = np.argsort(eigval)[::-1][:dim]
    explained = float(eigval[top].sum() / max(eigval.sum(), 1e-300))
    return mean.astype(np.float32), np.ascontiguousarray(eigvec[:, top].T, np.float32), explained


KMEANS_RESTARTS = 8


def spherical_kmeans(x: F32, k: int, *, seed: int = 0, restarts: int = KMEANS_RESTARTS,
                     ) -> tuple[F32, NDArray[np.int64]]:
    """Unit-norm centroids and labels, clusters renumbered by size (0 = largest).

    k-means++ seeding, best of ``restarts`` runs by total cosine similarity (chosen here, on
    all samples, rather than inside faiss, which scores restarts on its training subsample).
    """
    runs = []
    for run in range(max(1, restarts)):
        km = faiss.Kmeans(x.shape[1], k, niter=30, seed=seed + run, spherical=True,
                          min_points_per_centroid=1, verbose=False,
                          init_method=faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS)
        km.train(x)
        runs.append(unit_rows(np.asarray(km.centroids)))
    centroids = max(runs, key=lambda c: float(np.max(x @ c.T, axis=1).sum()))
    labels = assign_centroids(centroids, x)
    order = np.argsort(-np.bincount(labels, minlength=k), kind="stable")
    rank = np.empty(k, np.int64)
    rank[order] = np.arange(k)
    return np.ascontiguousarray(centroids[order]), rank[labels]


def assign_centroids(centroids: F32, x: F32) -> NDArray[np.int64]:
    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(centroids)
    _, idx = index.search(x, 1)
    return np.asarray(idx[:, 0], np.int64)


def loo_distances(x: F32, groups: NDArray[Any], times: NDArray[np.float64],
                  exclude_within_s: float | None = None) -> F32:
    """Distance from each sample to its nearest *other* sample (leave-one-out).

    With ``exclude_within_s``, neighbours of the same group (station) within that many seconds
    of event time are also left out. Frames from a line camera are autocorrelated: the nearest
    neighbour of a reference frame is usually the next frame, far closer than any future event
    will be, which would make the OOD threshold too tight for a reference recorded as a
    sequence. Leaving out a window estimates the distance of an independent new event.
    """
    n = len(x)
    if n < 2:
        raise ReferenceError("a reference needs at least 2 samples")
    index = faiss.IndexFlatL2(x.shape[1])
    index.add(x)
    out = np.full(n, np.nan, np.float32)
    todo = np.arange(n)
    k = 2 if exclude_within_s is None else min(n, 64)
    while todo.size:
        sq, idx = index.search(x[todo], k)
        valid = (idx >= 0) & (idx != todo[:, None])
        if exclude_within_s is not None:
            safe = np.maximum(idx, 0)
            near = (groups[safe] == groups[todo][:, None]) & (
                np.abs(times[safe] - times[todo][:, None]) <= exclude_within_s)
            valid &= ~near
        found = valid.any(axis=1)
        first = valid.argmax(axis=1)
        out[todo[found]] = np.sqrt(np.maximum(sq[found, first[found]], 0.0))
        todo = todo[~found]
        if todo.size and k == n:
            raise ReferenceError(
                f"{todo.size} reference samples have no neighbour outside the "
                f"{exclude_within_s}s exclusion window; shorten it or add reference data")
        k = min(n, 4 * k)
    return out
