"""What changed, per incident, as the demo prints it: detectors that fired, the clusters whose
share moved most (with the reference's description of each), and the OOD rate against the
reference's. Reads the incident as the API serves it (``Incident`` as JSON), cluster
descriptions included (the book takes them from the reference the alarm was raised on)."""

from __future__ import annotations

from typing import Any

TOP_CLUSTERS = 2
TOP_FIRINGS = 4


def describe_cluster(desc: dict[str, Any] | None, top: int = 2) -> str:
    """A cluster's description from the reference, in a few words: its most over-represented
    metadata values (lift), e.g. ``station=surf-1 ×3.9, lot=L2603 ×1.4``."""
    if not desc:
        return "no description in the reference"
    lift = [f"{r['field']}={r['value']} ×{r['lift']:.1f}" for r in desc.get("lift", [])[:top]]
    return ", ".join(lift) if lift else "no over-represented metadata"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%" if x < 0.1 else f"{100 * x:.0f}%"


def firings(incident: dict[str, Any], top: int = TOP_FIRINGS) -> str:
    """``detector at slice (statistic/threshold)``: the root slice's first, then the earliest;
    a detector that fired again in the same slice (a later episode) is named once."""
    root = incident["root"]["slice_id"]
    rows, seen = [], set()
    for f in sorted(incident.get("detectors", []),
                    key=lambda f: (f["slice_id"] != root, str(f["first_detected"]))):
        if (f["detector"], f["slice_id"]) not in seen:
            seen.add((f["detector"], f["slice_id"]))
            rows.append(f)
    out = [f"{f['detector']} at {f['slice_id']} ({f['statistic']:.1f}/{f['threshold']:.1f})"
           for f in rows[:top]]
    more = f", +{len(rows) - top} more" if len(rows) > top else ""
    return (", ".join(out) + more) if out else "none recorded"


def cluster_lines(evidence: dict[str, Any], top: int = TOP_CLUSTERS) -> list[str]:
    """The clusters whose share moved most since the onset, gains and losses alike."""
    out = []
    for c in evidence.get("clusters", [])[:top]:
        desc = c.get("description")
        verb = "gained" if c["delta"] > 0 else "lost"
        flag = ", an aggressor (error slice)" if c.get("aggressor") else ""
        out.append(f"cluster {c['cluster']} {verb}: {_pct(c['p_ref'])} of events expected → "
                   f"{_pct(c['p_obs'])} seen ({describe_cluster(desc)}{flag})")
    return out


def ood_line(evidence: dict[str, Any]) -> str | None:
    ood = evidence.get("ood")
    if not ood:
        return None
    ratio = f", ×{ood['ratio']:.1f}" if ood.get("ratio") else ""
    return (f"beyond the OOD threshold: {_pct(ood['rate'])} of {ood['n']} events vs "
            f"{_pct(ood['reference_rate'])} in the reference{ratio}")


def what_changed(incident: dict[str, Any]) -> list[str]:
    """Lines saying what changed in ``incident``, where and since when."""
    ev = incident.get("evidence") or {}
    n, missed = ev.get("n", 0), ev.get("missed") or 0
    head = (f"{incident['id']} at {incident['root']['slice_id']} since {incident['onset']}, "
            f"{n + missed} events since onset"
            + (f" ({missed} not counted: read with events from before the onset)" if missed
               else ""))
    lines = [head, f"  detectors: {firings(incident)}"]
    lines += [f"  {line}" for line in cluster_lines(ev)]
    ood = ood_line(ev)
    if ood is not None:
        lines.append(f"  {ood}")
    return lines
