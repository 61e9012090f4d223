"""Incident state changes: the timeline entry and the routed record, written together."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from driftline.alerts.model import SCHEMA_VERSION, SYSTEM, Incident, TimelineEntry, iso


@dataclass(frozen=True)
class Change:
    """One incident state change: a timeline entry and, if ``routed``, an alert."""

    incident_id: str
    action: str
    who: str
    at: datetime
    note: str | None
    routed: bool
    incident: dict[str, Any]


def record_change(inc: Incident, action: str, *, who: str, at: datetime,
                  note: str | None = None, routed: bool = True,
                  max_timeline: int = 500) -> Change:
    """Append the timeline entry and describe the change (the caller stores both). A held
    incident's changes are never routed: nobody was paged for it yet."""
    inc.timeline.append(TimelineEntry(at=at, who=who, action=action, note=note))
    trim_timeline(inc.timeline, max_timeline)
    inc.updated_at = at
    return Change(inc.id, action, who, at, note, routed and not inc.held, inc.summary())


def trim_timeline(timeline: list[TimelineEntry], limit: int) -> None:
    """Cut ``timeline`` to ``limit`` (at least 2) entries: "opened" and the newest stay, and
    the oldest of the service's own entries go before any of on-call's (an acknowledgement or
    a note is what a long incident's history must not lose: it says who looked, and the kept
    status rests on it).

    >>> from datetime import UTC, datetime
    >>> t0 = datetime(2026, 1, 1, tzinfo=UTC)
    >>> tl = [TimelineEntry(at=t0, who=w, action=a) for w, a in [
    ...     (SYSTEM, "opened"), ("alice", "acknowledged"), (SYSTEM, "related_added"),
    ...     (SYSTEM, "rerooted")]]
    >>> trim_timeline(tl, 3)
    >>> [e.action for e in tl]
    ['opened', 'acknowledged', 'rerooted']
    """
    excess = len(timeline) - max(limit, 2)
    if excess <= 0:
        return
    # "opened" is found by its action (a merge sorts carried entries in by time); the newest
    # entry, just recorded, always stays
    first = next((i for i, e in enumerate(timeline) if e.action == "opened"), 0)
    rest = [i for i in range(len(timeline) - 1) if i != first]
    drop = [i for i in rest if timeline[i].who == SYSTEM][:excess]
    if len(drop) < excess:  # on-call's entries alone exceed the limit: their oldest go
        drop += [i for i in rest if timeline[i].who != SYSTEM][:excess - len(drop)]
    for i in sorted(drop, reverse=True):
        del timeline[i]


def change_json(c: Change) -> str:
    return json.dumps({"schema_version": SCHEMA_VERSION, "incident_id": c.incident_id,
                       "action": c.action, "who": c.who, "at": iso(c.at),
                       "note": c.note, "routed": c.routed, "incident": c.incident})
