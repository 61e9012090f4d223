"""Soak: does anything keep growing while driftline runs a steady stream for a long time?

Starts the real local stack (Kafka, Redis; ``driftline.localstack``), builds a synthetic
precomputed-embedding reference (with predictions and labels, so every detector runs), and runs
the service as an operator would: ``driftline run embed``, ``driftline run detect``,
``driftline run book`` and ``driftline serve`` as subprocesses configured by ``DRIFTLINE_*``
variables. A producer thread streams events at a steady wall-clock rate; their event time runs
``--speedup`` times faster than the wall clock, so that a 15-minute soak covers days of a
plant: shifts change every 8 h, a new supplier lot starts every 40 min and the old one stops,
slices idle for an hour (``DRIFTLINE_SLICE_RETIRE_AFTER_DAYS``, its shortest) are retired, one
station at a time drifts for half an hour every few hours (alarms, incidents, auto-resolve),
one event in ten gets a late label a few hundred events later, and one in 200 is malformed.
A poller reads the triage API every few seconds.

Every ``--every`` seconds it samples each process's RSS (``/proc/PID/status`` VmRSS; the
driftline processes, the Kafka broker and redis-server), Redis ``INFO memory`` used_memory and
its keys per prefix, the embed and detect groups' lag (end offsets less committed offsets),
the detect checkpoint's lag (end offsets less the offsets stored in Redis), the outbox, change
stream and recent-embeddings lengths and the incidents in the book. The report gives, per
series, the value at the end of the warm-up (the first quarter of the run) and at the end, and
the least-squares slope over the second half with its standard error.

    .venv/bin/python benchmarks/soak.py --minutes 15 --rate 20
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import numpy as np
import redis
from _report import ROOT, RunMeta
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition

from driftline.consumers.kafka_io import ensure_topics
from driftline.localstack import Stack, free_port, start_stack
from driftline.reference.build import build_reference
from driftline.schema import Event

RESULTS = Path(__file__).parent / "results" / "soak.md"
DIM, K_TRUE = 16, 6
STATIONS = tuple(f"st{i:02d}" for i in range(1, 9))
LABELS = ("ok", "scratch", "dent", "stain")
PARTITIONS = 4
LOT_S = 2400.0  # a supplier lot runs 40 min of event time
DRIFT_EVERY_S, DRIFT_FOR_S = 3 * 3600.0, 1800.0  # one station drifts 30 min every 3 h
LATE_LABEL_SHARE, LATE_LABEL_AFTER = 0.1, 300  # events later
MALFORMED_EVERY = 200
EVENTS_TOPIC, UPDATES_TOPIC, DLQ_TOPIC = (
    "driftline.events", "driftline.slice-updates", "driftline.events.dlq")
GROUPS = {"embed": "driftline-embed", "detect": "driftline-detect"}
ROLES = ("embed", "detect", "book", "serve")
MB = 1 << 20
PRED_SERIES = "redis keys dl:pred (late-label cache)"


def note(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def shift_of(t: datetime) -> str:
    """Day 06–14, evening 14–22, night 22–06."""
    return ("night", "day", "evening", "night")[(t.hour + 2) // 8]


# --- the plant -------------------------------------------------------------------------------
class Plant:
    """Precomputed embeddings from K_TRUE cluster centres (one more for drifted events); each
    station has its own cluster mix; predictions follow the cluster, labels mostly agree."""

    def __init__(self, seed: int) -> None:
        rng = np.random.default_rng(7)
        c = rng.normal(size=(K_TRUE + 1, DIM))
        self.centres = c / np.linalg.norm(c, axis=1, keepdims=True)
        base = np.array([0.3, 0.25, 0.2, 0.1, 0.1, 0.05])
        self.mixes = {s: np.roll(base, i) for i, s in enumerate(STATIONS)}
        self.rng = np.random.default_rng(seed)

    def event(self, eid: str, t: datetime, station: str, lot: str, drifted: bool,
              with_label: bool = False) -> dict[str, Any]:
        rng = self.rng
        c = int(rng.choice(K_TRUE, p=self.mixes[station]))
        centre = K_TRUE if drifted and rng.random() < 0.5 else c
        vec = self.centres[centre] + 0.08 * rng.normal(size=DIM)
        pred = LABELS[c % len(LABELS)] if rng.random() < 0.9 else str(rng.choice(LABELS))
        doc: dict[str, Any] = {
            "event_id": eid, "ts": t.isoformat(), "station": station, "shift": shift_of(t),
            "lot": lot, "model_version": "v1",
            "prediction": {"label": pred, "score": round(float(rng.random()), 4)},
            "embedding": [round(float(x), 5) for x in vec]}
        if with_label:
            doc["label"] = self.label_for(pred)
        return doc

    def label_for(self, pred: str) -> str:
        return pred if self.rng.random() < 0.95 else str(self.rng.choice(LABELS))

    def reference(self, out_dir: Path, t0: datetime) -> None:
        """A clean day: 100 labelled events per station and shift."""
        events = []
        for i in range(100 * 3 * len(STATIONS)):
            t = t0 + timedelta(seconds=i * 86400 / (300 * len(STATIONS)))
            events.append(Event.model_validate(
                self.event(f"ref-{i}", t, STATIONS[i % len(STATIONS)], "ref", False, True)))
        build_reference(events, None, out_dir, k=8, min_count=80, source_name="soak plant")


@dataclass
class Feed:
    """Streams the plant at ``rate`` events/s of wall time, event time ``speedup`` × faster."""

    plant: Plant
    bootstrap: str
    rate: float
    speedup: float
    t0: datetime
    sent: dict[str, int] = field(default_factory=lambda: {
        "inference": 0, "late_label": 0, "malformed": 0})
    event_time: datetime | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # reported by the main thread
            self.error = exc

    def _run(self) -> None:
        producer = KafkaProducer(bootstrap_servers=self.bootstrap, acks="all", linger_ms=20)
        late: deque[tuple[int, dict[str, Any]]] = deque()
        dt = self.speedup / self.rate
        start, i = time.monotonic(), 0
        while not self.stop.is_set():
            ahead = start + i / self.rate - time.monotonic()
            if ahead > 0:
                time.sleep(min(ahead, 0.2))
                continue
            t = self.t0 + timedelta(seconds=i * dt)
            elapsed = i * dt
            station = STATIONS[i % len(STATIONS)]
            lot = f"L{int(elapsed // LOT_S):04d}"
            drift_no, drift_at = divmod(elapsed, DRIFT_EVERY_S)
            drifted = (drift_no >= 1 and drift_at < DRIFT_FOR_S
                       and station == STATIONS[int(drift_no) % len(STATIONS)])
            key = station.encode()
            if i % MALFORMED_EVERY == MALFORMED_EVERY - 1:
                value = self._malformed(i, t, station, lot)
                self.sent["malformed"] += 1
            else:
                doc = self.plant.event(f"e{i}", t, station, lot, drifted)
                if self.plant.rng.random() < LATE_LABEL_SHARE:
                    label = self.plant.label_for(doc["prediction"]["label"])
                    late.append((i + LATE_LABEL_AFTER, {
                        k: doc[k] for k in ("event_id", "ts", "station", "shift", "lot")} | {
                        "label": label}))
                value = json.dumps(doc).encode()
                self.sent["inference"] += 1
            producer.send(EVENTS_TOPIC, key=key, value=value)
            while late and late[0][0] <= i:
                label = late.popleft()[1]
                producer.send(EVENTS_TOPIC, key=label["station"].encode(),
                              value=json.dumps(label).encode())
                self.sent["late_label"] += 1
            self.event_time = t
            i += 1
        producer.flush()
        producer.close()

    def _malformed(self, i: int, t: datetime, station: str, lot: str) -> bytes:
        kind = (i // MALFORMED_EVERY) % 3
        if kind == 0:
            return b"{not json " + str(i).encode()
        doc: dict[str, Any] = {"event_id": f"bad{i}", "ts": t.isoformat(), "station": station,
                               "shift": shift_of(t), "lot": lot, "embedding": [0.1] * (DIM + 3)}
        if kind == 2:
            del doc["station"]
            doc["embedding"] = [0.1] * DIM
        return json.dumps(doc).encode()


# --- processes -------------------------------------------------------------------------------
@dataclass
class Proc:
    role: str
    port: int
    popen: subprocess.Popen[bytes]
    log: Path


def start_procs(env: dict[str, str], work: Path) -> dict[str, Proc]:
    procs = {}
    for role in ROLES:
        port = free_port()
        args = (["serve", "--port", str(port)] if role == "serve"
                else ["run", role, "--port", str(port)])
        log = work / f"{role}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(  # noqa: S603 - our own CLI, an argument list
                [sys.executable, "-m", "driftline.cli", *args], env=env, stdout=out,
                stderr=subprocess.STDOUT, cwd=ROOT)
        procs[role] = Proc(role, port, popen, log)
    return procs


def wait_ready(procs: dict[str, Proc], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    for p in procs.values():
        while True:
            if p.popen.poll() is not None:
                raise RuntimeError(f"{p.role} exited {p.popen.returncode}:\n"
                                   f"{p.log.read_text(errors='replace')[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{p.port}/readyz", timeout=2).is_success:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{p.role} not ready after {timeout:.0f} s:\n"
                                   f"{p.log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.5)


def stop_procs(procs: dict[str, Proc]) -> dict[str, int | None]:
    codes: dict[str, int | None] = {}
    for p in procs.values():
        if p.popen.poll() is None:
            p.popen.send_signal(signal.SIGTERM)
    for p in procs.values():
        try:
            codes[p.role] = p.popen.wait(60)
        except subprocess.TimeoutExpired:
            p.popen.kill()
            codes[p.role] = p.popen.wait(10)
    return codes


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return math.nan


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (``/proc/PID/stat``)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return math.nan


def stack_pids(stack: Stack) -> dict[str, int]:
    """The broker's and redis-server's pids, from the pid files the deploy/local scripts
    write."""
    out = {}
    for name, path in (("kafka (JVM)", stack.state_dir / "kafka" / "pid"),
                       ("redis-server", stack.state_dir / "redis" / "pid")):
        with contextlib.suppress(OSError, ValueError):
            out[name] = int(path.read_text().split()[0])
    return out


# --- sampling --------------------------------------------------------------------------------
class Sampler:
    def __init__(self, stack: Stack, procs: dict[str, Proc]) -> None:
        self.r = redis.Redis.from_url(stack.redis_url)
        self.admin = KafkaAdminClient(bootstrap_servers=stack.kafka_bootstrap,
                                      client_id="soak-sampler")
        self.consumer = KafkaConsumer(bootstrap_servers=stack.kafka_bootstrap)
        self.pids = {f"driftline {p.role}": p.popen.pid for p in procs.values()}
        self.pids.update(stack_pids(stack))

    def close(self) -> None:
        self.admin.close()
        self.consumer.close()
        self.r.close()

    def _ends(self, topic: str) -> dict[int, int]:
        parts = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        return {tp.partition: n for tp, n in self.consumer.end_offsets(parts).items()}

    def _lag(self, group: str, topic: str, ends: dict[int, int]) -> int:
        committed = {tp.partition: om.offset for tp, om in
                     self.admin.list_group_offsets(group).get(group, {}).items()
                     if tp.topic == topic}
        return sum(max(0, e - max(committed.get(p, 0), 0)) for p, e in ends.items())

    def _keys(self) -> dict[str, int]:
        """Key counts by prefix: the first three colon-separated parts, digits masked."""
        counts: dict[str, int] = {}
        for key in self.r.scan_iter(count=2000):
            parts = key.decode(errors="replace").split(":")[:3]
            name = ":".join("#" if p.isdigit() else p for p in parts)
            if name.startswith("dl:pred"):
                name = "dl:pred"
            elif name.startswith("dl:book:inc"):
                name = "dl:book:inc"
            elif name.startswith("dl:book:idx"):
                name = "dl:book:idx"
            counts[name] = counts.get(name, 0) + 1
        return counts

    def key_bytes(self, pattern: str, n: int = 200) -> float:
        """Mean ``MEMORY USAGE`` of up to ``n`` keys matching ``pattern``."""
        sizes = []
        for key in self.r.scan_iter(match=pattern, count=1000):
            sizes.append(int(self.r.memory_usage(key, samples=0) or 0))
            if len(sizes) >= n:
                break
        return float(np.mean(sizes)) if sizes else math.nan

    def sample(self) -> dict[str, float]:
        s: dict[str, float] = {f"rss {n} (MB)": rss_mb(pid) for n, pid in self.pids.items()}
        s.update({f"cpu {n} (s)": cpu_s(pid) for n, pid in self.pids.items()})
        info: Any = self.r.info("memory")
        s["redis used_memory (MB)"] = info["used_memory"] / MB
        s["redis used_memory_rss (MB)"] = info["used_memory_rss"] / MB
        aof: Any = self.r.info("persistence")
        s["redis AOF file (MB)"] = float(aof.get("aof_current_size", math.nan)) / MB
        s["redis keys"] = float(self.r.dbsize())
        keys = self._keys()
        s[PRED_SERIES] = float(keys.pop("dl:pred", 0))
        s["redis keys, others"] = float(sum(keys.values()))
        s["_keys"] = keys  # type: ignore[assignment]
        for what, key in (("detect outbox", "dl:detect:outbox"),
                          ("book change stream", "dl:book:changes"),
                          ("recent embeddings", "dl:recent")):
            try:
                s[f"{what} (entries)"] = float(self.r.xlen(key))
            except redis.ResponseError:
                s[f"{what} (entries)"] = 0.0
        s["incidents (all)"] = float(self.r.zcard("dl:book:idx:all"))
        s["incidents active"] = float(self.r.scard("dl:book:active"))
        s["slice summaries (detect)"] = float(self.r.hlen("dl:detect:summary"))
        ev_ends, up_ends = self._ends(EVENTS_TOPIC), self._ends(UPDATES_TOPIC)
        s["lag embed group (events)"] = float(self._lag(GROUPS["embed"], EVENTS_TOPIC, ev_ends))
        s["lag detect group (updates)"] = float(self._lag(GROUPS["detect"], UPDATES_TOPIC,
                                                          up_ends))
        stored = {int(k): int(v) for k, v in self.r.hgetall("dl:detect:offsets").items()}
        s["lag detect checkpoint (updates)"] = float(sum(
            max(0, e - stored.get(p, 0)) for p, e in up_ends.items()))
        return s


class Poller:
    """Reads the triage API as on-call would, every few seconds, until stopped."""

    def __init__(self, base: str) -> None:
        self.base, self.stop = base, threading.Event()
        self.calls, self.errors = 0, 0
        self.last_error = ""

    def _get(self, client: httpx.Client, path: str) -> Any:
        self.calls += 1
        resp = client.get(self.base + path, timeout=30)
        if resp.status_code >= 500 or resp.status_code in (401, 403, 422):
            self.errors += 1
            self.last_error = f"{path}: {resp.status_code} {resp.text[:200]}"
            return None
        if not resp.is_success:
            return None
        return resp.json() if resp.headers.get("content-type", "").startswith(
            "application/json") else resp.text

    def run(self) -> None:
        with httpx.Client() as client:
            n = 0
            while not self.stop.wait(3.0):
                n += 1
                try:
                    self._round(client, n)
                except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
                    self.errors += 1
                    self.last_error = repr(exc)

    def _round(self, client: httpx.Client, n: int) -> None:
        page = self._get(client, "/api/v1/incidents?limit=20")
        items = (page or {}).get("items") or []
        if items:
            inc = items[n % len(items)]["id"]
            self._get(client, f"/api/v1/incidents/{inc}")
            self._get(client, f"/api/v1/incidents/{inc}/evidence")
            if n % 5 == 0:
                self._get(client, f"/api/v1/similar/incidents/{inc}")
        slices = self._get(client, "/api/v1/slices") or []
        if slices:
            sid = quote(slices[n % len(slices)]["slice_id"], safe="")
            self._get(client, f"/api/v1/slices/{sid}")
            self._get(client, f"/api/v1/slices/{sid}/timeline")
        if n % 10 == 0:
            self._get(client, "/api/v1/references")
            self._get(client, "/metrics")


# --- statistics and report -------------------------------------------------------------------
def slope_per_hour(t: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least-squares slope of ``y`` over ``t`` (s), per hour, and its standard error, the
    residuals' lag-1 autocorrelation taken into account (an effective sample size of
    ``n (1 - r) / (1 + r)``; a sawtooth, such as slices retired in sweeps, is far from
    independent noise)."""
    ok = np.isfinite(y)
    t, y = t[ok], y[ok]
    if t.size < 4:
        return math.nan, math.nan
    tc = t - t.mean()
    sxx = float(tc @ tc)
    b = float(tc @ (y - y.mean())) / sxx
    resid = y - y.mean() - b * tc
    ss = float(resid @ resid)
    r = float(resid[1:] @ resid[:-1]) / ss if ss > 0 else 0.0
    inflate = (1 + r) / (1 - r) if 0 < r < 1 else 1.0
    se = math.sqrt(ss / (t.size - 2) / sxx * inflate)
    return b * 3600, se * 3600


