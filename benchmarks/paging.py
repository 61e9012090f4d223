"""Paging noise: how many incidents the failure book pages for the demo's three changes, and
how soon the first page about each comes, with held incidents and without.

The demo's alarms (two live runs' outboxes and slice summaries, kept as test data in
``tests/unit/alerts/data``; more with ``--dump``, as ``driftline demo --dump`` writes them) are
replayed to the book's grouping in batches of 1, 20 and 200 messages (a slow trickle of alarms
to a busy outbox), stored and loaded between batches as the book does, under two policies side
by side:

* **held** — the default: an incident the co-occurrence plan opens pages once the plan has
  stood behind it for ``stable_events`` events (or ``hold_max_s``);
* **no hold** — ``hold_max_s = 0``: every incident pages when it is opened (as before held
  incidents), unless merged within its batch.

Per run it prints the pages routed (incidents opened or released, routed), the incidents left
at the end (the three roots), and per root the delay from the root slice's first alarm to the
first page about it (a page of an incident holding the root slice, or one that ended merged
into the root's incident), in seconds of event time.

    .venv/bin/python benchmarks/paging.py   # ~10 s; results/paging.md
"""

from __future__ import annotations

import argparse
import os
import platform
from datetime import UTC, datetime
from pathlib import Path

from driftline.alerts.grouping import BookPolicy
from driftline.alerts.model import Incident, utc
from driftline.demo.replay import load_dump, replay_batches

DATA = Path(__file__).parent.parent / "tests" / "unit" / "alerts" / "data"
DUMPS = [DATA / "demo_outbox_cooccurrence_1.json.gz", DATA / "demo_outbox_cooccurrence_2.json.gz"]


def replay(path: Path, batch: int, policy: BookPolicy) -> tuple[int, dict[str, float | None]]:
    """Pages routed, and per final root its first page's delay after its first alarm (s)."""
    first_alarm: dict[str, datetime] = {}
    pages: list[tuple[datetime, set[str], str]] = []
    clock: datetime | None = None
    incidents: dict[str, Incident] = {}
    for g, chunk in replay_batches(*load_dump(path), batch, policy):
        for m in chunk:
            if isinstance(m.get("time"), int | float):
                t = utc(m["time"])
                clock = t if clock is None or t > clock else clock
                if m.get("kind") == "alarm":
                    first_alarm.setdefault(m["slice_id"], t)
        assert clock is not None
        pages += [(clock, set(g.incidents[c.incident_id].slices), c.incident_id)
                  for c in g.changes if c.routed and c.action in ("opened", "paged")]
        incidents = g.incidents

    def final(i: str) -> str:
        while (nxt := incidents[i].merged_into) is not None:
            i = nxt
        return i

    delays: dict[str, float | None] = {}
    for inc in incidents.values():
        if inc.merged_into is not None:
            continue
        sid = inc.root.slice_id
        seen = [t for t, slices, i in pages if sid in slices or final(i) == inc.id]
        delays[sid] = (None if not seen or sid not in first_alarm
                       else (min(seen) - first_alarm[sid]).total_seconds())
    return len({i for *_, i in pages}), delays


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dump", type=Path, action="append", default=[],
                    help="another demo dump (driftline demo --dump FILE)")
    args = ap.parse_args()
    started = datetime.now(UTC)
    policies = {"held": BookPolicy(), "no hold": BookPolicy(hold_max_s=0.0)}
    rows = ["| dump | batch | pages, no hold | pages, held | first page after the root's "
            "first alarm (s): no hold → held |", "|---|---|---|---|---|"]
    for path in [*DUMPS, *args.dump]:
        for batch in (1, 20, 200):
            (n0, d0), (n1, d1) = (replay(path, batch, policies[p]) for p in ("no hold", "held"))
            assert set(d0) == set(d1), (d0, d1)
            delays = "; ".join(f"{sid}: {_s(d0[sid])} → {_s(d1[sid])}" for sid in sorted(d1))
            rows.append(f"| {path.name} | {batch} | {n0} | {n1} | {delays} |")
            print(rows[-1], flush=True)
    out = Path(__file__).parent / "results" / "paging.md"
    out.write_text("\n".join([
        "# Paging noise: held incidents against none", "",
        f"- date: {started.isoformat(timespec='seconds')}",
        f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}",
        "- command: `.venv/bin/python benchmarks/paging.py"
        + "".join(f" --dump {d}" for d in args.dump) + "`"
        + (" (the extra dumps: `driftline demo --dump` runs of that session, not kept)"
           if args.dump else ""),
        f"- held: stable_events={policies['held'].stable_events}, "
        f"hold_max_s={policies['held'].hold_max_s:.0f}; no hold: hold_max_s=0", "",
        *rows, ""]))
    print(f"written to {out}")


def _s(x: float | None) -> str:
    return "never" if x is None else f"{x:.0f}"


if __name__ == "__main__":
    main()
