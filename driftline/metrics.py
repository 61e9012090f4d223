"""Prometheus metrics of the pipeline, registered on a registry the caller passes in.

Names follow ``driftline_<subsystem>_<name>_<unit>``; counters end in ``_total``; label values
are bounded (stage, partition, reason, station, shift, cluster, detector) — never lot or event
ids, whose cardinality grows without limit.
"""

from __future__ import annotations

import threading
from array import array
from collections.abc import Collection, Iterable, Iterator, Mapping
from typing import NamedTuple

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

from driftline.core.slices import DETECTORS
from driftline.schema import RejectReason

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


# why the detect stage skips a slice-update (driftline_detect_skipped_total's reason label)
SKIP_REASONS = ("unreadable", "unusable", "other_reference", "other_reference_label", "retired")
# driftline_embed_events_total's kind label: inference events, late labels, and records that
# are no valid event (dead-lettered at parsing)
EVENT_KINDS = ("inference", "label", "invalid")
# Counters whose label values are known at start are exported at 0 for each of them from the
# start: a series born at its first increment has no earlier sample, so increase() and rate()
# read 0 across it and the rules and dashboards would miss the first event after a restart.


class EmbedMetrics:
    """Embed stage: events in, slice-updates out, dead letters, batches, model latency."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.events_in = Counter(
            "driftline_embed_events_total",
            "Records consumed from the events topic, each once: inference events, late labels, "
            "and kind=invalid for records that are no valid event (dead-lettered at parsing). "
            "Events dead-lettered later count under their kind, so dead letters / this is the "
            "dead-letter share", ["kind"], registry=registry)
        self.updates_out = Counter(
            "driftline_embed_slice_updates_total", "Slice-updates produced", registry=registry)
        self.dead_letters = Counter(
            "driftline_embed_dead_letters_total",
            "Records sent to the dead-letter topic (a part of driftline_embed_events_total)",
            ["reason"], registry=registry)
        for kind in EVENT_KINDS:
            self.events_in.labels(kind)
        for reason in RejectReason:
            self.dead_letters.labels(reason.value)
        self.redis_skipped = Counter(
            "driftline_embed_redis_skipped_total",
            "Events whose prediction (for late labels) and recent embedding were not stored: "
            "Redis unreachable", registry=registry)
        self.duplicate_events = Counter(
            "driftline_embed_duplicate_events_total",
            "Inference events skipped: their event_id was first read at another position of "
            "the events topic (a sender's retry)", registry=registry)
        self.batch_size = Histogram(
            "driftline_embed_batch_size_events", "Events per embed batch",
            buckets=_BATCH_BUCKETS, registry=registry)
        self.embed_latency = Histogram(
            "driftline_embed_latency_seconds", "Decode + model time per batch",
            buckets=_LATENCY_BUCKETS, registry=registry)
        self.events_per_station = Counter(
            "driftline_embed_station_events_total", "Events per station (stations are bounded)",
            ["station"], registry=registry)
        self.last_event_time = Gauge(
            "driftline_embed_station_last_event_timestamp_seconds",
            "Event time of the newest event per station", ["station"], registry=registry)


class GaugeDefinition(NamedTuple):
    name: str
    documentation: str
    labelnames: tuple[str, ...]


# the detect stage's per-slice gauges (SliceGauges), in the order they are exported
STATISTIC_RATIO = GaugeDefinition(
    "driftline_detect_statistic_ratio",
    "Detector statistic / threshold for station and station+shift slices, at "
    "checkpoint time: the detector alarms at 1 and restarts from 0 in the same update, "
    "so this stays below 1 (driftline_detect_open_alarms says which alarms are open)",
    ("station", "shift", "detector"))
OPEN_ALARMS = GaugeDefinition(
    "driftline_detect_open_alarms",
    "1 while the detector has an open alarm on the station or station+shift slice "
    "(from its crossing until it clears or its incident is resolved), else 0",
    ("station", "shift", "detector"))
OOD_RATIO = GaugeDefinition(
    "driftline_detect_ood_ratio",
    "Out-of-distribution rate over the last hour of event time / reference rate",
    ("station", "shift"))
CLUSTER_SHARE = GaugeDefinition(
    "driftline_detect_cluster_share_ratio",
    "Share of the last hour's events (event time) per reference cluster",
    ("station", "cluster"))


class _Layout(NamedTuple):
    """Which series a slice's record holds, in the order of its values (shared by slices)."""

    detectors: tuple[str, ...]  # a statistic ratio each
    alarm_detectors: tuple[str, ...]  # an open-alarm value each
    ood: bool
    clusters: tuple[str, ...]  # a cluster share each