@dataclass
class Row:
    name: str
    warm: float
    end: float
    slope: float  # per hour, over the second half
    se: float


def summarise(samples: list[dict[str, Any]], warm_s: float) -> list[Row]:
    t = np.array([s["t"] for s in samples])
    second = t >= t[-1] / 2
    rows = []
    for name in (k for k in samples[-1] if not k.startswith("_") and k != "t"):
        y = np.array([float(s.get(name, math.nan)) for s in samples])
        warm = y[min(int(np.searchsorted(t, warm_s)), y.size - 1)]
        b, se = slope_per_hour(t[second], y[second])
        rows.append(Row(name, float(warm), float(y[-1]), b, se))
    return rows


# What bounds a series that grows by design, for the verdict column.
BOUNDS = {
    PRED_SERIES: "by design: one key per inference event for 7 "
    "days of wall time (PREDICTION_TTL_S); levels off after a week",
    "detect outbox (entries)": "capped (OUTBOX_MAXLEN, approximate trim)",
    "book change stream (entries)": "capped (CHANGES_MAXLEN = 100,000)",
    "incidents (all)": "by design: resolved incidents are kept up to "
    "DRIFTLINE_RETENTION_RESOLVED_COUNT / _DAYS",
    "redis keys, others": "the incidents' records and index keys (`dl:book:inc`, "
    "`dl:book:idx`): the book's retention",
    "rss kafka (JVM) (MB)": "the broker's heap (`-Xmx512m` in deploy/local) filling between "
    "collections, and its page cache; not driftline's",
}


