"""SliceCounts' compact ring: per-baseline and dense forms, merges, drops, snapshots."""

from __future__ import annotations

import json
import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from driftline.core.counts import SliceCounts
from driftline.core.snapshot import pack, plain, unpack

K = 4
RNG = np.random.default_rng(3)
POOL = [RNG.dirichlet(np.ones(K)) for _ in range(12)]  # 12 + 12 rates > 2(K+1): goes dense
RATES = [0.01 * (i + 1) for i in range(12)]

events = st.lists(
    st.tuples(st.integers(0, K - 1), st.integers(0, 11), st.booleans(),
              st.floats(0.0, 3000.0), st.booleans(), st.sampled_from(["both", "mix", "ood"])),
    min_size=1, max_size=150)


def _feed(c: SliceCounts, ev: tuple[int, int, bool, float, bool, str]) -> None:
    cl, b, ood, t, _, parts = ev
    c.update(cl if parts != "ood" else None, POOL[b] if parts != "ood" else None,
             ood=ood if parts != "mix" else None, ood_p0=RATES[b] if parts != "mix" else None,
             time=t)


@settings(max_examples=80, deadline=None)
@given(evs=events, since=st.floats(-10.0, 3000.0), pools=st.integers(1, 12))
def test_merged_counts_match_numpy_in_both_forms(
    evs: list[tuple[int, int, bool, float, bool, str]], since: float, pools: int
) -> None:
    evs = [(c, b % pools, o, t, a, parts) for c, b, o, t, a, parts in evs]
    width = 100.0
    a, b = SliceCounts(K, width, max_buckets=100), SliceCounts(K, width, max_buckets=100)
    for ev in evs:
        _feed(a if ev[4] else b, ev)
    merged = SliceCounts.restore(unpack(pack(a.snapshot()))).merge(
        SliceCounts.restore(json.loads(json.dumps(plain(b.snapshot())))))
    got = merged.since(since)
    keep = [e for e in evs if math.floor(e[3] / width) >= math.floor(since / width)]
    mix = [e for e in keep if e[5] != "ood"]
    ood = [e for e in keep if e[5] != "mix"]
    assert got.n == len(mix) and got.n_ood == len(ood)
    assert got.clusters == np.bincount([e[0] for e in mix], minlength=K).tolist()
    assert got.ood == sum(e[2] for e in ood)
    np.testing.assert_allclose(got.expected, np.sum([POOL[e[1]] for e in mix], axis=0)
                               if mix else np.zeros(K), atol=1e-9)
    assert math.isclose(got.ood_expected, sum(RATES[e[1]] for e in ood), abs_tol=1e-9)
    assert not got.truncated and merged.since(None).n == sum(e[5] != "ood" for e in evs)


def test_few_baselines_stay_integer_columns_many_turn_dense() -> None:
    c = SliceCounts(K, 60.0)
    for i in range(200):
        c.update(i % K, POOL[i % 2], ood=i % 7 == 0, ood_p0=RATES[i % 2], time=float(i))
    snap = c.snapshot()
    assert snap["expected"] is None and snap["per_baseline"].shape == (4, 2)
    assert snap["per_baseline"].dtype == np.int32 and snap["counts"].dtype == np.int32
    before = c.since(None)
    for i in range(200, 400):
        c.update(i % K, POOL[i % 12], ood=False, ood_p0=RATES[i % 12], time=float(i))
    snap = c.snapshot()
    assert snap["expected"] is not None and snap["per_baseline"].shape == (7, 1)
    first = c.since(0.0)
    assert first.n == 400 and first.clusters[:] == [100] * K
    np.testing.assert_allclose(c.since(None).expected, 100 * (POOL[0] + POOL[1]) + sum(
        POOL[i % 12] for i in range(200, 400)), atol=1e-9)
    assert before.n == 200


