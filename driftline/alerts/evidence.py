"""Evidence of an incident from outbox messages: effect size, cluster shifts, OOD, severity,
recurrence signature and the label set (pure: standard library and numpy).

**Effect per event.** A slice's alarm carries, since its onset, the observed cluster counts
``o`` and the counts its events' own baselines expected ``e`` (and the same for OOD hits). The
per-event effect is the larger of the cluster-mix KL ``KL(o/n ‖ e/n)`` and the Bernoulli OOD KL,
each minus its small-sample bias under no drift (``(K-1)/2n`` and ``1/2n``), so a small slice
does not look stronger by noise alone. :func:`effect` returns ``strength = sqrt(KL)``, which is
linear in the share of affected events for small changes: a slice whose events are a fraction
``f`` of a changed population shows about ``f`` times the strength. Detectors without counts
(prediction mix, confidence, error rate) fall back to ``statistic / events since onset``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from driftline.alerts.model import (
    ClusterShift,
    Delay,
    Evidence,
    Exemplar,
    Firing,
    Incident,
    OodEvidence,
    RecurrenceLink,
    Severity,
    SliceEvidence,
    SliceRef,
    severity_rank,
    utc,
)

_Q_FLOOR = 1e-9
MIX_DETECTORS = ("cluster_mix", "ood_rate")


@dataclass(frozen=True)
class ClusterCatalog:
    """Cluster descriptions (exemplars, metadata lift, performance) and aggressor clusters."""

    descriptions: Mapping[int, dict[str, Any]] = field(default_factory=dict)
    aggressors: frozenset[int] = frozenset()

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> ClusterCatalog:
        """From a reference artifact's ``manifest.json`` (``driftline.reference``)."""
        items = manifest.get("clusters", {}).get("items", [])
        aggr = manifest.get("performance", {}).get("aggressors", [])
        return cls({int(c["id"]): dict(c) for c in items},
                   frozenset(int(a["cluster"]) for a in aggr))


def _bernoulli_kl(r: float, p: float) -> float:
    p = min(max(p, _Q_FLOOR), 1 - _Q_FLOOR)
    out = 0.0
    if r > 0:
        out += r * math.log(r / p)
    if r < 1:
        out += (1 - r) * math.log((1 - r) / (1 - p))
    return out


def effect(counts: Mapping[str, Any] | None) -> tuple[float, float]:
    """``(strength, displaced)`` since onset: sqrt of bias-corrected KL, and moved share."""
    if not counts:
        return 0.0, 0.0
    kl, moved = 0.0, 0.0
    n = int(counts.get("n") or 0)
    if n > 0 and counts.get("clusters"):
        o = np.asarray(counts["clusters"], np.float64)
        q = np.maximum(np.asarray(counts["expected"], np.float64), _Q_FLOOR)
        p, q = o / o.sum(), q / q.sum()
        hit = p > 0
        kl = float(np.sum(p[hit] * np.log(p[hit] / q[hit]))) - (int((q > 1e-6).sum()) - 1) / (
            2 * n)
        moved = float(np.maximum(p - q, 0.0).sum())
    n_ood = int(counts.get("n_ood") or 0)
    if n_ood > 0:
        r, p0 = counts["ood"] / n_ood, counts["ood_expected"] / n_ood
        kl = max(kl, _bernoulli_kl(r, p0) - 1 / (2 * n_ood))
        moved = max(moved, max(r - p0, 0.0))
    return math.sqrt(max(kl, 0.0)), moved