def verdict(row: Row) -> str:
    """flat: slope within 3 standard errors of 0, or under 2 % of the value a day; else
    grows (or falls), with what bounds it if it is a store that grows by design."""
    if not math.isfinite(row.slope):
        return "—"
    if abs(row.slope) <= 3 * row.se:
        return "flat"
    if abs(row.slope) * 24 < 0.02 * max(abs(row.end), 1e-9):
        return "flat (slope significant, < 2 % of the value a day)"
    word = "**grows**" if row.slope > 0 else "falls"
    return f"{word}, {BOUNDS[row.name]}" if row.name in BOUNDS else word


def render(meta: RunMeta, args: argparse.Namespace, samples: list[dict[str, Any]],
           feed: Feed, poller: Poller, codes: dict[str, int | None], env_note: str,
           warm_s: float, extra: list[str]) -> str:
    dur = samples[-1]["t"]
    rows = summarise(samples, warm_s)
    last_keys = samples[-1]["_keys"]
    ev_span = (feed.event_time - feed.t0).total_seconds() / 3600 if feed.event_time else 0.0
    lines = ["# Soak: memory, Redis and lag under a steady stream", "", *meta.lines(), "",
             f"- stream: {args.rate:g} events/s for {dur / 60:.1f} min of wall time "
             f"({feed.sent['inference']:,} inference events, {feed.sent['late_label']:,} late "
             f"labels, {feed.sent['malformed']:,} malformed), event time × {args.speedup:g} "
             f"({ev_span:.1f} h of event time: {len(STATIONS)} stations, 3 shifts of 8 h, a new "
             f"lot every {LOT_S / 60:.0f} min, one station drifting {DRIFT_FOR_S / 60:.0f} min "
             f"every {DRIFT_EVERY_S / 3600:.0f} h)",
             f"- processes: `driftline run embed`, `run detect`, `run book` and `serve`, "
             f"each its own process; {env_note}",
             f"- API: {poller.calls:,} requests, {poller.errors} errors"
             + (f" (last: {poller.last_error})" if poller.errors else ""),
             f"- exit codes at SIGTERM: {codes}",
             f"- sampled every {args.every:g} s ({len(samples)} samples); warm-up: the first "
             f"{warm_s / 60:.1f} min; slope: least squares over the second half "
             f"({dur / 120:.1f} min), per hour of wall time, ± one standard error (widened for "
             "the residuals' autocorrelation); *per day* is that slope × 24, what a month-long "
             "run would see each day if it went on",
             "",
             "| series | at warm-up end | at end | slope, 2nd half (/h) | per day | verdict |",
             "|---|---|---|---|---|---|"]
    cpu = [r for r in rows if r.name.startswith("cpu ")]
    for r in rows:
        if r in cpu:
            continue
        fmt = "{:,.1f}" if "MB" in r.name else "{:,.0f}"
        lines.append(f"| {r.name} | {fmt.format(r.warm)} | {fmt.format(r.end)} | "
                     f"{r.slope:+,.2f} ± {r.se:,.2f} | {r.slope * 24:+,.1f} | {verdict(r)} |")
    lines += ["", "CPU over the second half (% of one core): " + ", ".join(
        f"{r.name[4:-4]} {r.slope / 36:.1f}" for r in cpu), ""]
    lines += extra
    lines += ["", "Redis keys by prefix at the end (digits masked): " + ", ".join(
        f"`{k}` {v}" for k, v in sorted(last_keys.items())), ""]
    lines += ["Samples (every 6th): elapsed min, then the RSS of each driftline process (MB), "
              "Redis used_memory (MB), keys, detect lag:", "", "```"]
    procs = [k for k in samples[0] if k.startswith("rss driftline")]
    for s in samples[::6] + [samples[-1]]:
        lines.append(f"{s['t'] / 60:6.1f}  " + "  ".join(f"{s[p]:7.1f}" for p in procs)
                     + f"  {s['redis used_memory (MB)']:7.2f}  {s['redis keys']:7.0f}"
                     + f"  {s['lag detect group (updates)']:6.0f}")
    lines += ["```", f"(columns: {', '.join(p[4:-5] for p in procs)})", ""]
    return "\n".join(lines)


