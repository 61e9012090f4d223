"""``driftline demo``: the factory demo end to end on the real local stack.

1. start Kafka, Redis, Prometheus and Alertmanager (``deploy/local``);
2. build the demo model and gather the demo images (offline, from packages);
3. build a reference from a clean day of the simulated plant;
4. run the service (embed, detect, failure book, HTTP) against the stack;
5. stream the plant's next days through Kafka, with three incidents injected at known times;
6. wait until every event is applied and the book is up to date, then print, per injection, the
   incident found, its root slice, onset error and detection delay — and any false incident —
   and, per incident, what changed: the detectors that fired, the clusters whose share moved
   most (with the reference's description of each) and the OOD rate against the reference's;
7. fetch each incident's first exemplar thumbnail through the HTTP API, as on-call would.

Exit status 0 only if every injection is found, rooted at the right slice, nothing else opened,
and every incident's exemplar thumbnail could be viewed.
"""

from __future__ import annotations

import io
import json
import logging
import secrets
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from kafka import KafkaProducer
from pydantic import SecretStr

from driftline.alerts.book import FailureBook
from driftline.config import load_settings
from driftline.demo.explain import what_changed
from driftline.demo.plant import STATIONS, Injection, Plant, PlantConfig, load_pools
from driftline.localstack import free_port, start_stack
from driftline.runner import ROLES, Service
from driftline.schema import Event

log = logging.getLogger(__name__)
SIZES = {
    "small": PlantConfig(shift_events=120, lot_events=60, stream_days=2),
    "medium": PlantConfig(shift_events=240, lot_events=120, stream_days=2),
    "large": PlantConfig(shift_events=480, lot_events=240, stream_days=3),
}


@dataclass
class Outcome:
    injection: Injection
    incident: dict[str, Any] | None

    @property
    def root_ok(self) -> bool:
        return self.incident is not None and self.incident["root"]["dims"] == self.injection.root


def _wait(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"demo: timed out waiting for {what}")
        time.sleep(0.5)


def match(injections: list[Injection], incidents: list[dict[str, Any]]) -> tuple[
        list[Outcome], list[dict[str, Any]]]:
    """Pair each injection with the incident rooted at its slice (else the earliest incident
    whose root shares a dimension value with it, to show what went wrong); the rest are false."""
    left = sorted(incidents, key=lambda i: i["onset"] or "")
    outcomes = []
    for inj in injections:
        exact = [i for i in left if i["root"]["dims"] == inj.root]
        near = [i for i in left if set(inj.root.items()) & set(i["root"]["dims"].items())]
        pick = (exact or near)[0] if exact or near else None
        if pick is not None:
            left.remove(pick)
        outcomes.append(Outcome(inj, pick))
    return outcomes, left


def report(outcomes: list[Outcome], false: list[dict[str, Any]], period_s: float) -> str:
    rows = ["| injected | expected root | root found | onset error | delay (events) | "
            "delay (min, event time) | incident |", "|---|---|---|---|---|---|---|"]
    for o in outcomes:
        exp = "|".join(f"{k}={v}" for k, v in o.injection.root.items())
        inc = o.incident
        if inc is None:
            rows.append(f"| {o.injection.name} | {exp} | MISSED | | | | |")
            continue
        onset = _ts(inc["onset"])
        detected = _ts(inc["detected_at"])
        start = o.injection.start.timestamp()
        err_min = (onset - start) / 60 if onset is not None else float("nan")
        delay_s = (detected - start) if detected is not None else float("nan")
        rows.append(
            f"| {o.injection.name} | {exp} | {inc['root']['slice_id']}"
            f"{'' if o.root_ok else ' (WRONG)'} | {err_min:+.1f} min | "
            f"{delay_s / period_s:.0f} | {delay_s / 60:.1f} | {inc['id']} |")
    rows.append(f"\nfalse incidents: {len(false)}"
                + "".join(f"\n  - {f['id']} rooted at {f['root']['slice_id']}" for f in false))
    shown = [o.incident for o in outcomes if o.incident is not None] + false
    rows.append("\nincidents (root first; per slice: per-event strength, events since onset):")
    for inc in shown:
        parts = [f"{sid} s={ev['strength']:.2f} n={ev['n_since_onset']}"
                 for sid, ev in sorted(inc["slices"].items(), key=lambda kv: kv[0] != inc[
                     "root"]["slice_id"])]
        rows.append(f"  {inc['id']} onset {inc['onset']}: " + "; ".join(parts))
    rows.append("\nwhat changed (detectors fired as statistic/threshold; the root slice's "
                "cluster shares and OOD rate since onset, against its reference):")
    for shown_inc in shown:
        rows += [f"  {line}" for line in what_changed(shown_inc)]
    return "\n".join(rows)


