"""Liveness of a worker process: /healthz fails when a stage's loop stops turning, and
``driftline run`` learns of a stage thread that ended on its own; start-up waits for Redis;
the failure book's Redis calls time out and its loop steps again."""

from __future__ import annotations

import socket
import threading
import time
from unittest.mock import MagicMock

import pytest
import redis
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from driftline import runner
from driftline.alerts.processor import IncidentProcessor
from driftline.alerts.routing import Router
from driftline.config import load_settings
from driftline.consumers.kafka_io import ProgressLog
from driftline.runner import Service, watch_stages
from driftline.service.app import create_app


class LoopStage:
    """Turns its loop (sets ``beat``) until told to stop, or parks as a hung call would."""

    def __init__(self, hang_after: int | None = None, crash: bool = False) -> None:
        self.beat = time.monotonic()
        self.stop_event = threading.Event()
        self.hang_after, self.crash = hang_after, crash
        self.progress: ProgressLog | None = None  # a Kafka stage's (see Service.liveness)

    def run(self) -> None:
        turns = 0
        while not self.stop_event.is_set():
            self.beat = time.monotonic()
            turns += 1
            if self.crash:
                raise RuntimeError("boom")
            if self.hang_after is not None and turns >= self.hang_after:
                self.stop_event.wait()  # parked, as in a broker call that never returns
            self.stop_event.wait(0.01)

    def stop(self) -> None:
        self.stop_event.set()


def service_with(stages: dict[str, LoopStage], stall_s: float = 120.0) -> Service:
    service = Service(load_settings(stage_stall_timeout_s=stall_s), roles=list(stages))
    service.stages = dict(stages)
    for name, stage in stages.items():
        thread = threading.Thread(target=service._run, args=(name, stage), daemon=True)
        thread.start()
        service.threads.append(thread)
    return service


def test_healthz_fails_when_a_stage_loop_stops_turning() -> None:
    busy, stuck = LoopStage(), LoopStage(hang_after=1)
    service = service_with({"embed": busy, "detect": stuck})
    app = create_app(CollectorRegistry(), service.readiness, liveness=service.liveness)
    try:
        with TestClient(app) as client:
            ok = client.get("/healthz")
            assert ok.status_code == 200, ok.json()
            assert ok.json()["checks"] == {"embed_loop": True, "detect_loop": True}
            stuck.beat -= 121  # as if parked for longer than the stall timeout
            bad = client.get("/healthz")
            assert bad.status_code == 503
            assert bad.json() == {"status": "stuck",
                                  "checks": {"embed_loop": True, "detect_loop": False}}
    finally:
        for s in (busy, stuck):
            s.stop()
        service.stop(5)


def test_healthz_fails_when_a_stage_never_settles_in_its_consumer_group() -> None:
    """A join that never finishes leaves the loop turning over no partitions: the progress
    log's ``unsettled_since`` older than the stall timeout fails liveness."""
    turning = LoopStage()
    turning.progress = progress = ProgressLog("detect")
    service = service_with({"detect": turning})
    app = create_app(CollectorRegistry(), service.readiness, liveness=service.liveness)
    try:
        with TestClient(app) as client:
            assert client.get("/healthz").json()["checks"] == {"detect_loop": True,
                                                               "detect_group": True}
            progress.unsettled_since = time.monotonic() - 60
            assert client.get("/healthz").status_code == 200
            progress.unsettled_since = time.monotonic() - 121
            bad = client.get("/healthz")
            assert bad.status_code == 503
            assert bad.json()["checks"] == {"detect_loop": True, "detect_group": False}
    finally:
        turning.stop()
        service.stop(5)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_stage_thread_that_ends_on_its_own_is_reported_once() -> None:
    healthy, crashing = LoopStage(), LoopStage(crash=True)
    service = service_with({"detect": healthy, "book": crashing})
    stopping, reported = threading.Event(), []

    def on_dead(dead: list[str]) -> None:
        reported.append(dead)
        stopping.set()

    watcher = threading.Thread(target=watch_stages, args=(service, stopping, on_dead, 0.02))
    watcher.start()
    watcher.join(10)
    try:
        assert not watcher.is_alive() and reported == [["book"]]
        assert service.liveness() == {"detect_loop": True, "book_loop": False}
    finally:
        healthy.stop()
        service.stop(5)


def test_a_requested_stop_is_not_a_death() -> None:
    stage = LoopStage()
    service = service_with({"embed": stage})
    stopping, reported = threading.Event(), []
    watcher = threading.Thread(target=watch_stages,
                               args=(service, stopping, reported.append, 0.02))
    watcher.start()
    stopping.set()  # as on SIGTERM: the flag first, then the stages stop
    stage.stop()
    service.stop(5)
    watcher.join(5)
    assert not watcher.is_alive() and reported == []