def test_full_ring_drops_oldest_and_late_events_go_to_the_totals() -> None:
    c = SliceCounts(2, bucket_seconds=10.0, max_buckets=3)
    p = np.array([0.25, 0.75])
    for t in range(100):
        c.update(t % 2, p, ood=None, ood_p0=None, time=float(t))
    c.update(0, p, ood=True, ood_p0=0.5, time=5.0)  # far older than the ring: dropped totals
    assert c.bucket_keys() == [7, 8, 9]
    assert c.since(70.0).n == 30 and not c.since(70.0).truncated
    assert c.since(0.0).truncated
    everything = c.since(None)
    assert everything.n == 101 and everything.n_ood == 1 and everything.ood == 1
    np.testing.assert_allclose(everything.expected, 101 * p)
    again = SliceCounts.restore(unpack(pack(c.snapshot())))
    assert again.since(None) == everything and again.since(0.0) == c.since(0.0)


def test_restores_v1_json_snapshots() -> None:
    v1 = {"n_clusters": 2, "bucket_seconds": 60.0, "max_buckets": 48,
          "buckets": [[1, [3.0, 2.0, 1.0, 0.02, 2.0, 1.0, 1.5, 1.5]],
                      [0, [1.0, 1.0, 0.0, 0.01, 0.0, 1.0, 0.5, 0.5]]],
          "dropped": [0.0] * 8, "dropped_until": None}
    c = SliceCounts.restore(v1)
    got = c.since(None)
    assert (got.n, got.n_ood, got.ood, got.clusters) == (4, 3, 1, [2, 2])
    assert got.expected == [2.0, 2.0] and math.isclose(got.ood_expected, 0.03)
    assert c.bucket_keys() == [0, 1] and c.since(60.0).n == 3
    c.update(1, np.array([0.5, 0.5]), ood=False, ood_p0=0.01, time=70.0)
    assert c.since(60.0).n == 4


@settings(max_examples=80, deadline=None)
@given(evs=events, since=st.floats(-10.0, 3000.0), pools=st.integers(1, 12),
       buckets=st.integers(1, 40))
def test_since_equals_the_totals_path_bit_for_bit(
    evs: list[tuple[int, int, bool, float, bool, str]], since: float, pools: int, buckets: int
) -> None:
    """since()'s lean path for per-baseline rings gives what the general _totals path gives."""
    c = SliceCounts(K, 100.0, max_buckets=buckets)
    for ev in evs:
        _feed(c, (ev[0], ev[1] % pools, *ev[2:]))
        for t in (since, None):
            got = c.since(t)
            first = None if t is None else math.floor(t / c.bucket_seconds)
            want = c._since_totals(first, got.truncated)
            assert got == want
            assert [type(x) for x in got.clusters + got.expected] == [
                type(x) for x in want.clusters + want.expected]
            assert [math.copysign(1.0, x) for x in got.expected] == [
                math.copysign(1.0, x) for x in want.expected]


def _want(evs: list[tuple[int, int, bool, float, bool, str]]) -> tuple[int, int, list[int], int,
                                                                      np.ndarray, float]:
    mix = [e for e in evs if e[5] != "ood"]
    ood = [e for e in evs if e[5] != "mix"]
    return (len(mix), len(ood), np.bincount([e[0] for e in mix], minlength=K).tolist(),
            sum(e[2] for e in ood),
            np.sum([POOL[e[1]] for e in mix], axis=0) if mix else np.zeros(K),
            sum(RATES[e[1]] for e in ood))


@settings(max_examples=80, deadline=None)
@given(evs=events, cut=st.integers(0, 150), after=st.floats(-10.0, 3000.0),
       pools=st.integers(1, 12), buckets=st.integers(1, 40), at=st.integers(0, 150))
