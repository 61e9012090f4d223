"""Root-slice attribution: which alarmed slice explains a set of concurrent alarms (pure).

Every event belongs to one slice of each template (``station``, ``station+shift``, ``shift``,
``lot``), so one physical change makes several slices alarm. The incident names the **root**:
the narrowest slice that explains the evidence; the other alarmed slices it explains are
``related``, never incidents of their own.

Each alarmed slice has a *strength*: the share of its events that moved since its onset
(:func:`driftline.alerts.evidence.effect`: total variation between the observed and expected
cluster mix, or the OOD excess rate, less noise). It is exactly linear under dilution, so a
slice whose events are partly from the changed population is *diluted*: weaker by that share.
Two slices are *compatible* when they agree on every dimension they share (their event sets
can intersect); slice ``C`` is *nested* in ``P`` when ``C``'s dimensions extend ``P``'s
(``press-3|night`` in ``press-3`` and in ``night``).

``R`` explains an alarmed ``Y`` when they are compatible, ``R``'s change is **timely** for
``Y`` (``R``'s onset is before ``Y``'s first detection, and ``R`` had events through at least
half of ``Y``'s window from onset to detection: a lot that ran out before ``Y`` changed explains
nothing), and

* ``Y`` is nested in ``R``, ``R`` shows ``Y``'s cluster gains (a station whose night shift
  gained cluster 6 while the station gained cluster 3 has two changes), and ``Y`` is not
  **concentrated** in ``R``. ``Y`` is concentrated when a sibling inside ``R`` (same template,
  e.g. ``press-3|day``) has clean data since the incident was first seen (its ``n`` grew by at
  least ``max(clean_events, clean_factor · Y's events since onset)``, no open detector, low
  ratios); it is not when a sibling alarms too (every child with data alarms: the parent's
  change); with no word from the siblings, when ``R`` is diluted against it (``s(R) < τ·s(Y)``).
  Shifts are sequential: while the night is bad the day shift has no data, so the station
  explains its night slice, and the incident re-roots to the night slice once the day shows
  clean data;
* ``R`` is nested in ``Y`` and concentrated in it (``press-3|night`` explains the fleet's
  ``night`` slice, which may hold other stations' changes too);
* neither is nested (a lot vs a station): ``Y`` is not stronger than ``R`` beyond the
  tolerance, ``s(Y) ≤ s(R)/τ``. Cluster gains are not compared here: the wider slice mixes
  stations whose gains and losses can cancel. A lot that changed at every station is at least
  as strong as each station, diluted by the other lots; one station's optics is stronger than
  the lots that merely ran through it.

The root maximises the number of alarmed slices it explains (one explanation for most of the
alarms); ties go to the more local template (station+shift, station, lot, shift: dimension
weights 3 station, 2 lot, 1 shift) and then to the stronger slice. Slices the root does not
explain are attributed again among themselves: they are separate incidents.

Checked on the demo's real pipeline output (``tests/unit/alerts/test_replay_demo.py``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from driftline.alerts.evidence import contained
from driftline.alerts.model import SliceEvidence, SliceRef, utc
from driftline.schema import parse_slice_id

_DIM_WEIGHT = {"station": 3, "lot": 2, "shift": 1}


@dataclass(frozen=True)
class AttributionPolicy:
    """``tolerance`` τ for "as strong as"; ``min_similarity`` for "the same change"; how far
    onsets may be off (``onset_slack_s``); what counts as a sibling's clean data."""

    tolerance: float = 0.75
    min_similarity: float = 0.5
    onset_slack_s: float = 30.0
    clean_events: int = 50
    clean_factor: float = 1.0
    clean_ratio: float = 0.5


