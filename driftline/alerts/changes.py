"""Incident state changes: the timeline entry and the routed record, written together."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from driftline.alerts.model import SCHEMA_VERSION, Incident, TimelineEntry, iso


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
    if len(inc.timeline) > max_timeline:  # keep "opened" and the newest entries
        del inc.timeline[1]
    inc.updated_at = at
    return Change(inc.id, action, who, at, note, routed and not inc.held, inc.summary())


def change_json(c: Change) -> str:
    return json.dumps({"schema_version": SCHEMA_VERSION, "incident_id": c.incident_id,
                       "action": c.action, "who": c.who, "at": iso(c.at),
                       "note": c.note, "routed": c.routed, "incident": c.incident})