def test_a_tally_holds_its_seed_buckets_and_every_later_event(
    evs: list[tuple[int, int, bool, float, bool, str]], cut: int, after: float, pools: int,
    buckets: int, at: int
) -> None:
    """Seeded with the buckets after ``after``'s, then every event exactly — across new
    baseline columns, the ring turning dense and dropping buckets, and a snapshot round trip
    (binary or JSON) at any point — against numpy on the same events."""
    evs = [(c, b % pools, o, t, a, parts) for c, b, o, t, a, parts in evs]
    width = 100.0
    c = SliceCounts(K, width, max_buckets=buckets)
    for ev in evs[:cut]:
        _feed(c, ev)
    held = set(c.bucket_keys())
    seed = [e for e in evs[:cut]
            if math.floor(e[3] / width) > math.floor(after / width)
            and math.floor(e[3] / width) in held]
    truncated = c._dropped_until is not None and c._dropped_until > math.floor(after / width)
    c.start_tally("a", after=after)
    for i, ev in enumerate(evs[cut:]):
        if i == at:
            snap = c.snapshot()
            c = SliceCounts.restore(unpack(pack(snap)) if at % 2 else json.loads(
                json.dumps(plain(snap))))
        _feed(c, ev)
    got = c.tally("a")
    assert got is not None and c.tallies == ("a",)
    n, n_ood, clusters, hits, expected, ood_expected = _want(seed + evs[cut:])
    assert (got.n, got.n_ood, got.clusters, got.ood) == (n, n_ood, clusters, hits)
    np.testing.assert_allclose(got.expected, expected, atol=1e-9)
    assert math.isclose(got.ood_expected, ood_expected, abs_tol=1e-9)
    assert got.truncated == truncated
    c.stop_tally("a")
    assert c.tally("a") is None and c.tallies == ()


@settings(max_examples=80, deadline=None)
@given(evs=events, cut=st.integers(0, 150), since=st.integers(0, 150), pools=st.integers(1, 12),
       snap=st.booleans())
def test_a_tally_from_an_arrival_holds_no_event_read_before_it(
    evs: list[tuple[int, int, bool, float, bool, str]], cut: int, since: int, pools: int,
    snap: bool
) -> None:
    """Event times in any order (a slice reading several stations' partitions in turns):
    seeded from arrival ``since``, a tally holds the buckets whose first event arrived then or
    later — none read before — and every later event, against numpy; so it never holds more
    events than arrived since. Seeding by event time counted events read before the onset but
    stamped after its bucket. The first arrivals round-trip through a snapshot."""
    evs = [(c, b % pools, o, t, a, parts) for c, b, o, t, a, parts in evs]
    width = 100.0
    c = SliceCounts(K, width, max_buckets=100)  # 31 buckets of 3,000 s: none dropped
    for i, (cl, b, ood, t, _, parts) in enumerate(evs[:cut]):
        c.update(cl if parts != "ood" else None, POOL[b] if parts != "ood" else None,
                 ood=ood if parts != "mix" else None, ood_p0=RATES[b] if parts != "mix" else None,
                 time=t, index=i)
    if snap:
        c = SliceCounts.restore(unpack(pack(c.snapshot())))
    first: dict[int, int] = {}
    for i, e in enumerate(evs[:cut]):
        first.setdefault(math.floor(e[3] / width), i)
    seed = [e for e in evs[:cut] if first[math.floor(e[3] / width)] >= since]
    keys = c.start_tally("a", after=0.0, since=since)
    assert keys == {k for k, i in first.items() if i >= since}
    for ev in evs[cut:]:
        _feed(c, ev)
    got = c.tally("a")
    assert got is not None
    n, n_ood, clusters, hits, expected, ood_expected = _want(seed + evs[cut:])
    assert (got.n, got.n_ood, got.clusters, got.ood) == (n, n_ood, clusters, hits)
    np.testing.assert_allclose(got.expected, expected, atol=1e-9)
    assert math.isclose(got.ood_expected, ood_expected, abs_tol=1e-9)
    assert len(seed) <= max(cut - since, 0)


