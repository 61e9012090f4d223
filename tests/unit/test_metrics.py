"""Metric help texts say what the gauges hold."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from driftline.consumers.slice_state import GAUGE_WINDOW_S
from driftline.metrics import DetectMetrics


def test_windowed_gauges_name_their_window() -> None:
    registry = CollectorRegistry()
    DetectMetrics(registry)
    docs = {m.name: m.documentation for m in registry.collect()}
    assert GAUGE_WINDOW_S == 3600.0  # SliceState.gauges: counts since last_time - window
    for name in ("driftline_detect_ood_ratio", "driftline_detect_cluster_share_ratio"):
        assert "last hour" in docs[name], docs[name]
        assert "reset" not in docs[name]


def test_every_skip_reason_is_exported_at_zero_from_the_start() -> None:
    """DriftlineMixedReferences reads increase() of one reason: a series that first appears
    with its first skips would hide them, and the rule would read a metric not exported."""
    import inspect
    import re

    from prometheus_client import CollectorRegistry

    from driftline.consumers import detect_stage
    from driftline.metrics import SKIP_REASONS, DetectMetrics

    used = set(re.findall(r'_skip\("(\w+)"\)', inspect.getsource(detect_stage)))
    assert used == set(SKIP_REASONS)
    registry = CollectorRegistry()
    DetectMetrics(registry)
    assert {r: registry.get_sample_value("driftline_detect_skipped_total", {"reason": r})
            for r in SKIP_REASONS} == dict.fromkeys(SKIP_REASONS, 0.0)
