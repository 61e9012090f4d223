"""``build_reference``: a manifest of reference events → a versioned reference artifact."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from driftline import __version__
from driftline.consumers.embedder import Embedder
from driftline.core.baselines import (
    DEFAULT_CONFIDENCE,
    baseline_cells,
    build_baselines,
    choose_k,
)
from driftline.core.error_rates import P0_QUANTILE
from driftline.core.predictions import (
    build_prediction_baselines,
    label_codes,
    label_vocabulary,
)
from driftline.reference.artifact import ReferenceError, check_out_dir, write_artifact
from driftline.reference.describe import exemplars, metadata_lift, performance
from driftline.reference.fallbacks import fallback_cells
from driftline.reference.index import Reference, load_reference, unit_embeddings, unit_rows
from driftline.reference.parameters import MAX_LABELS, ParameterError, check_parameters
from driftline.reference.space import fit_pca, loo_distances, spherical_kmeans
from driftline.schema import Event


@dataclass
class Collected:
    """Reference samples in manifest order; failed or duplicate events counted in ``skipped``
    per reason, the first of each described in ``first_skipped`` (its event and why)."""

    chunks: list[np.ndarray] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)
    first_skipped: dict[str, str] = field(default_factory=dict)
    source: str | None = None

    @property
    def embeddings(self) -> np.ndarray:
        return np.concatenate(self.chunks) if self.chunks else np.empty((0, 0), np.float32)

    def skip(self, reason: str, event_id: str, detail: str, line: int | None = None) -> None:
        self.skipped[reason] += 1
        at = f" (line {line})" if line is not None else ""
        self.first_skipped.setdefault(reason, f"event {event_id}{at}: {detail}")

    def skipped_text(self) -> str:
        """``reason count (first: event id: why)``, joined; ``none``."""
        return "; ".join(f"{reason} {n} (first: {self.first_skipped[reason]})"
                         for reason, n in self.skipped.items()) or "none"


def collect(events: Iterable[Event], embedder: Embedder | None, *, chunk: int = 512,
            lines: Sequence[int] | None = None) -> Collected:
    """Embed image events (or take precomputed embeddings) and join late labels by event id;
    a late label whose event id no event has is skipped as ``unknown_event``.

    Precomputed embeddings are all read before their dimension is chosen: the most common
    one, the others skipped as ``embedding_dim`` (a tie is refused, with the count of each).
    ``lines``: the manifest line of each event, in order, to name a skipped one by (it may
    fill as ``events`` is read)."""
    got = Collected()
    pending: list[Event] = []
    late: dict[str, Event] = {}
    line_of: dict[str, int | None] = {}  # event id -> manifest line (a late label: its own)
    seen: set[str] = set()

    def line(n: int) -> int | None:
        return lines[n] if lines is not None and n < len(lines) else None

    def flush() -> None:
        if not pending or got.source == "precomputed":  # taken once all are read
            return
        assert embedder is not None  # noqa: S101 - checked when the source was chosen
        emb, errors = embedder.embed_images(
            [e.image_bytes() or e.image_uri or b"" for e in pending])
        finite = [bool(np.isfinite(row).all()) for row in emb]
        ok = [i for i, err in enumerate(errors) if err is None and finite[i]]
        for ev, err, fin in zip(pending, errors, finite, strict=True):
            if err is not None:
                got.skip(str(err.reason), ev.event_id, err.detail, line_of[ev.event_id])
            elif not fin:  # e.g. a float16 export overflowing: as the embed stage does
                got.skip("embedding_not_finite", ev.event_id, "the model's embedding of "
                         "this image holds NaN or infinite values", line_of[ev.event_id])
        got.chunks.append(emb[ok])
        got.events.extend(pending[i] for i in ok)
        pending.clear()

    for n, ev in enumerate(events):
        if ev.kind == "label":
            late[ev.event_id] = ev
            line_of.setdefault(ev.event_id, line(n))
            continue
        if ev.event_id in seen:
            got.skip("duplicate_event_id", ev.event_id, "an earlier event has its id", line(n))
            continue
        seen.add(ev.event_id)
        line_of[ev.event_id] = line(n)
        source = "precomputed" if ev.embedding is not None else "image"
        if got.source is None:
            if source == "image" and embedder is None:
                raise ReferenceError("the manifest has images: an ONNX model is needed to embed")
            if source == "precomputed" and embedder is not None:
                raise ReferenceError("the manifest carries precomputed embeddings; building "
                                     "with a model would record the wrong model identity")
            got.source = source
        elif source != got.source:
            raise ReferenceError(f"event {ev.event_id} mixes {source} with {got.source} "
                                 "events: a reference lives in one embedding space")
        pending.append(ev)
        if len(pending) >= chunk:
            flush()
    flush()
    if got.source == "precomputed":
        _take_precomputed(got, pending, line_of)
    for event_id in [i for i in late if i not in seen]:  # in manifest order: a typo'd id, or
        # one of another manifest, is said rather than dropped
        got.skip("unknown_event", event_id, "a label or loss for an event id that no event of "
                 "the manifest has", line_of[event_id])
    got.events = [_with_late(e, late.get(e.event_id)) for e in got.events]
    return got


def _take_precomputed(got: Collected, events: list[Event],
                      line_of: dict[str, int | None]) -> None:
    """Keep the events of the most common embedding dimension; skip the others, naming the
    first. A tie has no majority to follow: refused, with the count of each dimension."""
    counts = Counter(len(e.embedding or []) for e in events)
    (dim, most), *rest = counts.most_common()
    if rest and rest[0][1] == most:
        shown = ", ".join(f"{c} of dimension {d}" for d, c in sorted(
            counts.items(), key=lambda dc: (-dc[1], dc[0])))
        raise ReferenceError(f"the manifest's embeddings have no most common dimension "
                             f"({shown}): a reference lives in one embedding space")
    keep = [e for e in events if len(e.embedding or []) == dim]
    for e in events:
        if len(e.embedding or []) != dim:
            got.skip("embedding_dim", e.event_id, f"{len(e.embedding or [])} dimensions where "
                     f"{most} of the {len(events)} events have {dim}", line_of[e.event_id])
    got.chunks.append(unit_embeddings([e.embedding for e in keep]))
    got.events.extend(keep)


def _with_late(ev: Event, late: Event | None) -> Event:
    if late is None:
        return ev
    return ev.model_copy(update={"label": late.label or ev.label,
                                 "loss": late.loss if late.loss is not None else ev.loss})


def build_reference(
    events: Iterable[Event], embedder: Embedder | None, out_dir: Path, *,
    k: int | None = None, pca_dim: int | None = None, quantile: float = 0.99,
    min_count: int = 200, alpha: float = 0.5, aggressor_alpha: float = 0.01,
    exclude_within_s: float | None = None, seed: int = 0, overwrite: bool = False,
    source_name: str | None = None, max_labels: int = MAX_LABELS,
    confidence_quantile: float = 0.05, error_quantile: float = P0_QUANTILE,
    bound_confidence: float = DEFAULT_CONFIDENCE, lines: Sequence[int] | None = None,
) -> Reference:
    """Embed the reference events and write the artifact to ``out_dir`` (see ``artifact.py``).

    ``k=None`` picks :func:`~driftline.core.baselines.choose_k`; ``min_count`` is the fewest
    samples a station or station×shift baseline needs, else it falls back to its parent
    (recorded with how well that fits it: :mod:`driftline.reference.fallbacks`);
    ``quantile`` sets each baseline's OOD threshold on leave-one-out distances;
    ``bound_confidence`` the bounds of each baseline's cluster mix, OOD rate, prediction mix
    and low-confidence rate that the detectors judge against (:mod:`driftline.core.baselines`).
    When events carry predictions, each baseline also gets a prediction mix over the
    ``max_labels`` most frequent labels plus *other*, and a low-confidence cut at
    ``confidence_quantile`` of its scores (:mod:`driftline.core.predictions`). Where events
    carry labels, each cluster's error rate is shrunk toward the overall one and the error-rate
    detector's reference rates are those scaled to the pooled rate's ``error_quantile``
    (:mod:`driftline.core.error_rates`). ``overwrite`` replaces a reference already in
    ``out_dir``, never a directory holding anything else
    (:func:`~driftline.reference.artifact.check_out_dir`, checked before any embedding).
    ``lines``: the manifest line of each event, to name skipped events by (:func:`collect`).
    """
    check_parameters(k=k, pca_dim=pca_dim, quantile=quantile, min_count=min_count, alpha=alpha,
                     exclude_within_s=exclude_within_s, seed=seed, max_labels=max_labels,
                     confidence_quantile=confidence_quantile, error_quantile=error_quantile,
                     bound_confidence=bound_confidence)
    check_out_dir(out_dir, overwrite=overwrite)  # before the embedding, not after it
    got = collect(events, embedder, lines=lines)
    raw, evs = got.embeddings, got.events
    n = len(evs)
    k_rule = "given" if k is not None else "round(sqrt(n/10)), clamped to [2, min(32, n/20)]"
    k = k if k is not None else choose_k(n)
    if n < max(2 * k, 10):
        raise ReferenceError(f"{n} usable reference events; need at least {max(2 * k, 10)} "
                             f"for K={k} (skipped: {got.skipped_text()})")
    x = unit_rows(raw)
    arrays: dict[str, np.ndarray] = {}
    pca = None
    if pca_dim is not None:
        if pca_dim > min(x.shape):
            raise ParameterError("pca_dim", pca_dim, f"must be at most {min(x.shape)}: the "
                                 f"reference has {n} samples of dimension {x.shape[1]}")
        mean, comps, explained = fit_pca(x, pca_dim)
        x = unit_rows((x - mean) @ comps.T)
        arrays |= {"pca_mean": mean, "pca_components": comps}
        pca = {"dim": pca_dim, "explained_variance": round(explained, 4)}
    centroids, clusters = spherical_kmeans(x, k, seed=seed)
    stations = np.array([e.station for e in evs], dtype=object)
    times = np.array([e.ts.timestamp() for e in evs], np.float64)
    dist = loo_distances(x, stations, times, exclude_within_s)
    baselines = build_baselines(clusters, dist, [e.station for e in evs],
                                [e.shift for e in evs], k, min_count=min_count, alpha=alpha,
                                quantile=quantile, confidence=bound_confidence)
    fallbacks = fallback_cells(clusters, [e.station for e in evs], [e.shift for e in evs],
                               baselines, k)
    predictions = _prediction_baselines(evs, min_count=min_count, alpha=alpha,
                                        max_labels=max_labels, quantile=confidence_quantile,
                                        confidence=bound_confidence)
    perf = performance(clusters, k, _errors(evs), np.array(
        [np.nan if e.loss is None else e.loss for e in evs]), alpha=aggressor_alpha,
        error_quantile=error_quantile)
    ids = [e.event_id for e in evs]
    lift = metadata_lift(clusters, k, {
        "station": [e.station for e in evs], "shift": [e.shift for e in evs],
        "lot": [e.lot for e in evs], "label": [e.label for e in evs],
        "prediction": [e.prediction.label if e.prediction else None for e in evs]})
    exem = exemplars(x, clusters, centroids, ids)
    spread = np.linalg.norm(x - centroids[clusters], axis=1)
    sizes = np.bincount(clusters, minlength=k)
    manifest: dict[str, Any] = {
        "created_at": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "driftline_version": __version__,
        "source": {"manifest": source_name, "events": n, "skipped": dict(got.skipped),
                   "first_skipped": got.first_skipped,
                   "model_versions": sorted({e.model_version for e in evs if e.model_version})},
        "embedding": {"source": got.source, "input_dim": int(raw.shape[1]),
                      "dim": int(x.shape[1]), "l2_normalize": True, "pca": pca,
                      "model": embedder.describe() if embedder is not None else None},
        "clusters": {"k": k, "method": "faiss spherical k-means, k-means++ seeding, best of 8",
                     "k_rule": k_rule,
                     "seed": seed, "items": [
                         {"id": c, "size": int(sizes[c]), "share": round(sizes[c] / n, 4),
                          "median_distance_to_centroid": round(float(np.median(
                              spread[clusters == c])), 4) if sizes[c] else None,
                          "exemplars": exem[c], "lift": lift[c],
                          "performance": perf["clusters"][c]} for c in range(k)]},
        "ood": {"quantile": quantile, "exclude_within_s": exclude_within_s,
                "distance": "euclidean between unit vectors, to the nearest reference sample; "
                            "leave-one-out at build time"},
        # p and ood_rate are the stated rates (evidence); p_lower/p_upper and ood_rate_bound,
        # the bounds at `bound_confidence` that the detectors judge against
        "baselines": {"min_count": min_count, "alpha": alpha,
                      "bound_confidence": bound_confidence,
                      "items": {
            key: {"parent": b.parent, "n": b.n, "counts": list(b.counts), "p": list(b.p),
                  "p_lower": list(b.p_lower), "p_upper": list(b.p_upper),
                  "ood_threshold": b.ood_threshold, "ood_rate": b.ood_rate,
                  "ood_exceed": b.ood_exceed, "ood_rate_bound": b.ood_rate_bound}
            for key, b in baselines.items()},
                      # cells judged against a parent's baseline, and how well it fits them
                      "fallbacks": fallbacks},
        "predictions": predictions,
        "performance": {key: v for key, v in perf.items() if key != "clusters"},
    }
    arrays |= {"centroids": centroids, "embeddings": x, "clusters": clusters,
               "distances": dist, "event_ids": np.array(ids, dtype=str)}
    write_artifact(out_dir, manifest, arrays, overwrite=overwrite)
    return load_reference(out_dir)


def _prediction_baselines(evs: list[Event], *, min_count: int, alpha: float, max_labels: int,
                          quantile: float, confidence: float) -> dict[str, Any] | None:
    """The manifest's ``predictions`` section, or None when no reference event has one."""
    labels = [e.prediction.label if e.prediction else None for e in evs]
    if all(lb is None for lb in labels):
        return None
    vocab = label_vocabulary((lb for lb in labels if lb is not None), max_labels)
    codes = label_codes(labels, vocab)
    scores = np.array([e.prediction.score if e.prediction else np.nan for e in evs])
    cells = baseline_cells([e.station for e in evs], [e.shift for e in evs],
                           min_count=min_count)
    items = build_prediction_baselines(codes, scores, cells, len(vocab) + 1,
                                       min_count=min_count, alpha=alpha, quantile=quantile,
                                       confidence=confidence)
    if not items:  # fewer than MIN_GLOBAL predictions in the whole reference
        return None
    return {"labels": list(vocab), "other": True, "max_labels": max_labels,
            "events": int((codes >= 0).sum()), "min_count": min_count, "alpha": alpha,
            "low_confidence_quantile": quantile,
            "low_confidence": "score < cut; rate (#{s < cut} + 1)/(n + 1)",
            # p and low_confidence_rate are stated (evidence); p_lower/p_upper and
            # low_confidence_rate_bound, at bound_confidence, what the detectors judge against
            "bound_confidence": confidence,
            "items": {key: {"parent": b.parent, "n": b.n, "counts": list(b.counts),
                            "p": list(b.p), "p_lower": list(b.p_lower),
                            "p_upper": list(b.p_upper),
                            "low_confidence_cut": b.low_confidence_cut,
                            "low_confidence_rate": b.low_confidence_rate,
                            "low_confidence_count": b.low_confidence_count,
                            "low_confidence_rate_bound": b.low_confidence_rate_bound}
                      for key, b in items.items()}}


def _errors(evs: list[Event]) -> np.ndarray:
    return np.array([float(e.prediction.label != e.label) if e.prediction and e.label else np.nan
                     for e in evs])
