"""Metric help texts say what the gauges hold; the per-slice gauges export what Gauges did."""

from __future__ import annotations

import sys
import threading

from prometheus_client import CollectorRegistry, Gauge, generate_latest

from driftline.consumers.slice_state import GAUGE_WINDOW_S
from driftline.metrics import DetectMetrics, SliceGauges


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


def _exposition(registry: CollectorRegistry) -> list[str]:
    return sorted(generate_latest(registry).decode().splitlines())


def test_slice_gauges_expose_what_one_gauge_child_per_series_did() -> None:
    """The per-slice gauges are built at scrape time from a record per slice: /metrics shows
    the names, help, labels and values that a prometheus_client Gauge per metric showed,
    set and removed series by series, as the detect stage did."""
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    gauges = SliceGauges(ours)
    ratio, alarm, ood, share = (
        Gauge(d.name, d.documentation, d.labelnames, registry=theirs) for d in gauges.families)
    assert _exposition(ours) == _exposition(theirs)  # help and type before any slice
    gauges.set("s1", "all", {"cluster_mix": 0.25, "ood_rate": 1 / 3}, {"ood_rate": object()},
               1.5, {0: 0.75, 1: 0.25})
    gauges.set("s1", "B", {"cluster_mix": 0.5}, {}, None)
    gauges.set("s2", "all", {}, {"confidence": object()}, 0.0, {})
    for station, shift, detector, value in (("s1", "all", "cluster_mix", 0.25),
                                             ("s1", "all", "ood_rate", 1 / 3),
                                             ("s1", "B", "cluster_mix", 0.5)):
        ratio.labels(station, shift, detector).set(value)
    for station, shift, detector, value in (("s1", "all", "cluster_mix", 0.0),
                                             ("s1", "all", "ood_rate", 1.0),
                                             ("s1", "B", "cluster_mix", 0.0),
                                             ("s2", "all", "confidence", 1.0)):
        alarm.labels(station, shift, detector).set(value)
    ood.labels("s1", "all").set(1.5)
    ood.labels("s2", "all").set(0.0)
    share.labels("s1", "0").set(0.75)
    share.labels("s1", "1").set(0.25)
    assert _exposition(ours) == _exposition(theirs)
    # s1's window emptied and its alarm cleared: those series go; s2 left this worker
    gauges.set("s1", "all", {"cluster_mix": 0.125, "ood_rate": 0.5}, {})
    gauges.remove("s2", "all")
    gauges.remove("s9", "all")  # never published: nothing to remove
    ratio.labels("s1", "all", "cluster_mix").set(0.125)
    ratio.labels("s1", "all", "ood_rate").set(0.5)
    alarm.labels("s1", "all", "ood_rate").set(0.0)
    alarm.remove("s2", "all", "confidence")
    for g, labels in ((ood, ("s1", "all")), (ood, ("s2", "all")), (share, ("s1", "0")),
                      (share, ("s1", "1"))):
        g.remove(*labels)
    assert _exposition(ours) == _exposition(theirs)


def test_slice_gauges_are_scraped_while_the_stage_replaces_them() -> None:
    """Scrapes run on the HTTP server's thread while checkpoints replace and remove records."""
    registry = CollectorRegistry()
    gauges = SliceGauges(registry)
    stop = threading.Event()
    errors: list[BaseException] = []
    scraped = [0]

    def scrape() -> None:
        while not stop.is_set():
            try:
                generate_latest(registry)
                scraped[0] += 1
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                errors.append(exc)
                return

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # threads take turns within a scrape and a checkpoint
    thread = threading.Thread(target=scrape)
    thread.start()
    try:
        for turn in range(1000):
            for i in range(100):
                gauges.set(f"s{i}", "all", {"cluster_mix": turn / 300}, {}, 1.0, {0: 1.0})
            for i in range(0, 100, 2 + turn % 3):
                gauges.remove(f"s{i}", "all")
            if scraped[0] >= 50 or errors:
                break
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(switch)
    assert not errors, errors
    assert scraped[0] > 0
    assert registry.get_sample_value("driftline_detect_ood_ratio",
                                     {"station": "s1", "shift": "all"}) == 1.0
