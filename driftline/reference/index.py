"""A loaded reference: project embeddings, assign clusters, measure OOD distance (faiss)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import faiss
import numpy as np
from numpy.typing import NDArray

from driftline.core.baselines import (
    DEFAULT_CONFIDENCE,
    checked_bounds,
    checked_rate_bound,
    frozen,
    resolve,
)
from driftline.core.predictions import prediction_bounds
from driftline.reference.artifact import ReferenceError, read_artifact

if TYPE_CHECKING:
    from driftline.consumers.embedder import EmbedderConfig

F32 = NDArray[np.float32]
log = logging.getLogger(__name__)


class BaselineView(NamedTuple):
    """What :meth:`Reference.baseline_for` returns: the key and what to compare against."""

    key: str
    p: NDArray[np.float64]
    ood_threshold: float
    ood_rate: float


class _PredictionView(NamedTuple):
    key: str
    labels: tuple[str, ...]
    codes: dict[str, int]
    p: NDArray[np.float64]
    low_confidence_cut: float
    low_confidence_rate: float
    bounds: NDArray[np.float64]
    low_confidence_bound: float


class PredictionView(_PredictionView):
    """What an event's predictions are judged against: the label mix ``p`` over ``labels``
    plus *other* (the last category), and the low-confidence cut (``score < cut``) with its
    reference rate — the stated rates (evidence) — and what the detectors judge against:
    ``bounds`` (``(2, K)`` lower, upper) and ``low_confidence_bound``
    (:func:`~driftline.core.predictions.prediction_bounds`). ``key`` is the baseline that
    holds them (the event's own, or an ancestor's when its own had too few predictions).
    ``p`` and ``bounds`` are read-only (:func:`~driftline.core.baselines.frozen`): detectors
    cache their increment tables by array identity."""

    __slots__ = ()

    def __new__(cls, key: str, labels: tuple[str, ...], codes: dict[str, int], p: Any,
                low_confidence_cut: float, low_confidence_rate: float, bounds: Any,
                low_confidence_bound: float) -> PredictionView:
        return super().__new__(cls, key, labels, codes, frozen(p), low_confidence_cut,
                               low_confidence_rate, frozen(bounds), low_confidence_bound)

    def category(self, label: str) -> int:
        """The label's category: its index in ``labels``, else *other*."""
        return self.codes.get(label, len(self.labels))


def prediction_views(manifest: dict[str, Any]) -> dict[str, PredictionView]:
    """Per cluster-baseline key, the prediction baseline its events use (its own, else its
    nearest ancestor's); empty for a reference without predictions (built before they were
    recorded, or from events that carried none). Keys that share a view share its arrays.

    A reference built before the prediction detectors' bounds were recorded gets them computed
    from its stored label counts and low-confidence count at its ``bound_confidence``, as the
    detect stage does for cluster baselines (``driftline.runner.detector_baseline``); one
    without those counts is judged against its stated rates, with a warning."""
    section = manifest.get("predictions")
    if not section:
        return {}
    labels = tuple(str(lb) for lb in section["labels"])
    codes = {lb: i for i, lb in enumerate(labels)}
    confidence = float(section.get("bound_confidence", manifest["baselines"].get(
        "bound_confidence", DEFAULT_CONFIDENCE)))
    items = section["items"]
    own = {key: PredictionView(key, labels, codes, np.asarray(b["p"], np.float64),
                               float(b["low_confidence_cut"]), float(b["low_confidence_rate"]),
                               *_prediction_bounds(key, items, float(section.get("alpha", 0.5)),
                                                   confidence))
           for key, b in items.items()}
    parents = {key: b["parent"] for key, b in manifest["baselines"]["items"].items()}
    out = {}
    for key in parents:
        at: str | None = key
        while at is not None and at not in own:
            at = parents.get(at)
        if at is not None:
            out[key] = own[at]
    return out


