"""The demo says what changed per incident, not only where and since when."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from driftline.alerts.model import (
    ClusterShift,
    Evidence,
    Firing,
    Incident,
    OodEvidence,
    SliceEvidence,
    SliceRef,
)
from driftline.demo.explain import describe_cluster, what_changed
from driftline.demo.plant import Injection
from driftline.demo.run import Outcome, report

T = datetime(2026, 11, 16, 6, 50, tzinfo=UTC)
ROOT = SliceRef(template="station", dims={"station": "surf-1"}, slice_id="station=surf-1")
CLUSTER_5 = {"id": 5, "size": 180, "share": 0.125, "exemplars": ["surf-1-12"],
             "lift": [{"field": "station", "value": "surf-1", "lift": 3.9, "count": 170},
                      {"field": "lot", "value": "L2603", "lift": 1.4, "count": 40},
                      {"field": "shift", "value": "day", "lift": 1.1, "count": 70}]}


def _firing(slice_id: str, detector: str, minutes: float, stat: float) -> Firing:
    at = T + timedelta(minutes=minutes)
    return Firing(slice_id=slice_id, detector=detector, statistic=stat, threshold=20.8,
                  onset=T, first_detected=at, last_detected=at)


def _incident(described: bool) -> dict[str, Any]:
    inc = Incident(
        id="DL-000003", root=ROOT, onset=T, detected_at=T + timedelta(minutes=1.3),
        detectors=[_firing("shift=day", "ood_rate", 0.5, 21.5),
                   _firing("station=surf-1", "cluster_mix", 15, 24.0),
                   _firing("station=surf-1", "ood_rate", 1.3, 23.0),
                   _firing("station=surf-1", "ood_rate", 30, 22.0)],  # a later episode
        evidence=Evidence(
            slice_id="station=surf-1", n=329,
            clusters=[ClusterShift(cluster=5, p_ref=0.28, p_obs=0.51, delta=0.23, observed=168,
                                   expected=92.1, description=CLUSTER_5 if described else None),
                      ClusterShift(cluster=7, p_ref=0.25, p_obs=0.11, delta=-0.14, observed=36,
                                   expected=82.3, aggressor=True)],
            ood=OodEvidence(n=329, observed=299, rate=0.9088, reference_rate=0.165,
                            ratio=5.51)),
        slices={"station=surf-1": SliceEvidence(ref=ROOT, strength=0.9, mix_shift=0.2,
                                                displaced=0.9, n_since_onset=329)},
        created_at=T, updated_at=T, last_activity=T)
    return dict(json.loads(inc.model_dump_json()))


def test_what_changed_counts_the_events_since_onset_it_could_not_count_too() -> None:
    """Without a bucket width: it is configurable (the words said "5 min" whatever it was),
    and what is not counted is what was read with events from before the onset."""
    inc = _incident(described=True)
    inc["evidence"]["missed"] = 21
    assert what_changed(inc)[0].endswith(
        ", 350 events since onset (21 not counted: read with events from before the onset)")


def test_what_changed_names_detectors_clusters_and_the_ood_rate() -> None:
    lines = what_changed(_incident(described=True))
    assert lines[0] == ("DL-000003 at station=surf-1 since 2026-11-16T06:50:00Z, "
                        "329 events since onset")
    # the root slice's detectors first, in the order they fired; then the others
    assert lines[1] == ("  detectors: ood_rate at station=surf-1 (23.0/20.8), cluster_mix at "
                        "station=surf-1 (24.0/20.8), ood_rate at shift=day (21.5/20.8)")
    assert lines[2] == ("  cluster 5 gained: 28% of events expected → 51% seen "
                        "(station=surf-1 ×3.9, lot=L2603 ×1.4)")
    assert lines[3] == ("  cluster 7 lost: 25% of events expected → 11% seen (no description "
                        "in the reference, an aggressor (error slice))")
    assert lines[4] == ("  beyond the OOD threshold: 91% of 329 events vs 16% in the "
                        "reference, ×5.5")


def test_a_cluster_without_description_or_lift_says_so() -> None:
    assert "(no description in the reference)" in what_changed(_incident(described=False))[2]
    assert describe_cluster({"id": 1, "lift": []}) == "no over-represented metadata"


def test_the_demo_report_says_what_where_and_since_when() -> None:
    inj = Injection("haze", "surf-1 lens hazes", {"station": "surf-1"}, T)
    out = report([Outcome(inj, _incident(described=True))], [], 4.0)
    assert "| haze | station=surf-1 | station=surf-1 | +0.0 min | 20 | 1.3 | DL-000003 |" in out
    what = out[out.index("what changed"):]
    assert "detectors: ood_rate at station=surf-1" in what
    assert "cluster 5 gained: 28% of events expected → 51% seen (station=surf-1 ×3.9" in what
    assert "beyond the OOD threshold: 91% of 329 events vs 16% in the reference" in what