@dataclass(frozen=True)
class SliceStatus:
    """A slice's entry of the detect stage's ``dl:detect:summary`` hash."""

    ref: SliceRef
    n: int
    open: bool
    max_ratio: float = 0.0
    last_time: datetime | None = None

    @classmethod
    def from_summary(cls, slice_id: str, raw: Mapping[str, Any]) -> SliceStatus:
        ratios = [float(r) for r in (raw.get("ratios") or {}).values()]
        last = raw.get("last_time")
        return cls(SliceRef(template=raw["template"], dims=dict(raw["dims"]), slice_id=slice_id),
                   int(raw.get("n") or 0), bool(raw.get("open")), max(ratios, default=0.0),
                   utc(float(last)) if last is not None else None)


@dataclass(frozen=True)
class Group:
    """One incident's worth of alarms: the root and the slices it explains."""

    root: SliceEvidence
    related: list[SliceEvidence] = field(default_factory=list)

    @property
    def slice_ids(self) -> set[str]:
        return {self.root.ref.slice_id, *(r.ref.slice_id for r in self.related)}


def compatible(a: SliceRef, b: SliceRef) -> bool:
    """The two slices agree on every dimension they share (their events can overlap)."""
    return all(b.dims[k] == v for k, v in a.dims.items() if k in b.dims)


def nested(inner: SliceRef, outer: SliceRef) -> bool:
    """``inner``'s dimensions strictly extend ``outer``'s, with the same values."""
    return len(inner.dims) > len(outer.dims) and all(
        inner.dims.get(k) == v for k, v in outer.dims.items())


def template_rank(ref: SliceRef) -> int:
    return sum(_DIM_WEIGHT.get(d, 1) for d in ref.dims)


class SummaryIndex:
    """The summary's multi-dimension slices by ``(dimension, value)`` (built once per batch)."""

    def __init__(self, summary: Mapping[str, SliceStatus]) -> None:
        self.summary = summary
        self.by_value: dict[tuple[str, str], set[str]] = {}
        for sid, st in summary.items():
            if len(st.ref.dims) > 1:
                for kv in st.ref.dims.items():
                    self.by_value.setdefault(kv, set()).add(sid)

    def sibling_candidates(self, members: Iterable[SliceRef]) -> set[str]:
        """Slices that may serve as clean siblings: multi-dimension slices sharing a
        dimension value with a member (an incident records their ``n`` when it sees them)."""
        out: set[str] = set()
        for m in members:
            for kv in m.dims.items():
                out |= self.by_value.get(kv, set())
        return out


def sibling_candidates(members: Iterable[SliceRef],
                       summary: Mapping[str, SliceStatus]) -> set[str]:
    return SummaryIndex(summary).sibling_candidates(members)


