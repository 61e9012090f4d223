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
