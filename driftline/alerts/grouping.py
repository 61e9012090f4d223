"""Alarms → incidents: grouping, (re-)rooting, splitting, merging, auto-resolve (pure).

:class:`Grouper` works on the active incidents loaded by the book and the detect stage's slice
summary; the book stores what it marks dirty, in one transaction with the outbox cursor.

* Evidence is kept per *episode* of a slice's detector: the detect stage reports counts since
  the detector's first onset for as long as the slice stays open, so the book differences
  consecutive messages, and starts a new episode when the detector sat near zero before
  re-crossing or re-crossed after a long pause (:mod:`driftline.alerts.episodes`); the old
  episode's firing ends (an incident whose firings all ended resolves itself). Its cells,
  also since the alarm, are read less those when the episode began: a new episode is placed
  by its own events, and rejoins its detector's last one only in the incident that held it.
* An ``update`` continuing an episode refreshes that slice's evidence and firing. A new
  episode joins an open incident rooted at its slice, else the most recent concurrent incident
  (activity windows within ``group_window_s`` of event time) whose root explains it or that it
  explains, else one holding such a slice — in either case one whose change was still being
  detected when this one began; otherwise it opens an incident.
* After each batch (:meth:`Grouper.finish`) every touched incident is attributed again, once
  (:mod:`driftline.alerts.attribution`): its root may move (``rerooted``) as evidence arrives,
  slices it no longer explains split off into incidents of their own, and concurrent
  incidents that one root now explains merge into the older one (the other is resolved with
  ``merged_into``). Attribution is quadratic in an incident's slices, so it runs per batch,
  not per message.
* ``clear`` marks the slice's detector inactive; when every firing of the incident is inactive
  the incident resolves itself (``auto_resolved``).
* An incident the co-occurrence plan opens — split off, or a new root — is *held* (its
  changes recorded unrouted): while cells fill, the plan changes from batch to batch, and an
  incident it opens is often merged back a few batches later. It pages (one routed ``paged``
  change, as it stands) once the plan is *stable* behind it — at every :meth:`Grouper.finish`
  some plan root with readable cells was among its slices, while such a root counted
  ``stable_events`` more events (a finish that names no root in it starts the count again:
  hysteresis) — or after ``hold_max_s`` of event time (of wall time if no event comes; a
  clear due after that pages it before it resolves). An incident an alarm opens pages at
  once (something changed, and on-call should know), as do moves into incidents (joins,
  merges). A held incident merged away (or cleared in time) was never paged; one that takes
  over a paged incident pages at once.
* A new incident links to resolved ones with the same root template whose signature (cluster
  gain/loss vector and OOD excess) has cosine similarity ≥ ``recurrence_similarity``.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from driftline.alerts.attribution import (
    AttributionPolicy,
    Attributor,
    Group,
    SliceStatus,
    SummaryIndex,
    compatible,
    template_rank,
)
from driftline.alerts.bounds import drop_ended_slices, fold_ended_firings
from driftline.alerts.changes import Change, record_change, trim_timeline
from driftline.alerts.cooccurrence import (
    CellReader,
    CooccurrencePolicy,
    Plan,
    direction,
    persisted,
    totals,
)
from driftline.alerts.cooccurrence import attribute as cooccur
from driftline.alerts.episodes import (
    add_counts,
    combine,
    diff_counts,
    episode_cells,
    episode_split,
    new_episode_counts,
)
from driftline.alerts.evidence import (
    ClusterCatalog,
    build_evidence,
    recurrence,
    refresh,
    slice_evidence,
)
from driftline.alerts.model import (
    SYSTEM,
    EpisodeCounts,
    Firing,
    Incident,
    SliceEvidence,
    Status,
    TimelineEntry,
    utc,
)
from driftline.schema import CLEAR_REFERENCE_CHANGED

log = logging.getLogger(__name__)

# Timeline entries written by on-call (the API), carried over when incidents merge.
ON_CALL_ACTIONS = ("acknowledged", "annotated")


@dataclass(frozen=True)
class BookPolicy:
    """How alarms become incidents, and how much of them is kept."""

    group_window_s: float = 3600.0
    recurrence_similarity: float = 0.8
    recurrence_links: int = 3
    max_exemplars: int = 32
    max_timeline: int = 500
    # Related slices whose alarms all ended that an open incident keeps in full (evidence,
    # cells, exemplars, firings); older ones are dropped and counted (alerts/bounds.py). A
    # station's change that lasts days sees dozens of lots come and go through it; the demo's
    # incidents never hold more than 6 such slices.
    max_ended_slices: int = 32
    episode_gap_events: int = 50
    episode_gap_s: float = 600.0
    # A held incident pages after this much event time at the latest: a plan that never
    # settles (or a root too slow to count stable_events) pages ten minutes late at most.
    hold_max_s: float = 600.0
    # Plan stability (hysteresis): an incident the plan opened pages once plan roots in it
    # counted stable_events more events with a root in it at every finish (as many events as
    # cells need to be read at all). Events, not finishes: a finish is one message or
    # hundreds, as the batch happens to be.
    stable_events: int = 30
    attribution: AttributionPolicy = field(default_factory=AttributionPolicy)
    cooccurrence: CooccurrencePolicy = field(default_factory=CooccurrencePolicy)


def pending_key(slice_id: Any, detector: Any) -> str:
    """The failure book's ``reset_pending`` field for one detector of a slice (a tab cannot
    be in either: slice values refuse control characters)."""
    return f"{slice_id}\t{detector}"


class Grouper:
    """Applies outbox messages to the active incidents (see the module docstring)."""

    def __init__(self, active: Iterable[Incident], summary: Mapping[str, SliceStatus], *,
                 now: datetime, new_id: Callable[[], str],
                 signatures: Callable[[], Mapping[str, dict[str, Any]]],
                 policy: BookPolicy = BookPolicy(),
                 catalog: ClusterCatalog | None = None,
                 reset_pending: Iterable[str] = ()) -> None:
        self.incidents = {i.id: i for i in active}
        self.summary = summary
        self.index = SummaryIndex(summary)
        self.now = now
        self.new_id = new_id
        self.signatures = signatures
        self.policy = policy
        self.catalog = catalog or ClusterCatalog()
        self.dirty: set[str] = set()
        self.changes: list[Change] = []
        # Detectors of slices (:func:`pending_key`; or whole slices, as requested before) whose
        # incident on-call resolved: the detect stage will reset them; until it does, their
        # ``update`` messages belong to the resolved incident, not a new one.
        self.reset_pending = set(reset_pending)
        self.reset_done: set[str] = set()
        self._todo: dict[str, bool] = {}  # incident id -> store even if unchanged
        self._joined: dict[str, list[str]] = {}
        self._created: set[str] = set()
        self._took_over: dict[str, str] = {}  # held incident id -> paged incident it absorbed
        self._clock: datetime | None = None  # the newest event time applied
        self._plan = Plan()  # the co-occurrence attribution of the last finish()
        self._home: dict[str, str] = {}  # slice -> the incident holding the evidence it read
        self._cells = CellReader(policy.cooccurrence)

    # --- entry points --------------------------------------------------------------------
    def apply(self, msg: Mapping[str, Any]) -> None:
        """Apply one outbox message; call :meth:`finish` after the batch."""
        kind = msg.get("kind")
        sid = msg.get("slice_id")
        if isinstance(msg.get("time"), int | float):
            at = utc(msg["time"])
            self._clock = at if self._clock is None or at > self._clock else self._clock
        key = pending_key(sid, msg.get("detector"))
        if key in self.reset_pending:
            # this detector's re-crossings until the detect stage resets it: the resolved
            # incident's; its next alarm or clear comes after the reset
            if kind == "update":
                return
            self.reset_pending.discard(key)
            self.reset_done.add(key)
        elif sid in self.reset_pending:  # a whole-slice request (written before per detector)
            if kind == "update" and not any(sid in i.slices for i in self._active()):
                return
            self.reset_pending.discard(sid)
            self.reset_done.add(sid)
        if kind in ("alarm", "update"):
            self._alarm(msg)
        elif kind == "clear":
            self._clear(msg)
        else:
            log.warning("outbox message of unknown kind skipped", extra={"kind": kind})

    def reattribute(self) -> None:
        """Attribute every active incident again (the summary may show new clean data)."""
        for inc in self._active():
            self._todo.setdefault(inc.id, False)
        self.finish()

    def finish(self) -> None:
        """Attribute the incidents the batch touched (once each), then merge concurrent ones
        that one root explains, then release the held incidents that may page. Incidents
        opened and merged within the batch are not routed: nobody needs an alert that lived
        for a few milliseconds."""
        self._cooccur()
        touched = sorted((self.incidents[i] for i in self._todo), key=_age)
        for inc in touched:
            if inc.active:
                self._attribute(inc, mark=self._todo[inc.id])
            joined = [s for s in self._joined.get(inc.id, [])
                      if s in inc.slices and s != inc.root.slice_id]
            if joined:
                self._record(inc, "related_added", ", ".join(joined))
        for inc in touched:
            self._merge_around(inc)
        self._release()
        for inc in self._active():
            if inc.id in self.dirty:
                self._bound(inc)
        self._todo.clear()
        self._joined.clear()
        self._took_over.clear()
        transient = {i for i in self._created if self.incidents[i].merged_into}
        self.changes = [replace(c, routed=False) if c.incident_id in transient else c
                        for c in self.changes]

    def _bound(self, inc: Incident) -> None:
        """Keep a long-lived incident bounded (:mod:`driftline.alerts.bounds`): ended firings
        folded, the oldest ended related slices dropped (and the clean-sibling counts only
        they needed), and what follows from the slices recomputed."""
        inc.detectors = fold_ended_firings(inc.detectors)
        if drop_ended_slices(inc, self.policy.max_ended_slices):
            wanted = self.index.sibling_candidates(s.ref for s in inc.slices.values())
            inc.baseline_n = {k: n for k, n in inc.baseline_n.items() if k in wanted}
            refresh(inc, self.catalog, self.policy.max_exemplars)  # never escalates: less

    def _event_clock(self) -> datetime:
        """The newest event time this book knows: messages applied and incidents' activity
        (a plant gone quiet stops it: :meth:`_expired` then counts wall time)."""
        times = [i.last_activity for i in self._active()]
        if self._clock is not None:
            times.append(self._clock)
        return max(times, default=self.now)

    def _release(self) -> None:
        """Page every held active incident the co-occurrence plan has stood behind long enough
        (:meth:`_stable`), that took over a paged incident, or that has been held
        ``hold_max_s``: one routed ``paged`` change."""
        held = [i for i in sorted(self._active(), key=_age) if i.held]
        if not held:
            return
        clock = self._event_clock()
        for inc in held:
            if self._stable(inc):
                why = f"the plan stood behind it for {self.policy.stable_events} events"
            elif inc.id in self._took_over:
                why = f"it took over {self._took_over[inc.id]}, already paged"
            elif (expired := self._expired(inc, clock)) is not None:
                why = expired
            else:
                continue
            self._page(inc, clock, why)

    def _expired(self, inc: Incident, clock: datetime) -> str | None:
        """Why ``inc`` has been held long enough: ``hold_max_s`` of event time by ``clock``,
        or of wall time (a quiet plant whose clock stands still); else None."""
        limit = self.policy.hold_max_s
        if self._held_for(inc, clock) >= limit:
            return f"the plan did not settle within {limit:.0f} s"
        if (self.now - inc.created_at).total_seconds() >= limit:
            return f"the plan did not settle within {limit:.0f} s of wall time"
        return None

    @staticmethod
    def _held_for(inc: Incident, clock: datetime) -> float:
        since = max(inc.detected_at, inc.held_since or inc.detected_at)
        return max(0.0, (clock - since).total_seconds())

    def _page(self, inc: Incident, clock: datetime, why: str) -> None:
        inc.held, inc.stable_from = False, {}
        self._record(inc, "paged", f"held {self._held_for(inc, clock):.0f} s of event time: {why}")

    def _stable(self, inc: Incident) -> bool:
        """Hysteresis on the plan: this finish names a root among ``inc``'s slices whose cells
        are readable, and so did every finish since such a root had ``stable_events`` fewer
        events. The roots may change within the incident (``station=cam-2`` and
        ``station=cam-2|shift=night`` hold the same events until day shift comes): each counts
        from when it was first named; a finish that names none starts again."""
        here = [r for r in self._plan.roots
                if r in inc.slices and self._cells(inc.slices[r]) is not None]
        if not here:
            if inc.stable_from:
                inc.stable_from = {}
                self.dirty.add(inc.id)
            return False
        for r in here:
            if r not in inc.stable_from:
                inc.stable_from[r] = inc.slices[r].n_since_onset
                self.dirty.add(inc.id)
        return max((inc.slices[r].n_since_onset - n for r, n in inc.stable_from.items()
                    if r in inc.slices), default=0) >= self.policy.stable_events

    # --- alarms --------------------------------------------------------------------------
    def _alarm(self, msg: Mapping[str, Any]) -> None:
        sid, det = msg["slice_id"], msg["detector"]
        counts = (msg.get("evidence") or {}).get("counts")
        held = self._firing_of(sid, det)
        onset: datetime | None = None
        episode = counts
        start: dict[str, Any] | None = None  # the alarm's cells when this episode began
        left: Incident | None = None  # an incident this new episode leaves with no live firing
        if held is not None:
            inc, f = held
            delta = diff_counts(counts, f.episode.last) if counts else None
            split = episode_split(f, msg, new_episode_counts(msg, delta),
                                  gap_events=self.policy.episode_gap_events,
                                  gap_s=self.policy.episode_gap_s) if msg["kind"] == "update" else (
                f.onset, counts)  # a first crossing while we hold one: the slice restarted
            if split is not None and msg["kind"] == "update" and self._persisted(f, msg):
                split = None
            if split is None:
                self._continue(inc, f, msg, counts, delta)
                return
            onset, episode = split
            if msg["kind"] == "update":  # the detect stage's cells go on from the alarm
                start = f.episode.last_cells
            self._end_firing(inc, f, "new episode")
            left = None if inc.active else inc
        ev = _evidence(msg, episode, onset if held is not None else None, start)
        firing = Firing(slice_id=sid, detector=det, statistic=msg["statistic"],
                        threshold=msg["threshold"], argmax=msg.get("argmax") or {},
                        onset=ev.onset, first_detected=ev.last_time or self.now,
                        last_detected=ev.last_time or self.now,
                        events_at_detection=ev.n_since_onset or None,
                        episode=EpisodeCounts(last=counts, counts=episode,
                                              slice_n=msg.get("slice_n"),
                                              cells=totals(_raw_cells(msg), det),
                                              last_cells=_raw_cells(msg).get(det),
                                              start_cells=start))
        target = self._place(ev)
        if target is None:
            self._open([ev], [firing], note=None, hold=False)
            return
        target.detectors.append(firing)
        old = target.slices.get(sid)
        if old is None:
            self._joined.setdefault(target.id, []).append(sid)
        elif (held is not None and held[0] is target and held[1].episode.counts and episode
              and held[1].onset and ev.onset and held[1].onset < ev.onset):
            # The detector's next episode is back in the incident of its last one (placed by
            # its own events: the same change): one evidence spans both. Only that detector's
            # episode: another detector's evidence for the slice counts the same events.
            prev = held[1]
            firing.onset = prev.onset
            firing.episode.counts = add_counts(prev.episode.counts, episode)
            firing.episode.start_cells = prev.episode.start_cells
            ev = _evidence(msg, firing.episode.counts, prev.onset, prev.episode.start_cells)
            ev.first_time = old.first_time if old.onset == prev.onset else prev.first_detected
        self._set_evidence(target, ev)
        if left is not None and left is not target and self._mergeable(target, left):
            # The slice's first episode had opened an incident of its own (nothing explained it
            # in time); its next one joined this incident, whose root explains both: one
            # problem, not a resolved one beside it. ``left`` has just auto-resolved (its only
            # firing ended), so the live ``target`` is kept even when ``left`` is older: the
            # older-id rule of the other merges is between active incidents, and reopening
            # ``left`` would move the page on-call knows to an id it may never have seen.
            self._merge(target, left)

    def _continue(self, inc: Incident, f: Firing, msg: Mapping[str, Any],
                  counts: dict[str, Any] | None, delta: dict[str, Any] | None) -> None:
        """A re-crossing within the episode: fresh statistics and evidence."""
        at = utc(msg["time"])
        f.statistic, f.threshold = msg["statistic"], msg["threshold"]
        f.argmax = msg.get("argmax") or {}
        f.last_detected = max(f.last_detected, at)
        f.crossings += 1
        if delta is not None:
            f.episode.counts = add_counts(f.episode.counts, delta)
        f.episode.last, f.episode.slice_n = counts, msg.get("slice_n")
        ev = _evidence(msg, f.episode.counts, f.onset, f.episode.start_cells)
        raw = _raw_cells(msg)
        f.episode.cells = totals(raw, f.detector) or f.episode.cells
        f.episode.last_cells = raw.get(f.detector) or f.episode.last_cells
        old = inc.slices.get(f.slice_id)
        ev.first_time = min(f.first_detected, old.first_time or f.first_detected) \
            if old is not None and old.onset == f.onset else f.first_detected
        self._set_evidence(inc, ev)

    def _persisted(self, f: Firing, msg: Mapping[str, Any]) -> bool:
        """The alarm's cells show its change went on between its last message and this one
        (an exact test on the events in between, :func:`~driftline.alerts.cooccurrence.
        persisted`): a re-crossing of the same change, not a new episode — the detector sat
        near zero only because a moderate change climbs slowly. Without cells: not known."""
        cells = {f.detector: (msg.get("evidence") or {}).get("cells") or {}}
        now = totals(cells, f.detector)
        if now is None or f.episode.cells is None or now[0] <= f.episode.cells[0]:
            return False
        own = (totals({f.detector: episode_cells(f.episode.last_cells, f.episode.start_cells)},
                      f.detector) if f.episode.last_cells else None)
        return persisted(f.episode.cells, now, direction(cells, f.detector),
                         self.policy.cooccurrence, own)

    def _set_evidence(self, inc: Incident, ev: SliceEvidence) -> None:
        old = inc.slices.get(ev.ref.slice_id)
        if old is not None:
            ev.cells = {**old.cells, **ev.cells}
        if old is not None:  # keep earlier exemplars too, newest first, bounded
            seen = {x["event_id"] for x in ev.exemplars}
            ev.exemplars.extend(x for x in old.exemplars if x["event_id"] not in seen)
            del ev.exemplars[self.policy.max_exemplars:]
        inc.slices[ev.ref.slice_id] = ev
        self._touch(inc, ev.last_time)
        self._todo[inc.id] = True

    def _firing_of(self, sid: str, detector: str) -> tuple[Incident, Firing] | None:
        for inc in self._active():
            for f in inc.detectors:
                if f.slice_id == sid and f.detector == detector and f.active:
                    return inc, f
        return None

    def _end_firing(self, inc: Incident, f: Firing, why: str) -> None:
        f.active, f.cleared_at = False, f.last_detected
        self._touch(inc, None)
        self._todo.setdefault(inc.id, False)
        if not any(x.active for x in inc.detectors):
            inc.status, inc.resolved_at, inc.auto_resolved = Status.resolved, self.now, True
            self._record(inc, "auto_resolved", f"every detector cleared or moved on ({why})")

    def _clear(self, msg: Mapping[str, Any]) -> None:
        held = self._firing_of(msg["slice_id"], msg["detector"])
        if held is None:
            return
        inc, f = held
        f.active, f.cleared_at = False, utc(msg["time"])
        self._touch(inc, f.cleared_at)
        if not any(x.active for x in inc.detectors):
            if inc.held and (why := self._expired(inc, f.cleared_at)):
                self._page(inc, f.cleared_at, why)  # it was due: on-call hears of it, once
            inc.status, inc.resolved_at, inc.auto_resolved = Status.resolved, self.now, True
            self._record(inc, "auto_resolved", _cleared_note(inc, msg))

    # --- placement, attribution, merging -------------------------------------------------
    def _active(self) -> list[Incident]:
        return [i for i in self.incidents.values() if i.active]

    def _window(self, inc: Incident) -> tuple[datetime, datetime]:
        w = timedelta(seconds=self.policy.group_window_s)
        return (inc.onset or inc.detected_at) - w, inc.last_activity + w

    def _concurrent(self, a: Incident, start: datetime, end: datetime) -> bool:
        lo, hi = self._window(a)
        return start <= hi and end >= lo

    def _attributor(self, inc: Incident, extra: Iterable[SliceEvidence] = ()) -> Attributor:
        refs = [s.ref for s in (*inc.slices.values(), *extra)]
        for sid in self.index.sibling_candidates(refs) - set(inc.baseline_n):
            inc.baseline_n[sid] = self.summary[sid].n
        return Attributor(self.summary, inc.baseline_n, self.policy.attribution)

    def _place(self, ev: SliceEvidence) -> Incident | None:
        decided, target = self._place_by_cells(ev)
        return target if decided else self._place_by_totals(ev)

    def _place_by_cells(self, ev: SliceEvidence) -> tuple[bool, Incident | None]:
        """Where co-occurrence attribution over the active incidents' alarms and ``ev`` puts
        ``ev`` (:meth:`_cooccur` would move it there): ``(True, the concurrent incident rooted
        at its root or holding it)``, ``(True, None)`` to open one; ``(False, None)`` when the
        cells cannot tell (too few events in ``ev``'s, or noise no root is compatible with)."""
        sid = ev.ref.slice_id
        if self._cells(ev) is None:
            return False, None
        members = {s: i.slices[s] for s, i in self._latest().items()}
        members[sid] = ev
        root = cooccur(list(members.values()), self.policy.cooccurrence,
                       self._cells).root_of.get(sid)
        if root is None:
            return False, None
        start, end = ev.onset or ev.last_time or self.now, ev.last_time or self.now
        live = [i for i in self._active() if self._concurrent(i, start, end)]
        held = ([i for i in live if i.root.slice_id == root]
                or ([] if root == sid else [i for i in live if root in i.slices]))
        return True, max(held, key=lambda i: i.last_activity) if held else None

    def _place_by_totals(self, ev: SliceEvidence) -> Incident | None:
        """An open incident rooted at ``ev``'s slice; else the most recent concurrent incident
        whose root explains ``ev`` or that ``ev`` explains; else the concurrent incident holding
        such a slice of the most local template (station+shift, station, lot, shift), the most
        recent first (a cheap test; :meth:`finish` attributes the whole group).

        Roots first, and local slices before wide ones, as attribution chooses: when two changes
        run at once (one station's optics, another's lighting) a slice that mixes both (the
        shift, a lot) explains the alarms of each; joined through it, a station's night cell
        ended up in a group of its own with that night's lots, which neither incident's root
        explained, rather than beside its own station's alarm."""
        start = ev.onset or ev.last_time or self.now
        end = ev.last_time or self.now
        # The open incident's own root slice changing again is that incident again.
        same_root = [i for i in self._active() if i.root.slice_id == ev.ref.slice_id
                     and self._concurrent(i, start, end)]
        if same_root:
            return max(same_root, key=lambda i: i.last_activity)
        candidates = [i for i in sorted(self._active(), key=lambda i: i.last_activity,
                                        reverse=True) if self._concurrent(i, start, end)]
        for inc in candidates:
            if self._explaining(inc, ev, roots_only=True):
                return inc
        best: tuple[int, Incident] | None = None
        for inc in candidates:  # most recent first: it wins ties
            rank = max((template_rank(s.ref) for s in self._explaining(inc, ev)), default=-1)
            if rank >= 0 and (best is None or rank > best[0]):
                best = (rank, inc)
        return best[1] if best is not None else None

    def _explaining(self, inc: Incident, ev: SliceEvidence,
                    roots_only: bool = False) -> list[SliceEvidence]:
        """``inc``'s slices (or its root) that explain ``ev`` or that ``ev`` explains, their
        changes under way together; or ``ev``'s own slice there, live, another detector's
        alarm showing the same change."""
        near = [s for s in inc.slices.values() if compatible(s.ref, ev.ref)
                and (not roots_only or s.ref.slice_id == inc.root.slice_id)]
        if not near:
            return []
        att = self._attributor(inc, [ev])
        alarmed = {*inc.slices, ev.ref.slice_id}
        live = {f.slice_id for f in inc.detectors if f.active}
        out = []
        for s in near:
            if s.ref.slice_id == ev.ref.slice_id:  # another detector of the same slice
                if s.ref.slice_id in live and att.timely(s, ev) and att.timely(ev, s) \
                        and att.same_change(s, ev):
                    out.append(s)
            elif self._together(s, ev) and (att.explains(s, ev, alarmed)
                                            or att.explains(ev, s, alarmed)):
                out.append(s)
        return out

    def _together(self, a: SliceEvidence, b: SliceEvidence) -> bool:
        """Both changes were under way at one time: neither slice's change was last detected
        before the other's began. A change that persists re-crosses (the detector restarts
        after each alarm), so its last detection stays recent; one that ended (a lot that ran
        out, an episode a slice has moved on from) stops there and is no reason to put a later
        change in its incident — attribution may still merge the two if one root explains
        both."""
        slack = timedelta(seconds=self.policy.attribution.onset_slack_s)
        return not ((a.last_time is not None and b.onset is not None
                     and a.last_time < b.onset - slack)
                    or (b.last_time is not None and a.onset is not None
                        and b.last_time < a.onset - slack))

    def _cooccur(self) -> None:
        """Make the active incidents the co-occurrence plan of all their alarms
        (:mod:`driftline.alerts.cooccurrence`): a function of the alarms and their cells, not of
        the order they came in. Each root claims an incident — the one rooted there, else the
        one holding most of its group (the oldest on ties), else a new one split off — and its
        group's slices move there; an incident left with none of its slices is merged into the
        one that took most (on-call's acknowledgements go with it). Slices the plan does not
        read (no cells, too few events) stay, and :meth:`_attribute` places them by totals."""
        incs = sorted(self._active(), key=_age)
        owner = self._latest()
        plan = self._plan = cooccur([owner[s].slices[s] for s in owner],
                                    self.policy.cooccurrence, self._cells)
        groups = {r: sorted(s for s, x in plan.root_of.items() if x == r) for r in plan.roots}
        claimed: dict[str, Incident] = {}
        for r in plan.roots:  # incidents rooted at a root first (the oldest), then the rest
            mine = next((i for i in incs if i.root.slice_id == r), None)
            if mine is not None:
                claimed[r] = mine
        for r in plan.roots:
            if r in claimed:
                continue
            free = [i for i in incs if i.id not in {c.id for c in claimed.values()}]
            held = Counter(owner[s].id for s in groups[r])
            mine = min((i for i in free if held[i.id]), default=None,
                       key=lambda i: (-held[i.id], _age(i)))
            if mine is not None:
                claimed[r] = mine
        moves: list[tuple[str, str, str]] = []  # (from, to, slice)
        for r in plan.roots:
            dst = claimed.get(r)
            order = [r, *(s for s in groups[r] if s != r)]
            if dst is None:
                src = owner[r]
                taken = [(owner[s].id, *self._take(owner[s], s)) for s in order]
                dst = self._open([e for _, e, _ in taken], [f for *_, fs in taken for f in fs],
                                 note=f"split from {src.id}", baseline_n=dict(src.baseline_n),
                                 hold=True)
                moves += [(i, dst.id, s) for (i, _, _), s in zip(taken, order, strict=True)]
                continue
            for s in order:
                src = owner[s]
                if src is dst:
                    continue
                ev, firings = self._take(src, s)
                dst.slices[s] = combine(dst.slices[s], ev) if s in dst.slices else ev
                dst.detectors.extend(firings)
                self._joined.setdefault(dst.id, []).append(s)
                self._touch(dst, ev.last_time)
                moves.append((src.id, dst.id, s))
            if dst.root.slice_id != r:
                old, dst.root = dst.root.slice_id, dst.slices[r].ref
                self._refresh(dst)
                self._record(dst, "rerooted", f"{old} → {r}")
                self._link_recurrence(dst)
            self._todo[dst.id] = True
        self._home = {s: i.id for s, i in owner.items() if s in plan.root_of}
        self._home.update({s: b for _, b, s in moves})
        self._settle_sources(moves, {i.id for i in claimed.values()})

    def _latest(self) -> dict[str, Incident]:
        """Per alarmed slice, the active incident holding its latest episode (the oldest
        incident on ties): what co-occurrence reads. A slice's earlier episode, ended, stays
        with the incident of the change it showed; a later one is another change's evidence."""
        owner: dict[str, Incident] = {}
        for inc in sorted(self._active(), key=_age):
            for sid, ev in inc.slices.items():
                cur = owner.get(sid)
                if cur is None or _start(ev) > _start(cur.slices[sid]):
                    owner[sid] = inc
        return owner

    def _planned(self, inc: Incident) -> set[str]:
        """``inc``'s slices whose evidence there the last co-occurrence plan read."""
        return {s for s in inc.slices if self._home.get(s) == inc.id}

    def _take(self, inc: Incident, sid: str) -> tuple[SliceEvidence, list[Firing]]:
        """Remove slice ``sid`` and its firings from ``inc``."""
        firings = [f for f in inc.detectors if f.slice_id == sid]
        inc.detectors = [f for f in inc.detectors if f.slice_id != sid]
        self._todo.setdefault(inc.id, True)
        self.dirty.add(inc.id)
        return inc.slices.pop(sid), firings

    def _settle_sources(self, moves: list[tuple[str, str, str]], claimed: set[str]) -> None:
        """Incidents that lost slices to :meth:`_cooccur`: ``split`` recorded; one no root
        claimed and left with no live firing (what it was about moved) is merged into the
        incident that took most of its slices, the oldest on ties — on-call's
        acknowledgements go with it."""
        by_src: dict[str, dict[str, list[str]]] = {}
        for a, b, s in moves:
            if a != b:
                by_src.setdefault(a, {}).setdefault(b, []).append(s)
        for src_id, to in sorted(by_src.items()):
            src = self.incidents[src_id]
            for dst, sids in sorted(to.items()):
                self._record(src, "split", f"{', '.join(sorted(sids))} → {dst}")
            if src_id not in claimed and not any(f.active for f in src.detectors):
                keep = self.incidents[min(to, key=lambda d: (-len(to[d]),
                                                             _age(self.incidents[d])))]
                if keep.active:
                    self._merge(keep, src)

    def _partition(self, inc: Incident) -> list[Group]:
        """``inc``'s groups: with a co-occurrence root, that root and the slices the plan gives
        it, plus slices the plan does not read that the root explains by totals; the rest (and
        every incident without such a root) by totals (:class:`Attributor`)."""
        att = self._attributor(inc)
        members = list(inc.slices.values())
        plan, root = self._plan, inc.root.slice_id
        if root not in plan.roots or root not in inc.slices:
            return att.partition(members)
        r, alarmed, read = inc.slices[root], set(inc.slices), self._planned(inc)
        mine = [m for m in members if m.ref.slice_id in read
                and plan.root_of.get(m.ref.slice_id) == root and m.ref.slice_id != root]
        unread = [m for m in members if m.ref.slice_id not in read]
        keep = [m for m in unread if att.explains(r, m, alarmed)]
        rest = [m for m in members if m is not r and not any(m is x for x in (*mine, *keep))]
        return [Group(r, mine + keep), *(att.partition(rest) if rest else [])]

    def _attribute(self, inc: Incident, *, mark: bool) -> None:
        n_known = len(inc.baseline_n)
        groups = self._partition(inc)
        mark = mark or len(inc.baseline_n) != n_known
        main, rest = groups[0], groups[1:]
        for g in rest:
            moved = g.slice_ids
            firings = [f for f in inc.detectors if f.slice_id in moved]
            inc.detectors = [f for f in inc.detectors if f.slice_id not in moved]
            for sid in moved:
                del inc.slices[sid]
            new = self._open([g.root, *g.related], firings, note=f"split from {inc.id}",
                             baseline_n=dict(inc.baseline_n), hold=True)
            self._record(inc, "split", f"{', '.join(sorted(moved))} → {new.id}")
        if main.root.ref.slice_id != inc.root.slice_id:
            old = inc.root.slice_id
            inc.root = main.root.ref
            self._refresh(inc)
            self._record(inc, "rerooted", f"{old} → {inc.root.slice_id}")
            self._link_recurrence(inc)
        elif mark or rest:
            self._refresh(inc)
            self.dirty.add(inc.id)
        else:  # periodic re-attribution: store only what changed
            before = (inc.severity, [r.slice_id for r in inc.related])
            self._refresh(inc)
            if (inc.severity, [r.slice_id for r in inc.related]) != before:
                self.dirty.add(inc.id)

    def _merge_around(self, inc: Incident) -> None:
        """Merge concurrent incidents into ``inc`` (or it into an older one) while one root
        explains both groups."""
        while inc.active:
            other = next((o for o in sorted(self._active(), key=_age)
                          if o.id != inc.id and self._mergeable(inc, o)), None)
            if other is None:
                return
            keep, gone = (inc, other) if _age(inc) <= _age(other) else (other, inc)
            self._merge(keep, gone)
            inc = keep

    def _merge(self, keep: Incident, gone: Incident) -> None:
        """``gone``'s slices and firings move to ``keep``, which is attributed again."""
        for sid, ev in gone.slices.items():
            keep.slices[sid] = combine(keep.slices[sid], ev) if sid in keep.slices else ev
        keep.detectors.extend(gone.detectors)
        for sid, n in gone.baseline_n.items():
            keep.baseline_n[sid] = min(n, keep.baseline_n.get(sid, n))
        self._carry_on_call(gone, keep)
        # A paged incident (not one opened in this batch: its changes go unrouted) merged
        # into a held one pages it; so does one that took over a paged one.
        paged = (self._took_over.get(gone.id) if gone.held
                 else None if gone.id in self._created else gone.id)
        if keep.held and paged is not None:
            self._took_over[keep.id] = paged
        gone.status, gone.resolved_at, gone.merged_into = Status.resolved, self.now, keep.id
        self._record(gone, "merged", f"into {keep.id}")
        self._touch(keep, gone.last_activity)
        roots = self._plan.roots
        if (gone.root.slice_id in roots and keep.root.slice_id not in roots
                and gone.root.slice_id in keep.slices):
            old, keep.root = keep.root.slice_id, gone.root
            self._record(keep, "rerooted", f"{old} → {keep.root.slice_id}")
        self._attribute(keep, mark=True)
        self._record(keep, "related_added", f"merged {gone.id}")

    def _carry_on_call(self, gone: Incident, keep: Incident) -> None:
        """On-call's acknowledgements and notes on a merged incident go with it: the kept one
        is acknowledged if either was, and its timeline shows who did what, and where."""
        carried = [TimelineEntry(at=e.at, who=e.who, action=e.action,
                                 note=f"on {gone.id}" + (f": {e.note}" if e.note else ""))
                   for e in gone.timeline if e.action in ON_CALL_ACTIONS]
        if not carried:
            return
        keep.timeline = sorted([*keep.timeline, *carried], key=lambda e: e.at)
        trim_timeline(keep.timeline, self.policy.max_timeline)
        # ``gone`` may have auto-resolved just before (a slice's next episode moved its only
        # firing here): its acknowledgement is read from its timeline, not its status.
        if keep.status is Status.open and any(e.action == "acknowledged" for e in carried):
            keep.status = Status.acknowledged

    def _mergeable(self, a: Incident, b: Incident) -> bool:
        lo, hi = self._window(a)
        if not self._concurrent(b, lo, hi):
            return False
        if a.root.slice_id == b.root.slice_id:  # one problem, seen twice
            return True
        ra, rb = a.slices[a.root.slice_id], b.slices[b.root.slice_id]
        att = self._attributor(a, b.slices.values())
        alarmed = {*a.slices, *b.slices}
        planned = [i for i in (a, b) if i.root.slice_id in self._plan.roots]
        if len(planned) == 2:  # two roots of the co-occurrence plan: two changes
            return False
        if planned:  # one: the other's slices, none read by the plan, all explained by it
            r = planned[0].slices[planned[0].root.slice_id]
            other = b if planned[0] is a else a
            return not self._planned(other) and all(
                att.explains(r, s, alarmed) for s in other.slices.values())
        if not (att.explains(ra, rb, alarmed) or att.explains(rb, ra, alarmed)):
            return False
        return len(att.partition([*a.slices.values(), *b.slices.values()])) == 1

    # --- incidents -----------------------------------------------------------------------
    def _open(self, slices: list[SliceEvidence], firings: list[Firing], *, note: str | None,
              hold: bool, baseline_n: dict[str, int] | None = None) -> Incident:
        """A new incident; ``hold``: the plan opened it, so it pages once :meth:`_release`
        lets it."""
        root = slices[0]
        detected = min((f.first_detected for f in firings), default=root.last_time or self.now)
        inc = Incident(id=self.new_id(), root=root.ref, detected_at=detected,
                       evidence=build_evidence(root, slices, self.catalog, 0),
                       slices={s.ref.slice_id: s for s in slices}, detectors=firings,
                       baseline_n=baseline_n or {}, created_at=self.now, updated_at=self.now,
                       last_activity=max(s.last_time or detected for s in slices),
                       held=hold, held_since=self._event_clock() if hold else None)
        self.incidents[inc.id] = inc
        self._created.add(inc.id)
        self._todo.setdefault(inc.id, True)
        self._attributor(inc)
        self._refresh(inc)
        self._link_recurrence(inc)
        self._record(inc, "opened", note)
        return inc

    def _refresh(self, inc: Incident) -> None:
        old = refresh(inc, self.catalog, self.policy.max_exemplars)
        if old is not None and inc.timeline:  # the first computation is not an escalation
            self._record(inc, "escalated", f"{old.value} → {inc.severity.value}")

    def _link_recurrence(self, inc: Incident) -> None:
        inc.recurrence = recurrence(inc, self.signatures(), self.policy.recurrence_similarity,
                                    self.policy.recurrence_links)

    def _touch(self, inc: Incident, at: datetime | None) -> None:
        if at is not None and at > inc.last_activity:
            inc.last_activity = at
        self.dirty.add(inc.id)

    def _record(self, inc: Incident, action: str, note: str | None) -> None:
        self.changes.append(record_change(inc, action, who=SYSTEM, at=self.now, note=note,
                                          max_timeline=self.policy.max_timeline))
        self.dirty.add(inc.id)


def _cleared_note(inc: Incident, msg: Mapping[str, Any]) -> str:
    """Why the last firing's clear resolved ``inc``: its detectors back at the no-drift
    level, or restarted on a newly activated reference (the change may go on: the new
    reference's detectors judge it afresh, and open their own incident if it does)."""
    if msg.get("reason") == CLEAR_REFERENCE_CHANGED:
        return (f"alarms cleared by the switch to reference {msg.get('reference_id') or '?'}: "
                "the detectors restarted on its clusters, the change was not seen to end")
    return f"all {len(inc.detectors)} detectors back at the no-drift level"


def _raw_cells(msg: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The message's cells, as the detect stage sent them (since the alarm was raised)."""
    cells = (msg.get("evidence") or {}).get("cells")
    return {msg["detector"]: cells} if cells else {}


def _evidence(msg: Mapping[str, Any], counts: Mapping[str, Any] | None,
              onset: datetime | None, start: Mapping[str, Any] | None) -> SliceEvidence:
    """The episode's evidence: its counts since ``onset``, its own cells since ``start``."""
    ev = slice_evidence(msg, counts, onset)
    if start and msg["detector"] in ev.cells:
        ev.cells[msg["detector"]] = episode_cells(ev.cells[msg["detector"]], start)
    return ev


def group_of(inc: Incident) -> Group:
    """The incident's attribution result as a :class:`Group` (tests and the API)."""
    return Group(inc.slices[inc.root.slice_id],
                 [inc.slices[r.slice_id] for r in inc.related if r.slice_id in inc.slices])


def _start(ev: SliceEvidence) -> datetime:
    return ev.onset or ev.last_time or datetime.min.replace(tzinfo=UTC)


def _age(inc: Incident) -> tuple[datetime, str]:
    """Oldest first; ids break ties between incidents opened in the same batch."""
    return inc.created_at, inc.id
