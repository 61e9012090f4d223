"""Evidence of an incident: cluster shifts with descriptions, OOD, severity."""

from __future__ import annotations

import re

from driftline.alerts.evidence import (
    ClusterCatalog,
    build_evidence,
    cluster_shifts,
    ood_evidence,
    severity,
    slice_evidence,
)
from driftline.alerts.model import Evidence, Firing, Severity, SliceRef, utc
from tests.unit.alerts.synthetic import alarm, counts

MANIFEST = {
    "clusters": {"items": [
        {"id": c, "size": 10, "exemplars": [f"ref-{c}-{i}" for i in range(5)],
         "lift": [{"field": "station", "value": "press-3", "lift": 2.0}] if c == 0 else []}
        for c in range(8)]},
    "performance": {"aggressors": [{"cluster": 0, "reasons": ["error_rate"]}]},
}


def test_cluster_shifts_name_gained_and_lost_clusters_with_their_description() -> None:
    catalog = ClusterCatalog.from_manifest(MANIFEST)
    shifts = cluster_shifts(counts(800, 1.0, eps=0.3), catalog)
    top = shifts[0]
    assert top.cluster == 0 and top.delta > 0.25 and top.aggressor
    assert abs(top.p_ref - 0.125) < 1e-6 and top.observed == round(800 * top.p_obs)
    assert top.description is not None and top.description["lift"][0]["value"] == "press-3"
    assert all(s.delta < 0 and not s.aggressor for s in shifts[1:])
    assert abs(sum(s.delta for s in shifts)) < 0.01  # gains and losses balance


def test_ood_rate_since_onset_against_the_reference() -> None:
    ood = ood_evidence(counts(1000, 1.0, ood_shift=0.09))
    assert ood is not None and ood.rate == 0.1 and ood.reference_rate == 0.01
    assert ood.ratio == 10.0


def test_evidence_puts_changed_exemplars_first_with_reference_exemplars() -> None:
    catalog = ClusterCatalog.from_manifest(MANIFEST)
    root = slice_evidence(alarm("station=press-3", 1.0))
    other = slice_evidence(alarm("lot=L7", 0.25, n=1600))
    ev = build_evidence(root, [root, other], catalog, max_exemplars=6)
    assert len(ev.exemplars) == 6
    assert [x.cluster for x in ev.exemplars[:4]] == [0, 0, 0, 0]
    assert ev.exemplars[0].reference_exemplars == ["ref-0-0", "ref-0-1", "ref-0-2"]
    assert {x.slice_id for x in ev.exemplars} == {"station=press-3", "lot=L7"}
    assert ev.model_versions == {"v1": 400} and len(ev.signature) == 9


def _firing(sid: str, detector: str, crossings: int = 1) -> Firing:
    t = utc(1_700_000_000.0)
    return Firing(slice_id=sid, detector=detector, statistic=12.0, threshold=11.0,
                  first_detected=t, last_detected=t, crossings=crossings)


def test_severity_grows_with_effect_detector_persistence_and_reach() -> None:
    small = slice_evidence(alarm("station=press-3", 1.0, eps=0.05, n=4000))
    big = slice_evidence(alarm("station=press-3", 1.0, eps=0.5))
    assert severity(small, [_firing("station=press-3", "cluster_mix")], []) is Severity.warning
    assert severity(big, [_firing("station=press-3", "cluster_mix")], []) is Severity.major
    stations = [SliceRef(template="station", dims={"station": s}, slice_id=f"station={s}")
                for s in ("press-1", "press-2")]
    assert severity(big, [_firing("station=press-3", "error_rate", crossings=5)],
                    stations) is Severity.critical


def test_clusters_are_described_only_from_the_alarm_s_own_reference() -> None:
    """After another reference is activated, an alarm raised on the old one keeps its cluster
    shifts but gets no description from the new reference's clusters of the same ids."""
    catalog = ClusterCatalog.from_manifest({**MANIFEST, "reference_id": "new"})
    for rid, described in (("new", True), ("old", False), (None, True)):  # None: older alarm
        root = slice_evidence({**alarm("station=press-3", 1.0), "reference_id": rid})
        ev = build_evidence(root, [root], catalog, max_exemplars=2)
        assert ev.clusters and ev.clusters[0].cluster == 0
        assert (ev.clusters[0].description is not None) is described, rid
        assert ev.clusters[0].aggressor is described
        assert bool(ev.exemplars[0].reference_exemplars) is described
    # a catalog that does not know its reference (hand-made) describes any alarm
    root = slice_evidence({**alarm("station=press-3", 1.0), "reference_id": "old"})
    assert build_evidence(root, [root], ClusterCatalog.from_manifest(MANIFEST), 2
                          ).clusters[0].description is not None


def test_the_evidence_schema_names_no_bucket_width_or_ring_horizon() -> None:
    """Both are configurable (``SliceDetectors(bucket_seconds, max_buckets)``): the API's words
    said "5-min bucket" and "4-h count ring" whatever they were."""
    for field in ("missed", "truncated"):
        words = Evidence.model_fields[field].description or ""
        assert not re.search(r"\d+[- ]?(min|h)\b", words), words
