"""Data for the API tests and the load benchmark, written the way the stages write it.

A small synthetic plant (stations s1–s3, day/night shifts, rotating lots, model versions v1
and v2) runs through the real pieces minus Kafka: a reference is built from precomputed
embeddings; each event is assigned by the reference, appended to the recent buffer exactly as
the embed stage does (``meta`` JSON + float32 ``vec``) and fed to real ``SliceState`` objects
per template; their snapshots, summaries and alarms are committed with the detect stage's
``CheckpointStore``; the ``IncidentProcessor`` turns the alarms into incidents. Station s3's
lens hazes over two thirds into the run (its events move to one cluster and away from the
reference), and v2 gets cluster 2 wrong far more often than v1.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import redis

from driftline.alerts.attribution import SliceStatus
from driftline.alerts.book import FailureBook
from driftline.alerts.evidence import ClusterCatalog
from driftline.alerts.model import Resolution, RootCause, SliceRef, Status
from driftline.alerts.processor import IncidentProcessor
from driftline.alerts.store import Batch
from driftline.consumers.checkpoint import CheckpointStore
from driftline.consumers.slice_state import SliceState
from driftline.core.slices import SliceDetectors
from driftline.reference import build_reference
from driftline.reference.index import Reference, load_reference
from driftline.runner import ReferenceBaselines
from driftline.schema import SliceUpdate, slice_id
from driftline.service.keys import RECENT_KEY
from tests.unit.alerts.synthetic import alarm
from tests.unit.reference.synthetic import CELLS, CENTRES, reference_events, sample

TEMPLATES = ("station", "station+shift", "shift", "lot")
STATIONS = ("s1", "s2", "s3")
T0 = datetime(2026, 2, 2, 6, 0, tzinfo=UTC)
STEP_S = 6.0
MIXES = {(station, shift): mix for station, shift, _, mix in CELLS}
UNIFORM = [1 / CENTRES] * CENTRES


def build_references(root: Path) -> tuple[Path, Path]:
    """Two sibling reference artifacts: ``root/ref-a`` (configured) and ``root/ref-b``."""
    a, b = root / "ref-a", root / "ref-b"
    events, _ = reference_events(seed=0)
    build_reference(events, None, a, k=6, min_count=100, source_name="synthetic-a")
    events_b, _ = reference_events(seed=1)
    build_reference(events_b, None, b, k=5, min_count=100, source_name="synthetic-b")
    return a, b


@dataclass
class Populated:
    reference: Reference
    incident_ids: list[str]
    resolved_id: str | None
    event_ids: list[str]
    slices: list[str]


def _summary(state: SliceState) -> dict[str, Any]:
    g = state.gauges()
    return {"template": state.template, "dims": state.dims, "n": state.n,
            "last_time": state.last_time, "ratios": g.get("ratios", {}),
            "ood_ratio": g.get("ood_ratio"), "open": sorted(state.open)}


def populate(client: redis.Redis, ref_dir: Path, *, n_events: int = 1500,
             seed: int = 3) -> Populated:
    """Write recent buffer, slice states/summaries, outbox and incidents into ``client``."""
    ref = load_reference(ref_dir)
    baselines = ReferenceBaselines(ref)
    rng = np.random.default_rng(seed)
    states: dict[str, SliceState] = {}
    outbox: list[dict[str, Any]] = []
    event_ids = []
    change_at = 2 * n_events // 3
    pipe = client.pipeline(transaction=False)
    for i in range(n_events):
        station = STATIONS[i % 3]
        shift = "day" if (i // 200) % 2 == 0 else "night"
        lot = f"L{i // 400}"
        changed = station == "s3" and i >= change_at
        mix = MIXES.get((station, shift), UNIFORM)
        centre = 4 if changed and rng.random() < 0.7 else int(rng.choice(CENTRES, p=mix))
        emb = sample(rng, np.array([centre]), noise=0.35 if changed else 0.15)[0]
        cluster_arr, dist_arr = ref.assign(emb[None, :])
        cluster, dist = int(cluster_arr[0]), float(dist_arr[0])
        base = ref.baseline_for(station, shift)
        version = "v1" if rng.random() < 0.5 else "v2"
        label = "ok" if rng.random() < 0.7 else "scratch"
        wrong = rng.random() < (0.5 if version == "v2" and centre == 2 else 0.05)
        pred = ("scratch" if label == "ok" else "ok") if wrong else label
        score = float(np.clip(rng.normal(0.8 if version == "v1" else 0.7, 0.1), 0.0, 1.0))
        ts = T0 + timedelta(seconds=STEP_S * i)
        eid = f"ev-{i:05d}"
        event_ids.append(eid)
        meta = {"event_id": eid, "ts": ts.timestamp(), "station": station, "shift": shift,
                "lot": lot, "model_version": version, "cluster": cluster, "distance": dist,
                "pred": pred, "score": score, "label": label if i % 2 == 0 else None}
        pipe.xadd(RECENT_KEY, {"meta": json.dumps(meta),
                               "vec": np.asarray(emb, np.float32).tobytes()})
        for tpl in TEMPLATES:
            values = {"station": station, "shift": shift, "lot": lot}
            sid = slice_id(tpl, values)
            upd = SliceUpdate(slice_id=sid, template=tpl, event_id=eid, ts=ts,
                              source_partition=0, source_offset=i, station=station,
                              shift=shift, lot=lot, baseline=base.key, cluster=cluster,
                              distance=dist, ood=dist > base.ood_threshold,
                              model_version=version)
            st = states.get(sid)
            if st is None:
                st = states[sid] = SliceState(sid, tpl, SliceDetectors(arl0=5000.0), baselines,
                                              autoresolve_events=10_000)
            for msg in st.update(upd):
                outbox.append({**msg, "slice_id": sid, "template": tpl})
    pipe.execute()
    store = CheckpointStore(client)
    parts = {sid: zlib.crc32(sid.encode()) % 2 for sid in states}
    epochs = store.claim([0, 1])
    store.commit(epochs, {p: {sid: {"state": st.snapshot(), "applied": {"0": n_events}}
                              for sid, st in states.items() if parts[sid] == p} for p in (0, 1)},
                 {0: n_events, 1: n_events}, outbox,
                 {sid: _summary(st) for sid, st in states.items()})
    book = FailureBook(client, catalog=ClusterCatalog.from_manifest(ref.manifest))
    proc = IncidentProcessor(client, book, block_ms=0)
    while proc.step(block_ms=0):
        pass
    resolved = _past_incident(client, book)
    ids = [i.id for i in book.list(limit=500).items]
    return Populated(ref, ids, resolved, event_ids, sorted(states))


def _past_incident(client: redis.Redis, book: FailureBook) -> str | None:
    """A resolved lot incident from a month before (exemplars: recent events), then the same
    change again now: the new incident links to the old one ("seen before")."""
    summary = {sid: SliceStatus.from_summary(sid, json.loads(v)) for sid, v in (
        (k.decode(), v) for k, v in client.hgetall("dl:detect:summary").items())}
    onset = T0.timestamp() - 30 * 86400
    exemplars = [{"event_id": f"ev-{i:05d}", "cluster": 3, "distance": 0.2, "ts": onset + i,
                  "ood": False} for i in range(0, 12, 2)]
    old = _ingest(book, alarm("lot=L9", 1.0, n=600, onset=onset, t=onset + 600, cluster=3,
                              exemplars=exemplars), summary)
    if old is None:
        return None
    book.resolve(old, RootCause.supplier_lot, "lot L9 surface texture", "setup")
    later = T0.timestamp() + 86400
    _ingest(book, alarm("lot=L9", 1.0, n=600, eps=0.25, onset=later, t=later + 300,
                        cluster=3, exemplars=exemplars), summary)
    return old


def _ingest(book: FailureBook, msg: dict[str, Any],
            summary: dict[str, SliceStatus]) -> str | None:
    before = {i.id for i in book.list(limit=1000).items}
    ms = int((book.cursor() or "0-0").partition("-")[0]) + 1
    book.ingest([(f"{ms}-0", msg)], summary)
    new = [i.id for i in book.list(limit=1000).items if i.id not in before]
    return new[0] if new else None


def bulk_incidents(client: redis.Redis, n: int, *, batch: int = 500,
                   resolve_share: float = 0.9) -> list[str]:
    """``n`` incidents on distinct stations, most resolved, as in a book that has run for
    months. Eight come from alarms through ``FailureBook.ingest``; the rest are copies of
    those with new ids, slices and times, stored through the book's own transaction
    (ingesting 10,000 alarms one by one would mostly time the book's recurrence matching)."""
    book = FailureBook(client)
    rng = np.random.default_rng(0)
    t0 = T0.timestamp() - 90 * 86400
    seeds = [_ingest(book, alarm(f"station=seed-{k}", 1.0, n=800, cluster=k, onset=t0,
                                 t=t0 + 600), {}) for k in range(8)]
    templates = [book.get(i) for i in seeds if i is not None]
    ids = [i.id for i in templates]

    def fill(b: Batch, count: int) -> list[str]:
        made = []
        for _ in range(count):
            inc = templates[int(rng.integers(len(templates)))].model_copy(deep=True)
            inc.id = b.new_id()
            shift_s = float(rng.uniform(0, 90 * 86400))
            sid = f"station=st-{inc.id}"
            old = inc.root.slice_id
            ev = inc.slices.pop(old)
            inc.root = SliceRef(template="station", dims={"station": f"st-{inc.id}"},
                                slice_id=sid)
            ev.ref = inc.root
            inc.slices = {sid: ev}
            inc.evidence.slice_id = sid
            for f in inc.detectors:
                f.slice_id = sid
            inc.detected_at += timedelta(seconds=shift_s)
            inc.onset = inc.onset + timedelta(seconds=shift_s) if inc.onset else None
            if rng.random() < resolve_share:
                at = inc.detected_at + timedelta(hours=2)
                inc.status, inc.resolved_at = Status.resolved, at
                inc.resolution = Resolution(category=RootCause.optics, note=None, who="bench",
                                            at=at)
            b.saves[inc.id] = inc
            made.append(inc.id)
        return made

    while len(ids) < n:
        count = min(batch, n - len(ids))
        ids.extend(book.transact(lambda b, c=count: fill(b, c)))  # type: ignore[misc]
    return ids