def slice_evidence(msg: Mapping[str, Any]) -> SliceEvidence:
    """An outbox ``alarm``/``update`` message → the slice's evidence since onset."""
    ev = msg.get("evidence") or {}
    counts = ev.get("counts")
    strength, displaced = effect(counts)
    n_since = int(msg.get("events_since_onset") or (counts or {}).get("n") or 0)
    if msg["detector"] not in MIX_DETECTORS and n_since > 0:
        strength = max(strength, math.sqrt(max(float(msg["statistic"]), 0.0) / n_since))
    return SliceEvidence(
        ref=SliceRef(template=msg["template"], dims=dict(msg["dims"]), slice_id=msg["slice_id"]),
        strength=strength, displaced=displaced, n_since_onset=n_since, counts=counts,
        signature=signature(counts),
        exemplars=[{**x, "slice_id": msg["slice_id"]} for x in ev.get("exemplars", [])],
        model_versions=dict(ev.get("model_versions") or {}),
        onset=utc(msg["onset_time"]) if msg.get("onset_time") is not None else None,
        last_time=utc(msg["time"]))


def cluster_shifts(counts: Mapping[str, Any] | None, catalog: ClusterCatalog,
                   top: int = 8, min_delta: float = 0.01) -> list[ClusterShift]:
    """Clusters that gained or lost mass (p_ref vs p_obs since onset), largest first."""
    if not counts or not counts.get("n") or not counts.get("clusters"):
        return []
    o = np.asarray(counts["clusters"], np.float64)
    e = np.asarray(counts["expected"], np.float64)
    p_obs, p_ref = o / max(o.sum(), 1.0), e / max(e.sum(), _Q_FLOOR)
    delta = p_obs - p_ref
    order = [int(k) for k in np.argsort(-np.abs(delta), kind="stable")[:top]]
    return [ClusterShift(cluster=k, p_ref=round(float(p_ref[k]), 5),
                         p_obs=round(float(p_obs[k]), 5), delta=round(float(delta[k]), 5),
                         observed=int(o[k]), expected=round(float(e[k]), 3),
                         aggressor=k in catalog.aggressors,
                         description=catalog.descriptions.get(k))
            for k in order if abs(delta[k]) >= min_delta]


def ood_evidence(counts: Mapping[str, Any] | None) -> OodEvidence | None:
    if not counts or not counts.get("n_ood"):
        return None
    n = int(counts["n_ood"])
    rate, ref = counts["ood"] / n, counts["ood_expected"] / n
    return OodEvidence(n=n, observed=int(counts["ood"]), rate=round(rate, 6),
                       reference_rate=round(ref, 6),
                       ratio=round(rate / ref, 4) if ref > 0 else None)


def signature(counts: Mapping[str, Any] | None) -> list[float]:
    """Cluster gain/loss vector ``p_obs - p_ref`` with the OOD excess rate appended."""
    if not counts or not counts.get("n"):
        return []
    o = np.asarray(counts["clusters"], np.float64)
    e = np.asarray(counts["expected"], np.float64)
    vec = list((o / max(o.sum(), 1.0) - e / max(e.sum(), _Q_FLOOR)).round(6))
    n_ood = counts.get("n_ood") or 0
    vec.append(round((counts["ood"] - counts["ood_expected"]) / n_ood, 6) if n_ood else 0.0)
    return [float(v) for v in vec]


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    """Cosine similarity; 0 when lengths differ (different references) or a vector is zero."""
    if len(a) != len(b) or not a:
        return 0.0
    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    den = float(np.linalg.norm(x) * np.linalg.norm(y))
    return float(x @ y) / den if den > 0 else 0.0


