"""Detect stage CPU per slice-update and per dirty slice, two versions of the code side by side,
and a differential check that they write the same checkpoints.

Each leg runs in a fresh subprocess whose ``PYTHONPATH`` is one checkout (``--old``, ``--new``),
so that both versions measure the same input in one run: the stage built by
``runner.build_detect_stage`` (its ``new_slice`` and ``restore_slice``, the settings' defaults)
with a stand-in Kafka consumer and a stand-in Redis client under the real
:class:`~driftline.consumers.checkpoint.CheckpointStore` — so every step of a checkpoint that
runs in Python (snapshots, gauges, summaries, record encoding, the transaction's calls) is the
stage's own. Updates are applied through ``DetectStage.apply_batch`` in polls of
``MAX_POLL_RECORDS`` and checkpointed every ``--every`` updates (a second's worth at the
stage's measured rate). CPU is the measuring thread's (``time.thread_time``); legs interleave
(old, new, old, new…) and the table gives medians and the median of the per-pair ratios. Also
shown: the time spent in garbage collections (``gc.callbacks``, within both phases) and the
number of full collections.

Streams:

* ``throughput`` — ``pipeline_throughput.plant_updates``: the topic of that benchmark's part 1
  (~1,000 slices, four templates, no drift), its first ``--updates`` updates;
* ``steady`` — ``pipeline_throughput.memory_updates`` with predictions: 2,000 slices, 50
  updates each 300 s apart (every count bucket filled, the ring wrapping), all four detectors.

``--check`` runs instead a stream made to reach every path (drift and its alarms, tallies and
cells, clears, predictions, labels and late labels, missing parts, a slice spread over many
baselines that turns its counts dense, gaps, out-of-order times, duplicates, resets, retirement,
a restore from the records mid-stream) through both versions and compares everything the stage
writes: each checkpoint's Redis calls (state records, summaries, offsets, alarms; bytes) and
the published gauges, and the final snapshots.

    .venv/bin/python benchmarks/detect_cpu.py --old /tmp/old-checkout --check
    .venv/bin/python benchmarks/detect_cpu.py --old /tmp/old-checkout --repeats 5
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PARTITIONS = 4


# --- the stand-ins (child side) ---------------------------------------------------------------
class _Consumer:
    def commit(self, offsets: Any = None) -> None:
        pass

    def commit_async(self, offsets: Any = None) -> None:
        pass

    def close(self, autocommit: bool = False) -> None:
        pass


class _Pipe:
    """What ``CheckpointStore._commit_once`` calls on a pipeline; records the calls."""

    def __init__(self, client: _Redis) -> None:
        self.client = client
        self.calls: list[Any] = []

    def __enter__(self) -> _Pipe:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass

    def watch(self, *keys: str) -> None:
        pass

    def mget(self, keys: list[str]) -> list[bytes | None]:
        return self.client.mget(keys)

    def multi(self) -> None:
        pass

    def hdel(self, key: str, *fields: str) -> None:
        self.calls.append(("hdel", key, sorted(fields)))

    def hset(self, key: str, mapping: dict[str, Any]) -> None:
        self.calls.append(("hset", key, mapping))

    def xadd(self, key: str, fields: dict[str, Any], **kw: Any) -> None:
        self.calls.append(("xadd", key, fields))

    def execute(self) -> list[Any]:
        self.client.executed(self.calls)
        return []


class _Redis:
    """The Redis calls a detect stage makes from its loop (no rebalance): epochs, the control
    stream, the checkpoint transaction. Keeps the last record of every slice (a restore
    reads them) and, when ``record``, every transaction."""

    def __init__(self, record: bool) -> None:
        self.record = record
        self.log: list[Any] = []
        self.state: dict[int, dict[str, bytes]] = {}
        self.control: list[tuple[bytes, dict[bytes, bytes]]] = []

    def mget(self, keys: list[str]) -> list[bytes | None]:
        return [b"1" for _ in keys]

    def pipeline(self, transaction: bool = True) -> _Pipe:
        return _Pipe(self)

    def xrange(self, key: str, min: str = "-", count: int | None = None) -> list[Any]:
        after = tuple(int(x) for x in min.lstrip("(").split("-"))
        return [(eid, f) for eid, f in self.control
                if tuple(int(x) for x in eid.decode().split("-")) > after][:count]

    def executed(self, calls: list[Any]) -> None:
        for call in calls:
            if call[0] == "hset" and ":state:" in call[1]:
                self.state.setdefault(int(call[1].rsplit(":", 1)[1]), {}).update(call[2])
            elif call[0] == "hdel" and ":state:" in call[1]:
                for sid in call[2]:
                    self.state.get(int(call[1].rsplit(":", 1)[1]), {}).pop(sid, None)
        if self.record:
            self.log.append(calls)


def _stage(ref_dir: Path, redis: _Redis, retire_days: float) -> Any:
    from unittest import mock

    from prometheus_client import CollectorRegistry

    from driftline import runner
    from driftline.config import Settings
    from driftline.consumers.checkpoint import CheckpointStore
    from driftline.consumers.detect_stage import PartitionState
    from driftline.reference.index import load_reference

    settings = Settings(reference_dir=ref_dir, detect_group="detect-cpu",
                        slice_retire_after_days=retire_days)
    registry = CollectorRegistry()
    with mock.patch.object(runner, "make_consumer", lambda *a, **k: _Consumer()):
        stage = runner.build_detect_stage(settings, registry, load_reference(ref_dir))
    stage.store = CheckpointStore(redis, prefix="dl:detect")  # type: ignore[arg-type]
    stage.retire_sweep_s = 0.0  # every checkpoint: the same decisions whatever the wall time
    stage.parts = {p: PartitionState(epoch=1, next_offset=None, slices={})
                   for p in range(PARTITIONS)}
    stage._registry = registry
    return stage


def _gauges(stage: Any) -> list[Any]:
    out = []
    for metric in stage._registry.collect():
        for s in metric.samples:
            # every detect metric but the wall-clock ones
            if (s.name.startswith("driftline_detect_") and "age_seconds" not in s.name
                    and "latency" not in s.name and not s.name.endswith("_created")):
                out.append((s.name, tuple(sorted(s.labels.items())), repr(s.value)))
    return sorted(out)


def _polls(stream: list[tuple[int, bytes]], max_records: int) -> list[dict[int, list[Any]]]:
    """The stream as polls: up to ``max_records`` messages each, by partition in offset order."""
    from collections import namedtuple

    msg = namedtuple("msg", "topic partition offset key value timestamp headers")
    offsets = [0] * PARTITIONS
    polls = []
    for i in range(0, len(stream), max_records):
        poll: dict[int, list[Any]] = {}
        for p, value in stream[i:i + max_records]:
            poll.setdefault(p, []).append(msg("t", p, offsets[p], None, value, 0, ()))
            offsets[p] += 1
        polls.append(poll)
    return polls


def child(spec: dict[str, Any]) -> dict[str, Any]:
    from driftline.consumers.checkpoint import decode_record
    from driftline.consumers.detect_stage import MAX_POLL_RECORDS, PartitionState, SliceEntry

    stream = pickle.loads(Path(spec["stream"]).read_bytes())  # noqa: S301 - our own file
    polls = _polls(stream, MAX_POLL_RECORDS)
    check = spec["check"]
    every = spec["every"]
    out: dict[str, Any] = {"passes": []}
    collecting = [0.0, 0.0, 0.0]  # start of the running collection; in collections; full ones

    def on_gc(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            collecting[0] = time.thread_time()
        else:
            collecting[1] += time.thread_time() - collecting[0]
            collecting[2] += info["generation"] == 2

    gc.callbacks.append(on_gc)
    for _ in range(1 if check else spec["passes"] + 1):  # the first pass warms up
        collecting[1:] = [0.0, 0.0]
        redis = _Redis(record=check)
        stage = _stage(Path(spec["reference"]), redis, spec["retire_days"])
        apply_s = ckpt_s = 0.0
        dirty = checkpoints = 0
        since = 0
        gauges = []
        for poll in polls:
            t = time.thread_time()
            for p, msgs in poll.items():
                stage.apply_batch(p, msgs)
            apply_s += time.thread_time() - t
            since += sum(map(len, poll.values()))
            if since < every and poll is not polls[-1]:
                continue
            since = 0
            if check and checkpoints in spec["resets"]:
                for j, sid in enumerate(spec["resets"][checkpoints]):
                    redis.control.append((f"{1000 * checkpoints + j + 1}-0".encode(),
                                          {b"reset": sid.encode()}))
            dirty += sum(len(part.dirty) for part in stage.parts.values())
            t = time.thread_time()
            stage.checkpoint()
            ckpt_s += time.thread_time() - t
            checkpoints += 1
            if check:
                gauges.append(_gauges(stage))
                if checkpoints == spec["restore_at"]:  # as a new owner loads the partitions
                    for p, part in stage.parts.items():
                        stage.parts[p] = PartitionState(
                            part.epoch, part.next_offset, {
                                sid: SliceEntry(stage.restore_slice(rec["state"]), {
                                    int(s): o for s, o in rec["applied"].items()})
                                for sid, raw in redis.state.get(p, {}).items()
                                for rec in [decode_record(raw)]}, part.control_seen)
        out["passes"].append({"apply_s": apply_s, "checkpoint_s": ckpt_s, "dirty": dirty,
                              "checkpoints": checkpoints, "updates": len(stream),
                              "gc_s": collecting[1], "gc_full": int(collecting[2]),
                              "slices": sum(len(p.slices) for p in stage.parts.values())})
        if check:
            out["log"] = redis.log
            out["gauges"] = gauges
            out["alarms"] = sum(1 for calls in redis.log for c in calls if c[0] == "xadd")
    if not check:
        out["passes"] = out["passes"][1:]
    return out


# --- streams (parent side) --------------------------------------------------------------------
def _partition(sid: str) -> int:
    return zlib.crc32(sid.encode()) % PARTITIONS


def throughput_stream(ref: Any, n: int) -> list[tuple[int, bytes]]:
    from pipeline_throughput import plant_updates

    return [(_partition(sid), v) for sid, v in plant_updates(ref, 200_000, 1000)][:n]


def steady_stream(ref: Any, slices: int, per_slice: int) -> list[tuple[int, bytes]]:
    from pipeline_throughput import memory_updates

    return memory_updates(ref, slices, per_slice, 300.0, predictions=True)


def check_reference(out_dir: Path, stations: int = 6, k: int = 8, dim: int = 12,
                    n: int = 6000) -> Any:
    """As ``pipeline_throughput.synthetic_reference`` with predictions, over more stations:
    a baseline per station and shift, ~20 in all, with OOD rates of their own — more than a
    slice's counts keep columns for."""
    import numpy as np
    from pipeline_throughput import SHIFTS, T0, _prediction

    from driftline.reference.build import build_reference
    from driftline.schema import Event

    rng = np.random.default_rng(11)
    preds = np.random.default_rng(12)
    centres = rng.normal(size=(k, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    mixes = rng.dirichlet(np.full(k, 3.0), size=stations)
    events = []
    for i in range(n):
        station = int(rng.integers(stations))
        c = int(rng.choice(k, p=mixes[station]))
        vec = centres[c] + 0.12 * rng.normal(size=dim)
        events.append(Event.model_validate({
            "event_id": f"ref-{i}", "ts": (T0 - timedelta(days=1, seconds=-3 * i)).isoformat(),
            "station": f"s{station + 1}", "shift": SHIFTS[int(rng.integers(3))], "lot": "ref",
            "embedding": vec.tolist(), "prediction": _prediction(preds, c)}))
    return build_reference(events, None, out_dir, k=k, min_count=150)


def check_stream(ref: Any, n_events: int, seed: int = 3) -> tuple[list[tuple[int, bytes]],
                                                                    dict[int, list[str]]]:
    """Updates that reach every path of the stage (see the module docstring), and the resets
    requested before given checkpoints."""
    import numpy as np

    from driftline.schema import SliceUpdate, slice_id

    rng = np.random.default_rng(seed)
    labels = ("ok", "scratch", "dent", "stain", "crack", "chip")
    t0 = datetime(2026, 11, 2, 6, 0, tzinfo=UTC)
    stations = ("s1", "s2", "s3", "s4", "s5", "s6", "s9")  # s9: none of its own (the global)
    src_offsets = [0, 0]
    sent: list[tuple[int, bytes]] = []
    out: list[tuple[int, bytes]] = []
    late: list[dict[str, Any]] = []
    t = 0.0
    for i in range(n_events):
        t += float(rng.exponential(2.0))
        if i == n_events // 3:
            t += 6 * 3600.0  # a gap of hours: onsets after it, buckets dropped
        ts = t0 + timedelta(seconds=t - (30.0 if rng.random() < 0.03 else 0.0))  # out of order
        station = stations[int(rng.integers(len(stations)))]
        # shifts change every 40 minutes; some events come from another shift's line, so that
        # a lot's slice sees a dozen baselines (its counts turn dense)
        shift = ("A", "B", "C")[int(t // 2400 if rng.random() < 0.7 else rng.integers(3)) % 3]
        lot = f"L{i // 400:04d}"  # lots run in sequence, each spread over every station
        base = ref.baseline_for(station, shift)
        p = np.asarray(base.p, float)
        ood_rate = base.ood_rate
        drifting = station == "s2" and 2 * n_events // 5 <= i < 3 * n_events // 5
        if drifting:
            p = 0.5 * p + 0.5 * np.eye(p.size)[0]
            ood_rate = min(0.5, 10 * ood_rate + 0.1)
        cluster: int | None = int(rng.choice(p.size, p=p / p.sum()))
        ood: bool | None = bool(rng.random() < ood_rate)
        distance: float | None = round(float(rng.random()), 5)
        if rng.random() < 0.04:
            ood = None
        if rng.random() < 0.02:
            cluster = distance = None
        label = loss = error = None
        if rng.random() < 0.1:
            label, loss = labels[int(rng.integers(6))], round(float(rng.random()), 4)
            error = bool(rng.random() < (0.3 if drifting else 0.05))
        pred = None
        if rng.random() < 0.8 and cluster is not None:
            lab = "crack" if drifting and rng.random() < 0.5 else labels[
                cluster % 6 if rng.random() < 0.9 else int(rng.integers(6))]
            score = rng.random() * (0.3 if drifting and rng.random() < 0.5 else 1.0)
            pred = {"label": lab, "score": round(float(score), 4)}
        src = int(station[1:]) % 2
        off = src_offsets[src]
        src_offsets[src] += 1
        dims = {"station": station, "shift": shift, "lot": lot}
        for template in ("station", "station+shift", "shift", "lot"):
            sid = slice_id(template, dims)
            fields = dict(slice_id=sid, template=template, event_id=f"ev-{i}", ts=ts,
                          source_partition=src, source_offset=off, baseline=base.key,
                          cluster=cluster, distance=distance, ood=ood,
                          model_version=("v1", "v2")[i // 3000 % 2], prediction=pred,
                          label=label, loss=loss, error=error,
                          reference_id=ref.reference_id if i % 7 else None, **dims)
            value = SliceUpdate.model_validate(fields).model_dump_json().encode()
            out.append((_partition(sid), value))
            sent.append((_partition(sid), value))
            if rng.random() < 0.02:
                late.append({**fields, "late_label": True, "distance": None,
                             "label": labels[int(rng.integers(6))], "error": bool(
                                 rng.random() < 0.2), "prediction": None})
        if late and rng.random() < 0.3:
            upd = SliceUpdate.model_validate(late.pop(0)).model_dump_json().encode()
            out.append((_partition(json.loads(upd)["slice_id"]), upd))
        if sent and rng.random() < 0.01:  # a replay of the embed stage: a duplicate
            out.append(sent[int(rng.integers(len(sent)))])
    resets = {4: [slice_id("station", {"station": "s2"}),
                  slice_id("shift", {"shift": "A"})],
              12: [slice_id("station+shift", {"station": "s2", "shift": "B"})]}
    return out, resets


# --- parent -----------------------------------------------------------------------------------
def run_child(tree: Path, spec: dict[str, Any]) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run(  # noqa: S603 - this script, an argument list
        [sys.executable, __file__, "--child", json.dumps(spec)], env=env,
        capture_output=True, check=False, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"child ({tree}) failed:\n{done.stderr.decode()[-3000:]}")
    result: dict[str, Any] = pickle.loads(Path(spec["out"]).read_bytes())  # noqa: S301
    return result


def _diff(a: Any, b: Any, where: str = "") -> str | None:
    """Where ``a`` and ``b`` first differ (None: equal; bytes compared as bytes)."""
    if type(a) is not type(b):
        return f"{where}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, dict):
        if sorted(a) != sorted(b):
            return f"{where}: keys {sorted(set(a) ^ set(b))[:5]}"
        for k in a:
            if (d := _diff(a[k], b[k], f"{where}/{k}")) is not None:
                return d
        return None
    if isinstance(a, list | tuple):
        if len(a) != len(b):
            return f"{where}: length {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            if (d := _diff(x, y, f"{where}[{i}]")) is not None:
                return d
        return None
    if a != b and not (isinstance(a, float) and math.isnan(a) and math.isnan(b)):
        return f"{where}: {str(a)[:200]!r} vs {str(b)[:200]!r}"
    return None


def _counted(result: dict[str, Any]) -> list[dict[str, Any]]:
    return [{k: v for k, v in p.items() if not k.endswith("_s") and not k.startswith("gc")}
            for p in result["passes"]]


def check(old: Path, new: Path, work: Path, ref_dir: Path, events: int) -> list[str]:
    from driftline.reference.index import load_reference

    stream, resets = check_stream(load_reference(ref_dir), events)
    path = work / "check.pickle"
    path.write_bytes(pickle.dumps(stream))
    spec = {"stream": str(path), "reference": str(ref_dir), "check": True, "every": 2000,
            "retire_days": 0.05, "resets": resets, "restore_at": 9}
    got = {}
    for name, tree in (("old", old), ("new", new)):
        got[name] = run_child(tree, {**spec, "out": str(work / f"check-{name}.pickle")})
    a, b = got["old"], got["new"]
    calls = sum(len(c) for c in a["log"])
    records = sum(len(c[2]) for calls_ in a["log"] for c in calls_ if c[0] == "hset"
                  and ":state:" in c[1])
    diff = (_diff(a["log"], b["log"], "redis") or _diff(a["gauges"], b["gauges"], "gauges")
            or _diff(_counted(a), _counted(b), "passes"))
    lines = [f"- stream: {len(stream):,} updates ({events:,} events), "
             f"{a['passes'][0]['checkpoints']} checkpoints, {a['passes'][0]['slices']} slices "
             f"live at the end; {records:,} state records, {calls:,} Redis calls in all, "
             f"{a['alarms']} alarm/update/clear messages, restored from the records after "
             f"checkpoint {spec['restore_at']}",
             "- result: " + ("**identical** (every Redis call's arguments, bytes for bytes, and "
                             "every gauge sample after every checkpoint)"
                             if diff is None else f"**DIFFERENT** at {diff}")]
    return lines


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "–"


def bench(old: Path, new: Path, work: Path, refs: dict[str, Path], repeats: int,
          updates: int, every: int) -> tuple[list[str], dict[str, Any]]:
    from driftline.reference.index import load_reference

    streams = {"throughput": (throughput_stream(load_reference(refs["plain"]), updates),
                              refs["plain"]),
               "steady": (steady_stream(load_reference(refs["predictions"]), 2000, 50),
                          refs["predictions"])}
    rows: list[str] = []
    figures: dict[str, Any] = {}
    for name, (stream, ref_dir) in streams.items():
        path = work / f"{name}.pickle"
        path.write_bytes(pickle.dumps(stream))
        spec = {"stream": str(path), "reference": str(ref_dir), "check": False,
                "every": every, "retire_days": 14.0, "passes": 1, "resets": {},
                "restore_at": -1}
        legs: dict[str, list[dict[str, Any]]] = {"old": [], "new": []}
        for r in range(repeats):
            for leg, tree in (("old", old), ("new", new))[:: 1 if r % 2 == 0 else -1]:
                res = run_child(tree, {**spec, "out": str(work / f"{name}-{leg}.pickle")})
                legs[leg].extend(res["passes"])
                print(f"{name} {leg} {r}: {res['passes']}", file=sys.stderr)
        per = {leg: {"apply": [1e6 * p["apply_s"] / p["updates"] for p in ps],
                     "ckpt": [1e6 * p["checkpoint_s"] / max(1, p["dirty"]) for p in ps],
                     "ckpt_u": [1e6 * p["checkpoint_s"] / p["updates"] for p in ps],
                     "total": [1e6 * (p["apply_s"] + p["checkpoint_s"]) / p["updates"]
                               for p in ps],
                     "gc": [1e6 * p["gc_s"] / p["updates"] for p in ps],
                     "gc_full": [float(p["gc_full"]) for p in ps]} for leg, ps in legs.items()}
        p0 = legs["old"][0]
        figures[name] = per
        label = {"apply": "apply_batch, µs/update", "ckpt": "checkpoint, µs/dirty slice",
                 "ckpt_u": "checkpoint, µs/update", "total": "apply + checkpoint, µs/update",
                 "gc": "of which in garbage collections, µs/update",
                 "gc_full": "full (generation 2) collections per pass"}
        rows.append(f"| **{name}**: {p0['updates']:,} updates, {p0['slices']:,} slices, "
                    f"{p0['checkpoints']} checkpoints, {p0['dirty'] / p0['checkpoints']:,.0f} "
                    "dirty slices each | | | | |")
        for key, text in label.items():
            o, n = per["old"][key], per["new"][key]
            paired = statistics.median(b / a if a else math.nan
                                       for a, b in zip(o, n, strict=True))
            rows.append(f"| {text} | {statistics.median(o):.1f} ({min(o):.1f}–{max(o):.1f}) "
                        f"| {statistics.median(n):.1f} ({min(n):.1f}–{max(n):.1f}) | "
                        f"{_ratio(statistics.median(n), statistics.median(o))} | {paired:.2f} |")
    head = ["| measure | old, median (min–max) | new, median (min–max) | new / old | "
            "paired |", "|---|---|---|---|---|"]
    return head + rows, figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", type=Path, help="checkout of the code to compare against")
    parser.add_argument("--new", type=Path, default=HERE.parent)
    parser.add_argument("--check", action="store_true", help="the differential check only")
    parser.add_argument("--events", type=int, default=20_000, help="events in --check's stream")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--updates", type=int, default=60_000)
    parser.add_argument("--every", type=int, default=7_500,
                        help="updates between checkpoints (a second's worth)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import logging

        logging.basicConfig(level=logging.ERROR)
        spec = json.loads(args.child)
        spec["resets"] = {int(k): v for k, v in spec["resets"].items()}
        Path(spec["out"]).write_bytes(pickle.dumps(child(spec)))
        return
    if args.old is None:
        parser.error("--old is required")
    sys.path.insert(0, str(HERE))
    from pipeline_throughput import synthetic_reference

    started = time.perf_counter()
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="detect-cpu.") as tmp:
        work = Path(tmp)
        refs = {"plain": work / "reference", "predictions": work / "reference-predictions"}
        check_reference(work / "reference-check")
        lines = ["## Differential check", ""]
        lines += check(args.old, args.new, work, work / "reference-check", args.events)
        if not args.check:
            synthetic_reference(refs["plain"])
            synthetic_reference(refs["predictions"], predictions=True)
            table, _ = bench(args.old, args.new, work, refs, args.repeats, args.updates,
                             args.every)
            lines += ["", "## CPU", "", *table]
    print(f"- runtime {(time.perf_counter() - started) / 60:.1f} min, load average at start "
          f"{'/'.join(f'{x:.2f}' for x in load0)}, at end "
          f"{'/'.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
