"""Mergeable per-slice counts in event-time buckets: observed vs expected mix and OOD rate.

An incident needs "what changed since the onset": observed cluster counts against the counts
the events' own baselines expected, and the OOD rate against its reference. The onset is only
known when a detector alarms, so counts are kept per event-time bucket and summed from the
onset's bucket on demand. Buckets add, so counts from several workers (or a replay) merge by
addition.

Layout (one ring of at most ``max_buckets`` rows per slice; a detect worker holds thousands):

* ``counts``: rows ``[ood_hits, clusters[0..K)]``, int16 while every count fits and int32
  from the first that would not (see *Narrow counts* below) — exact up to 2**31 − 1 events
  per bucket (7 million events/s for a 5-min bucket);
* events and expected counts, in one of two forms. While a slice has seen few distinct
  baselines (a station, a station×shift, a lot on one line: one or two), a bucket stores *how
  many events were judged against each baseline* — int32 columns ``per_baseline`` (cluster
  events per baseline ``p``) and ``per_ood_p0`` (OOD-flagged events per reference rate) — so
  ``n = Σ_b events_b`` and the expectation is ``Σ_b events_b · p_b``: exact integers, 4 bytes
  per baseline. Once the columns would cost more than a dense float64 row (more than ``2·(K+1)``
  columns, e.g. a lot spread over many stations), the ring turns *dense*: one column each for
  ``n`` and ``n_ood``, and rows ``[expected[0..K), ood_expected]`` that add each event's ``p``
  in order.

  The first column of each (the only one of a slice judged against one baseline and one OOD
  rate; ``n`` and ``n_ood`` of a dense ring) is not stored. Every event with a cluster adds
  one to its cluster's count and one to its baseline's column, so the first ``per_baseline``
  column is the row's cluster events less the other columns. The detect stage's events carry
  both a cluster and an OOD flag, so the first ``per_ood_p0`` column is the same cluster events
  plus ``d`` — OOD-flagged events less cluster events, an int32 per row held only once an event
  has had one part without the other — less its other columns. A usual ring holds neither
  array (0.6 kB a full ring at K = 8), and its per-event step two numpy increments less.

Rows are allocated as buckets fill (a fresh slice holds one). When the ring is full the oldest
bucket is folded into running totals and ``Counts.truncated`` tells a reader that asked for
time before it. Each row also records the arrival index (the slice's event count, ``index`` of
:meth:`SliceCounts.update`) of its first event, beside its bucket key: one ``(rows, 2)`` array,
int32 while every key and arrival fits (a 5-min bucket key does for 20,000 years, an arrival
for 2**31 events), int64 from the first that does not — 0.5 kB a slice less than two int64
arrays. Only new buckets and readers touch it, never the per-event step.

**Narrow counts.** A full ring holds 48·(K + 1) counts; as int32 at K = 11 they are 2.3 kB
a slice, the largest part of one (10,000 slices: 23 MB). A count exceeds int16's 32,767 only
when more than ~109 events/s of one slice fall in one cluster for a whole 5-min bucket, so the
counts start as int16 and widen to int32 at the first that would not fit. The per-event
step does not read the counts to find out: the ring keeps ``_room``, how many more unit
increments are safe (32,767 less the largest count), takes two off per event, and only when
it runs out looks at the counts again: once per (32,767 − largest count) / 2 events, ~16,000
for a usual ring. A checkpoint
stores the counts as int32 either way: records are the same bytes as before.

**Tallies.** The ring answers "since the onset's bucket, within the last ``max_buckets``": a
bucket holds events from before the onset too, and an alarm open longer than the ring loses its
start. While an alarm is open its slice keeps a *tally* (:meth:`SliceCounts.start_tally`): one
more row in the same layout (int64, so that it does not overflow however long the alarm), seeded
when the alarm is raised and then counting every event exactly until :meth:`stop_tally`. Each
event costs a few scalar increments per open tally, nothing when none is open. The seed is the
rows whose first event arrived at or after the onset's arrival index: only events read since
the onset, even where event times go back and forth (a slice that mixes stations reads their
partitions in turns, so a bucket later than the onset's by event time can hold events read
before it).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from driftline.core.cusum import FloatArray, shared_float

_HITS = 1  # counts rows start with ood_hits, then the clusters
_EMPTY = np.iinfo(np.int64).min
_I32_MIN, _I32_MAX = -(2**31), 2**31 - 1
_NARROW = np.dtype(np.int16)  # counts rows while every count fits (module docstring)
_NARROW_MAX = int(np.iinfo(_NARROW).max)
# The first arrival of a row whose events' arrival indices are not known (rows merged from
# another worker, rows restored from a snapshot written before arrivals were recorded): taken
# as before every event, so such a row never seeds a tally and its events since an onset are
# reported as missed rather than counted.
NO_ARRIVAL = -1
SNAPSHOT_VERSION = 2
IntArray = npt.NDArray[np.int64]
AnyIntArray = npt.NDArray[np.signedinteger[Any]]


def _placeholder(shape: tuple[int, ...]) -> AnyIntArray:
    a = np.zeros(shape, np.int32)
    a.setflags(write=False)  # shared by every new ring: replaced, never written
    return a


_NO_ROWS = _placeholder((0, 2))
_SHARED_BASELINES = 512
_restored: dict[bytes, FloatArray] = {}


def _restored_baseline(p: Any) -> FloatArray:
    """A restored ring's baseline column: one read-only array per value, shared by every ring
    restored with it — not a copy in each slice (176 B at K = 8) until its next event judged
    against it puts the caller's own array in its place (:meth:`SliceCounts._column_p`)."""
    a = np.array(p, np.float64)
    key = a.tobytes()
    got = _restored.get(key)
    if got is None:
        if len(_restored) >= _SHARED_BASELINES:
            _restored.clear()
        a.setflags(write=False)
        got = _restored[key] = a
    return got