def test_start_up_waits_for_redis_then_names_the_setting(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker started while Redis is down waits (logging why) and then exits with a message
    naming DRIFTLINE_REDIS_URL, without the password in it."""
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setattr(runner, "STARTUP_REDIS_WAIT_S", 0.5)
    settings = load_settings(redis_url=f"redis://:s3cret@127.0.0.1:{port}/2")
    with pytest.raises(SystemExit) as exited:
        runner.load_active_reference(settings)
    message = str(exited.value)
    assert f"Redis at 127.0.0.1:{port}/2 (DRIFTLINE_REDIS_URL) unreachable" in message
    assert "s3cret" not in message and "s3cret" not in caplog.text
    assert "waiting for Redis to read the active reference" in caplog.text


def closed_port() -> int:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_the_book_waits_for_redis_at_start_up_then_names_the_setting(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis gone between the active reference's read and the book's start (both read it
    then): the book waits and exits as the reference's read does, not with a traceback."""
    port = closed_port()
    monkeypatch.setattr(runner, "STARTUP_REDIS_WAIT_S", 0.5)
    settings = load_settings(redis_url=f"redis://:s3cret@127.0.0.1:{port}/2",
                             alertmanager_url="http://127.0.0.1:9")
    with pytest.raises(SystemExit) as exited:
        runner.build_book_processor(settings, CollectorRegistry())
    message = str(exited.value)
    assert f"Redis at 127.0.0.1:{port}/2 (DRIFTLINE_REDIS_URL) unreachable" in message
    assert "s3cret" not in message and "s3cret" not in caplog.text
    assert "waiting for Redis to start the failure book" in caplog.text


def test_the_book_starts_once_redis_answers(monkeypatch: pytest.MonkeyPatch,
                                             caplog: pytest.LogCaptureFixture) -> None:
    calls = []

    def check_trimmed(self: IncidentProcessor) -> int:
        calls.append(1)
        if len(calls) < 3:
            raise redis.ConnectionError("Connection refused")
        return 0
    monkeypatch.setattr(IncidentProcessor, "check_trimmed", check_trimmed)
    monkeypatch.setattr(Router, "_start_new_targets", lambda self: None)
    processor = runner.build_book_processor(
        load_settings(redis_url=f"redis://127.0.0.1:{closed_port()}/0"), CollectorRegistry())
    assert isinstance(processor, IncidentProcessor) and len(calls) == 3
    assert caplog.text.count("waiting for Redis to start the failure book") == 2


def test_the_detect_stage_retires_slices_after_the_configured_days(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    monkeypatch.setattr(runner, "make_consumer", lambda *args, **kw: None)
    ref = SimpleNamespace(reference_id="r1", manifest={"baselines": {"items": {}}})
    settings = load_settings(slice_retire_after_days=3.5)
    stage = runner.build_detect_stage(settings, CollectorRegistry(), ref)  # type: ignore[arg-type]
    assert stage.retire_after_s == 3.5 * 86400
    off = runner.build_detect_stage(load_settings(slice_retire_after_days=0), CollectorRegistry(),
                                    ref)  # type: ignore[arg-type]
    assert off.retire_after_s == 0.0


def test_the_detect_stage_restores_slices_on_the_budget_its_new_slices_get(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Restored slices take the per-detector ARL0 target of the settings and reference now
    (``SliceRestorer``), the one a new slice is built with — not their checkpoint's."""
    from types import SimpleNamespace

    from driftline.consumers.slice_state import SliceRestorer

    monkeypatch.setattr(runner, "make_consumer", lambda *args, **kw: None)
    ref = SimpleNamespace(reference_id="r1", manifest={"baselines": {"items": {}}})
    settings = load_settings()
    stage = runner.build_detect_stage(settings, CollectorRegistry(), ref)  # type: ignore[arg-type]
    assert isinstance(stage.restore_slice, SliceRestorer)
    new = stage.new_slice(SimpleNamespace(slice_id="station=s1",  # type: ignore[arg-type]
                                          template="station"))
    arl0 = runner.detector_arl0(settings, 2)  # cluster mix and OOD: no predictions, no labels
    assert stage.restore_slice.arl0 == new.det.arl0 == arl0  # type: ignore[attr-defined]


def test_the_detect_stage_exports_its_alarm_counters_at_zero(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """One series per configured template and detector the reference feeds, at 0 before the
    first alarm: the dashboards' increase() would read a series born at 1 as no alarm."""
    from types import SimpleNamespace

    monkeypatch.setattr(runner, "make_consumer", lambda *args, **kw: None)
    ref = SimpleNamespace(reference_id="r1", manifest={"baselines": {"items": {}}})
    registry = CollectorRegistry()
    runner.build_detect_stage(load_settings(slice_templates="station,station+shift"),
                              registry, ref)  # type: ignore[arg-type]
    alarms = {tuple(s.labels.values()): s.value for m in registry.collect() for s in m.samples
              if s.name == "driftline_detect_alarms_total"}
    # no predictions, no labels: cluster mix and OOD rate only
    assert alarms == {(t, d): 0.0 for t in ("station", "station+shift")
                      for d in ("cluster_mix", "ood_rate")}


def test_the_books_redis_calls_time_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """A half-open connection must fail the book's blocking XREAD, not park its loop while
    Alertmanager resolves the pages it stopped re-sending; a healthy XREAD (``block_ms``) must
    never come near the timeout."""
    # both read Redis when built; the client itself connects lazily
    monkeypatch.setattr(IncidentProcessor, "check_trimmed", lambda self: 0)
    monkeypatch.setattr(Router, "_start_new_targets", lambda self: None)
    processor = runner.build_book_processor(load_settings(), CollectorRegistry())
    kwargs = processor.r.connection_pool.connection_kwargs
    assert kwargs.get("socket_connect_timeout") is not None
    assert kwargs.get("socket_timeout") is not None
    assert kwargs["socket_timeout"] >= 3 * processor.block_ms / 1000


def test_the_book_labels_its_alerts_as_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    """DRIFTLINE_ALERT_LABELS reaches the router that pushes the book's alerts."""
    monkeypatch.setattr(IncidentProcessor, "check_trimmed", lambda self: 0)
    monkeypatch.setattr(Router, "_start_new_targets", lambda self: None)
    settings = load_settings(alert_labels="deployment=plant-7")
    processor = runner.build_book_processor(settings, CollectorRegistry())
    assert processor.router.alert_labels == {"deployment": "plant-7"}


def test_the_incident_processor_steps_again_after_a_redis_timeout(
        caplog: pytest.LogCaptureFixture) -> None:
    """What the timeout raises is logged and the step tried again: the thread ending would
    stop the re-sends for good."""

    class HalfOpen:
        """XREAD times out once, as on a connection that went half-open, then answers."""

        def __init__(self) -> None:
            self.reads = 0

        def xinfo_stream(self, key: str) -> None:
            raise redis.ResponseError("no such key")

        def xread(self, *args: object, **kwargs: object) -> None:
            self.reads += 1
            if self.reads == 1:
                raise redis.TimeoutError("Timeout reading from socket")
            processor.stop()

        def hgetall(self, key: str) -> dict[bytes, bytes]:
            return {}

    book = MagicMock(**{"cursor.return_value": None, "reattribute.return_value": [],
                        "enforce_retention.return_value": 0})
    client = HalfOpen()
    processor = IncidentProcessor(client, book)  # type: ignore[arg-type]
    worker = threading.Thread(target=processor.run, daemon=True)
    worker.start()
    worker.join(10)
    assert not worker.is_alive() and client.reads == 2
    assert "incident processor step failed" in caplog.text


def test_the_start_up_line_names_the_model_as_well_as_the_reference(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """After a model upgrade the operator checks each worker's start-up line: it names the
    model file and its sha256 beside the reference id."""
    ref = MagicMock(reference_id="62de2c96761ef7dc", model_sha256="bbcf" * 16,
                    manifest={"embedding": {"model": {"model_file": "model_b.onnx",
                                                      "model_sha256": "bbcf" * 16}}})
    monkeypatch.setattr(runner, "load_active_reference", lambda settings: ref)
    service = Service(load_settings(), roles=[])
    with caplog.at_level("INFO", logger="driftline.runner"):
        service.start()
    # and /metrics says it too, for a query over every worker after an activation
    assert service.registry.get_sample_value("driftline_reference_info", {
        "reference_id": "62de2c96761ef7dc", "model_sha256": "bbcf" * 16}) == 1.0
    (line,) = [r for r in caplog.records if r.getMessage() == "service started"]
    assert line.reference == "62de2c96761ef7dc"  # type: ignore[attr-defined]
    assert line.model == "model_b.onnx"  # type: ignore[attr-defined]
    assert line.model_sha256 == "bbcf" * 16  # type: ignore[attr-defined]