def _ts(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, int | float):
        return float(value)
    from datetime import datetime

    return datetime.fromisoformat(str(value)).timestamp()


def dump_alarms(processor: Any, path: Path) -> None:
    """Write the detect stage's outbox and slice summaries (replayable attribution input)."""
    r = processor.r
    outbox = [{"id": eid.decode(), "alarm": json.loads(f[b"alarm"])}
              for eid, f in r.xrange(processor.outbox_key)]
    summary = {k.decode(): json.loads(v) for k, v in r.hgetall(processor.summary_key).items()}
    path.write_text(json.dumps({"outbox": outbox, "summary": summary}))
    print(f"[demo] alarms and slice summaries written to {path}", flush=True)


def run_demo(size: str = "small", cache_dir: Path | None = None, hold: float = 0.0,
             dump: Path | None = None) -> int:
    """Run the whole demo; returns the process exit status."""
    from driftline.consumers.embedder import Embedder, EmbedderConfig
    from driftline.demo.data import fetch_demo_data
    from driftline.demo.model import build_demo_model
    from driftline.reference.build import build_reference

    cfg = SIZES[size]
    started = time.monotonic()
    settings0 = load_settings()
    cache = cache_dir or settings0.cache_dir
    print(f"[demo] size={size}: {len(STATIONS)} stations, {cfg.shift_events} events per "
          f"station per shift, {cfg.stream_days} days streamed", flush=True)
    model = build_demo_model(cache)
    plant = Plant(load_pools(fetch_demo_data(cache)), cfg)
    work = Path(tempfile.mkdtemp(prefix="driftline-demo."))
    with start_stack() as stack:
        print(f"[demo] stack: Kafka {stack.kafka_version} at {stack.kafka_bootstrap}, "
              f"Redis at {stack.redis_url}, Prometheus {stack.prometheus_url}, "
              f"Alertmanager {stack.alertmanager_url}", flush=True)
        embedder = Embedder(EmbedderConfig(model_path=model, batch_size=32))
        ref_events = [Event.model_validate(e) for e in plant.reference_events()]
        reference = build_reference(ref_events, embedder, work / "reference", min_count=100,
                                    source_name="demo plant, clean day")
        embedder.close()
        print(f"[demo] reference {reference.reference_id}: {len(ref_events)} events, "
              f"K={reference.k}, baselines {len(reference.baseline_keys)}", flush=True)
        port = free_port()
        tokens, token = demo_tokens(settings0.api_tokens)
        settings = load_settings(
            kafka_bootstrap=stack.kafka_bootstrap, redis_url=stack.redis_url,
            alertmanager_url=stack.alertmanager_url, reference_dir=work / "reference",
            model_path=model, api_port=port, public_url=f"http://127.0.0.1:{port}",
            budget_event_rate=1.0 / cfg.period_s, checkpoint_interval_ms=500,
            autoresolve_events=cfg.shift_events * 4, **tokens)
        service = Service(settings, ROLES)
        service.start()
        server = _serve(service, settings.api_host, port)
        n = _stream(plant, settings.kafka_bootstrap, settings.events_topic)
        print(f"[demo] streamed {n} events; waiting for the pipeline", flush=True)
        stages = service.stages
        _wait(lambda: stages["detect"].slice_counts() and sum(
            stages["detect"].slice_counts().values()) >= 4 * n, 600, "all events applied")
        time.sleep(3 * settings.checkpoint_interval_ms / 1000 + 6)  # checkpoint + book passes
        book = FailureBook(stages["book"].r)
        _wait(lambda: book.applied() >= _outbox_len(stages["book"]), 120, "the book")
        stages["book"].book.reattribute(_summary(stages["book"]))
        if dump is not None:
            dump_alarms(stages["book"], dump)
        incidents = [json.loads(i.model_dump_json()) for i in book.list(limit=1000).items
                     if i.merged_into is None]
        outcomes, false = match(plant.injections, incidents)
        print("\n" + report(outcomes, false, cfg.period_s), flush=True)
        paged = _counter(service.registry, "driftline_incidents_paged")
        print(f"\n[demo] paging: {paged:.0f} incidents paged for {len(plant.injections)} "
              f"injected changes; {_counter(service.registry, 'driftline_incidents'):.0f} "
              "opened in all (the rest were held or merged before they paged)", flush=True)
        found = [o.incident for o in outcomes if o.incident is not None]
        thumbs_ok = all([show_thumbnail(f"http://127.0.0.1:{port}", inc, token)
                         for inc in found])
        print(f"\n[demo] API http://127.0.0.1:{port}/api/v1/incidents · metrics "
              f"http://127.0.0.1:{port}/metrics · Alertmanager {stack.alertmanager_url}"
              f" · {time.monotonic() - started:.0f} s in all", flush=True)
        if hold > 0:
            print(f"[demo] holding the stack for {hold:.0f} s (Ctrl-C to stop)", flush=True)
            time.sleep(hold)
        service.stop()
        server.should_exit = True
    ok = all(o.root_ok for o in outcomes) and not false and thumbs_ok
    print("[demo] PASS" if ok else "[demo] FAIL", flush=True)
    return 0 if ok else 1


