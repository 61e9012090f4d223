"""Incident state changes: the timeline entry and the routed record, written together."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from driftline.alerts.model import SCHEMA_VERSION, SYSTEM, Incident, TimelineEntry, iso

log = logging.getLogger(__name__)

# The transitions on-call looks an incident up by in the logs (when did DL-000004 open, page,
# move, end?): one INFO line each. Not joins of related slices, notes or acknowledgements.
LOGGED_ACTIONS = frozenset({"opened", "paged", "escalated", "rerooted", "split", "merged",
                            "resolved", "auto_resolved"})


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


def log_changes(changes: Iterable[Change], targets: Sequence[str] = ()) -> None:
    """Log each committed change of :data:`LOGGED_ACTIONS` at INFO: the incident, its severity,
    root slice (template and station/shift/lot), detectors and onset (UTC, as the API and the
    alert give it) as they stood after the change, and the timeline note (``old → new`` for a
    re-root, ``into DL-…`` for a merge). A page (an incident opened and routed at once, or
    ``paged`` from hold) names ``targets``, where the router sends it; an incident opened held,
    or opened and merged within one batch, says it did not page."""
    for c in changes:
        if c.action not in LOGGED_ACTIONS:
            continue
        inc, root = c.incident, c.incident["root"]
        fields: dict[str, Any] = {
            "incident_id": c.incident_id, "action": c.action, "severity": inc["severity"],
            "root": root["slice_id"], "template": root["template"],
            **root["dims"],  # station/shift/lot, as the alert labels carry them
            "detectors": ",".join(inc["detectors"]), "onset": inc["onset"], "who": c.who}
        if c.note:
            fields["note"] = c.note
        if c.action in ("opened", "paged"):
            if c.routed:
                fields["paged_to"] = ",".join(targets) or "none (no alert target configured)"
            elif inc.get("held"):
                fields["held"] = True  # pages once the attribution is stable behind it
            else:  # the grouper unroutes an incident opened and merged in one batch
                fields["not_paged"] = "merged within the batch that opened it"
        log.info("incident %s %s", c.incident_id, c.action, extra=fields)


def change_json(c: Change) -> str:
    return json.dumps({"schema_version": SCHEMA_VERSION, "incident_id": c.incident_id,
                       "action": c.action, "who": c.who, "at": iso(c.at),
                       "note": c.note, "routed": c.routed, "incident": c.incident})
