"""Prometheus metrics of the pipeline, registered on a registry the caller passes in.

Names follow ``driftline_<subsystem>_<name>_<unit>``; counters end in ``_total``; label values
are bounded (stage, partition, reason, station, shift, cluster, detector) — never lot or event
ids, whose cardinality grows without limit.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from driftline.core.slices import DETECTORS
from driftline.schema import RejectReason

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


# why the detect stage skips a slice-update (driftline_detect_skipped_total's reason label)
SKIP_REASONS = ("unreadable", "unusable", "other_reference", "retired")
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
            "embedded against another reference, or for a retired slice",
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
        self.ratio = Gauge(
            "driftline_detect_statistic_ratio",
            "Detector statistic / threshold for station and station+shift slices, at "
            "checkpoint time: the detector alarms at 1 and restarts from 0 in the same update, "
            "so this stays below 1 (driftline_detect_open_alarms says which alarms are open)",
            ["station", "shift", "detector"], registry=registry)
        self.open_alarms = Gauge(
            "driftline_detect_open_alarms",
            "1 while the detector has an open alarm on the station or station+shift slice "
            "(from its crossing until it clears or its incident is resolved), else 0",
            ["station", "shift", "detector"], registry=registry)
        self.ood_ratio = Gauge(
            "driftline_detect_ood_ratio",
            "Out-of-distribution rate over the last hour of event time / reference rate",
            ["station", "shift"], registry=registry)
        self.cluster_share = Gauge(
            "driftline_detect_cluster_share_ratio",
            "Share of the last hour's events (event time) per reference cluster",
            ["station", "cluster"], registry=registry)
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