def demo_tokens(configured: SecretStr | None) -> tuple[dict[str, str], str | None]:
    """Settings overrides and the bearer token the demo reads its own API with: with
    ``DRIFTLINE_API_TOKENS`` set the API refuses callers without one, so the demo adds a viewer
    token of its own, made for this run, to the configured ones; without, nothing."""
    if configured is None or not configured.get_secret_value().strip():
        return {}, None
    token = secrets.token_urlsafe(24)
    return {"api_tokens": f"{configured.get_secret_value()},demo:viewer:{token}"}, token


def show_thumbnail(api: str, incident: dict[str, Any], token: str | None = None) -> bool:
    """GET the incident's first exemplar thumbnail from the API (as bearer ``token`` if given)
    and say what came back."""
    import httpx

    exemplars = incident["evidence"]["exemplars"]
    if not exemplars:
        print(f"[demo] {incident['id']}: no exemplars", flush=True)
        return False
    eid = exemplars[0]["event_id"]
    url = f"{api}/api/v1/incidents/{incident['id']}/exemplars/{quote(eid, safe='')}/thumbnail"
    resp = httpx.get(url, timeout=30,
                     headers={"Authorization": f"Bearer {token}"} if token else None)
    if resp.status_code != 200:
        print(f"[demo] {incident['id']} exemplar {eid}: no thumbnail ({resp.status_code} "
              f"{resp.text[:200]})", flush=True)
        return False
    from PIL import Image

    with Image.open(io.BytesIO(resp.content)) as img:
        size = f"{img.width}x{img.height} {img.format}"
    print(f"[demo] {incident['id']} exemplar {eid}: thumbnail {size}, "
          f"{len(resp.content) / 1000:.1f} kB at {url}", flush=True)
    return True


def _counter(registry: Any, name: str) -> float:
    """The sum of a counter's ``_total`` samples over its labels."""
    return float(sum(s.value for m in registry.collect() if m.name == name
                     for s in m.samples if s.name == f"{name}_total"))


def _outbox_len(processor: Any) -> int:
    try:
        return int(processor.r.xinfo_stream(processor.outbox_key)["entries-added"])
    except Exception:  # no outbox yet: nothing alarmed
        return 0


def _summary(processor: Any) -> Any:
    from driftline.alerts.processor import read_summary

    return read_summary(processor.r, processor.summary_key)


def _stream(plant: Plant, bootstrap: str, topic: str) -> int:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20,
                             max_request_size=8 << 20)
    n = 0
    for doc in plant.stream_events():
        producer.send(topic, key=doc["station"].encode(), value=json.dumps(doc).encode())
        n += 1
    producer.flush()
    producer.close()
    return n


def _serve(service: Service, host: str, port: int) -> Any:
    import uvicorn

    from driftline.service.app import create_app

    app = create_app(service.registry, service.readiness, service.settings)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    threading.Thread(target=server.run, name="http", daemon=True).start()
    return server