def test_rows_of_unknown_arrival_never_seed_a_tally_from_an_arrival() -> None:
    """A snapshot written before first arrivals were recorded, and rows merged from another
    worker (whose arrivals count other events): their events are not known to be from the
    onset on, so a tally from an arrival leaves them out (the caller reports them missed)."""
    p = np.full(K, 1 / K)
    c = SliceCounts(K, 60.0)
    c.update(1, p, ood=True, ood_p0=0.01, time=0.0, index=0)
    c.update(1, p, ood=True, ood_p0=0.01, time=60.0, index=1)
    snap = c.snapshot()
    del snap["first_arrival"]
    old = SliceCounts.restore(snap)
    assert old.start_tally("a", after=0.0, since=0) == frozenset()
    assert old.tally("a").n == 0  # type: ignore[union-attr]
    assert c.start_tally("a", after=0.0, since=1) == {1}
    other = SliceCounts(K, 60.0)
    other.update(2, p, ood=False, ood_p0=0.01, time=60.0, index=5)
    other.update(2, p, ood=False, ood_p0=0.01, time=120.0, index=6)
    assert c.merge(other).start_tally("b", after=0.0, since=0) == {0}
    big = SliceCounts(K, 60.0)  # a slice past 2**31 events: stored as int64, not int32
    big.update(1, p, ood=True, ood_p0=0.01, time=0.0, index=2**40)
    back = SliceCounts.restore(unpack(pack(big.snapshot())))
    assert back.start_tally("a", after=0.0, since=2**40) == {0}
    assert back.start_tally("a", after=0.0, since=2**40 + 1) == frozenset()


def test_tallies_are_kept_apart_and_cost_nothing_once_stopped() -> None:
    p = np.full(K, 1 / K)
    c = SliceCounts(K, 60.0, max_buckets=2)
    c.start_tally("ood_rate", after=None)
    c.update(1, p, ood=True, ood_p0=0.01, time=0.0)
    c.start_tally("cluster_mix", after=None)  # seeded with the bucket holding that event
    for i in range(1, 500):  # 8 min of events: the 2-bucket ring drops, the tallies do not
        c.update(1, p, ood=False, ood_p0=0.01, time=float(i))
    a, b = c.tally("ood_rate"), c.tally("cluster_mix")
    assert a is not None and b is not None
    assert (a.n, a.ood, b.n, b.ood) == (500, 1, 500, 1)
    assert not a.truncated and c.since(0.0).truncated
    c.stop_tally("ood_rate")
    c.update(2, p, ood=False, ood_p0=0.01, time=500.0)
    assert c.tallies == ("cluster_mix",) and c.tally("cluster_mix").n == 501  # type: ignore[union-attr]


def test_a_snapshot_written_before_tallies_restores_without_one() -> None:
    p = np.full(K, 1 / K)
    c = SliceCounts(K, 60.0)
    c.start_tally("ood_rate", after=None)
    c.update(1, p, ood=True, ood_p0=0.01, time=0.0)
    snap = c.snapshot()
    del snap["tallies"]
    old = SliceCounts.restore(snap)
    assert old.tallies == () and old.tally("ood_rate") is None and old.since(0.0).n == 1


def test_a_slice_without_an_open_tally_holds_no_tally_storage() -> None:
    """A worker holds thousands of slices and few have an open alarm: five empty tally lists
    per slice cost ~330 bytes, ~3 MiB per 10,000 slices (tracemalloc: 1,268 → 948 bytes a
    fresh 16-cluster slice). One slot, empty until a tally opens and again once the last one
    stops; a snapshot of a slice without one restores without one."""
    p = np.full(K, 1 / K)
    c = SliceCounts(K, 60.0)
    assert c._tal is None
    c.update(1, p, ood=True, ood_p0=0.01, time=0.0)
    c.start_tally("a", after=None)
    c.start_tally("b", after=None)
    c.stop_tally("a")
    assert c._tal is not None and c.tallies == ("b",)
    c.stop_tally("b")
    assert c._tal is None and c.tallies == () and c.tally("b") is None
    c.update(2, p, ood=False, ood_p0=0.01, time=1.0)  # counted in the ring only
    assert SliceCounts.restore(unpack(pack(c.snapshot())))._tal is None
    assert c.since(None).n == 2