def _sums(total: int, stored: AnyIntArray | None, rows: Any, n_cols: int) -> list[int]:
    """Per-column sums over ``rows`` as Python ints: the first is ``total`` (the rows' events)
    less the ``stored`` other columns' sums."""
    if n_cols == 0:
        return []
    if stored is None:
        return [total]
    rest: list[int] = np.add.reduce(stored[rows], axis=0, dtype=np.int64).tolist()
    return [total - sum(rest), *rest]


def _snapshot_columns(total: AnyIntArray, stored: AnyIntArray | None, u: int,
                      n_cols: int) -> AnyIntArray:
    """Per-column counts of the first ``u`` rows as a snapshot stores them (int32): the first
    is each row's ``total`` less its ``stored`` other columns."""
    if n_cols == 0:
        return np.zeros((u, 0), np.int32)
    first = total.reshape(u, 1)
    if stored is None:
        return first
    rest = stored[:u]
    return np.concatenate([first - rest.sum(axis=1, keepdims=True, dtype=np.int32), rest],
                          axis=1)


def _narrow(a: AnyIntArray) -> AnyIntArray:
    """A copy of ``a`` as int32 if its values fit (a checkpoint record stores it raw: half the
    bytes of a slice's ring of first arrivals until it has seen 2**31 events), else int64."""
    i32 = np.iinfo(np.int32)
    if a.size == 0 or (i32.min <= a.min() and a.max() <= i32.max):
        return a.astype(np.int32)
    return a.copy()


class _Tallies:
    """A slice's open tallies (rows of the ring's layout, int64), by name: held only while one
    is open — most slices never have one, and five empty lists cost ~330 bytes a slice."""

    __slots__ = ("names", "trunc", "cnt", "kp", "k0", "exp")

    def __init__(self, dense: bool) -> None:
        self.names: list[str] = []
        self.trunc: list[bool] = []
        # rows as Python ints (unbounded, and a scalar increment costs a third of numpy's)
        self.cnt: list[list[int]] = []
        self.kp: list[list[int]] = []
        self.k0: list[list[int]] = []
        self.exp: list[FloatArray] | None = [] if dense else None  # dense rows, as the ring's


@dataclass(frozen=True)
class Counts:
    """Totals over a time range; ``truncated`` if older buckets had already been dropped."""

    n: int
    clusters: list[int]
    expected: list[float]
    n_ood: int
    ood: int
    ood_expected: float
    truncated: bool = False


