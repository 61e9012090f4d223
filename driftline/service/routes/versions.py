"""``/api/v1/versions/compare``: two model versions, per reference cluster (regression control).

From the events of the recent buffer (``dl:recent``): per cluster and version the prediction
mix, the mean confidence and, among labelled events, the error rate. Per cluster the mixes are
compared by Fisher's exact test (two labels) or the chi-square test of homogeneity, the
confidences by Mann–Whitney U and the error rates by Fisher's exact test; all p-values of the
comparison are Holm-adjusted together, and a difference is significant when its adjusted
p-value is below ``alpha``. A cluster is tested only when both versions have ``min_events``
events in it. Only events embedded on the API's reference are compared (clusters are that
reference's); those of another (before an activation) are counted in ``other_reference``.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query

from driftline.service.deps import ContextDep, Viewer
from driftline.service.schemas.analysis import (
    ClusterComparison,
    SignificanceTest,
    VersionComparison,
    VersionSide,
)
from driftline.service.schemas.common import COMMON_ERRORS, QueryTime, time_range
from driftline.service.statistics import Test, holm, location_test, mix_test, rate_test

router = APIRouter(prefix="/versions", tags=["versions"], responses=COMMON_ERRORS)
Version = Annotated[str, Query(min_length=1, max_length=128, examples=["v1"])]
Dim = Annotated[str | None, Query(min_length=1, max_length=128)]


def _side(events: list[dict[str, Any]]) -> tuple[VersionSide, Counter[str], list[float],
                                                  tuple[int, int]]:
    preds = Counter(str(e["pred"]) for e in events if e.get("pred") is not None)
    scores = [float(e["score"]) for e in events if isinstance(e.get("score"), int | float)]
    labelled = [e for e in events if e.get("label") is not None and e.get("pred") is not None]
    wrong = sum(e["label"] != e["pred"] for e in labelled)
    total = sum(preds.values())
    side = VersionSide(
        n=len(events), prediction_mix={k: round(v / total, 6) for k, v in sorted(preds.items())},
        mean_confidence=round(sum(scores) / len(scores), 6) if scores else None,
        labelled=len(labelled), error_rate=round(wrong / len(labelled), 6) if labelled else None)
    return side, preds, scores, (wrong, len(labelled))


def _ts(t: datetime | None) -> float | None:
    return None if t is None else (t if t.tzinfo else t.replace(tzinfo=UTC)).timestamp()


@router.get("/compare", response_model=VersionComparison)
def compare_versions(
    ctx: ContextDep, _: Viewer, a: Version, b: Version,
    since: Annotated[QueryTime | None, Query(description="event time")] = None,
    until: Annotated[QueryTime | None, Query(description="event time")] = None,
    station: Dim = None, shift: Dim = None,
    alpha: Annotated[float, Query(gt=0.0, lt=1.0)] = 0.05,
    min_events: Annotated[int, Query(ge=2, le=100_000)] = 10,
) -> VersionComparison:
    """Prediction mix, confidence and error rate of versions ``a`` and ``b`` per cluster."""
    time_range(since, until)
    lo, hi = _ts(since), _ts(until)
    per: dict[str, dict[int | None, list[dict[str, Any]]]] = {a: {}, b: {}}

    def wanted(m: dict[str, Any]) -> bool:
        if m.get("model_version") not in per or (station and m.get("station") != station) or (
                shift and m.get("shift") != shift):
            return False
        ts = m.get("ts")
        t = float(ts) if isinstance(ts, int | float) else None
        if (lo is not None or hi is not None) and t is None:
            return False
        return t is None or not ((lo is not None and t < lo) or (hi is not None and t > hi))

    snap = ctx.recent().snapshot()
    for m in filter(wanted, snap.metas):
        c = m.get("cluster")
        per[str(m["model_version"])].setdefault(c if isinstance(c, int) else None, []).append(m)
    other = Counter(str(m["model_version"]) for m in filter(wanted, snap.other_reference))
    clusters = sorted(set(per[a]) | set(per[b]), key=lambda c: (c is None, c or 0))
    rows: list[tuple[int | None, VersionSide, VersionSide, list[Test | None]]] = []
    for c in clusters:
        sa, pa, qa, ea = _side(per[a].get(c, []))
        sb, pb, qb, eb = _side(per[b].get(c, []))
        tests: list[Test | None] = [None, None, None]
        if sa.n >= min_events and sb.n >= min_events:
            labels = sorted(set(pa) | set(pb))
            tests = [mix_test([pa[x] for x in labels], [pb[x] for x in labels]),
                     location_test(qa, qb),
                     rate_test(*ea, *eb) if min(ea[1], eb[1]) >= min_events else None]
        rows.append((c, sa, sb, tests))
    flat = [t for *_, tests in rows for t in tests if t is not None]
    adjusted = iter(holm([f.p_value for f in flat]))
    out, significant = [], []
    for c, sa, sb, tests in rows:
        views: list[SignificanceTest | None] = []
        for what, test in zip(("prediction mix", "confidence", "error rate"), tests,
                              strict=True):
            if test is None:
                views.append(None)
                continue
            p_adj = next(adjusted)
            views.append(SignificanceTest(test=test.name, statistic=test.statistic,
                                          p_value=test.p_value, p_adjusted=p_adj,
                                          significant=p_adj < alpha))
            if p_adj < alpha:
                significant.append(f"cluster {'unassigned' if c is None else c}: {what}")
        out.append(ClusterComparison(cluster=c, a=sa, b=sb, prediction_mix=views[0],
                                     confidence=views[1], error_rate=views[2]))
    return VersionComparison(
        version_a=a, version_b=b, alpha=alpha,
        events={a: sum(len(x) for x in per[a].values()),
                b: sum(len(x) for x in per[b].values())},
        other_reference=dict(sorted(other.items())),
        clusters=out, significant=significant)