def _prediction_bounds(key: str, items: dict[str, Any], alpha: float, confidence: float
                       ) -> tuple[NDArray[np.float64], float]:
    """A prediction baseline's ``(bounds, low_confidence_bound)``: stored if the detectors can
    use them (finite, ``(2, K)``, around the stated rates), else computed."""
    b = items[key]
    p = np.asarray(b["p"], np.float64)
    if "p_lower" in b or "p_upper" in b or "low_confidence_rate_bound" in b:
        bounds = checked_bounds(p, b.get("p_lower"), b.get("p_upper"))
        rate = checked_rate_bound(float(b["low_confidence_rate"]),
                                  b.get("low_confidence_rate_bound"))
        if bounds is not None and rate is not None:
            return bounds, rate
        log.warning("prediction baseline's stored bounds are invalid: ignored",
                    extra={"baseline": key})
    if b.get("counts") is None or b.get("low_confidence_count") is None:
        log.warning("prediction baseline has no counts: its label mix and low-confidence rate "
                    "are taken as exact", extra={"baseline": key})
        return np.array([p, p]), float(b["low_confidence_rate"])
    parent = b.get("parent")
    prior = (np.asarray(items[parent]["p"], np.float64) if parent in items
             else np.full(p.size, 1.0 / p.size))
    lower, upper, rate = prediction_bounds(np.asarray(b["counts"], np.int64), prior, alpha, p,
                                           int(b["low_confidence_count"]), confidence)
    return np.array([lower, upper], np.float64), max(rate, float(b["low_confidence_rate"]))


def unit_rows(x: Any, via: type[np.floating[Any]] = np.float32) -> F32:
    """The rows of ``x`` at unit length, as float32; computed in ``via`` (an all-zero row
    stays zeros)."""
    x = np.asarray(x, via)
    return np.ascontiguousarray(x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12),
                                dtype=np.float32)


def unit_embeddings(rows: Any) -> F32:
    """Events' own (precomputed) embeddings ``[N, D]`` as unit rows in float32, the one
    normalisation the reference build and the embed stage share, so that they agree.

    The norm is taken in float64: the event schema allows values up to float32's largest, and
    the square of one above ~1.8e19 overflows float32, which made such a row all zeros. An
    all-zero embedding stays all zeros (it has no direction): both accept it, and the stream
    puts it at distance 1 from every reference sample — without ``--pca-dim``; with it, the
    projection (centred first) maps it to a unit vector like any other.
    """
    return unit_rows(rows, np.float64)


