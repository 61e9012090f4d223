"""Wires settings into running stages: ``driftline run embed|detect|all``.

Each stage runs in its own thread with its own Kafka clients; the process serves probes and
metrics over HTTP. SIGTERM/SIGINT stop the stages gracefully: the current batch is finished,
checkpointed and committed before the process exits.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from prometheus_client import CollectorRegistry
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential,
)

from driftline.config import ConfigError, Settings, unknown_onnx_providers
from driftline.consumers.checkpoint import REDIS_ERRORS, CheckpointStore, store_client
from driftline.consumers.detect_stage import DetectStage
from driftline.consumers.embed_stage import EmbedStage
from driftline.consumers.kafka_io import ensure_topics, make_consumer, make_producer
from driftline.consumers.slice_state import SliceRestorer, SliceState, UpdateView
from driftline.core.baselines import (
    DEFAULT_CONFIDENCE,
    DetectorBaseline,
    checked_bounds,
    checked_rate_bound,
    mix_bounds,
    tail_rate_bound,
)
from driftline.core.budget import DAY
from driftline.core.error_rates import P0_QUANTILE, shrunk_error_rates
from driftline.core.slices import SliceDetectors
from driftline.metrics import ConsumerMetrics, DetectMetrics, EmbedMetrics, reference_info
from driftline.reference.artifact import ReferenceError, file_sha256
from driftline.reference.fallbacks import misfit_cells
from driftline.reference.index import PredictionView, Reference, load_reference, prediction_views

log = logging.getLogger(__name__)
T = TypeVar("T")
ROLES = ("embed", "detect", "book")
# The roles that wait for the broker at start-up; the book makes its topic when it sends.
BROKER_AT_START = frozenset({"embed", "detect"})
DETECT_REDIS_WAIT_S = 5.0
# At start-up, like a broker (kafka_io.BROKER_WAIT_S): a restart or a slow container start.
STARTUP_REDIS_WAIT_S = 120.0
BOOK_BOOTSTRAP_MS = 5_000  # one attempt of the book's producer to reach the broker
# The book's XREAD waits up to the processor's block_ms (1 s) on the server, so a healthy read
# never comes near this; a connection that went half-open fails its call within it (the
# processor's loop logs the error and steps again) instead of blocking for good while the
# pages it should re-send resolve themselves in Alertmanager.
BOOK_REDIS_TIMEOUT_S = 5.0


class ReferenceBaselines:
    """Adapts a :class:`Reference` to what the detectors need per event (cached arrays): per
    baseline key, the stated mix and OOD rate, and the bounds the detectors judge against
    (:class:`~driftline.core.baselines.DetectorBaseline`)."""

    def __init__(self, ref: Reference) -> None:
        self.reference_id = ref.reference_id
        section = ref.manifest["baselines"]
        items = section["items"]
        self._b = {k: detector_baseline(k, items, section) for k in items}
        self._predictions = prediction_views(ref.manifest)
        self._err = expected_errors(ref.manifest)

    @property
    def detectors(self) -> tuple[str, ...]:
        """The detectors this reference can feed (what the false-alarm budget is split over)."""
        return (("cluster_mix", "ood_rate")
                + (("prediction_mix", "confidence") if self._predictions else ())
                + (("error_rate",) if self._err else ()))

    def cluster_mix(self, key: str) -> np.ndarray:
        return self._b[key].p

    def ood_rate(self, key: str) -> float:
        return self._b[key].ood_rate

    def detector_baseline(self, key: str) -> DetectorBaseline:
        return self._b[key]

    def prediction(self, key: str) -> PredictionView | None:
        return self._predictions.get(key)

    def expected_error(self, cluster: int) -> float | None:
        return self._err.get(cluster)


def detector_baseline(key: str, items: dict[str, Any], section: dict[str, Any]
                      ) -> DetectorBaseline:
    """A manifest baseline as the detectors use it. A reference built before the detectors'
    bounds existed (no ``p_lower``/``ood_rate_bound``) gets them computed from its stored counts
    and exceedance count at :data:`~driftline.core.baselines.DEFAULT_CONFIDENCE`; one without
    those is judged against its stated rates, with a warning. Stored bounds the detectors
    cannot use (not finite, not ``(2, K)``, not around the stated rates: a NaN bound made the
    OOD detector never alarm) are treated as absent, with a warning."""
    item = items[key]
    p = np.asarray(item["p"], np.float64)
    confidence = float(section.get("bound_confidence", DEFAULT_CONFIDENCE))
    bounds = None
    if "p_lower" in item or "p_upper" in item:
        bounds = checked_bounds(p, item.get("p_lower"), item.get("p_upper"))
        if bounds is None:
            log.warning("baseline's stored cluster-mix bounds are invalid: ignored",
                        extra={"baseline": key})
    if bounds is None and item.get("counts") is not None:
        parent = item.get("parent")
        prior = (np.asarray(items[parent]["p"], np.float64) if parent in items
                 else np.full(p.size, 1.0 / p.size))
        bounds = np.array(mix_bounds(np.asarray(item["counts"], np.int64), prior,
                                     float(section.get("alpha", 0.5)), confidence), np.float64)
    elif bounds is None:
        log.warning("baseline has no counts: its cluster mix is taken as exact",
                    extra={"baseline": key})
        bounds = np.array([p, p])
    return DetectorBaseline(p, bounds, float(item["ood_rate"]), ood_detector_rate(key, item,
                                                                                  confidence))


def ood_detector_rate(key: str, item: dict[str, Any], confidence: float) -> float:
    """The rate a manifest baseline's OOD detector judges against: its stored
    ``ood_rate_bound`` if usable, else computed from its exceedance count at ``confidence``
    (references built before the bound), else its stated rate, with a warning; never below
    the stated rate. The reference views (API, CLI) show this same value."""
    ood_rate = float(item["ood_rate"])
    stored = None
    if "ood_rate_bound" in item:
        stored = checked_rate_bound(ood_rate, item["ood_rate_bound"])
        if stored is None:
            log.warning("baseline's stored OOD rate bound is invalid: ignored",
                        extra={"baseline": key, "ood_rate_bound": item["ood_rate_bound"]})
    if stored is not None:
        ood_bound = stored
    elif item.get("n") is not None and item.get("ood_exceed") is not None:
        ood_bound = tail_rate_bound(int(item["n"]), int(item["ood_exceed"]), confidence)
    else:
        log.warning("baseline has no OOD exceedance count: its OOD rate is taken as exact",
                    extra={"baseline": key})
        ood_bound = ood_rate
    return max(ood_bound, ood_rate)


def expected_errors(manifest: dict[str, Any]) -> dict[int, float]:
    """Per cluster, the reference rate the error-rate detector judges labelled events against:
    the build's ``error_p0``; for a reference built before it was recorded, the same posterior
    quantile of its per-cluster counts (its raw ``error_rate`` of 0 made every error an alarm).
    A reference built at a lower quantile (the 0.9 default before) keeps it, with a warning:
    its detector alarms more often than the budget says (``driftline.core.error_rates``)."""
    prior = (manifest.get("performance") or {}).get("error_prior") or {}
    if prior.get("p0_quantile", P0_QUANTILE) < P0_QUANTILE:
        log.warning("reference's error-rate p0 is a lower posterior quantile than the default: "
                    "the error-rate detector may exceed the false-alarm budget; rebuild the "
                    "reference to judge against the default",
                    extra={"p0_quantile": prior["p0_quantile"], "default": P0_QUANTILE})
    # the per-cluster rows live with each cluster (the top-level "performance" has none: read
    # from there, as before, no cluster had an error reference and the detector never ran)
    clusters = (manifest.get("clusters") or {}).get("items") or []
    rows = [c["performance"] for c in clusters if c.get("performance")]
    if all("error_p0" in r for r in rows):
        stored = {int(r["cluster"]): float(r["error_p0"]) for r in rows
                  if r["error_p0"] is not None}
        bad = sorted(c for c, p0 in stored.items() if not math.isfinite(p0))
        if bad:  # the detector refuses it (ValueError): the cluster's labels go unjudged instead
            log.warning("reference's error-rate p0 is not finite: those clusters' errors are not "
                        "judged", extra={"clusters": bad})
        return {c: p0 for c, p0 in stored.items() if math.isfinite(p0)}
    shrunk = shrunk_error_rates(np.array([r.get("errors", 0) for r in rows], np.float64),
                                np.array([r.get("labelled", 0) for r in rows], np.float64))
    if shrunk is None:
        return {}
    return {int(r["cluster"]): float(e) for r, e in zip(rows, shrunk.p0, strict=True)}


def detector_arl0(settings: Settings, detectors: int = 2) -> float:
    """Per-detector ARL0 target γ from the operator's false-alarm budget, split over the
    ``detectors`` each slice runs."""
    budget = settings.budget(detectors)  # checked when the settings load: 1 < γ < inf
    log.info("false-alarm budget", extra={"budget": budget.describe()})
    return budget.arl0()


def at_start_up(client: Any, what: str, call: Callable[[], T]) -> T:
    """``call()``, tried again while Redis cannot serve it for up to
    :data:`STARTUP_REDIS_WAIT_S`, logging ``waiting for Redis to {what}`` before each retry;
    then the process exits with one line naming DRIFTLINE_REDIS_URL (no password)."""
    kw = client.connection_pool.connection_kwargs  # no password in logs
    where = kw.get("path") or f"{kw.get('host')}:{kw.get('port')}/{kw.get('db', 0)}"

    def waiting(state: RetryCallState) -> None:
        log.warning(f"waiting for Redis to {what}",
                    extra={"redis": where, "waited_s": round(state.seconds_since_start or 0, 1),
                           "error": repr(state.outcome.exception() if state.outcome else None)})

    try:
        result: T = Retrying(retry=retry_if_exception_type(REDIS_ERRORS),
                             wait=wait_exponential(multiplier=0.2, max=5),
                             stop=stop_after_delay(STARTUP_REDIS_WAIT_S),
                             before_sleep=waiting, reraise=True)(call)
    except REDIS_ERRORS as exc:
        raise SystemExit(f"driftline: Redis at {where} (DRIFTLINE_REDIS_URL) unreachable for "
                         f"{STARTUP_REDIS_WAIT_S:.0f} s at start-up: {exc}") from None
    return result


def load_active_reference(settings: Settings) -> Reference:
    """The reference activated through the API if the stages can use it, else the configured
    one (:func:`~driftline.service.references_store.active_reference`); a missing or unusable
    configured one raises :class:`ConfigError` naming the setting."""
    from driftline.service.references_store import active_reference

    client = store_client(settings.redis_url)
    ref_dir, ref = at_start_up(client, "read the active reference",
                               lambda: active_reference(settings, client))
    if ref is not None:
        log.info("reference", extra={"dir": str(ref_dir), "activated": True})
        return ref
    if ref_dir is None:
        raise ConfigError("DRIFTLINE_REFERENCE_DIR is not set; build one with "
                          "`driftline reference build` and point the setting at it")
    log.info("reference", extra={"dir": str(ref_dir)})
    try:
        return load_reference(ref_dir)
    except (ReferenceError, OSError) as exc:
        raise ConfigError(f"DRIFTLINE_REFERENCE_DIR: {exc}") from None


def configured_model_sha256(settings: Settings) -> str | None:
    """sha256 of the configured model file; None if it cannot be read in this process."""
    try:
        return file_sha256(settings.resolved_model_path())
    except OSError:
        return None


def usable_reference(settings: Settings, ref_dir: Path,
                     model_sha256: str | None) -> Reference:
    """Load ``ref_dir`` and run on it what the roles' start-up runs to use a reference: the
    hash checks, the model identity (``model_sha256``, the configured model's; None: not
    checked) and preprocessing when it embeds images, the detect stage's baselines and the
    book's cluster catalogue. Raises :class:`ReferenceError` naming the problem (a manifest
    missing a section raised a bare KeyError in every role)."""
    from driftline.alerts.evidence import ClusterCatalog
    from driftline.consumers.embedder import EmbedderConfig

    try:
        ref = load_reference(ref_dir)
        desc = ref.manifest["embedding"].get("model")
        if desc is not None:
            if model_sha256 is not None and ref.model_sha256 != model_sha256:
                raise ReferenceError(
                    f"reference {ref.reference_id} at {ref_dir} was built with "
                    f"{desc.get('model_file') or 'a model'} (sha256 {ref.model_sha256}), but "
                    f"the configured model (DRIFTLINE_MODEL_PATH) has sha256 {model_sha256}: "
                    "the embed workers refuse it at start-up. Set DRIFTLINE_MODEL_PATH to "
                    "the model it was built with (for a model upgrade: in this process too, "
                    "then activate; README, 'Switching to a retrained model')")
            EmbedderConfig.from_description(desc, settings.resolved_model_path())
        ReferenceBaselines(ref)
        ClusterCatalog.from_manifest(ref.manifest)
    except OSError as exc:
        raise ReferenceError(f"{ref_dir} cannot be read: {exc}") from None
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise ReferenceError(f"{ref_dir}: its manifest cannot be used by the stages "
                             f"({type(exc).__name__}: {exc})") from None
    return ref


def make_embedder(settings: Settings, ref: Reference) -> Any:
    """The embedder the reference was built with, or None for precomputed embeddings; a model
    or providers it cannot use raise :class:`ConfigError` naming the setting."""
    desc = ref.manifest["embedding"].get("model")
    if desc is None:
        return None
    from driftline.consumers.embedder import Embedder, EmbedderConfig

    problem = unknown_onnx_providers(settings.onnx_providers)
    if problem:
        raise ConfigError(problem)
    config = EmbedderConfig.from_description(
        desc, reference_model(settings, desc), providers=tuple(settings.onnx_providers),
        batch_size=settings.embed_batch_size, intra_op_threads=settings.onnx_threads,
        max_image_pixels=settings.max_image_pixels,
        image_roots=tuple(Path(r) for r in settings.image_roots) or None)
    return Embedder(config)


def reference_model(settings: Settings, desc: dict[str, Any]) -> Path:
    """The configured model file if it is the one the reference was built with (``desc``), else
    :class:`ConfigError`. Checked before onnxruntime reads it: a wrong model otherwise fails
    there first, on a tensor it lacks, without saying which model was expected."""
    path = settings.resolved_model_path()
    where = (f"DRIFTLINE_MODEL_PATH: {path}" if settings.model_path is not None else
             f"DRIFTLINE_MODEL_PATH: not set, and the demo model {path}")
    expected = str(desc["model_sha256"])
    built_with = (f"the reference was built with {desc.get('model_file') or 'a model'} "
                  f"(sha256 {expected[:12]}…)")
    try:
        actual = file_sha256(path)
    except OSError as exc:
        raise ConfigError(f"{where} cannot be read ({exc.strerror or exc}); {built_with}"
                          ) from None
    if actual != expected:
        raise ConfigError(f"{where} has sha256 {actual[:12]}…; {built_with}")
    return path


def build_embed_stage(settings: Settings, registry: CollectorRegistry, ref: Reference,
                      embedder: Any,
                      consumer_metrics: ConsumerMetrics | None = None) -> EmbedStage:
    return EmbedStage(
        make_consumer(settings.kafka_bootstrap, settings.embed_group,
                      session_timeout_ms=settings.kafka_session_timeout_ms),
        make_producer(settings.kafka_bootstrap),
        events_topic=settings.events_topic, updates_topic=settings.slice_updates_topic,
        dlq_topic=settings.dlq_topic, embedder=embedder, reference=ref,
        templates=settings.slice_templates, metrics=EmbedMetrics(registry),
        redis_client=store_client(settings.redis_url),
        consumer_metrics=consumer_metrics or ConsumerMetrics(registry),
        batch_size=settings.embed_batch_size, batch_timeout_ms=settings.embed_batch_timeout_ms,
        max_event_bytes=settings.max_event_bytes, recent_size=settings.recent_buffer_size,
        prediction_ttl_s=max(1, round(settings.late_label_hours * 3600)))


def warn_of_misfit_fallbacks(ref: Reference, show: int = 10) -> list[str]:
    """Log, once at start-up, the cells the build found judged against a parent baseline that
    does not fit their own reference events (:mod:`driftline.reference.fallbacks`): slices
    there can alarm on unchanged data, and the on-call engineer reading such an alarm should
    know before suspecting the line. Returns those cells."""
    cells = misfit_cells(ref.manifest)
    bad = list(cells)
    if bad:
        log.warning(
            f"reference: {len(bad)} station or station×shift cells are judged against a "
            "parent baseline that does not fit their reference events; their slices may "
            "alarm on unchanged data (`driftline reference show`: give them reference events "
            "or rebuild with a lower --min-count)",
            extra={"reference": ref.reference_id, "cells": {
                key: f"{cells[key]['n']} events, judged against {cells[key]['judged_against']}"
                     f", p = {cells[key]['p_value']:.2g}" for key in bad[:show]}})
    return bad


def build_detect_stage(settings: Settings, registry: CollectorRegistry, ref: Reference,
                       consumer_metrics: ConsumerMetrics | None = None) -> DetectStage:
    baselines = ReferenceBaselines(ref)
    warn_of_misfit_fallbacks(ref)
    arl0 = detector_arl0(settings, len(baselines.detectors))
    autoresolve = settings.autoresolve_events

    def new_slice(upd: UpdateView) -> SliceState:
        return SliceState(upd.slice_id, upd.template, SliceDetectors(arl0=arl0), baselines,
                          autoresolve)

    # the revoke listener blocks heartbeats: give up well within the session
    revoke_wait_s = settings.kafka_session_timeout_ms / 4000
    return DetectStage(
        make_consumer(settings.kafka_bootstrap, settings.detect_group,
                      session_timeout_ms=settings.kafka_session_timeout_ms),
        settings.slice_updates_topic,
        # a few seconds per call: the loop retries at a later turn (see detect_stage); one
        # attempt takes at most the revoke's wait, so the revoke listener, which blocks
        # heartbeats, ends within half the session
        CheckpointStore(store_client(settings.redis_url,
                                     socket_timeout_s=min(DETECT_REDIS_WAIT_S, revoke_wait_s)),
                        wait_s=DETECT_REDIS_WAIT_S),
        # restored slices run on the same ARL0 target as new ones, whatever the checkpoint's
        new_slice, SliceRestorer(baselines, autoresolve, arl0),
        DetectMetrics(registry, settings.slice_templates, baselines.detectors),
        consumer_metrics or ConsumerMetrics(registry),
        checkpoint_interval_s=settings.checkpoint_interval_ms / 1000,
        revoke_wait_s=revoke_wait_s, reference_id=ref.reference_id,
        retire_after_s=settings.slice_retire_after_days * DAY)


def build_book_processor(settings: Settings, registry: CollectorRegistry,
                         ref: Reference | None = None) -> Any:
    """Outbox → failure book → Alertmanager, the alerts topic (and a webhook if configured);
    incidents describe their clusters from ``ref`` (the active reference)."""
    from driftline.alerts.attribution import AttributionPolicy
    from driftline.alerts.book import FailureBook, Retention
    from driftline.alerts.evidence import ClusterCatalog
    from driftline.alerts.grouping import BookPolicy
    from driftline.alerts.processor import IncidentProcessor
    from driftline.alerts.routing import AlertMetrics, Router

    s = settings
    client = store_client(s.redis_url, socket_timeout_s=BOOK_REDIS_TIMEOUT_S)
    policy = BookPolicy(
        group_window_s=s.incident_group_window_s, recurrence_similarity=s.recurrence_similarity,
        hold_max_s=s.incident_hold_max_s, stable_events=s.incident_stable_events,
        max_exemplars=s.incident_max_exemplars,
        attribution=AttributionPolicy(tolerance=s.attribution_tolerance,
                                      clean_events=s.attribution_clean_events))
    book = FailureBook(client, policy=policy, retention=Retention(
        max_resolved=s.retention_resolved_count, max_age_s=s.retention_resolved_days * DAY),
        catalog=ClusterCatalog.from_manifest(ref.manifest) if ref is not None else None)
    metrics = AlertMetrics(registry)

    def start() -> IncidentProcessor:  # both read Redis when built (cursors, outbox)
        router = Router(book, metrics, public_url=s.public_url,
                        alertmanager_url=s.alertmanager_url,
                        producer_factory=lambda: alerts_producer(s),
                        topic=s.alerts_topic, webhook_url=s.alert_webhook_url,
                        webhook_attempts=s.alert_webhook_attempts,
                        alert_labels=s.alert_labels)
        return IncidentProcessor(client, book, router=router)
    # Redis answered the reference's read a moment ago (Service.start), but may have gone
    return at_start_up(client, "start the failure book", start)


def alerts_producer(settings: Settings) -> Any:
    """The book's producer to the alerts topic, in one bounded attempt (the router tries again
    at its next delivery): the book needs no broker to start, ingest alarms and page through
    Alertmanager — re-sends keep open pages from resolving themselves during a broker outage.
    A send with the broker down waits at most 10 s (not 60), so a step that also re-sends to
    Alertmanager is never held long."""
    once = stop_after_attempt(1)
    ensure_topics.retry_with(stop=once)(settings.kafka_bootstrap, {settings.alerts_topic: 1},
                                        bootstrap_timeout_ms=BOOK_BOOTSTRAP_MS)
    return make_producer.retry_with(stop=once)(
        settings.kafka_bootstrap, max_block_ms=10_000, bootstrap_timeout_ms=BOOK_BOOTSTRAP_MS)


@dataclass
class Service:
    """The stages of one process and their threads."""

    settings: Settings
    roles: Sequence[str]
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    stages: dict[str, Any] = field(default_factory=dict)
    threads: list[threading.Thread] = field(default_factory=list)
    reference: Reference | None = None

    def start(self) -> None:
        s = self.settings
        if BROKER_AT_START & set(self.roles):
            ensure_topics(s.kafka_bootstrap, {
                s.events_topic: s.topic_partitions, s.slice_updates_topic: s.topic_partitions,
                s.dlq_topic: 1, s.alerts_topic: 1})
        self.reference = load_active_reference(s)
        reference_info(self.registry, self.reference.reference_id, self.reference.model_sha256)
        cmetrics = ConsumerMetrics(self.registry)  # one set of lag gauges, labelled by stage
        if "embed" in self.roles:
            self.stages["embed"] = build_embed_stage(s, self.registry, self.reference,
                                                     make_embedder(s, self.reference), cmetrics)
        if "detect" in self.roles:
            self.stages["detect"] = build_detect_stage(s, self.registry, self.reference,
                                                       cmetrics)
        if "book" in self.roles:
            self.stages["book"] = build_book_processor(s, self.registry, self.reference)
        for name, stage in self.stages.items():
            thread = threading.Thread(target=self._run, args=(name, stage), name=name,
                                      daemon=True)
            thread.start()
            self.threads.append(thread)
        # which model too: after an upgrade, the line an operator greps to see which workers
        # moved (the reference id alone does not say which model file made it)
        model = self.reference.manifest["embedding"].get("model") or {}
        log.info("service started", extra={
            "roles": list(self.roles), "reference": self.reference.reference_id,
            "model": model.get("model_file"), "model_sha256": self.reference.model_sha256,
            **({"model_path": str(s.resolved_model_path())}
               if "embed" in self.roles and model else {})})

    def _run(self, name: str, stage: Any) -> None:
        try:
            stage.run()
        except Exception:
            log.exception("stage crashed", extra={"stage": name})
            raise

    def stop(self, timeout: float = 30.0) -> None:
        for stage in self.stages.values():
            stage.stop()
        for thread in self.threads:
            thread.join(timeout)

    def liveness(self) -> dict[str, bool]:
        """Per stage: its thread runs and its loop turned within ``stage_stall_timeout_s`` (a
        loop parked in a call — a broker request that never returns — fails it, and the
        orchestrator's liveness probe restarts the process); and, for Kafka stages, the
        consumer's group membership was not unsettled at every progress line for that long (a
        join that never finishes leaves a loop turning over no partitions; a broker down that
        long fails it too, and a restart does no harm then)."""
        now, limit = time.monotonic(), self.settings.stage_stall_timeout_s
        checks = {}
        for (name, stage), thread in zip(self.stages.items(), self.threads, strict=False):
            checks[f"{name}_loop"] = thread.is_alive() and now - getattr(stage, "beat", now) < limit
            progress = getattr(stage, "progress", None)
            if progress is not None:
                since = progress.unsettled_since
                checks[f"{name}_group"] = since is None or now - since < limit
        return checks

    def dead_stages(self) -> list[str]:
        return [name for name, thread in zip(self.stages, self.threads, strict=False)
                if not thread.is_alive()]

    def readiness(self) -> dict[str, bool]:
        checks = {"reference_loaded": self.reference is not None}
        for role in ("embed", "detect"):
            stage = self.stages.get(role)
            if stage is not None:
                checks[f"{role}_partitions_assigned"] = bool(stage.ready)
        checks.update({f"{n}_running": t.is_alive() for n, t in zip(
            self.stages, self.threads, strict=False)})
        return checks


def watch_stages(service: Service, stopping: threading.Event,
                 on_dead: Callable[[list[str]], None], every_s: float = 1.0) -> None:
    """Until ``stopping``: a stage thread that ended on its own (it logged why) is reported to
    ``on_dead`` once. ``driftline run`` then exits with status 1, so that its supervisor
    restarts the process instead of leaving a worker running without that stage."""
    while not stopping.wait(every_s):
        dead = service.dead_stages()
        if dead and not stopping.is_set():
            log.error("stage stopped unexpectedly; exiting so the supervisor restarts the "
                      "process", extra={"stages": dead})
            on_dead(dead)
            return

