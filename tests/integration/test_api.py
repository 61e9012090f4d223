"""The triage API against real Redis with a populated failure book (live app, TestClient).

Data: ``tests/unit/service/populate.py`` (a synthetic plant through real slice states, the
detect stage's checkpoint store and the incident processor), in Redis database 9.
"""

from __future__ import annotations

import base64
import io
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient
from kafka import KafkaProducer
from PIL import Image
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from driftline.alerts.attribution import SliceStatus
from driftline.alerts.book import FailureBook
from driftline.config import Settings, load_settings
from driftline.consumers.checkpoint import CheckpointStore
from driftline.consumers.kafka_io import ensure_topics
from driftline.service.app import create_app
from driftline.service.context import ServiceContext
from driftline.service.keys import ACTIVE_REFERENCE_KEY, BOOK_PREFIX, RECENT_KEY, SUMMARY_KEY
from tests.integration.pipeline_support import free_port
from tests.unit.alerts.synthetic import ONSET, alarm, fleet, summary_entry
from tests.unit.service.populate import Populated, build_references, populate

pytestmark = pytest.mark.integration
DB = 9
TOKENS = {"viewer": "viewer-token-0123456789", "operator": "operator-token-0123456789",
          "admin": "admin-token-0123456789"}
NAMES = {"viewer": "vic", "operator": "olga", "admin": "ada"}
PUBLIC = "http://driftline.test:8080"


def db_url(url: str, db: int = DB) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{db}", parts.query, parts.fragment))


def make_settings(url: str, ref: Path | None, tokens: bool = True, **kw: Any) -> Settings:
    spec = ",".join(f"{NAMES[r]}:{r}:{t}" for r, t in TOKENS.items()) if tokens else None
    return load_settings(redis_url=url, reference_dir=ref, public_url=PUBLIC,
                         api_tokens=SecretStr(spec) if spec else None, **kw)


@dataclass
class Api:
    client: TestClient
    data: Populated
    r: redis.Redis
    refs: tuple[Path, Path]
    url: str

    def get(self, path: str, role: str | None = "viewer", **kw: Any) -> Any:
        return self.client.get(path, headers=auth(role), **kw)

    def post(self, path: str, role: str | None = "operator", **kw: Any) -> Any:
        return self.client.post(path, headers=auth(role), **kw)


def auth(role: str | None) -> dict[str, str]:
    if role is None:
        return {}
    token = TOKENS.get(role, "not-a-configured-token-at-all")
    return {"Authorization": f"Bearer {token}"}


def colour(i: int) -> tuple[int, int, int]:
    return (i * 37 % 256, i * 11 % 256, 255 - i * 5 % 256)


def produce_image_events(bootstrap: str, topic: str, event_ids: list[str]) -> None:
    """The events populate's slice-updates came from: event i at partition 0, offset i, each a
    small JPEG of one colour, so a thumbnail shows whether the right event was read."""
    ensure_topics(bootstrap, {topic: 1})
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20)
    for i, eid in enumerate(event_ids):
        buf = io.BytesIO()
        Image.new("RGB", (320, 240), colour(i)).save(buf, format="JPEG", quality=95)
        doc = {"event_id": eid, "ts": "2026-11-02T06:00:00+00:00", "station": "s1",
               "shift": "day", "lot": "L0", "image": base64.b64encode(buf.getvalue()).decode()}
        producer.send(topic, json.dumps(doc).encode(), partition=0)
    producer.flush()
    producer.close()