def test_bucket_keys_and_arrivals_widen_past_int32_with_the_same_answers() -> None:
    """Keys and first arrivals are held as int32 while they fit (half the bytes of a full
    ring's two int64 columns); a key or an arrival that does not fit widens them to int64,
    the answers and the snapshot (int64 keys, arrivals narrowed as before) unchanged."""
    p = np.full(K, 1 / K)
    c = SliceCounts(K, 1.0, max_buckets=4)
    t0, i0 = float(2**31 - 2), 2**31 - 3
    for i in range(6):  # keys and arrivals cross 2**31 - 1 on the way
        c.update(i % K, p, ood=i == 3, ood_p0=0.01, time=t0 + i, index=i0 + i)
    assert c._kf.dtype == np.int64
    assert c.bucket_keys() == [2**31 + i for i in range(4)]
    assert c.since(float(2**31 + 1)).n == 3 and c.since(None).n == 6
    assert sorted(c.start_tally("a", after=None, since=i0 + 4)) == [2**31 + 2, 2**31 + 3]
    snap = c.snapshot()
    assert snap["keys"].dtype == np.int64 and snap["first_arrival"].dtype == np.int64
    back = SliceCounts.restore(unpack(pack(snap)))
    assert back._kf.dtype == np.int64 and pack(back.snapshot()) == pack(snap)
    small = SliceCounts(K, 60.0)
    small.update(1, p, ood=False, ood_p0=0.01, time=1.8e9, index=7)
    assert small._kf.dtype == np.int32
    snap = small.snapshot()  # the checkpoint format as before: int64 keys, int32 arrivals
    assert (snap["keys"].dtype, snap["first_arrival"].dtype) == (np.int64, np.int32)
    assert SliceCounts.restore(unpack(pack(snap)))._kf.dtype == np.int32


def test_restored_rings_share_their_baselines_and_settings() -> None:
    """A worker restores thousands of slices from its checkpoint: equal baselines and bucket
    widths decode as one shared object each, not a copy per slice (a K = 8 baseline is 176 B),
    until the next event puts the caller's own array in its place."""
    p = RNG.dirichlet(np.ones(K))
    rings = []
    for i in range(2):
        c = SliceCounts(K, 300.0)
        c.update(i, p, ood=False, ood_p0=0.01, time=0.0)
        rings.append(SliceCounts.restore(unpack(pack(c.snapshot()))))
    a, b = rings
    assert a._ps[0] is b._ps[0] and not a._ps[0].flags.writeable
    assert a.bucket_seconds is b.bucket_seconds and a._p0s[0] is b._p0s[0]
    a.update(2, p, ood=False, ood_p0=0.01, time=1.0)
    assert a._ps == [p] and a._ps[0] is p and a.since(None).n == 2


def test_a_usual_ring_stores_no_per_baseline_columns_and_snapshots_them_as_before() -> None:
    """The first per-baseline and per-rate columns are derived from the cluster counts (every
    event with a cluster adds one to its cluster and one to its baseline's column; the detect
    stage's events all carry an OOD flag too): a ring judged against one baseline and one rate
    holds neither array nor ``d``; a second baseline or rate stores only its own column; an
    event with one part only keeps ``d``. Snapshots carry every column, as before."""
    p, q = POOL[0], POOL[1]
    c = SliceCounts(K, 60.0)
    for i in range(120):
        c.update(i % K, p, ood=i % 9 == 0, ood_p0=0.01, time=float(i))
    assert c._kp is None and c._k0 is None and c._d is None
    snap = c.snapshot()
    assert snap["per_baseline"].tolist() == [[60], [60]]
    assert snap["per_ood_p0"].tolist() == [[60], [60]]
    assert snap["per_baseline"].dtype == snap["per_ood_p0"].dtype == np.int32
    c.update(1, q, ood=False, ood_p0=0.02, time=130.0)  # a second baseline and rate
    c.update(2, p, ood=None, ood_p0=None, time=131.0)  # a cluster without an OOD flag
    c.update(None, None, ood=True, ood_p0=0.01, time=132.0)  # and a flag without a cluster
    c.update(3, q, ood=None, ood_p0=None, time=133.0)
    assert c._kp is not None and c._kp.shape[1] == 1 and c._k0 is not None and c._d is not None
    snap = c.snapshot()
    assert snap["per_baseline"].tolist() == [[60, 0], [60, 0], [1, 2]]
    assert snap["per_ood_p0"].tolist() == [[60, 0], [60, 0], [1, 1]]
    got = c.since(120.0)
    assert (got.n, got.n_ood, got.ood) == (3, 2, 1)
    np.testing.assert_allclose(got.expected, p + 2 * q)
    assert math.isclose(got.ood_expected, 0.03)
    back = SliceCounts.restore(unpack(pack(snap)))
    assert pack(back.snapshot()) == pack(snap) and back.since(120.0) == got
    usual = SliceCounts.restore(unpack(pack(SliceCounts.restore(
        json.loads(json.dumps(plain(snap)))).snapshot())))
    assert usual.since(None) == c.since(None)