class SliceGauges:
    """The gauges of station and station+shift slices (bounded labels): ``STATISTIC_RATIO``,
    ``OPEN_ALARMS``, ``OOD_RATIO`` and ``CLUSTER_SHARE``, built at scrape time from one
    immutable record per slice — its label values, a shared layout and a packed array of
    values — instead of a prometheus_client child per series (~800 B each: 17,600 series,
    14 MB, for the 1,600 gauged slices of 10,000; benchmarks/results/detect_memory.md).

    The detect stage replaces a slice's record at each checkpoint (:meth:`set`; series the
    slice no longer has go with the old record) and removes it when the slice leaves
    (:meth:`remove`). Scrapes run on another thread: records are swapped and copied out
    under a lock, and never changed in place.
    """

    families = (STATISTIC_RATIO, OPEN_ALARMS, OOD_RATIO, CLUSTER_SHARE)

    def __init__(self, registry: CollectorRegistry) -> None:
        self._lock = threading.Lock()
        self._records: dict[tuple[str, str], tuple[_Layout, array[float]]] = {}
        self._layouts: dict[_Layout, _Layout] = {}
        registry.register(self)

    def set(self, station: str, shift: str, ratios: Mapping[str, float],
            open_alarms: Collection[str], ood_ratio: float | None = None,
            cluster_shares: Mapping[int, float] | None = None) -> None:
        """The slice (``station``, ``shift``) now exports a statistic ratio per detector of
        ``ratios``, an open-alarm value (1 if in ``open_alarms``, else 0) per detector of
        either, its OOD ratio if known and its cluster shares if given — and nothing else."""
        shares = cluster_shares or {}
        alarms = tuple(sorted({*ratios, *open_alarms}))
        layout = _Layout(tuple(ratios), alarms, ood_ratio is not None,
                         tuple(str(c) for c in shares))
        layout = self._layouts.setdefault(layout, layout)
        values = array("d", [float(v) for v in ratios.values()])
        values.extend([float(d in open_alarms) for d in alarms])
        if ood_ratio is not None:
            values.append(float(ood_ratio))
        values.extend([float(v) for v in shares.values()])
        with self._lock:
            self._records[station, shift] = (layout, values)

    def remove(self, station: str, shift: str) -> None:
        """The slice's series go (none if it has no record)."""
        with self._lock:
            self._records.pop((station, shift), None)

    def describe(self) -> list[GaugeMetricFamily]:
        return [GaugeMetricFamily(d.name, d.documentation, labels=d.labelnames)
                for d in self.families]

    def collect(self) -> Iterator[GaugeMetricFamily]:
        with self._lock:
            records = list(self._records.items())
        ratio, alarm, ood, share = self.describe()
        for (station, shift), (layout, values) in records:
            i = 0
            for detector in layout.detectors:
                ratio.add_metric((station, shift, detector), values[i])
                i += 1
            for detector in layout.alarm_detectors:
                alarm.add_metric((station, shift, detector), values[i])
                i += 1
            if layout.ood:
                ood.add_metric((station, shift), values[i])
                i += 1
            for cluster in layout.clusters:
                share.add_metric((station, cluster), values[i])
                i += 1
        yield from (ratio, alarm, ood, share)


class DetectMetrics:
    """Detect stage: updates applied, duplicates, alarms, drift statistics, checkpoints.
    ``templates`` and ``detectors``: the alarm counter's label values, exported at 0."""

    def __init__(self, registry: CollectorRegistry, templates: Iterable[str] = (),
                 detectors: Iterable[str] = DETECTORS) -> None:
        self.updates = Counter(
            "driftline_detect_slice_updates_total",
            "Slice-updates applied (again when uncommitted work is read again)",
            registry=registry)
        self.duplicates = Counter(
            "driftline_detect_duplicates_total", "Replayed slice-updates skipped by source offset",
            registry=registry)
        self.skipped = Counter(
            "driftline_detect_skipped_total",
            "Slice-updates skipped: unreadable record, unusable with the loaded reference, "
            "embedded against another reference (an event, or a late label of one), or for a "
            "retired slice",
            ["reason"], registry=registry)
        for reason in SKIP_REASONS:  # at 0 from the start: alert rules read increase()
            self.skipped.labels(reason)
        self.alarms = Counter(
            "driftline_detect_alarms_total", "Detector alarms, counted once committed",
            ["template", "detector"],
            registry=registry)
        detectors = tuple(detectors)
        for template in templates:
            for detector in detectors:
                self.alarms.labels(template, detector)
        self.slices = SliceGauges(registry)
        self.retired = Counter(
            "driftline_detect_slices_retired_total",
            "Idle slices retired: removed from memory and Redis, or started afresh when "
            "their updates came back after the horizon", registry=registry)
        self.live_slices = Gauge(
            "driftline_detect_live_slices", "Slices held by this worker", registry=registry)
        self.checkpoint_age = Gauge(
            "driftline_detect_checkpoint_age_seconds", "Seconds since the last checkpoint",
            registry=registry)
        self.checkpoints = Counter(
            "driftline_detect_checkpoints_total", "Checkpoint attempts by outcome", ["outcome"],
            registry=registry)
        self.e2e_latency = Histogram(
            "driftline_pipeline_end_to_end_latency_seconds",
            "From the event's arrival in Kafka to its effect on the detectors (one slice-update "
            "in 16)",
            buckets=_LATENCY_BUCKETS, registry=registry)


def reference_info(registry: CollectorRegistry, reference_id: str, model_sha256: str | None
                   ) -> Gauge:
    """``driftline_reference_info{reference_id, model_sha256} 1``: the reference and model this
    worker runs (one series per process, its labels fixed at start-up). After an activation,
    ``count by (reference_id) (driftline_reference_info)`` shows which workers moved."""
    info = Gauge("driftline_reference_info",
                 "The reference and model this worker runs (1; labels say which)",
                 ["reference_id", "model_sha256"], registry=registry)
    info.labels(reference_id, model_sha256 or "").set(1)
    return info


class ConsumerMetrics:
    """Per-stage consumer lag and assigned partitions."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.lag = Gauge(
            "driftline_kafka_consumer_lag_messages", "Messages behind the log end",
            ["stage", "partition"], registry=registry)
        self.assigned = Gauge(
            "driftline_kafka_assigned_partitions", "Partitions assigned to this worker",
            ["stage"], registry=registry)
        self.forced_rejoins = Counter(
            "driftline_kafka_forced_rejoins_total",
            "Group joins kafka-python finished but never applied, rejoined by driftline",
            ["stage"], registry=registry)