# --- main ------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=15.0, help="wall time of the stream")
    ap.add_argument("--rate", type=float, default=20.0, help="events/s (wall time)")
    ap.add_argument("--speedup", type=float, default=180.0,
                    help="event-time seconds per wall-clock second")
    ap.add_argument("--every", type=float, default=10.0, help="sample period (s)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--samples", type=Path, help="also write the raw samples (JSON lines)")
    args = ap.parse_args()
    meta = RunMeta()
    dur = args.minutes * 60
    # event time ends an hour before now: the embed stage refuses events dated a day ahead
    t0 = (datetime.now(UTC) - timedelta(seconds=dur * args.speedup + 3600)).replace(
        microsecond=0)
    t0 = t0.replace(hour=6, minute=0, second=0) - timedelta(days=1)
    work = Path(tempfile.mkdtemp(prefix="driftline-soak."))
    plant = Plant(seed=1)
    with start_stack(("kafka", "redis")) as stack:
        note(f"stack: Kafka {stack.kafka_version} at {stack.kafka_bootstrap}, "
             f"Redis at {stack.redis_url}; work dir {work}")
        plant.reference(work / "reference", t0 - timedelta(days=1))
        ensure_topics(stack.kafka_bootstrap, {EVENTS_TOPIC: PARTITIONS,
                                              UPDATES_TOPIC: PARTITIONS, DLQ_TOPIC: 1})
        per_station_rate = args.rate / args.speedup / len(STATIONS)
        settings = {
            "DRIFTLINE_KAFKA_BOOTSTRAP": stack.kafka_bootstrap,
            "DRIFTLINE_REDIS_URL": stack.redis_url,
            "DRIFTLINE_REFERENCE_DIR": str(work / "reference"),
            "DRIFTLINE_TOPIC_PARTITIONS": str(PARTITIONS),
            "DRIFTLINE_SLICE_RETIRE_AFTER_DAYS": f"{1 / 24 + 1e-6:.6f}",
            "DRIFTLINE_BUDGET_EVENT_RATE": f"{per_station_rate:.6g}",
            "DRIFTLINE_BUDGET_SLICES": str(len(STATIONS) * 4),
            "DRIFTLINE_AUTORESOLVE_EVENTS": "200",
            "DRIFTLINE_LOG_FORMAT": "console", "DRIFTLINE_LOG_LEVEL": "WARNING",
            "DRIFTLINE_CACHE_DIR": str(work / "cache"), "DRIFTLINE_ONNX_THREADS": "1",
        }
        env = {k: v for k, v in os.environ.items() if not k.startswith("DRIFTLINE_")}
        env.update(settings)
        env["PYTHONPATH"] = str(ROOT)
        procs = start_procs(env, work)
        sampler: Sampler | None = None
        feed = Feed(plant, stack.kafka_bootstrap, args.rate, args.speedup, t0)
        poller = Poller(f"http://127.0.0.1:{procs['serve'].port}")
        threads = [threading.Thread(target=feed.run, name="feed", daemon=True),
                   threading.Thread(target=poller.run, name="poll", daemon=True)]
        samples: list[dict[str, Any]] = []
        extra: list[str] = []
        codes: dict[str, int | None] = {}
        try:
            wait_ready(procs)
            note("processes ready: " + ", ".join(
                f"{p.role} pid {p.popen.pid} :{p.port}" for p in procs.values()))
            sampler = Sampler(stack, procs)
            for th in threads:
                th.start()
            start = time.monotonic()
            out = args.samples.open("w") if args.samples else None
            for k in _ticks(start, dur, args.every):
                dead = [p.role for p in procs.values() if p.popen.poll() is not None]
                if dead or feed.error:
                    raise RuntimeError(f"died: {dead} feed error: {feed.error!r}")
                s = sampler.sample()
                s["t"] = time.monotonic() - start
                samples.append(s)
                if out:
                    out.write(json.dumps(s) + "\n")
                    out.flush()
                if k % 6 == 0:
                    note(f"{s['t'] / 60:5.1f} min, event time {feed.event_time}: "
                         + ", ".join(f"{n[14:-5]} {s[n]:.0f}" for n in s
                                     if n.startswith("rss driftline"))
                         + f" MB; redis {s['redis used_memory (MB)']:.1f} MB "
                         f"{s['redis keys']:.0f} keys; lag embed "
                         f"{s['lag embed group (events)']:.0f} detect "
                         f"{s['lag detect group (updates)']:.0f}; incidents "
                         f"{s['incidents (all)']:.0f}; api errors {poller.errors}")
            extra = pred_sizing(sampler, samples, feed)
        finally:
            feed.stop.set()
            poller.stop.set()
            for th in threads:
                th.join(30)
            codes = stop_procs(procs)
            if sampler is not None:
                sampler.close()
    env_note = ("settings: " + ", ".join(
        f"`{k}={v}`" for k, v in settings.items()
        if k not in ("DRIFTLINE_KAFKA_BOOTSTRAP", "DRIFTLINE_REDIS_URL",
                     "DRIFTLINE_REFERENCE_DIR", "DRIFTLINE_CACHE_DIR")))
    text = render(meta, args, samples, feed, poller, codes, env_note, warm_s=dur / 4,
                  extra=extra)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    note(f"written to {args.out}; logs in {work}")
    return 0


