"""How much of a long-lived incident the book keeps (pure; :meth:`Grouper.finish` applies it).

An incident can stay open for days while its detectors fire, clear and fire again, and while
lots come and go through its root. Each ended episode left a :class:`Firing` behind and each
ended lot its :class:`SliceEvidence` (counts, cells, up to ``max_exemplars`` exemplars), so the
stored record — loaded and parsed at every batch while the incident is active — grew without
bound. In the spirit of the timeline's trim (:func:`~driftline.alerts.changes.trim_timeline`:
what on-call needs stays, the oldest of the rest goes):

* every live firing stays; of the ended firings of one detector in one slice only the first
  stays (its detection dates the incident: ``detected_at``, onset, delay), standing for the
  later ones (:attr:`Firing.episodes`, with the latest ``last_detected`` and ``cleared_at``);
* the root and every slice with a live firing stay, and the ``max_ended`` related slices
  whose alarms ended most recently (:attr:`BookPolicy.max_ended_slices`); older ended ones
  are dropped with their firings and counted per template (:attr:`Incident.dropped_slices`).
"""

from __future__ import annotations

from driftline.alerts.model import Firing, Incident, SliceEvidence


def fold_ended_firings(firings: list[Firing]) -> list[Firing]:
    """``firings`` with the ended ones of each detector and slice folded into their first
    (order kept; live firings untouched)."""
    first: dict[tuple[str, str], Firing] = {}
    folded: dict[int, Firing] = {}  # id of a first firing -> the copy that takes in the rest
    for f in sorted((f for f in firings if not f.active), key=lambda f: f.first_detected):
        key = (f.slice_id, f.detector)
        if key not in first:
            first[key] = f
            continue
        # a copy: a merged-away incident may still hold the same objects (its stored record
        # must not change with this one's)
        kept = folded.get(id(first[key])) or folded.setdefault(
            id(first[key]), first[key].model_copy(deep=True))
        kept.episodes += f.episodes
        kept.last_detected = max(kept.last_detected, f.last_detected)
        if f.cleared_at is not None:
            kept.cleared_at = max(kept.cleared_at or f.cleared_at, f.cleared_at)
    keep = {id(f) for f in first.values()}
    return [folded.get(id(f), f) for f in firings if f.active or id(f) in keep]


def drop_ended_slices(inc: Incident, max_ended: int) -> list[str]:
    """Drop all but the ``max_ended`` most recent of ``inc``'s related slices with no live
    firing, with their firings, counting them in ``inc.dropped_slices``; return their ids."""
    live = {f.slice_id for f in inc.detectors if f.active}
    ended = [ev for sid, ev in inc.slices.items()
             if sid != inc.root.slice_id and sid not in live]
    if len(ended) <= max_ended:
        return []
    ended.sort(key=lambda ev: (_ended(ev, inc), ev.ref.slice_id))
    doomed = [ev.ref for ev in ended[:len(ended) - max_ended]]
    gone = {r.slice_id for r in doomed}
    for ref in doomed:
        del inc.slices[ref.slice_id]
        inc.dropped_slices[ref.template] = inc.dropped_slices.get(ref.template, 0) + 1
    inc.detectors = [f for f in inc.detectors if f.slice_id not in gone]
    return sorted(gone)


def _ended(ev: SliceEvidence, inc: Incident) -> float:
    """When the slice's alarm last showed in ``inc`` (its newest crossing or message)."""
    times = [f.cleared_at or f.last_detected for f in inc.detectors
             if f.slice_id == ev.ref.slice_id]
    times += [t for t in (ev.last_time, ev.onset) if t is not None]
    return max(times).timestamp() if times else float("-inf")