class SliceCounts:
    """Event-time bucketed counts for one slice; ``merge`` adds another worker's counts.

    >>> import numpy as np
    >>> p = np.array([0.5, 0.5])
    >>> a, b = SliceCounts(2, bucket_seconds=60.0), SliceCounts(2, bucket_seconds=60.0)
    >>> a.update(0, p, ood=False, ood_p0=0.01, time=10.0)
    >>> b.update(1, p, ood=True, ood_p0=0.01, time=70.0)
    >>> a.merge(b).since(60.0).clusters
    [0, 1]
    """

    __slots__ = ("n_clusters", "bucket_seconds", "max_buckets", "_used", "_kf", "_cnt", "_ps",
                 "_p0s", "_kp", "_k0", "_d", "_exp", "_last_key", "_last_row", "_dropped",
                 "_dropped_until", "_tal", "_room")

    def __init__(self, n_clusters: int, bucket_seconds: float = 300.0, max_buckets: int = 48):
        if bucket_seconds <= 0.0 or max_buckets < 1 or n_clusters < 1:
            raise ValueError("need bucket_seconds > 0, max_buckets >= 1, n_clusters >= 1")
        self.n_clusters = int(n_clusters)
        self.bucket_seconds = shared_float(bucket_seconds)
        self.max_buckets = int(max_buckets)
        self._used = 0  # rows in use; rows are allocated as buckets fill
        # per row: [bucket key, arrival index of its first event] (int32 while they fit)
        self._kf: AnyIntArray = _NO_ROWS
        self._cnt: AnyIntArray = np.zeros((0, _HITS + self.n_clusters), _NARROW)
        self._room = _NARROW_MAX  # unit increments of the counts that are safe (docstring)
        self._ps: list[FloatArray] = []  # distinct cluster baselines seen
        self._p0s: list[float] = []  # distinct OOD reference rates seen
        # Events per baseline (per OOD rate) but the first, whose column is derived (module
        # docstring): columns for _ps[1:] (_p0s[1:]); None while there are none (one, or dense).
        self._kp: AnyIntArray | None = None
        self._k0: AnyIntArray | None = None
        self._d: AnyIntArray | None = None  # per row: OOD-flagged less cluster events; None: 0
        self._exp: FloatArray | None = None  # dense expected rows, once columns cost more
        self._last_key, self._last_row = _EMPTY, -1  # bucket key and row of the previous update
        # totals of buckets dropped from a full ring (made on the first drop):
        # [n, n_ood, ood_hits, clusters[0..K), expected[0..K), ood_expected]
        self._dropped: FloatArray | None = None
        self._dropped_until: int | None = None
        self._tal: _Tallies | None = None  # open tallies; None while there are none

    # -- rows -------------------------------------------------------------------------------
    def _resize(self, rows: int) -> None:
        def grow(a: Any) -> Any:
            out = np.zeros((rows, *a.shape[1:]), a.dtype)
            out[: a.shape[0]] = a
            return out

        self._kf, self._cnt = grow(self._kf), grow(self._cnt)
        if self._kp is not None:
            self._kp = grow(self._kp)
        if self._k0 is not None:
            self._k0 = grow(self._k0)
        if self._d is not None:
            self._d = grow(self._d)
        if self._exp is not None:
            self._exp = grow(self._exp)

    def _set_counts(self, cnt: AnyIntArray, more: int = 0) -> None:
        """Hold the counts ``cnt`` (an array of this ring's own, not copied if already of the
        dtype) as int16 if they and ``more`` unit increments fit, else int32, and reset
        :attr:`_room`."""
        top = int(cnt.max()) if cnt.size else 0
        narrow = top + more <= _NARROW_MAX
        self._cnt = cnt.astype(_NARROW if narrow else np.int32, copy=False)
        self._room = (_NARROW_MAX if narrow else _I32_MAX) - top

    def _row(self, key: int, index: int) -> int:
        """The row of bucket ``key``, made if needed (first arrival ``index``); -1 if older
        than a full ring keeps."""
        used = self._used
        keys = self._kf[:used, 0]
        hit = np.flatnonzero(keys == key)
        if hit.size:
            row = int(hit[0])
        elif used < self.max_buckets:
            if used == self._kf.shape[0]:
                self._resize(min(self.max_buckets, max(2, 2 * used)))
            row, self._used = used, used + 1
            self._set_row(row, key, index)
        else:
            row = int(np.argmin(keys))
            if key < int(keys[row]):
                return -1
            self._drop_row(row)
            self._set_row(row, key, index)
        self._last_key, self._last_row = key, row
        return row

    def _set_row(self, row: int, key: int, index: int) -> None:
        """Row ``row`` is bucket ``key``, first arrival ``index`` (widened to int64 if either
        does not fit in int32)."""
        kf = self._kf
        if kf.itemsize == 4 and not (_I32_MIN <= key <= _I32_MAX
                                     and _I32_MIN <= index <= _I32_MAX):
            kf = self._kf = kf.astype(np.int64)
        kf[row, 0] = key
        kf[row, 1] = index

    @property
    def _keys(self) -> AnyIntArray:
        """Bucket key of each allocated row (a view)."""
        return self._kf[:, 0]

    @property
    def _first(self) -> AnyIntArray:
        """Arrival index of each allocated row's first event (a view)."""
        return self._kf[:, 1]

    def _totals(self, rows: list[int]) -> FloatArray:
        """``[n, n_ood, ood_hits, clusters[0..K), expected[0..K), ood_expected]`` of ``rows``
        (float64: exact for counts below 2**53)."""
        k = self.n_clusters
        out = np.zeros(3 + 2 * k + 1)
        hits = self._cnt[rows].sum(axis=0, dtype=np.int64)
        out[2 : 3 + k] = hits
        n = int(hits[_HITS:].sum())  # cluster events: the per-baseline columns' sum
        n_ood = n + (0 if self._d is None else int(self._d[rows].sum(dtype=np.int64)))
        out[0], out[1] = n, n_ood
        if self._exp is not None:
            keys = self._kf[:, 0].tolist()
            for r in sorted(rows, key=keys.__getitem__):  # time order: fixed sums
                out[3 + k :] += self._exp[r]
            return out
        for m, p in zip(_sums(n, self._kp, rows, self._kp_columns()), self._ps, strict=True):
            out[3 + k : 3 + 2 * k] += m * p
        out[-1] = math.fsum(m * p0 for m, p0 in zip(
            _sums(n_ood, self._k0, rows, self._k0_columns()), self._p0s, strict=True))
        return out

    def _column_sums(self, rows: Any) -> tuple[list[int], list[int]]:
        """Events per baseline column and OOD-flagged events per OOD-rate column, summed over
        ``rows``: the stored columns after the first, derived from the cluster counts (and
        ``d``)."""
        n = int(self._cnt[rows, _HITS:].sum(dtype=np.int64))
        d = 0 if self._d is None else int(self._d[rows].sum(dtype=np.int64))
        return (_sums(n, self._kp, rows, self._kp_columns()),
                _sums(n + d, self._k0, rows, self._k0_columns()))

    def _add_d(self, row: int, delta: int) -> None:
        """An event with a cluster and no OOD flag (-1), or the other way round (+1)."""
        if self._d is None:
            self._d = np.zeros(self._kf.shape[0], np.int32)
        self._d[row] += delta

    def _add_dropped(self, totals: FloatArray, key: int) -> None:
        if self._dropped is None:
            self._dropped = np.zeros(3 + 2 * self.n_clusters + 1)
        self._dropped += totals
        self._dropped_until = key if self._dropped_until is None else max(self._dropped_until,
                                                                          key)

    def _drop_row(self, row: int) -> None:
        """Fold bucket ``row`` into the dropped totals and clear it."""
        self._add_dropped(self._totals([row]), int(self._kf[row, 0]))
        self._cnt[row] = 0
        if self._kp is not None:
            self._kp[row] = 0
        if self._k0 is not None:
            self._k0[row] = 0
        if self._d is not None:
            self._d[row] = 0
        if self._exp is not None:
            self._exp[row] = 0.0

    # -- baseline columns -------------------------------------------------------------------
    def _set_d(self, n_ood: IntArray) -> None:
        """``d`` of the rows in use from their OOD-flagged events (restored rows)."""
        d = n_ood - self._cnt[: self._used, _HITS:].sum(axis=1, dtype=np.int64)
        self._d = d.astype(np.int32) if d.any() else None

    def _k0_columns(self) -> int:
        """Columns of ``per_ood_p0`` in a snapshot and of a tally (dense: one)."""
        return 1 if self._exp is not None else len(self._p0s)

    def _kp_columns(self) -> int:
        """Columns of ``per_baseline`` in a snapshot and of a tally: one per baseline (dense:
        one)."""
        return 1 if self._exp is not None else len(self._ps)

    def _column_p(self, p: FloatArray) -> int:
        for i, q in enumerate(self._ps):
            if q is p:
                return i
        for i, q in enumerate(self._ps):
            if np.array_equal(q, p):
                self._ps[i] = p  # the caller's object: the next lookup is by identity
                return i
        if p.shape != (self.n_clusters,):
            raise ValueError(f"baseline must have shape ({self.n_clusters},)")
        if self._too_many_columns():
            return 0
        if self._ps:  # a second or later baseline: a stored column (the first is derived)
            rows = self._kf.shape[0]
            new = np.zeros((rows, 1), np.int32)
            self._kp = new if self._kp is None else np.hstack([self._kp, new])
        self._ps.append(p)
        if self._tal is not None:
            for r in self._tal.kp:
                r.append(0)
        return len(self._ps) - 1

    def _column_0(self, p0: float, counted: int = -1) -> int:
        """The column of OOD rate ``p0``, made if new; ``counted``: the row where the event
        asking has had its cluster counted already (and not yet its OOD flag)."""
        for i, q in enumerate(self._p0s):
            if q == p0:
                return i
        if self._too_many_columns(counted):
            return 0
        if self._p0s:  # a second or later rate: a stored column (the first is derived)
            new = np.zeros((self._kf.shape[0], 1), np.int32)
            self._k0 = new if self._k0 is None else np.hstack([self._k0, new])
        self._p0s.append(float(p0))
        if self._tal is not None:
            for r in self._tal.k0:
                r.append(0)
        return len(self._p0s) - 1

    def _too_many_columns(self, counted: int = -1) -> bool:
        """Turn dense if one more column would cost more than dense rows; True if dense."""
        if len(self._ps) + len(self._p0s) + 1 > 2 * (self.n_clusters + 1):
            self._densify(counted)
        return self._exp is not None

    def _densify(self, counted: int = -1) -> None:
        """Switch to dense float64 expected rows (many distinct baselines); ``counted``: a
        row with an event whose cluster is counted and its OOD flag not yet (as
        :meth:`_column_0`), which the derived OOD column must not hold yet."""
        rows, k = self._kf.shape[0], self.n_clusters
        exp = np.zeros((rows, k + 1))
        if counted >= 0:
            self._add_d(counted, -1)
        for r in range(self._used):
            exp[r] = self._totals([r])[3 + k :]
        if counted >= 0:
            self._add_d(counted, 1)
            if self._d is not None and not self._d.any():
                self._d = None
        self._kp = self._k0 = None  # n and n_ood: the cluster counts (plus d)
        tal = self._tal
        if tal is not None:
            tal.exp = [self._tally_expected(tal, i) for i in range(len(tal.names))]
            tal.kp = [[sum(r)] for r in tal.kp]
            tal.k0 = [[sum(r)] for r in tal.k0]
        self._exp, self._ps, self._p0s = exp, [], []

    # -- updates ----------------------------------------------------------------------------
    def update(
        self,
        cluster: int | None,
        baseline: FloatArray | None,
        *,
        ood: bool | None,
        ood_p0: float | None,
        time: float,
        index: int = NO_ARRIVAL,
    ) -> None:
        """Count one event at event ``time`` (seconds), the slice's ``index``-th arrival (what
        :meth:`start_tally` seeds by; :data:`NO_ARRIVAL`: not known); ``None`` fields are not
        counted."""
        key = math.floor(time / self.bucket_seconds)
        row = self._last_row
        if key != self._last_key:
            row = self._row(key, index)
        if row < 0:  # older than every bucket of a full ring: straight to the dropped totals
            self._add_dropped(self._event_totals(cluster, baseline, ood, ood_p0), key)
            if self._tal is not None:
                self.tally_event(cluster, baseline, ood=ood, ood_p0=ood_p0)
            return
        self._room -= 2  # at most two counts go up by one each
        if self._room < 0:
            self._set_counts(self._cnt, 2)
            self._room -= 2
        exp = self._exp
        cp = c0 = -1  # the event's columns (-1: no such part)
        flagged = ood is not None and ood_p0 is not None
        # First columns are derived from the cluster counts (module docstring): a column is
        # made, or the ring turns dense from its rows, with the event's parts counted so far.
        if cluster is not None and baseline is not None:
            if exp is None:
                cp = self._column_p(baseline)  # first: a new column replaces the array
                exp = self._exp
            self._cnt[row, _HITS + cluster] += 1
            if not flagged:
                self._add_d(row, -1)
            if exp is None:
                if cp:
                    self._kp[row, cp - 1] += 1  # type: ignore[index]
            else:
                cp = 0
                exp[row, : self.n_clusters] += baseline
        if flagged:
            if ood:
                self._cnt[row, 0] += 1
            if exp is None:
                c0 = self._column_0(ood_p0, row if cp >= 0 else -1)  # type: ignore[arg-type]
                exp = self._exp
            if exp is None:
                if c0:
                    self._k0[row, c0 - 1] += 1  # type: ignore[index]
            else:
                c0 = 0
                exp[row, self.n_clusters] += ood_p0
            if cp < 0:
                self._add_d(row, 1)
        tal = self._tal
        if tal is not None:  # an alarm is open: its tally counts the event too, same columns
            if exp is not None and cp > 0:  # the ring turned dense at the OOD column
                cp = 0
            self._tally_add(range(len(tal.names)), cluster, cp, baseline, bool(ood), c0,
                            ood_p0)

    def _event_totals(self, cluster: int | None, baseline: FloatArray | None,
                      ood: bool | None, ood_p0: float | None) -> FloatArray:
        k = self.n_clusters
        out = np.zeros(3 + 2 * k + 1)
        if cluster is not None and baseline is not None:
            out[0] += 1
            out[3 + cluster] += 1
            out[3 + k : 3 + 2 * k] += baseline
        if ood is not None and ood_p0 is not None:
            out[1] += 1
            out[2] += bool(ood)
            out[-1] += ood_p0
        return out

    # -- tallies ----------------------------------------------------------------------------
    @property
    def tallies(self) -> tuple[str, ...]:
        """Names of the open tallies."""
        return () if self._tal is None else tuple(self._tal.names)

    def start_tally(self, name: str, after: float | None,
                    since: int | None = None) -> frozenset[int]:
        """Open tally ``name`` (restarting one of that name) and return the keys of the
        buckets it is seeded with; from now on every event :meth:`update` counts is added to
        it.

        With ``since`` (an arrival index, as :meth:`update`'s ``index``) the seed is every row
        whose first event arrived at ``since`` or later — events read from then on only,
        whatever their times; without, the whole buckets *after* ``after``'s bucket (every
        bucket held: ``after`` None). Its ``truncated`` is set if the ring had already dropped
        buckets from ``after``'s bucket (after it, without ``since``) on."""
        self.stop_tally(name)
        used = self._used
        first = None if after is None else math.floor(after / self.bucket_seconds) + (
            since is None)
        if since is not None:
            rows = np.flatnonzero(self._first[:used] >= since)
        else:
            rows = (np.arange(used) if first is None
                    else np.flatnonzero(self._keys[:used] >= first))
        tal = self._tal
        if tal is None:
            tal = self._tal = _Tallies(dense=self._exp is not None)
        tal.cnt.append(self._cnt[rows].sum(axis=0, dtype=np.int64).tolist())
        kp, k0 = self._column_sums(rows)
        tal.kp.append(kp)
        tal.k0.append(k0)
        if self._exp is not None and tal.exp is not None:
            exp = np.zeros(self.n_clusters + 1)
            keys = self._kf[:, 0].tolist()
            for r in sorted(rows.tolist(), key=keys.__getitem__):  # time order
                exp += self._exp[r]
            tal.exp.append(exp)
        tal.names.append(name)
        tal.trunc.append(self._dropped_until is not None and (
            first is None or first <= self._dropped_until))
        return frozenset(self._keys[rows].tolist())

    def tally_event(self, cluster: int | None, baseline: FloatArray | None, *,
                    ood: bool | None, ood_p0: float | None, name: str | None = None) -> None:
        """Add one event to tally ``name`` (every open tally: ``None``), as :meth:`update`
        adds it to a bucket, without counting it in the ring."""
        cp = c0 = -1
        if cluster is not None and baseline is not None:
            cp = 0 if self._exp is not None else self._column_p(baseline)  # may turn dense
        if ood is not None and ood_p0 is not None:
            c0 = 0 if self._exp is not None else self._column_0(ood_p0)
        if cp >= 0 and self._exp is not None:  # the ring turned dense at the OOD column
            cp = 0
        tal = self._tal
        if tal is None:
            if name is not None:
                raise ValueError(f"no open tally {name!r}")
            return
        self._tally_add(range(len(tal.names)) if name is None else (tal.names.index(name),),
                        cluster, cp, baseline, bool(ood), c0, ood_p0)

    def _tally_add(self, tallies: Iterable[int], cluster: int | None, cp: int,
                   baseline: FloatArray | None, ood: bool, c0: int,
                   ood_p0: float | None) -> None:
        """The per-event step: a few integer increments per open tally (``cp``/``c0``: the
        event's columns, -1 for a part it does not have)."""
        tal, k = self._tal, self.n_clusters
        if tal is None:
            return
        texp = tal.exp
        for i in tallies:
            cnt = tal.cnt[i]
            if cp >= 0:
                cnt[_HITS + cluster] += 1  # type: ignore[operator]
                tal.kp[i][cp] += 1
                if texp is not None:
                    texp[i][:k] += baseline  # type: ignore[arg-type]
            if c0 >= 0:
                cnt[0] += ood
                tal.k0[i][c0] += 1
                if texp is not None:
                    texp[i][k] += ood_p0

    def _tally_expected(self, tal: _Tallies, i: int) -> FloatArray:
        """``[expected[0..K), ood_expected]`` of tally ``i``."""
        out: FloatArray
        if tal.exp is not None:
            out = tal.exp[i].copy()
            return out
        out = np.zeros(self.n_clusters + 1)
        for n, p in zip(tal.kp[i], self._ps, strict=True):
            out[: self.n_clusters] += n * p
        out[-1] = math.fsum(n * p0 for n, p0 in zip(tal.k0[i], self._p0s, strict=True))
        return out

    def tally(self, name: str) -> Counts | None:
        """The counts of tally ``name``; ``None`` if it is not open."""
        tal = self._tal
        if tal is None or name not in tal.names:
            return None
        i = tal.names.index(name)
        exp, cnt = self._tally_expected(tal, i), tal.cnt[i]
        return Counts(n=sum(tal.kp[i]), clusters=cnt[_HITS:],
                      expected=exp[: self.n_clusters].tolist(), n_ood=sum(tal.k0[i]),
                      ood=cnt[0], ood_expected=float(exp[-1]), truncated=tal.trunc[i])

    def stop_tally(self, name: str) -> None:
        """Close tally ``name`` (nothing if it is not open)."""
        tal = self._tal
        if tal is None or name not in tal.names:
            return
        if len(tal.names) == 1:  # the last one: the slice holds none again
            self._tal = None
            return
        i = tal.names.index(name)
        del tal.names[i], tal.trunc[i], tal.cnt[i], tal.kp[i], tal.k0[i]
        if tal.exp is not None:
            del tal.exp[i]

    # -- reading ----------------------------------------------------------------------------
    def bucket_keys(self) -> list[int]:
        """Keys (``floor(time / bucket_seconds)``) of the buckets held, oldest first."""
        return sorted(self._keys[: self._used].tolist())

    def since(self, time: float | None) -> Counts:
        """Totals of every bucket from ``time``'s bucket on (``None``: everything ever seen)."""
        used = self._used
        if time is None:
            first = None
            rows: list[int] | slice = slice(0, used)
            truncated = False
        else:
            first = math.floor(time / self.bucket_seconds)
            picked = [r for r, key in enumerate(self._keys[:used].tolist()) if key >= first]
            # rows fill in time order until the ring wraps: usually a range, read as a view
            rows = (slice(picked[0], picked[-1] + 1) if picked[-1] - picked[0] + 1 == len(picked)
                    else picked) if picked else slice(0, 0)
            truncated = self._dropped_until is not None and first <= self._dropped_until
        if self._exp is not None or (time is None and self._dropped is not None):
            return self._since_totals(first, truncated)
        # Per-baseline columns (the usual ring): the same sums as _totals, fewer numpy calls —
        # a checkpoint reads every dirty slice's last hour for its gauges.
        add = np.add.reduce
        hits = add(self._cnt[rows], axis=0, dtype=np.int64).tolist()
        n = sum(hits[_HITS:])
        per_p = _sums(n, self._kp, rows, self._kp_columns())
        d = 0 if self._d is None else int(add(self._d[rows], dtype=np.int64))
        per_0 = _sums(n + d, self._k0, rows, self._k0_columns())
        expected = np.zeros(self.n_clusters)
        for n, p in zip(per_p, self._ps, strict=True):
            expected += n * p
        return Counts(
            n=sum(per_p),
            clusters=hits[_HITS:],
            expected=expected.tolist(),
            n_ood=sum(per_0),
            ood=hits[0],
            ood_expected=math.fsum(n * p0 for n, p0 in zip(per_0, self._p0s, strict=True)),
            truncated=truncated,
        )

    def _since_totals(self, first: int | None, truncated: bool) -> Counts:
        """:meth:`since` through :meth:`_totals` (dense rings, and the dropped totals)."""
        keys = self._keys[: self._used]
        rows = (list(range(self._used)) if first is None
                else np.flatnonzero(keys >= first).tolist())
        t = self._totals(rows)
        if first is None and self._dropped is not None:
            t += self._dropped
        k = self.n_clusters
        return Counts(
            n=int(t[0]),
            clusters=t[3 : 3 + k].astype(np.int64).tolist(),
            expected=t[3 + k : 3 + 2 * k].tolist(),
            n_ood=int(t[1]),
            ood=int(t[2]),
            ood_expected=float(t[-1]),
            truncated=truncated,
        )

    def merge(self, other: SliceCounts) -> SliceCounts:
        """Add ``other``'s counts into this object (same K and bucket width); returns self.
        Tallies are not merged: they belong to one owner's open alarms."""
        if (other.n_clusters, other.bucket_seconds) != (self.n_clusters, self.bucket_seconds):
            raise ValueError("can only merge counts with the same clusters and bucket width")
        if other._exp is not None and self._exp is None:
            self._densify()
        # Columns first: registering them may turn this ring dense, before any row is added.
        cols_p = [self._column_p(p) for p in other._ps] if self._exp is None else []
        cols_0 = [self._column_0(p0) for p0 in other._p0s] if self._exp is None else []
        stored = [(c, j) for j, c in enumerate(cols_p) if c]  # (this ring's column, other's)
        stored_0 = [(c, j) for j, c in enumerate(cols_0) if c]
        k = self.n_clusters
        for key in other.bucket_keys():
            src = int(np.flatnonzero(other._keys[: other._used] == key)[0])
            row = self._row(key, NO_ARRIVAL)
            if row < 0:
                self._add_dropped(other._totals([src]), key)
                continue
            self._kf[row, 1] = NO_ARRIVAL  # another worker's events: arrivals not comparable
            added = self._cnt[row].astype(np.int64) + other._cnt[src]
            if self._cnt.dtype == _NARROW and int(added.max()) > _NARROW_MAX:
                self._cnt = self._cnt.astype(np.int32)
            self._cnt[row] = added
            self._room = 0  # counted again at the next event
            t = other._totals([src])
            if t[1] != t[0]:  # its OOD-flagged less cluster events: d, as the first columns
                self._add_d(row, int(t[1] - t[0]))
            if self._exp is None:  # columns other than the first: the first is derived
                kp, k0 = other._column_sums([src])
                if stored:
                    self._kp[row, [c - 1 for c, _ in stored]] += (  # type: ignore[index]
                        [kp[j] for _, j in stored])
                if stored_0:
                    self._k0[row, [c - 1 for c, _ in stored_0]] += (  # type: ignore[index]
                        [k0[j] for _, j in stored_0])
            else:
                self._exp[row] += t[3 + k :]
        if other._dropped is not None:
            self._add_dropped(other._dropped, other._dropped_until or 0)
            self._dropped_until = other._dropped_until if self._dropped_until is None else (
                max(self._dropped_until, other._dropped_until or self._dropped_until))
        return self

    # -- persistence ------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """State as JSON-ready scalars and numpy arrays (see :mod:`driftline.core.snapshot`)."""
        u = self._used
        tal = self._tal
        # int32 as stored before the first columns were derived: the same sums, the same bits
        n = np.add.reduce(self._cnt[:u, _HITS:], axis=1, dtype=np.int32)
        return {
            "version": SNAPSHOT_VERSION,
            "n_clusters": self.n_clusters,
            "bucket_seconds": self.bucket_seconds,
            "max_buckets": self.max_buckets,
            "keys": self._kf[:u, 0].astype(np.int64),
            "first_arrival": _narrow(self._kf[:u, 1]),
            "counts": self._cnt[:u].astype(np.int32),  # int32 however the ring holds them
            "baselines": (np.array(self._ps, np.float64) if self._ps
                          else np.zeros((0, self.n_clusters))),
            "ood_p0": list(self._p0s),
            "per_baseline": _snapshot_columns(n, self._kp, u, self._kp_columns()),
            "per_ood_p0": _snapshot_columns(n if self._d is None else n + self._d[:u], self._k0,
                                            u, self._k0_columns()),
            "expected": None if self._exp is None else self._exp[:u].copy(),
            "dropped": None if self._dropped is None else self._dropped.copy(),
            "dropped_until": self._dropped_until,
            "tallies": None if tal is None else {
                "names": list(tal.names), "truncated": list(tal.trunc),
                "counts": np.array(tal.cnt, np.int64), "per_baseline": np.array(
                    tal.kp, np.int64).reshape(len(tal.names), self._kp_columns()),
                "per_ood_p0": np.array(tal.k0, np.int64).reshape(
                    len(tal.names), self._k0_columns()),
                "expected": None if tal.exp is None else np.array(tal.exp)},
        }

    @classmethod
    def restore(cls, snap: dict[str, Any]) -> SliceCounts:
        """Rebuild from :meth:`snapshot` output (arrays or lists; v1 JSON too)."""
        obj = cls(snap["n_clusters"], snap["bucket_seconds"], snap["max_buckets"])
        if snap.get("version") != SNAPSHOT_VERSION:
            return obj._restore_v1(snap)
        k = obj.n_clusters
        keys = np.asarray(snap["keys"], np.int64)
        u = obj._used = int(keys.size)
        first = snap.get("first_arrival")  # written before arrivals were recorded: not known
        obj._kf = _narrow(np.stack([keys.reshape(u), np.full(u, NO_ARRIVAL, np.int64)
                                    if first is None else np.asarray(first, np.int64).reshape(u)],
                                   axis=1))
        obj._set_counts(np.array(snap["counts"], np.int32).reshape(u, _HITS + k))
        obj._ps = [_restored_baseline(p) for p in np.asarray(snap["baselines"]).reshape(-1, k)]
        obj._p0s = [shared_float(x) for x in snap["ood_p0"]]
        dense = snap["expected"] is not None
        # the first column is the rows' cluster events less the others: not kept
        kp = np.asarray(snap["per_baseline"], np.int32).reshape(u, 1 if dense else len(obj._ps))
        obj._kp = kp[:, 1:].copy() if kp.shape[1] > 1 else None
        k0 = np.asarray(snap["per_ood_p0"], np.int32).reshape(u, 1 if dense else len(obj._p0s))
        obj._k0 = k0[:, 1:].copy() if k0.shape[1] > 1 else None
        obj._set_d(k0.sum(axis=1, dtype=np.int64))
        if dense:
            obj._exp = np.asarray(snap["expected"], np.float64).reshape(u, k + 1).copy()
        if snap["dropped"] is not None:
            obj._dropped = np.asarray(snap["dropped"], np.float64).copy()
        obj._dropped_until = snap["dropped_until"]
        tallies = snap.get("tallies")  # snapshots written before tallies have none
        if tallies:
            a = len(tallies["names"])
            tal = obj._tal = _Tallies(dense)
            tal.names, tal.trunc = list(tallies["names"]), list(tallies["truncated"])
            tal.cnt = np.asarray(tallies["counts"], np.int64).reshape(a, _HITS + k).tolist()
            tal.kp = np.asarray(tallies["per_baseline"], np.int64).reshape(
                a, obj._kp_columns()).tolist()
            tal.k0 = np.asarray(tallies["per_ood_p0"], np.int64).reshape(
                a, obj._k0_columns()).tolist()
            if dense:
                tal.exp = list(np.asarray(tallies["expected"], np.float64).reshape(
                    a, k + 1).copy())
        return obj

    def _restore_v1(self, snap: dict[str, Any]) -> SliceCounts:
        """v1: float rows ``[n, n_ood, ood_hits, ood_expected, counts, expected]`` by key."""
        k = self.n_clusters
        buckets = sorted((int(key), np.asarray(row, np.float64)) for key, row in snap["buckets"])
        rows = self._used = len(buckets)
        self._kf = _narrow(np.array([[key, NO_ARRIVAL] for key, _ in buckets],
                                    np.int64).reshape(rows, 2))
        self._cnt = np.zeros((rows, _HITS + k), np.int32)
        self._kp = self._k0 = None  # n: the cluster counts (v1 counted both together)
        n_ood = np.zeros(rows, np.int64)
        self._exp = np.zeros((rows, k + 1))
        for r, (_, v) in enumerate(buckets):
            self._cnt[r] = np.concatenate([v[2:3], v[4 : 4 + k]]).round()
            n_ood[r] = round(v[1])
            self._exp[r] = np.concatenate([v[4 + k :], v[3:4]])
        self._set_counts(self._cnt)
        self._set_d(n_ood)
        d = np.asarray(snap["dropped"], np.float64)
        if d.any():
            self._dropped = np.concatenate([d[:3], d[4 : 4 + k], d[4 + k :], d[3:4]])
        self._dropped_until = snap["dropped_until"]
        return self
