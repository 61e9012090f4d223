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


def _zeros(registry: CollectorRegistry, name: str) -> dict[tuple[str, ...], float]:
    """Every sample of counter ``name`` (``..._total``): label values -> value."""
    return {tuple(s.labels.values()): s.value for m in registry.collect() for s in m.samples
            if s.name == name}


def test_counters_with_known_labels_are_exported_at_zero_from_the_start() -> None:
    """A series born at 1 has no earlier sample, so increase() over it is 0: the dashboards'
    alarms and incidents per hour and the dead-letter rules missed the first one after a
    start."""
    from driftline.alerts.model import SEVERITY_ORDER
    from driftline.alerts.routing import AlertMetrics
    from driftline.core.slices import DETECTORS
    from driftline.metrics import EVENT_KINDS, EmbedMetrics
    from driftline.schema import RejectReason

    registry = CollectorRegistry()
    EmbedMetrics(registry)
    AlertMetrics(registry)
    DetectMetrics(registry, ["station", "station+shift", "lot"], ("cluster_mix", "ood_rate"))
    assert _zeros(registry, "driftline_embed_events_total") == {
        (k,): 0.0 for k in EVENT_KINDS}
    assert _zeros(registry, "driftline_embed_dead_letters_total") == {
        (r.value,): 0.0 for r in RejectReason}
    for name in ("driftline_incidents_total", "driftline_incidents_paged_total"):
        assert _zeros(registry, name) == {(s.value,): 0.0 for s in SEVERITY_ORDER}
    assert _zeros(registry, "driftline_detect_alarms_total") == {
        (t, d): 0.0 for t in ("station", "station+shift", "lot")
        for d in ("cluster_mix", "ood_rate")}
    other = CollectorRegistry()
    DetectMetrics(other, ["station"])  # every detector unless told which the reference feeds
    assert _zeros(other, "driftline_detect_alarms_total") == {
        ("station", d): 0.0 for d in DETECTORS}