def build_evidence(root: SliceEvidence, members: Iterable[SliceEvidence],
                   catalog: ClusterCatalog, max_exemplars: int) -> Evidence:
    """The incident's evidence: the root's counts, exemplars of the changed clusters first."""
    shifts = cluster_shifts(root.counts, catalog)
    gained = {s.cluster for s in shifts if s.delta > 0}
    seen: set[str] = set()
    pool: list[dict[str, Any]] = []
    for m in (root, *(m for m in members if m.ref.slice_id != root.ref.slice_id)):
        pool.extend(sorted(m.exemplars, key=lambda x: -(x.get("ts") or 0.0)))
    # Changed exemplars (OOD or in a gaining cluster) first: they are the ones to look at.
    pool.sort(key=lambda x: not (x.get("ood") or x.get("cluster") in gained))
    exemplars: list[Exemplar] = []
    for x in pool:
        if x["event_id"] in seen or len(exemplars) >= max_exemplars:
            continue
        seen.add(x["event_id"])
        desc = catalog.descriptions.get(x["cluster"]) if x.get("cluster") is not None else None
        exemplars.append(Exemplar(
            event_id=x["event_id"], slice_id=x["slice_id"], cluster=x.get("cluster"),
            distance=x.get("distance"), ts=utc(x["ts"]) if x.get("ts") is not None else None,
            ood=x.get("ood"), reference_exemplars=list((desc or {}).get("exemplars", []))[:3]))
    counts = root.counts or {}
    return Evidence(slice_id=root.ref.slice_id, n=int(counts.get("n") or 0),
                    truncated=bool(counts.get("truncated")), clusters=shifts,
                    ood=ood_evidence(root.counts), exemplars=exemplars,
                    model_versions=root.model_versions, signature=signature(root.counts))


_DETECTOR_POINTS = {"error_rate": 2, "ood_rate": 1, "confidence": 1, "prediction_mix": 1}


def severity(root: SliceEvidence, firings: Sequence[Firing],
             related: Sequence[SliceRef]) -> Severity:
    """Points: share of events moved (≥10 % +1, ≥30 % +2), the worst detector kind (error
    rate +2; OOD, confidence, prediction mix +1), a persisting change (root re-crossed its
    threshold 5 times +1), fleet reach (3 or more stations +1). ≥4 critical, ≥2 major."""
    score = 2 if root.displaced >= 0.3 else 1 if root.displaced >= 0.1 else 0
    score += max((_DETECTOR_POINTS.get(f.detector, 0) for f in firings), default=0)
    if any(f.crossings >= 5 for f in firings if f.slice_id == root.ref.slice_id):
        score += 1
    stations = {r.dims["station"] for r in (root.ref, *related) if "station" in r.dims}
    if len(stations) >= 3:
        score += 1
    return Severity.critical if score >= 4 else Severity.major if score >= 2 else Severity.warning


def refresh(inc: Incident, catalog: ClusterCatalog, max_exemplars: int) -> Severity | None:
    """Recompute what follows from the root and the slices: related slices (strongest first),
    evidence, onset, detection time, delay and severity (which only grows while open).
    Returns the previous severity when it grew."""
    root = inc.slices[inc.root.slice_id]
    inc.related = [s.ref for s in sorted(inc.slices.values(), key=lambda s: -s.strength)
                   if s.ref.slice_id != root.ref.slice_id]
    inc.evidence = build_evidence(root, inc.slices.values(), catalog, max_exemplars)
    mine = [f for f in inc.detectors if f.slice_id == root.ref.slice_id] or inc.detectors
    first = min(mine, key=lambda f: f.first_detected)
    inc.detected_at, inc.onset = first.first_detected, first.onset or root.onset
    inc.delay = Delay(events=first.events_at_detection, seconds=None if inc.onset is None
                      else (inc.detected_at - inc.onset).total_seconds())
    new = severity(root, inc.detectors, inc.related)
    if severity_rank(new) <= severity_rank(inc.severity):
        return None
    old, inc.severity = inc.severity, new
    return old


def recurrence(inc: Incident, signatures: Mapping[str, Mapping[str, Any]], threshold: float,
               links: int) -> list[RecurrenceLink]:
    """Resolved incidents with the same root template and a similar signature, best first."""
    sims = sorted(((cosine(inc.evidence.signature, s.get("signature", [])), iid)
                   for iid, s in signatures.items()
                   if iid != inc.id and s.get("template") == inc.root.template), reverse=True)
    return [RecurrenceLink(incident_id=iid, similarity=round(sim, 4))
            for sim, iid in sims[:links] if sim >= threshold]