def test_turning_dense_at_a_new_rate_counts_the_event_once() -> None:
    """An event whose new OOD rate turns the ring dense has had its cluster counted already:
    the dense rows start from the columns without its flag, which is then added once."""
    p = np.array([0.25, 0.75])
    c = SliceCounts(2, 60.0)  # dense beyond 2·(K+1) = 6 columns
    rates = [0.01 * (i + 1) for i in range(8)]
    for i, r in enumerate(rates):
        c.update(i % 2, p, ood=i % 3 == 0, ood_p0=r, time=float(i))
    assert c._exp is not None
    got = c.since(None)
    assert (got.n, got.n_ood, got.ood, got.clusters) == (8, 8, 3, [4, 4])
    np.testing.assert_allclose(got.expected, 8 * p)
    assert math.isclose(got.ood_expected, sum(rates))


def test_counts_are_int16_until_one_would_not_fit_and_exact_past_it() -> None:
    """The ring's counts are int16 while they fit (half the bytes of the largest part of a
    slice) and widen to int32 at the first that would not: 40,000 events of one cluster in one
    bucket (and OOD hits in another) come out exact, as do merges and restores past int16."""
    p = np.full(K, 1 / K)
    small = SliceCounts(K, 60.0)
    for i in range(100):
        small.update(i % K, p, ood=i % 7 == 0, ood_p0=0.01, time=float(i))
    assert small._cnt.dtype == np.int16
    snap = small.snapshot()
    assert snap["counts"].dtype == np.int32  # the checkpoint format as before
    assert SliceCounts.restore(unpack(pack(snap)))._cnt.dtype == np.int16

    big = SliceCounts(K, 60.0)
    n = 40_000  # past int16's 32,767 in one count
    for i in range(n):
        big.update(2, p, ood=True, ood_p0=0.01, time=0.0)
        if i < 3:
            big.update(1, p, ood=False, ood_p0=0.01, time=60.0)
    got = big.since(None)
    assert (got.clusters, got.ood, got.n, got.n_ood) == ([0, 3, n, 0], n, n + 3, n + 3)
    assert big._cnt.dtype == np.int32
    back = SliceCounts.restore(unpack(pack(big.snapshot())))
    assert back._cnt.dtype == np.int32 and back.since(0.0) == got
    back.update(2, p, ood=False, ood_p0=0.01, time=0.0)
    assert back.since(0.0).clusters == [0, 3, n + 1, 0]

    half = SliceCounts(K, 60.0)  # two int16 rings whose sum does not fit in int16
    for _ in range(20_000):
        half.update(3, p, ood=False, ood_p0=0.01, time=0.0)
    merged = SliceCounts.restore(half.snapshot()).merge(half)
    assert merged._cnt.dtype == np.int32 and merged.since(0.0).clusters == [0, 0, 0, 40_000]
    merged.update(3, p, ood=False, ood_p0=0.01, time=0.0)
    assert merged.since(0.0).clusters == [0, 0, 0, 40_001]