class Reference:
    """Runtime view of a reference artifact.

    Distances are Euclidean between unit vectors (``sqrt(2 - 2 cos)``, in ``[0, 2]``) from an
    event to its nearest reference *sample* — the definition used for the leave-one-out
    distances that set each baseline's OOD threshold at build time.
    """

    def __init__(self, path: Path, manifest: dict[str, Any], arrays: dict[str, NDArray[Any]]):
        self.path = Path(path)
        self.manifest = manifest
        self.centroids: F32 = arrays["centroids"]
        self.embeddings: F32 = arrays["embeddings"]
        self.clusters: NDArray[np.int64] = arrays["clusters"]
        self.distances: F32 = arrays["distances"]
        self.event_ids: list[str] = arrays["event_ids"].tolist()
        self._pca = (arrays["pca_mean"], arrays["pca_components"]) if "pca_mean" in arrays \
            else None
        self.k, self.space_dim = self.centroids.shape
        self.dim: int = manifest["embedding"]["input_dim"]
        self._baselines = {
            key: BaselineView(key, np.asarray(b["p"], np.float64), float(b["ood_threshold"]),
                              float(b["ood_rate"]))
            for key, b in manifest["baselines"]["items"].items()}
        self._predictions = prediction_views(manifest)
        self._centroid_index = faiss.IndexFlatIP(self.space_dim)
        self._centroid_index.add(self.centroids)
        self._sample_index = faiss.IndexFlatL2(self.space_dim)
        self._sample_index.add(self.embeddings)

    @property
    def reference_id(self) -> str:
        return str(self.manifest["reference_id"])

    @property
    def model_sha256(self) -> str | None:
        """sha256 of the ONNX model that made the embeddings; ``None`` if precomputed."""
        model = self.manifest["embedding"].get("model")
        return None if model is None else str(model["model_sha256"])

    @property
    def baseline_keys(self) -> list[str]:
        return list(self._baselines)

    def project(self, emb: NDArray[Any]) -> F32:
        """Raw embeddings ``[N, dim]`` → the reference space (unit norm, PCA, unit norm)."""
        emb = np.asarray(emb, np.float32)
        if emb.ndim != 2 or emb.shape[1] != self.dim:
            raise ReferenceError(f"embedding has shape {emb.shape}; reference "
                                 f"{self.reference_id} expects [N, {self.dim}]")
        if not np.isfinite(emb).all():
            raise ReferenceError("embedding contains NaN or infinite values")
        x = unit_rows(emb)
        if self._pca is not None:
            mean, comps = self._pca
            x = unit_rows((x - mean) @ comps.T)
        return x

    def assign(self, emb: NDArray[Any]) -> tuple[NDArray[np.int64], F32]:
        """Nearest cluster and distance to the nearest reference sample, per row."""
        x = self.project(emb)
        _, cluster = self._centroid_index.search(x, 1)
        sq, _ = self._sample_index.search(x, 1)
        return cluster[:, 0].astype(np.int64), np.sqrt(np.maximum(sq[:, 0], 0.0))

    def nearest(self, emb: NDArray[Any], n: int = 5) -> tuple[F32, list[list[str]]]:
        """The ``n`` nearest reference samples per row: distances and event ids."""
        sq, idx = self._sample_index.search(self.project(emb), n)
        ids = [[self.event_ids[i] for i in row if i >= 0] for row in idx]
        return np.sqrt(np.maximum(sq, 0.0)), ids

    def baseline_for(self, station: str, shift: str) -> BaselineView:
        """The most specific baseline for an event: station×shift, else station, else global."""
        return self._baselines[resolve(self._baselines.keys(), station, shift)]

    def prediction_for(self, key: str) -> PredictionView | None:
        """The prediction baseline of cluster baseline ``key``; None without predictions."""
        return self._predictions.get(key)

    def embedder_config(self, model_path: Path, **runtime: Any) -> EmbedderConfig:
        """Embedder settings with this reference's preprocessing and layer (``runtime``: threads,
        batch size…). Check ``Embedder(config).model_sha256 == self.model_sha256`` after."""
        from driftline.consumers.embedder import EmbedderConfig

        model = self.manifest["embedding"]["model"]
        if model is None:
            raise ReferenceError(f"reference {self.reference_id} holds precomputed embeddings; "
                                 "it has no model preprocessing")
        return EmbedderConfig.from_description(model, model_path, **runtime)

    @property
    def aggressors(self) -> list[int]:
        return [int(a["cluster"]) for a in self.manifest["performance"]["aggressors"]]


def load_reference(ref_dir: Path, expected_model_sha256: str | None = None) -> Reference:
    """Load and verify a reference; with ``expected_model_sha256``, check the model identity."""
    manifest, arrays = read_artifact(Path(ref_dir))
    ref = Reference(Path(ref_dir), manifest, arrays)
    if expected_model_sha256 is not None and ref.model_sha256 != expected_model_sha256:
        made_by = (f"model sha256 {ref.model_sha256[:12]}…" if ref.model_sha256
                   else "precomputed embeddings")
        raise ReferenceError(
            f"reference {ref.reference_id} at {ref_dir} was built from {made_by}, but the "
            f"configured model has sha256 {expected_model_sha256[:12]}…; rebuild the reference "
            f"with this model or configure the model it was built with")
    return ref