@pytest.fixture(scope="module")
def api(redis_url: str, kafka_bootstrap: str,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    url = db_url(redis_url)
    r = redis.Redis.from_url(url)
    r.flushdb()
    refs = build_references(tmp_path_factory.mktemp("refs"))
    data = populate(r, refs[0])
    topic = f"api-{uuid.uuid4().hex[:8]}.events"
    produce_image_events(kafka_bootstrap, topic, data.event_ids)
    app = create_app(CollectorRegistry(), None, make_settings(
        url, refs[0], kafka_bootstrap=kafka_bootstrap, events_topic=topic))
    with TestClient(app) as client:
        yield Api(client, data, r, refs, url)
    r.close()


def _t(iso: str) -> datetime:
    return datetime.fromisoformat(iso.replace("Z", "+00:00"))


def _station_incident(api: Api) -> dict[str, Any]:
    items = api.get("/api/v1/incidents", params={"station": "s3"}).json()["items"]
    return next(i for i in items if i["root"]["slice_id"] == "station=s3")


# --- incidents -------------------------------------------------------------------------------
def test_list_filters_and_cursor_pagination(api: Api) -> None:
    everything = api.get("/api/v1/incidents", params={"limit": 500}).json()
    assert everything["next_cursor"] is None
    ids = [i["id"] for i in everything["items"]]
    assert len(ids) >= 3 and len(set(ids)) == len(ids)
    seen, cursor = [], None
    while True:
        page = api.get("/api/v1/incidents", params={"limit": 1, **(
            {"cursor": cursor} if cursor else {})}).json()
        seen += [i["id"] for i in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ids
    times = [_t(i["detected_at"]) for i in everything["items"]]
    assert times == sorted(times, reverse=True)
    s3 = _station_incident(api)
    assert s3["link"] == f"{PUBLIC}/api/v1/incidents/{s3['id']}"
    resolved = api.get("/api/v1/incidents", params={"status": "resolved"}).json()["items"]
    assert resolved and all(i["status"] == "resolved" for i in resolved)
    assert api.data.resolved_id in [i["id"] for i in resolved]
    lot = api.get("/api/v1/incidents", params={"lot": "L9"}).json()["items"]
    assert {i["root"]["slice_id"] for i in lot} == {"lot=L9"}
    since = api.get("/api/v1/incidents", params={"since": s3["detected_at"]}).json()["items"]
    assert s3["id"] in [i["id"] for i in since]
    assert all(_t(i["detected_at"]) >= _t(s3["detected_at"]) for i in since)
    by_sev = [i["id"] for sev in ("warning", "major", "critical") for i in api.get(
        "/api/v1/incidents", params={"severity": sev, "limit": 500}).json()["items"]]
    assert sorted(by_sev) == sorted(ids)


@pytest.mark.parametrize("params", [{"cursor": "garbage"}, {"cursor": "nan:DL-1"},
                                    {"cursor": "inf:DL-000001"}])
def test_bad_cursor_is_a_clear_422(api: Api, params: dict[str, str]) -> None:
    resp = api.get("/api/v1/incidents", params=params)
    assert resp.status_code == 422 and resp.json()["detail"][0]["loc"] == ["query", "cursor"]


def test_bad_query_values_are_422_with_details(api: Api) -> None:
    for params in ({"limit": 0}, {"status": "sleeping"}, {"since": "yesterday"},
                   {"until": "1.175494351e-38"}, {"since": "1700000000"}):
        resp = api.get("/api/v1/incidents", params=params)
        assert resp.status_code == 422 and resp.json()["detail"]
    for path, params in (("/api/v1/slices/station=press-1/timeline", {}),
                         ("/api/v1/versions/compare", {"a": "v1", "b": "v2"})):
        resp = api.get(path, params={"since": "1700000000", **params})
        assert resp.status_code == 422 and "not a number" in str(resp.json()["detail"])
    typo = api.get("/api/v1/incidents", params={"stauts": "open"})
    assert typo.status_code == 400 and "'stauts'" in typo.json()["detail"]


def test_detail_evidence_exemplars_and_thumbnails(api: Api) -> None:
    s3 = _station_incident(api)
    detail = api.get(f"/api/v1/incidents/{s3['id']}").json()
    assert detail["timeline"][0]["action"] == "opened"
    assert detail["evidence"]["slice_id"] == "station=s3" and detail["evidence"]["clusters"]
    assert detail["firings"] and detail["firings"][0]["threshold"] > 0
    ev = api.get(f"/api/v1/incidents/{s3['id']}/evidence").json()
    assert ev["slices"][0]["root"] and ev["slices"][0]["slice_id"] == "station=s3"
    assert ev["slices"][0]["strength"] > 0
    ex = api.get(f"/api/v1/incidents/{s3['id']}/exemplars").json()
    assert ex and all(x["in_recent_buffer"] for x in ex)
    assert all(x["exemplar"]["reference_exemplars"] for x in ex)
    event = ex[0]["exemplar"]["event_id"]
    assert (ex[0]["exemplar"]["source_partition"], ex[0]["exemplar"]["source_offset"]) == (
        0, api.data.event_ids.index(event))
    thumb = api.get(f"/api/v1/incidents/{s3['id']}/exemplars/{event}/thumbnail")
    assert thumb.status_code == 200, thumb.text
    assert thumb.headers["content-type"] == "image/jpeg"
    img = Image.open(io.BytesIO(thumb.content))
    assert img.format == "JPEG" and max(img.size) == 160 and img.size == (160, 120)
    # the right event's image: its colour survives two JPEG encodings within a few levels
    mean = np.asarray(img.convert("RGB"), np.float64).reshape(-1, 3).mean(axis=0)
    assert np.abs(mean - colour(api.data.event_ids.index(event))).max() < 6, mean
    assert api.r.exists(f"dl:thumb:0:{api.data.event_ids.index(event)}:{event}")
    # cached: the next view does not read Kafka (which is now out of reach)
    thumbs = api.client.app.state.ctx.thumbnails()  # type: ignore[attr-defined]
    bootstrap, thumbs.bootstrap = thumbs.bootstrap, f"127.0.0.1:{free_port()}"
    timeout, thumbs.timeout_s = thumbs.timeout_s, 2.0
    try:
        again = api.get(f"/api/v1/incidents/{s3['id']}/exemplars/{event}/thumbnail")
        assert again.status_code == 200 and again.content == thumb.content
        uncached = next(x["exemplar"]["event_id"] for x in ex[1:]
                        if not api.r.keys(f"dl:thumb:*:{x['exemplar']['event_id']}"))
        down = api.get(f"/api/v1/incidents/{s3['id']}/exemplars/{uncached}/thumbnail")
        assert down.status_code == 503 and "could not be read" in down.json()["detail"]
    finally:
        thumbs.bootstrap, thumbs.timeout_s = bootstrap, timeout
    # an incident from before thumbnails: its exemplars have no events-topic position
    old = api.get(f"/api/v1/incidents/{api.data.resolved_id}/exemplars").json()
    eid = old[0]["exemplar"]["event_id"]
    none = api.get(f"/api/v1/incidents/{api.data.resolved_id}/exemplars/{eid}/thumbnail")
    assert none.status_code == 404 and "before thumbnails" in none.json()["detail"]
    other = api.get(f"/api/v1/incidents/{s3['id']}/exemplars/nope/thumbnail")
    assert other.status_code == 404 and "not an exemplar" in other.json()["detail"]
    missing = api.get("/api/v1/incidents/DL-999999")
    assert missing.status_code == 404 and "DL-999999" in missing.json()["detail"]


def test_label_set_is_jsonl_covering_every_exemplar(api: Api) -> None:
    s3 = _station_incident(api)
    resp = api.get(f"/api/v1/incidents/{s3['id']}/label-set")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith(
        "application/jsonl")
    rows = [json.loads(line) for line in resp.text.splitlines()]
    n = len(api.get(f"/api/v1/incidents/{s3['id']}/exemplars").json())
    assert rows and sum(r["covers"] for r in rows) == n
    assert {r["incident_id"] for r in rows} == {s3["id"]}
    for r in rows:  # where a labeler finds each sample: the topic position and the thumbnail
        assert r["source"] == {"partition": 0, "offset": api.data.event_ids.index(r["event_id"])}
        assert r["thumbnail"] == (f"{PUBLIC}/api/v1/incidents/{s3['id']}/exemplars/"
                                  f"{r['event_id']}/thumbnail")
    old = api.get(f"/api/v1/incidents/{api.data.resolved_id}/label-set").text.splitlines()
    assert old and all(json.loads(r)["thumbnail"] is None for r in old)  # no known position


def test_recurrence_links_the_past_incident(api: Api) -> None:
    items = api.get("/api/v1/incidents", params={"lot": "L9", "status": "open"}).json()["items"]
    (again,) = items
    assert again["recurrence"] == [api.data.resolved_id]
    links = api.get(f"/api/v1/incidents/{again['id']}/recurrence").json()
    assert links[0]["incident_id"] == api.data.resolved_id and links[0]["available"]
    assert links[0]["category"] == "supplier_lot" and links[0]["similarity"] > 0.9


def test_lifecycle_records_the_token_name_in_the_timeline(api: Api) -> None:
    s3 = _station_incident(api)
    path = f"/api/v1/incidents/{s3['id']}"
    ack = api.post(f"{path}/acknowledge", json={"note": "looking at the lens"})
    assert ack.status_code == 200 and ack.json()["status"] == "acknowledged"
    again = api.post(f"{path}/acknowledge")
    assert again.status_code == 409 and "acknowledged" in again.json()["detail"]
    note = api.post(f"{path}/annotations", json={"note": "lens hazed"})
    assert note.status_code == 201
    bad = api.post(f"{path}/resolve", json={"category": "gremlins"})
    assert bad.status_code == 422
    done = api.post(f"{path}/resolve", role="admin", json={"category": "optics",
                                                          "note": "lens cleaned"})
    assert done.status_code == 200
    body = done.json()
    assert body["status"] == "resolved" and body["resolution"]["who"] == NAMES["admin"]
    steps = [(t["who"], t["action"]) for t in body["timeline"]]
    assert steps[-3:] == [("olga", "acknowledged"), ("olga", "annotated"), ("ada", "resolved")]
    assert body["timeline"][-3]["note"] == "looking at the lens"
    resets = {f[b"reset"].decode(): (f.get(b"incident"), f.get(b"who"))
              for _, f in api.r.xrange("dl:detect:control")}
    # the detect stage logs which incident's resolution reset the slice, and who resolved it
    assert resets["station=s3"] == (body["id"].encode(), NAMES["admin"].encode())
    requests = CheckpointStore(api.r).control_after("0-0")
    assert ("station=s3", body["id"], NAMES["admin"]) in {
        (q.slice_id, q.incident, q.who) for q in requests}
    extra = api.post(f"{path}/acknowledge", json={"unknown": 1})
    assert extra.status_code == 422


# --- slices ----------------------------------------------------------------------------------
def test_slices_status_detail_and_timeline(api: Api) -> None:
    rows = api.get("/api/v1/slices").json()
    assert len(rows) == len(api.data.slices)
    stations = api.get("/api/v1/slices", params={"template": "station"}).json()
    assert sorted(r["slice_id"] for r in stations) == ["station=s1", "station=s2", "station=s3"]
    only = api.get("/api/v1/slices", params={"station": "s3"}).json()
    assert only and all(r["dims"]["station"] == "s3" for r in only)
    detail = api.get("/api/v1/slices/station=s3").json()
    assert detail["state_found"] and {d["name"] for d in detail["detectors"]} >= {
        "cluster_mix", "ood_rate"}
    assert sum(detail["model_versions"].values()) == detail["n"]
    tl = api.get("/api/v1/slices/station=s3/timeline").json()
    assert tl["bucket_seconds"] == 300.0 and len(tl["points"]) > 5
    assert sum(p["n"] for p in tl["points"]) == detail["n"]
    last = tl["points"][-1]
    assert abs(sum(last["cluster_shares"]) - 1) < 1e-3 and last["ood_rate"] is not None
    assert last["statistics"]["cluster_mix"]["threshold"] > 0
    peak = max(p["statistics"]["cluster_mix"]["ratio"] for p in tl["points"])
    calm = max(p["statistics"]["cluster_mix"]["ratio"] for p in api.get(
        "/api/v1/slices/station=s1/timeline").json()["points"])
    assert peak > 1.0 > calm  # the hazed lens crosses; the healthy station does not
    window = api.get("/api/v1/slices/station=s3/timeline", params={
        "since": tl["points"][2]["start"], "until": tl["points"][4]["start"]}).json()
    assert [p["start"] for p in window["points"]] == [p["start"] for p in tl["points"][2:5]]
    assert api.get("/api/v1/slices/station=nowhere").status_code == 404
    assert api.get("/api/v1/slices/station=nowhere/timeline").status_code == 404


# --- similar, gap, versions ------------------------------------------------------------------
def test_similar_to_an_event_and_to_an_incident(api: Api) -> None:
    event = api.data.event_ids[-3]
    res = api.get(f"/api/v1/similar/events/{event}", params={"k": 5}).json()
    assert res["space"] == "reference" and res["buffer_events"] == len(api.data.event_ids)
    dists = [n["distance"] for n in res["recent"]]
    assert len(dists) == 5 and dists == sorted(dists) and event not in [
        n["event_id"] for n in res["recent"]]
    assert len(res["reference"]) == 5 and all(n["cluster"] is not None
                                              for n in res["reference"])
    s3 = _station_incident(api)
    inc = api.get(f"/api/v1/similar/incidents/{s3['id']}", params={"k": 8}).json()
    assert inc["query"]["kind"] == "incident" and inc["query"]["event_ids"]
    assert not set(inc["query"]["event_ids"]) & {n["event_id"] for n in inc["recent"]}
    near = [n["distance"] for n in inc["recent"]]
    assert len(near) == 8 and near == sorted(near) and inc["reference"]
    gone = api.get("/api/v1/similar/events/never-seen")
    assert gone.status_code == 404 and "recent buffer" in gone.json()["detail"]


def test_domain_gap_matrix(api: Api) -> None:
    gap = api.get("/api/v1/gap", params={"dimension": "station"}).json()
    assert sorted(gap["values"]) == ["s1", "s2", "s3"]
    m = gap["js_divergence"]
    assert all(m[i][i] == 0 and all(m[i][j] == m[j][i] for j in range(3)) for i in range(3))
    assert all(0 <= x <= 1 for row in m for x in row)
    i3 = gap["values"].index("s3")
    ood = gap["ood_rate_difference"]
    assert all(ood[i3][j] > 0 for j in range(3) if j != i3)  # the hazed lens is OOD
    shifts = api.get("/api/v1/gap", params={"dimension": "shift"}).json()
    assert sorted(shifts["values"]) == ["day", "night"]
    early = api.get("/api/v1/gap", params={"dimension": "station",
                                           "until": "2026-02-02T07:00:00Z"}).json()
    assert sum(s["n"] for s in early["slices"]) < sum(s["n"] for s in gap["slices"])


def test_model_versions_compare_flags_the_regression(api: Api) -> None:
    res = api.get("/api/v1/versions/compare", params={"a": "v1", "b": "v2"}).json()
    assert res["events"]["v1"] + res["events"]["v2"] == len(api.data.event_ids)
    errs = [c for c in res["clusters"] if c["error_rate"] and c["error_rate"]["significant"]]
    assert errs and all(c["b"]["error_rate"] > c["a"]["error_rate"] for c in errs)
    assert any("error rate" in s for s in res["significant"])
    assert any("confidence" in s for s in res["significant"])
    p = [t["p_adjusted"] >= t["p_value"] for c in res["clusters"]
         for t in (c["prediction_mix"], c["confidence"], c["error_rate"]) if t]
    assert p and all(p)
    same = api.get("/api/v1/versions/compare", params={"a": "v1", "b": "v1"}).json()
    assert same["significant"] == []


# --- references ------------------------------------------------------------------------------
def test_references_list_show_activate(api: Api) -> None:
    rows = api.get("/api/v1/references").json()
    assert [r["name"] for r in rows] == ["ref-a", "ref-b"]
    assert rows[0]["configured"] and not rows[1]["configured"]
    shown = api.get(f"/api/v1/references/{rows[1]['reference_id']}").json()
    assert shown["clusters"] == 5 and len(shown["cluster_items"]) == 5 and shown["baselines"]
    act = api.post(f"/api/v1/references/{rows[1]['reference_id']}/activate", role="admin",
                   json={"note": "night-shift lighting"})
    assert act.status_code == 200 and act.json()["activated_by"] == NAMES["admin"]
    assert "restart" in act.json()["effect"]
    stored = json.loads(api.r.get(ACTIVE_REFERENCE_KEY) or b"{}")
    assert stored["reference_id"] == rows[1]["reference_id"] and stored["who"] == "ada"
    again = api.get("/api/v1/references").json()
    assert [r["activated"] for r in again] == [False, True]
    assert api.get("/api/v1/references/0000000000000000").status_code == 404
    # restarted, the API reads the activated reference, as the stages do (not the configured)
    restarted = ServiceContext.build(make_settings(api.url, api.refs[0]), api.r)
    ref = restarted.reference()
    assert ref is not None and ref.reference_id == rows[1]["reference_id"]


# --- auth matrix -----------------------------------------------------------------------------
ROLES = [None, "bad", "viewer", "operator", "admin"]
RANK = {"viewer": 0, "operator": 1, "admin": 2}


def _endpoints(api: Api) -> list[tuple[str, str, dict[str, Any] | None, str]]:
    inc = api.data.incident_ids[0]
    ev = api.data.event_ids[-1]
    ref = api.get("/api/v1/references").json()[0]["reference_id"]
    return [
        ("GET", "/api/v1/incidents", None, "viewer"),
        ("GET", f"/api/v1/incidents/{inc}", None, "viewer"),
        ("GET", f"/api/v1/incidents/{inc}/evidence", None, "viewer"),
        ("GET", f"/api/v1/incidents/{inc}/exemplars", None, "viewer"),
        ("GET", f"/api/v1/incidents/{inc}/label-set", None, "viewer"),
        ("GET", f"/api/v1/incidents/{inc}/recurrence", None, "viewer"),
        ("GET", "/api/v1/slices", None, "viewer"),
        ("GET", "/api/v1/slices/station=s1", None, "viewer"),
        ("GET", "/api/v1/slices/station=s1/timeline", None, "viewer"),
        ("GET", f"/api/v1/similar/events/{ev}", None, "viewer"),
        ("GET", f"/api/v1/similar/incidents/{inc}", None, "viewer"),
        ("GET", "/api/v1/gap?dimension=station", None, "viewer"),
        ("GET", "/api/v1/versions/compare?a=v1&b=v2", None, "viewer"),
        ("GET", "/api/v1/references", None, "viewer"),
        ("GET", f"/api/v1/references/{ref}", None, "viewer"),
        ("POST", f"/api/v1/incidents/{inc}/acknowledge", {"note": "x"}, "operator"),
        ("POST", f"/api/v1/incidents/{inc}/annotations", {"note": "x"}, "operator"),
        ("POST", f"/api/v1/incidents/{inc}/resolve", {"category": "other"}, "operator"),
        ("POST", f"/api/v1/references/{ref}/activate", None, "admin"),
    ]


def test_auth_matrix_every_role_on_every_endpoint(api: Api) -> None:
    failures = []
    for method, path, body, need in _endpoints(api):
        for role in ROLES:
            resp = api.client.request(method, path, headers=auth(role), json=body)
            if role in (None, "bad"):
                ok = resp.status_code == 401 and resp.headers.get("www-authenticate") == "Bearer"
            elif RANK[role] < RANK[need]:
                ok = resp.status_code == 403 and role in resp.json()["detail"]
            else:  # allowed: success, or a lifecycle conflict once an earlier role acted
                ok = resp.status_code in (200, 201, 409)
            if not ok:
                failures.append((method, path, role, resp.status_code, resp.text[:120]))
    assert failures == []


def test_probes_open_or_guarded(api: Api) -> None:
    assert api.client.get("/healthz").status_code == 200
    ready = api.client.get("/readyz").json()
    assert ready == {"ready": True, "checks": {"redis": True, "reference": True}}
    text = api.client.get("/metrics").text
    assert 'driftline_api_requests_total{method="GET",route="/api/v1/incidents"' in text
    closed = create_app(CollectorRegistry(), None, make_settings(api.url, api.refs[0],
                                                                  open_probes=False))
    with TestClient(closed) as c:
        assert c.get("/healthz").status_code == 401
        assert c.get("/metrics", headers=auth("viewer")).status_code == 200


def test_without_tokens_reads_work_and_mutations_are_refused(
        api: Api, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING"):
        app = create_app(CollectorRegistry(), None, make_settings(api.url, api.refs[0],
                                                                   tokens=False))
    assert "NO API TOKENS CONFIGURED" in caplog.text
    inc = api.data.incident_ids[0]
    with TestClient(app) as c:
        assert c.get("/api/v1/incidents").status_code == 200
        resp = c.post(f"/api/v1/incidents/{inc}/annotations", json={"note": "hi"})
        assert resp.status_code == 403 and "DRIFTLINE_API_TOKENS" in resp.json()["detail"]


def test_request_body_limit(api: Api) -> None:
    small = create_app(CollectorRegistry(), None, make_settings(api.url, api.refs[0],
                                                                 max_request_bytes=1024))
    inc = api.data.incident_ids[0]
    path = f"/api/v1/incidents/{inc}/annotations"
    with TestClient(small) as c:
        big = c.post(path, headers=auth("operator"), json={"note": "x" * 1500})
        assert big.status_code == 413 and "DRIFTLINE_MAX_REQUEST_BYTES" in big.json()["detail"]

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
            yield b'{"note": "'
            for _ in range(20):
                yield b"y" * 100
            yield b'"}'
        streamed = c.post(path, headers={**auth("operator"),
                                         "Content-Type": "application/json"},
                          content=chunks())
        assert streamed.status_code == 413
        fine = c.post(path, headers=auth("operator"), json={"note": "short"})
        assert fine.status_code == 201


def test_recent_index_follows_the_bounded_buffer(api: Api) -> None:
    """New entries are read incrementally and trimmed ones dropped, as the embed stage's
    MAXLEN trims the stream."""
    ctx = api.client.app.state.ctx  # type: ignore[attr-defined]
    before = ctx.recent().snapshot()
    n = len(before)
    oldest = before.metas[0]["event_id"]
    last = r_meta = dict(before.metas[-1])
    vec = before.raw[-1].tobytes()
    for k in range(3):
        r_meta = {**last, "event_id": f"late-{k}", "ts": last["ts"] + 1 + k}
        api.r.xadd(RECENT_KEY, {"meta": json.dumps(r_meta), "vec": vec}, maxlen=n,
                   approximate=False)
    after = ctx.recent().snapshot()
    assert len(after) == n and "late-2" in after.rows and oldest not in after.rows
    res = api.get("/api/v1/similar/events/late-0", params={"k": 3}).json()
    assert res["recent"][0]["distance"] < 1e-3  # late-1 and late-2 carry the same vector
    # embedded on another reference (before an activation): its clusters are another space's
    api.r.xadd(RECENT_KEY, {"meta": json.dumps({**last, "event_id": "other-ref",
                                                "reference_id": "another"}), "vec": vec})
    ours = ctx.reference().reference_id
    api.r.xadd(RECENT_KEY, {"meta": json.dumps({**last, "event_id": "this-ref",
                                                "reference_id": ours}), "vec": vec})
    latest = ctx.recent().snapshot()
    assert "this-ref" in latest.rows and "other-ref" not in latest.rows


# --- ids holding '/' -------------------------------------------------------------------------
SLASHED_DB = 11
SLASHED_EVENT = "line3/cam2/000123"
# The second id, once %2F is decoded, reads as the first one's timeline path.
SLASHED_SLICES = ("lot=2024/07/L7", "lot=2024/07/L7/timeline")


@pytest.fixture(scope="module")
def slashed(redis_url: str, kafka_bootstrap: str) -> Iterator[tuple[TestClient, str]]:
    """An app over a book whose incident has an exemplar with '/' in its event id (its image
    in a real topic), slices whose lot holds '/', and that event in the recent buffer."""
    url = db_url(redis_url, SLASHED_DB)
    r = redis.Redis.from_url(url)
    r.flushdb()
    docs = {**fleet(), **{sid: summary_entry(sid, 1000) for sid in SLASHED_SLICES}}
    for sid, doc in docs.items():
        r.hset(SUMMARY_KEY, sid, json.dumps(doc))
    rng = np.random.default_rng(0)
    for i, eid in enumerate((SLASHED_EVENT, "e-1", "e-2", "e-3")):
        vec = rng.normal(size=16)
        meta = {"event_id": eid, "ts": ONSET + i, "station": "press-3", "shift": "day",
                "lot": "L7"}
        r.xadd(RECENT_KEY, {"meta": json.dumps(meta),
                            "vec": (vec / np.linalg.norm(vec)).astype(np.float32).tobytes()})
    topic = f"api-slash-{uuid.uuid4().hex[:8]}.events"
    produce_image_events(kafka_bootstrap, topic, [SLASHED_EVENT])
    ex = [{"event_id": SLASHED_EVENT, "cluster": 0, "distance": 0.4, "ts": ONSET + 500,
           "ood": False, "source_partition": 0, "source_offset": 0}]
    book = FailureBook(r, prefix=BOOK_PREFIX)
    book.ingest([("1-0", alarm("station=press-3", 1.0, exemplars=ex))],
                {sid: SliceStatus.from_summary(sid, doc) for sid, doc in docs.items()})
    (inc,) = book.active()
    app = create_app(CollectorRegistry(), None, make_settings(
        url, None, kafka_bootstrap=kafka_bootstrap, events_topic=topic))
    with TestClient(app) as client:
        yield client, inc.id
    r.close()


def test_label_set_thumbnail_link_works_for_an_event_id_with_slashes(
        slashed: tuple[TestClient, str]) -> None:
    client, inc = slashed
    (row,) = [json.loads(line) for line in client.get(
        f"/api/v1/incidents/{inc}/label-set", headers=auth("viewer")).text.splitlines()]
    assert row["event_id"] == SLASHED_EVENT
    link = row["thumbnail"]
    assert link == (f"{PUBLIC}/api/v1/incidents/{inc}/exemplars/"
                    f"{quote(SLASHED_EVENT, safe='')}/thumbnail")
    thumb = client.get(link.removeprefix(PUBLIC), headers=auth("viewer"))
    assert thumb.status_code == 200, thumb.text
    assert thumb.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(thumb.content)).size == (160, 120)


def test_slice_ids_with_slashes_are_told_apart_from_the_timeline(
        slashed: tuple[TestClient, str]) -> None:
    client, _ = slashed
    first, second = SLASHED_SLICES
    for sid in SLASHED_SLICES:
        resp = client.get(f"/api/v1/slices/{quote(sid, safe='')}", headers=auth("viewer"))
        assert resp.status_code == 200, resp.text
        assert resp.json()["slice_id"] == sid and "state_found" in resp.json()
    tl = client.get(f"/api/v1/slices/{quote(first, safe='')}/timeline", headers=auth("viewer"),
                    params={"since": "2023-01-01T00:00:00Z"})  # its query still accepted
    assert tl.status_code == 200, tl.text
    assert tl.json()["slice_id"] == first and "bucket_seconds" in tl.json()


def test_similar_to_an_event_id_with_slashes(slashed: tuple[TestClient, str]) -> None:
    client, _ = slashed
    resp = client.get(f"/api/v1/similar/events/{quote(SLASHED_EVENT, safe='')}",
                      headers=auth("viewer"), params={"k": 2})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["query"]["event_ids"] == [SLASHED_EVENT] and len(body["recent"]) == 2
