"""What a cluster means to a person: exemplars, over-represented metadata, model performance.

Pure numpy/scipy, so it can be tested without a model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import stats

from driftline.core.error_rates import P0_QUANTILE, shrunk_error_rates

I64 = NDArray[np.int64]


def exemplars(emb: NDArray[np.float32], clusters: I64, centroids: NDArray[np.float32],
              event_ids: Sequence[str], m: int = 5) -> list[list[str]]:
    """Per cluster, the ``m`` event ids closest to the centroid (medoid first)."""
    d = np.linalg.norm(emb - centroids[clusters], axis=1)
    out = []
    for c in range(len(centroids)):
        members = np.flatnonzero(clusters == c)
        out.append([event_ids[i] for i in members[np.argsort(d[members], kind="stable")[:m]]])
    return out


def metadata_lift(clusters: I64, k: int, columns: Mapping[str, Sequence[str | None]], *,
                  min_count: int = 3, min_lift: float = 1.5, top: int = 5,
                  ) -> list[list[dict[str, Any]]]:
    """Per cluster, the metadata values most over-represented in it.

    ``lift = (share of the cluster with the value) / (share of the reference with it)``;
    kept when at least ``min_count`` cluster members have the value and ``lift ≥ min_lift``,
    best first.
    """
    sizes = np.bincount(clusters, minlength=k)
    found: list[list[dict[str, Any]]] = [[] for _ in range(k)]
    for field, raw in columns.items():
        present = np.array([v is not None for v in raw])
        if not present.any():
            continue
        values, codes = np.unique(np.array([v for v in raw if v is not None], dtype=str),
                                  return_inverse=True)
        table = np.zeros((k, len(values)), np.int64)
        np.add.at(table, (clusters[present], codes), 1)
        overall = table.sum(axis=0) / len(clusters)
        for c in range(k):
            if sizes[c] == 0:
                continue
            lift = table[c] / sizes[c] / overall
            for j in np.flatnonzero((table[c] >= min_count) & (lift >= min_lift)):
                found[c].append({
                    "field": field, "value": str(values[j]), "lift": round(float(lift[j]), 3),
                    "count": int(table[c, j]), "cluster_share": round(table[c, j] / sizes[c], 4),
                    "overall_share": round(float(overall[j]), 4)})
    return [sorted(f, key=lambda r: (-r["lift"], -r["count"]))[:top] for f in found]


def _holm(pvalues: NDArray[np.float64]) -> NDArray[np.float64]:
    """Holm–Bonferroni adjusted p-values (family-wise error control over clusters)."""
    order = np.argsort(pvalues)
    adj = np.minimum(1.0, np.maximum.accumulate(pvalues[order] * (len(pvalues) - np.arange(
        len(pvalues)))))
    out = np.empty_like(adj)
    out[order] = adj
    return out


def performance(clusters: I64, k: int, errors: NDArray[np.float64], losses: NDArray[np.float64],
                *, alpha: float = 0.01, error_quantile: float = P0_QUANTILE) -> dict[str, Any]:
    """Per-cluster error rate and mean loss, and the **aggressor** clusters.

    ``errors[i]`` is 1.0 (prediction ≠ label), 0.0, or NaN (unlabelled); ``losses[i]`` NaN if
    absent. A cluster is an aggressor when its error rate is above the rest of the reference
    (one-sided Fisher exact test) or its losses are stochastically larger (one-sided
    Mann–Whitney U), at family-wise level ``alpha`` over clusters (Holm).

    Per cluster, ``expected_error`` is its counts shrunk toward the overall rate (the
    posterior mean of :mod:`driftline.core.error_rates`, never 0) and ``error_p0`` the rate the
    error-rate detector judges its events against (the posterior means scaled to the pooled rate's
    ``error_quantile``);
    ``error_prior`` records the prior.
    """
    has_err, has_loss = ~np.isnan(errors), ~np.isnan(losses)
    rows: list[dict[str, Any]] = []
    p_err, p_loss = np.ones(k), np.ones(k)
    for c in range(k):
        inside = clusters == c
        e_in, e_out = errors[inside & has_err], errors[~inside & has_err]
        l_in, l_out = losses[inside & has_loss], losses[~inside & has_loss]
        if len(e_in) and len(e_out):
            table = [[e_in.sum(), len(e_in) - e_in.sum()], [e_out.sum(), len(e_out) - e_out.sum()]]
            p_err[c] = stats.fisher_exact(table, alternative="greater").pvalue
        if len(l_in) and len(l_out):
            p_loss[c] = stats.mannwhitneyu(l_in, l_out, alternative="greater").pvalue
        rows.append({
            "cluster": c, "labelled": int(len(e_in)), "errors": int(e_in.sum()),
            "error_rate": float(e_in.mean()) if len(e_in) else None,
            "with_loss": int(len(l_in)), "mean_loss": float(l_in.mean()) if len(l_in) else None})
    shrunk = shrunk_error_rates(np.array([r["errors"] for r in rows], np.float64),
                                np.array([r["labelled"] for r in rows], np.float64),
                                quantile=error_quantile)
    for c, row in enumerate(rows):
        row["expected_error"] = None if shrunk is None else float(shrunk.expected[c])
        row["error_p0"] = None if shrunk is None else float(shrunk.p0[c])
    adj_err, adj_loss = _holm(p_err), _holm(p_loss)
    aggressors = []
    for c, row in enumerate(rows):
        row["p_error"], row["p_loss"] = float(adj_err[c]), float(adj_loss[c])
        reasons = [name for name, p in (("error_rate", adj_err[c]), ("loss", adj_loss[c]))
                   if p < alpha]
        if reasons:
            aggressors.append({**row, "reasons": reasons})
    return {
        "labelled": int(has_err.sum()), "with_loss": int(has_loss.sum()),
        "error_rate": float(errors[has_err].mean()) if has_err.any() else None,
        "mean_loss": float(losses[has_loss].mean()) if has_loss.any() else None,
        "alpha": alpha, "test": "one-sided Fisher exact (errors), Mann-Whitney U (loss); Holm",
        "error_prior": None if shrunk is None else {
            "rate": shrunk.prior.rate, "strength": shrunk.prior.strength,
            "rho": shrunk.prior.rho, "p0_quantile": shrunk.quantile, "p0_method": "pooled",
            "method": "posterior Beta(errors + m·rate, labelled - errors + m·(1 - rate)): "
                      "prior at the Jeffreys overall rate, m from the clusters' intraclass "
                      "correlation (m = 1/rho - 1) within [2/rate, labelled]; expected_error "
                      "its mean; error_p0 the means scaled by one factor so that their "
                      "labelled-weighted mean is the p0_quantile of the pooled rate's Jeffreys "
                      "posterior"},
        "clusters": rows, "aggressors": aggressors,
    }
