"""Evidence of an incident from outbox messages: effect size, cluster shifts, OOD, severity,
recurrence signature and the label set (pure: standard library, numpy and the core's baseline
keys).

**Effect.** A slice's alarm carries, since its onset, the observed cluster counts ``o`` and
the counts its events' own baselines expected ``e`` (and the same for OOD hits). The effect is
the *share of the slice's events that moved*: the total variation between ``o/n`` and ``e/n``,
or the OOD excess rate, whichever is larger (:func:`effect`). Unlike a per-event KL it is
exactly linear under dilution, whatever the size of the change: a slice whose events are a
fraction ``f`` from a changed population shows ``f`` times the effect of that population, which
is what root-slice attribution compares. Detectors without counts (prediction mix, confidence,
error rate) fall back to Pinsker's bound from ``statistic / events since onset``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import numpy.typing as npt

from driftline.alerts.misfit import BaselineMisfit, slice_cell
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
FloatArray = npt.NDArray[np.float64]
MIX_DETECTORS = ("cluster_mix", "ood_rate")


@dataclass(frozen=True)
class ClusterCatalog:
    """Cluster descriptions (exemplars, metadata lift, performance), aggressor clusters and
    the fallback cells that do not fit their fallback (``misfits``, as in the manifest's
    ``baselines.fallbacks``) of one reference (``reference_id``; None: whatever reference an
    alarm came from)."""

    descriptions: Mapping[int, dict[str, Any]] = field(default_factory=dict)
    aggressors: frozenset[int] = frozenset()
    reference_id: str | None = None
    misfits: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> ClusterCatalog:
        """From a reference artifact's ``manifest.json`` (``driftline.reference``); one
        built before ``baselines.fallbacks`` was recorded has no misfits."""
        # here, not at the top: the reference package loads faiss, and this module is pure
        from driftline.reference.fallbacks import misfit_cells

        items = manifest.get("clusters", {}).get("items", [])
        aggr = manifest.get("performance", {}).get("aggressors", [])
        rid = manifest.get("reference_id")
        return cls({int(c["id"]): dict(c) for c in items},
                   frozenset(int(a["cluster"]) for a in aggr),
                   str(rid) if rid is not None else None,
                   misfit_cells(manifest))

    def describes(self, reference_id: str | None) -> bool:
        """Whether cluster ids of that reference's alarms are this catalog's: after another
        reference is activated, workers restart one by one, and an alarm of the old reference
        must not be described with the new one's clusters. An alarm that does not say (written
        before the field) is taken to be of this catalog's reference."""
        return None in (self.reference_id, reference_id) or reference_id == self.reference_id

    def misfit(self, ref: SliceRef, reference_id: str | None) -> BaselineMisfit | None:
        """The slice's cell (:func:`~driftline.alerts.misfit.slice_cell`) if it is one of this
        reference's misfit fallbacks and the alarm (raised on ``reference_id``) was judged
        on this reference; else None."""
        cell = slice_cell(ref.dims)
        found = self.misfits.get(cell) if cell is not None else None
        if found is None or not self.describes(reference_id):
            return None
        return BaselineMisfit(cell=str(cell), reference_events=int(found["n"]),
                              judged_against=str(found["judged_against"]),
                              p_value=float(found["p_value"]))


def effect(counts: Mapping[str, Any] | None) -> tuple[float, float, float]:
    """``(strength, mix_shift, displaced)`` since onset, each a share of the slice's events.

    ``displaced`` is the larger of the total variation between the observed and expected
    cluster mix and the OOD excess rate; ``mix_shift`` and ``strength`` are the same with
    each cluster's (and the OOD rate's) deviation soft-thresholded by one standard error
    under no drift, so that noise in a small slice does not read as an effect.
    """
    if not counts:
        return 0.0, 0.0, 0.0
    mix, mix_adj, ood, ood_adj = 0.0, 0.0, 0.0, 0.0
    n = int(counts.get("n") or 0)
    if n > 0 and counts.get("clusters"):
        o = np.asarray(counts["clusters"], np.float64)
        q = np.maximum(np.asarray(counts["expected"], np.float64), 0.0)
        p, q = o / max(o.sum(), 1.0), q / max(q.sum(), _Q_FLOOR)
        dev = np.abs(p - q)
        mix = 0.5 * float(dev.sum())
        mix_adj = 0.5 * float(np.maximum(dev - np.sqrt(q * (1 - q) / n), 0.0).sum())
    n_ood = int(counts.get("n_ood") or 0)
    if n_ood > 0:
        r, p0 = counts["ood"] / n_ood, min(max(counts["ood_expected"] / n_ood, 0.0), 1.0)
        ood = max(r - p0, 0.0)
        ood_adj = max(r - p0 - math.sqrt(p0 * (1 - p0) / n_ood), 0.0)
    return max(mix_adj, ood_adj), mix_adj, max(mix, ood)


def deviations(counts: Mapping[str, Any] | None) -> tuple[FloatArray, FloatArray] | None:
    """Per cluster: ``p_obs - p_ref`` and its standard error under no drift."""
    if not counts or not counts.get("n") or not counts.get("clusters"):
        return None
    o = np.asarray(counts["clusters"], np.float64)
    q = np.maximum(np.asarray(counts["expected"], np.float64), 0.0)
    q = q / max(q.sum(), _Q_FLOOR)
    return o / max(o.sum(), 1.0) - q, np.sqrt(q * (1 - q) / int(counts["n"]))


