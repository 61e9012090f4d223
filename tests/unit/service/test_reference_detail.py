"""The reference detail's baselines: the OOD rate bound served is the one the detect stage
judges against, for references built before it was stored too."""

from __future__ import annotations

from typing import Any

import pytest

from driftline.core.baselines import tail_rate_bound
from driftline.runner import detector_baseline
from driftline.service.routes.references import baseline_rows

ITEMS: dict[str, Any] = {
    "global": {"parent": None, "n": 500, "counts": [250, 250], "p": [0.5, 0.5],
               "ood_threshold": 0.3, "ood_rate": 0.01, "ood_exceed": 4},
    "station=s1": {"parent": "global", "n": 120, "counts": [60, 60], "p": [0.5, 0.5],
                   "ood_threshold": 0.3, "ood_rate": 0.02, "ood_exceed": 2,
                   "ood_rate_bound": 0.07},
}


def test_an_old_reference_serves_the_bound_its_detector_judges_against() -> None:
    """It served ``ood_rate_bound: null`` where the detect stage and CLI computed one."""
    rows = {r.key: r for r in baseline_rows({"items": ITEMS, "bound_confidence": 0.99})}
    section = {"bound_confidence": 0.99}
    for key, row in rows.items():
        assert row.ood_rate_bound == detector_baseline(key, ITEMS, section).ood_bound
    assert rows["global"].ood_rate_bound == pytest.approx(tail_rate_bound(500, 4, 0.99))
    assert rows["station=s1"].ood_rate_bound == 0.07  # stored: served as stored
    assert baseline_rows({"items": {"x": {"parent": None}}})[0].ood_rate_bound is None