def pred_sizing(sampler: Sampler, samples: list[dict[str, Any]], feed: Feed) -> list[str]:
    """What the late-label cache (``dl:pred:*``, one key per inference event for 7 days of
    wall time) holds once it levels off, at this run's rate and per event/s of a plant."""
    per_key = sampler.key_bytes("dl:pred:*")
    dur = samples[-1]["t"] - samples[0]["t"]
    keys_per_s = (samples[-1][PRED_SERIES] - samples[0][PRED_SERIES]) / dur
    mem_per_key = ((samples[-1]["redis used_memory (MB)"] - samples[0]["redis used_memory (MB)"])
                   * MB / max(samples[-1]["redis keys"] - samples[0]["redis keys"], 1))
    week = 7 * 86400
    return [
        f"Late-label cache (`dl:pred:*`): {samples[-1][PRED_SERIES]:,.0f}"
        f" keys at the end, {keys_per_s:.1f} a second (one per inference event); `MEMORY USAGE`"
        f" {per_key:.0f} B a key (mean of 200), and Redis's used_memory grew "
        f"{mem_per_key:.0f} B per key added over the run. They expire after 7 days of wall "
        f"time, so the cache levels off at 7 days of events: at this run's rate "
        f"{keys_per_s * week / 1e6:.1f} M keys, {keys_per_s * week * per_key / 1e9:.1f} GB; "
        f"per inference event/s of a plant's stream {week * per_key / 1e6:.0f} MB.", ""]


def _ticks(start: float, dur: float, every: float) -> Iterator[int]:
    k = 0
    while True:
        now = time.monotonic() - start
        if now > dur:
            return
        yield k
        k += 1
        time.sleep(max(0.0, start + k * every - time.monotonic()))


if __name__ == "__main__":
    raise SystemExit(main())
