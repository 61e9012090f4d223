"""Replay a demo dump (``driftline demo --dump FILE``: the detect stage's outbox and slice
summaries) through the failure book's grouping, a batch of outbox messages at a time, the
incidents stored and loaded between batches as the book does. Offline attribution checks (the
replay tests) and ``benchmarks/paging.py`` read the book's decisions this way."""

from __future__ import annotations

import gzip
import itertools
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from driftline.alerts.attribution import SliceStatus
from driftline.alerts.grouping import BookPolicy, Grouper
from driftline.alerts.model import Incident

NOW = datetime(2026, 11, 16, 8, tzinfo=UTC)  # the book's wall clock in a replay: fixed


def load_dump(path: Path) -> tuple[list[dict[str, Any]], dict[str, SliceStatus]]:
    """The outbox messages in order and the slice summary of a dump (``.json`` or ``.gz``;
    outbox entries as the demo writes them, ``{"id", "alarm"}``, or ``[id, alarm]``)."""
    opener: Any = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        data = json.load(f)
    summary = {k: SliceStatus.from_summary(k, v) for k, v in data["summary"].items()}
    return [e["alarm"] if isinstance(e, dict) else e[1] for e in data["outbox"]], summary


def replay_batches(messages: list[dict[str, Any]], summary: dict[str, SliceStatus],
                   batch: int, policy: BookPolicy | None = None
                   ) -> Iterator[tuple[Grouper, list[dict[str, Any]]]]:
    """Each batch's finished :class:`Grouper` (its incidents and changes) and its messages."""
    ids = itertools.count(1)
    incidents: dict[str, Incident] = {}
    for k in range(0, len(messages), batch):
        g = Grouper(list(incidents.values()), summary, now=NOW, signatures=dict,
                    new_id=lambda: f"DL-{next(ids):06d}", policy=policy or BookPolicy())
        chunk = messages[k:k + batch]
        for m in chunk:
            g.apply(m)
        g.finish()
        yield g, chunk
        incidents = {i: Incident.model_validate_json(x.model_dump_json())
                     for i, x in g.incidents.items()}