class Attributor:
    """Attribution over one set of alarmed slices, given the detect stage's summary."""

    def __init__(self, summary: Mapping[str, SliceStatus], baseline_n: Mapping[str, int],
                 policy: AttributionPolicy = AttributionPolicy()) -> None:
        self.summary = summary
        self.baseline_n = baseline_n
        self.policy = policy
        # Only slices whose n was recorded can show growth; index them by template.
        self._recorded: dict[str, list[SliceStatus]] = {}
        for sid in baseline_n:
            st = summary.get(sid)
            if st is not None:
                self._recorded.setdefault(st.ref.template, []).append(st)
        self._same: dict[tuple[str, str], bool] = {}
        self._concentrated: dict[tuple[str, str], bool] = {}

    def clean(self, sid: str, needed: int) -> bool:
        st = self.summary.get(sid)
        if st is None or sid not in self.baseline_n or st.open:
            return False
        grew = st.n - self.baseline_n[sid]
        return grew >= needed and st.max_ratio < self.policy.clean_ratio

    def concentrated(self, child: SliceEvidence, parent: SliceEvidence,
                     alarmed: set[str]) -> bool:
        """``child`` holds the change inside ``parent``: a sibling is clean or parent diluted."""
        key = (child.ref.slice_id, parent.ref.slice_id)
        if key not in self._concentrated:
            self._concentrated[key] = self._is_concentrated(child, parent, alarmed)
        return self._concentrated[key]

    def _is_concentrated(self, child: SliceEvidence, parent: SliceEvidence,
                         alarmed: set[str]) -> bool:
        """A sibling has clean data: concentrated. Else a sibling alarms too: the parent's
        change (all its children with data alarm). Else, no word from the siblings: the
        parent is diluted against the child."""
        needed = max(self.policy.clean_events,
                     int(self.policy.clean_factor * child.n_since_onset))
        if any(st.ref.slice_id not in alarmed and st.ref.slice_id != child.ref.slice_id
               and nested(st.ref, parent.ref) and self.clean(st.ref.slice_id, needed)
               for st in self._recorded.get(child.ref.template, ())):
            return True
        for sid in alarmed:
            if sid != child.ref.slice_id:
                dims = parse_slice_id(sid)
                if "+".join(dims) == child.ref.template and all(
                        dims.get(k) == v for k, v in parent.ref.dims.items()):
                    return False
        return parent.strength < self.policy.tolerance * child.strength

    def same_change(self, r: SliceEvidence, y: SliceEvidence) -> bool:
        """``r`` shows ``y``'s change: most of ``y``'s cluster gains are gains of ``r`` too
        (:func:`~driftline.alerts.evidence.contained`; true when ``y`` shows no gains beyond
        noise, e.g. a pure OOD rise)."""
        key = (r.ref.slice_id, y.ref.slice_id)
        if key not in self._same:
            share = contained(y.counts, r.counts)
            self._same[key] = share is None or share >= self.policy.min_similarity
        return self._same[key]

    def timely(self, r: SliceEvidence, y: SliceEvidence) -> bool:
        """``r``'s change can have caused ``y``'s alarm: it began before ``y`` was detected,
        and ``r`` had events through at least half of ``y``'s window from onset to first
        detection (a lot that ended before ``y``'s change began explains nothing). Onsets are
        estimates — a CUSUM often leaves zero early — so ``y``'s onset is not compared
        directly; ``onset_slack_s`` absorbs small errors of ``r``'s."""
        if r.onset is None or y.onset is None:
            return True
        slack = timedelta(seconds=self.policy.onset_slack_s)
        y_first = y.first_time or y.onset
        if r.onset > y_first + slack:
            return False
        st = self.summary.get(r.ref.slice_id)
        lasts = [t for t in (r.last_time, st.last_time if st else None) if t is not None]
        if not lasts:
            return True
        covered = min(max(lasts), y_first) - max(r.onset - slack, y.onset)
        return covered >= (y_first - y.onset) / 2 and max(lasts) >= y.onset

    def explains(self, r: SliceEvidence, y: SliceEvidence, alarmed: set[str]) -> bool:
        if r.ref.slice_id == y.ref.slice_id:
            return True
        if not compatible(r.ref, y.ref) or not self.timely(r, y):
            return False
        if nested(y.ref, r.ref):
            return self.same_change(r, y) and not self.concentrated(y, r, alarmed)
        if nested(r.ref, y.ref):  # the parent may hold other changes too: no same_change
            return self.concentrated(r, y, alarmed)
        # Neither nested (a lot and a station): the mixes of different stations' clusters can
        # cancel in the wider slice, so only time and strength can tell.
        return y.strength * self.policy.tolerance <= r.strength

    def choose(self, members: Sequence[SliceEvidence]) -> Group:
        """The root of ``members`` and the members it explains."""
        alarmed = {m.ref.slice_id for m in members}
        best: tuple[tuple[int, int, float, str], Group] | None = None
        for r in members:
            covered = [y for y in members
                       if y is not r and self.explains(r, y, alarmed)]
            key = (len(covered), template_rank(r.ref), r.strength, r.ref.slice_id)
            if best is None or key > best[0]:
                best = (key, Group(r, covered))
        if best is None:
            raise ValueError("no alarmed slices to attribute")
        return best[1]

    def partition(self, members: Sequence[SliceEvidence]) -> list[Group]:
        """Split ``members`` into groups, strongest explanation first."""
        left = list(members)
        groups = []
        while left:
            g = self.choose(left)
            groups.append(g)
            left = [m for m in left if m.ref.slice_id not in g.slice_ids]
        return groups