def gains(counts: Mapping[str, Any] | None) -> FloatArray | None:
    """The clusters' gains beyond noise (deviation minus two standard errors, at least 0)."""
    dev = deviations(counts)
    return None if dev is None else np.maximum(dev[0] - 2.0 * dev[1], 0.0)


def contained(y: Mapping[str, Any] | None, r: Mapping[str, Any] | None) -> float | None:
    """Share of ``y``'s gains that land on clusters ``r`` gained too (``None``: no gains).

    A station explains its station+shift slice only if it shows that slice's gains; across
    stations the comparison is not valid (one station's gain can cancel another's loss)."""
    gy, dr = gains(y), deviations(r)
    if gy is None or dr is None or gy.shape != dr[0].shape or gy.sum() <= 0.0:
        return None
    return float(gy[dr[0] > 0.0].sum() / gy.sum())


def slice_evidence(msg: Mapping[str, Any], counts: Mapping[str, Any] | None = None,
                   onset: datetime | None = None) -> SliceEvidence:
    """An outbox ``alarm``/``update`` message → the slice's evidence since onset (or since
    the given episode ``onset``, with the episode's ``counts``)."""
    ev = msg.get("evidence") or {}
    if counts is None:
        counts = ev.get("counts")
    strength, mix_shift, displaced = effect(counts)
    # the events since the onset: those counted, and those the detect stage could not tell
    # from the events before the onset (its ``missed``)
    n_since = int((counts or {}).get("n") or msg.get("events_since_onset") or 0) + int(
        (counts or {}).get("missed") or 0)
    if msg["detector"] not in MIX_DETECTORS and n_since > 0:
        # No counts for this detector: TV <= sqrt(KL/2) (Pinsker) from statistic / events.
        strength = max(strength, math.sqrt(max(float(msg["statistic"]), 0.0) / n_since / 2))
    if onset is None and msg.get("onset_time") is not None:
        onset = utc(msg["onset_time"])
    at = utc(msg["time"])
    if onset is not None and onset > at:
        # A slice mixing stations (a lot, a shift) sees event times out of order, as the
        # stations' partitions are read in turns: its excursion's first event may be younger
        # than the event that crossed. The change was under way by the crossing.
        onset = at
    return SliceEvidence(
        ref=SliceRef(template=msg["template"], dims=dict(msg["dims"]), slice_id=msg["slice_id"]),
        strength=strength, mix_shift=mix_shift, displaced=displaced, n_since_onset=n_since,
        counts=dict(counts) if counts else None, signature=signature(counts),
        cells={msg["detector"]: ev["cells"]} if ev.get("cells") else {},
        exemplars=[{**x, "slice_id": msg["slice_id"]} for x in ev.get("exemplars", [])],
        model_versions=dict(ev.get("model_versions") or {}),
        reference_id=msg.get("reference_id"), onset=onset, first_time=at, last_time=at)


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
    """The incident's evidence: the root's counts, exemplars of the changed clusters first
    (cluster descriptions only when ``catalog`` is of the root alarm's reference)."""
    if not catalog.describes(root.reference_id):
        catalog = ClusterCatalog()
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
            ood=x.get("ood"), reference_exemplars=list((desc or {}).get("exemplars", []))[:3],
            source_partition=x.get("source_partition"), source_offset=x.get("source_offset")))
    counts = root.counts or {}
    return Evidence(slice_id=root.ref.slice_id, n=int(counts.get("n") or 0),
                    missed=int(counts.get("missed") or 0),
                    truncated=bool(counts.get("truncated")), clusters=shifts,
                    ood=ood_evidence(root.counts), exemplars=exemplars,
                    model_versions=root.model_versions, signature=signature(root.counts),
                    reference_id=root.reference_id)


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
    if not catalog.describes(root.reference_id):
        catalog = _described(inc.evidence, root)
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


def _described(old: Evidence, root: SliceEvidence) -> ClusterCatalog:
    """The descriptions ``old`` evidence of the same root and reference holds: after a switch
    to another reference the book's catalog is the new one's, and an incident of the old
    reference refreshed then (its alarms cleared by the switch) kept its numbers but lost
    what its clusters are."""
    if old.slice_id != root.ref.slice_id or old.reference_id is None \
            or old.reference_id != root.reference_id:
        return ClusterCatalog()
    return ClusterCatalog({c.cluster: c.description for c in old.clusters if c.description},
                          frozenset(c.cluster for c in old.clusters if c.aggressor),
                          old.reference_id)


def root_reference(inc: Incident) -> str | None:
    """The reference the incident's root alarm was raised on (None: not recorded)."""
    root = inc.slices.get(inc.root.slice_id)
    return root.reference_id if root is not None else None


def recurrence(inc: Incident, signatures: Mapping[str, Mapping[str, Any]], threshold: float,
               links: int) -> list[RecurrenceLink]:
    """Resolved incidents with the same root template and reference and a similar signature,
    best first. A signature's entries are the clusters of its reference: another reference
    (after a model upgrade) numbers other clusters, often as many of them, so its signatures
    are not compared (those stored before the reference was recorded are, as before)."""
    ref = root_reference(inc)
    sims = sorted(((cosine(inc.evidence.signature, s.get("signature", [])), iid)
                   for iid, s in signatures.items()
                   if iid != inc.id and s.get("template") == inc.root.template
                   and (None in (ref, s.get("reference_id")) or s.get("reference_id") == ref)),
                  reverse=True)
    return [RecurrenceLink(incident_id=iid, similarity=round(sim, 4))
            for sim, iid in sims[:links] if sim >= threshold]
