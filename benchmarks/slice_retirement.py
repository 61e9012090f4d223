"""What slice retirement costs the detect stage, and what it saves.

1. **Sweep**: one scan of a partition holding 10,000 slices (the DESIGN §7 scale), when none is
   idle (every sweep in steady state) and when all are (the first sweep after upgrading a worker
   that held every lot it ever saw); the stage sweeps a partition at most every
   ``RETIRE_SWEEP_S`` of wall time, so the first figure is divided by that period too.
2. **Hot path**: ``apply_batch`` per update over slices that are not idle, retirement on and off
   (interleaved repeats, medians): the check an update pays is two attribute reads and compares.
3. **Held slices**: 60 days of 50 new lots a day (one lot slice each, 20 events over its day),
   through the stage's own apply path and checkpoints, retirement off and at 14 days.
4. **Redis** (``--redis URL``, or a Redis of its own from ``deploy/local``): one checkpoint
   transaction deleting the state and summary fields of 3,000 retired slices against one that
   deletes none.

    .venv/bin/python benchmarks/slice_retirement.py   # ~1.5 min; results/slice_retirement.md
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import time
import timeit
import tracemalloc
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from prometheus_client import CollectorRegistry

from driftline.consumers.checkpoint import CheckpointStore, store_client
from driftline.consumers.detect_stage import RETIRE_SWEEP_S, DetectStage, PartitionState
from driftline.consumers.slice_state import SliceState, UpdateView
from driftline.core.baselines import DetectorBaseline
from driftline.core.slices import SliceDetectors
from driftline.metrics import ConsumerMetrics, DetectMetrics
from driftline.schema import SliceUpdate

DAY = 86400.0
T0 = datetime(2026, 11, 2, 6, 0, tzinfo=UTC)
K = 16
LINES: list[str] = []


def say(line: str) -> None:
    print(line, flush=True)
    LINES.append(line)


class Msg(NamedTuple):
    partition: int
    offset: int
    value: bytes
    timestamp: int = 0
    headers: tuple[tuple[str, bytes], ...] = ()


class Baselines:
    reference_id = "bench"

    def __init__(self) -> None:
        self.p = np.full(K, 1 / K)
        self.exact = DetectorBaseline.exact(self.p, 0.01)

    def cluster_mix(self, key: str) -> np.ndarray:
        return self.p

    def ood_rate(self, key: str) -> float:
        return 0.01

    def detector_baseline(self, key: str) -> DetectorBaseline:
        return self.exact

    def expected_error(self, cluster: int) -> float | None:
        return None


class NullStore:
    """A store that accepts every checkpoint (the Redis write is part 4's business)."""

    wait_s = 1.0
    waiting_at_most = staticmethod(CheckpointStore.waiting_at_most)

    def control_after(self, after: str) -> list[tuple[str, str]]:
        return []

    def commit(self, *args: Any) -> None:
        pass


class NullConsumer:
    def commit(self, offsets: Any) -> None:
        pass


def stage(retire_days: float) -> DetectStage:
    baselines = Baselines()

    def new_slice(u: UpdateView) -> SliceState:
        return SliceState(u.slice_id, u.template, SliceDetectors(arl0=1e6), baselines, 500)

    reg = CollectorRegistry()
    s = DetectStage(NullConsumer(), "t", NullStore(), new_slice,  # type: ignore[arg-type]
                    lambda snap: SliceState.restore(snap, baselines, 500), DetectMetrics(reg),
                    ConsumerMetrics(reg), retire_after_s=retire_days * DAY, retire_sweep_s=0.0)
    s.parts = {0: PartitionState(epoch=1, next_offset=None, slices={})}
    return s


def update(offset: int, lot: str, t: datetime, rng: np.random.Generator) -> Msg:
    upd = SliceUpdate(slice_id=f"lot={lot}", template="lot", event_id=f"e{offset}", ts=t,
                      source_partition=0, source_offset=offset, station="s1", shift="A",
                      lot=lot, baseline="s1", cluster=int(rng.integers(K)),
                      distance=float(rng.random()), ood=bool(rng.random() < 0.01))
    return Msg(0, offset, upd.model_dump_json().encode())


def fill(s: DetectStage, n: int, per_slice: int, day: float) -> int:
    """``n`` lot slices with ``per_slice`` updates each around ``day``; returns the offset."""
    rng = np.random.default_rng(7)
    offset = s.parts[0].next_offset or 0
    for j in range(per_slice):
        s.apply_batch(0, [update(offset + i, f"L{i}", T0 + timedelta(days=day, seconds=j * n + i),
                                 rng) for i in range(n)])
        offset += n
    return offset


def sweep_cost(n: int) -> None:
    s = stage(14.0)
    fill(s, n, 3, 0.0)
    part = s.parts[0]
    runs = []
    for _ in range(21):
        part.swept_at = -np.inf
        t = time.perf_counter()
        s._sweep()
        runs.append(time.perf_counter() - t)
    assert len(part.slices) == n and not part.retired
    idle_ms = statistics.median(runs) * 1e3
    say(f"sweep of {n:,} slices, none idle: {idle_ms:.2f} ms (median of 21); "
          f"swept every {RETIRE_SWEEP_S:.0f} s: {idle_ms / RETIRE_SWEEP_S * 1e3:.2f} µs per s "
          f"of wall time, {idle_ms / RETIRE_SWEEP_S / 10:.5f} % of one core (every 1-s "
          f"checkpoint: {idle_ms / 10:.3f} %)")
    part.cutoff = np.inf  # every slice idle: the first sweep after an upgrade
    t = time.perf_counter()
    s._sweep()
    gone = [sid for sid in part.retired if sid not in part.slices]
    all_ms = (time.perf_counter() - t) * 1e3
    say(f"sweep of {n:,} slices, all idle (moved out, deletion list built): {all_ms:.2f} ms "
          f"({len(gone):,} retired)")


def hot_path(n_slices: int, n_updates: int, repeats: int) -> None:
    rng = np.random.default_rng(3)
    msgs = [update(o, f"L{o % n_slices}", T0 + timedelta(seconds=o), rng)
            for o in range(n_updates)]
    per: dict[str, list[float]] = {"off": [], "on": []}
    for _ in range(repeats):
        for name, days in (("off", 0.0), ("on", 14.0)):
            s = stage(days)
            s.apply_batch(0, msgs[:n_slices])  # create them: not timed
            t = time.process_time()
            for i in range(n_slices, n_updates, 2000):
                s.apply_batch(0, msgs[i:i + 2000])
            per[name].append((time.process_time() - t) / (n_updates - n_slices) * 1e6)
    off, on = min(per["off"]), min(per["on"])
    say(f"apply_batch, {n_slices:,} slices, {n_updates - n_slices:,} updates x {repeats}, CPU "
        f"time, best run: retirement off {off:.2f} µs/update, on {on:.2f} (on/off "
        f"{on / off:.3f}; runs off {[round(x, 1) for x in per['off']]}, "
        f"on {[round(x, 1) for x in per['on']]})")
    # what an update pays for retirement, whether on or off: the two checks ``_apply`` adds
    # (copied here from it), on the stage's own objects, against the lookup alone
    s = stage(14.0)
    s.apply_batch(0, msgs[:10])
    part, ra, sid = s.parts[0], s.retire_after_s, "lot=L3"

    def lookup() -> None:
        entry = part.slices.get(sid)
        if entry is None:
            raise AssertionError

    def checked() -> None:
        entry = part.slices.get(sid)
        if entry is None or (((last := entry.model.last_time) is None or last < part.cutoff)
                             and ra > 0 and not entry.model.open):
            raise AssertionError
        if (last := entry.model.last_time) is not None and last > part.newest:
            raise AssertionError

    n = 1_000_000
    base = min(timeit.repeat(lookup, number=n, repeat=7)) / n * 1e9
    added = min(timeit.repeat(checked, number=n, repeat=7)) / n * 1e9 - base
    say(f"the per-update checks: {added:.0f} ns (best of 7 x 1,000,000), "
        f"{added / 1e3 / off * 100:.2f} % of the best apply_batch time per update above")


def held(days: int, lots_per_day: int, events_per_lot: int) -> None:
    rng = np.random.default_rng(11)
    for retire in (0.0, 14.0):
        s = stage(retire)
        s.retire_sweep_s = 0.0
        offset = 0
        tracemalloc.start()
        for d in range(days):
            batch = []
            for e in range(events_per_lot):
                for k in range(lots_per_day):
                    t = T0 + timedelta(days=d, seconds=(e * lots_per_day + k) * 60)
                    batch.append(update(offset, f"D{d}-L{k}", t, rng))
                    offset += 1
            s.apply_batch(0, batch)
            s.checkpoint()  # one a day of event time is enough to sweep (interval 0 here)
        mem = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        retired = sum(x.value for m in s.metrics.retired.collect() for x in m.samples
                      if x.name.endswith("_total"))
        say(f"{days} days x {lots_per_day} lots/day, retirement "
              f"{'off' if not retire else f'{retire:.0f} days'}: {len(s.parts[0].slices):,} "
              f"slices held, {retired:,.0f} retired, {mem / 2**20:.1f} MiB traced")


@contextlib.contextmanager
def redis_url(url: str | None) -> Iterator[str]:
    if url:
        yield url
        return
    from driftline.localstack import start_stack

    with start_stack(["redis"]) as own:
        yield own.redis_url


def redis_cost(url: str, n: int) -> None:
    store = CheckpointStore(store_client(url), prefix="dl:bench-retire")
    store.reset()
    try:
        epochs = store.claim([0])
        record = {"state": {"x": 1}, "applied": {0: 1}}
        summary = {"template": "lot", "dims": {"lot": "x"}, "n": 1}
        sids = [f"lot=L{i}" for i in range(n)]
        runs: dict[str, list[float]] = {"none": [], "all": []}
        for _ in range(7):
            store.commit(epochs, {0: dict.fromkeys(sids, record)}, {0: 1},
                         summaries=dict.fromkeys(sids, summary))
            for name, gone in (("none", []), ("all", sids)):
                t = time.perf_counter()
                store.commit(epochs, {0: {}}, {0: 2}, retired={0: gone})
                runs[name].append((time.perf_counter() - t) * 1e3)
        assert not store.r.hlen(store._k("state", 0))
        say(f"checkpoint transaction, Redis: deleting {n:,} slices' state and summary fields "
              f"{statistics.median(runs['all']):.2f} ms, deleting none "
              f"{statistics.median(runs['none']):.2f} ms (medians of 7)")
    finally:
        store.reset()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slices", type=int, default=10_000)
    ap.add_argument("--redis", help="a Redis URL (default: start one from deploy/local)")
    ap.add_argument("--no-redis", action="store_true")
    args = ap.parse_args()
    started, load = datetime.now(UTC), os.getloadavg()
    sweep_cost(args.slices)
    hot_path(1000, 101_000, 5)
    held(60, 50, 20)
    if not args.no_redis:
        with redis_url(args.redis) as url:
            redis_cost(url, 3000)
    end = os.getloadavg()
    out = Path(__file__).parent / "results" / "slice_retirement.md"
    out.write_text("\n".join([
        "# Slice retirement: cost and effect", "",
        f"- date: {started.isoformat(timespec='seconds')}",
        f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}; load average (1/5/15 min) at start "
        f"{'/'.join(f'{x:.2f}' for x in load)}, at end {'/'.join(f'{x:.2f}' for x in end)}",
        "- command: `.venv/bin/python benchmarks/slice_retirement.py`", "",
        *(f"- {line}" for line in LINES), ""]))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
