"""After a model upgrade the recent buffer holds the old version's events embedded on the old
reference: the version comparison leaves them out (their clusters are another reference's) and
says how many, instead of answering as if the old version had sent nothing."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import numpy as np

from driftline.service.recent import RecentIndex
from driftline.service.routes.versions import compare_versions


class _Stream:
    """The one Redis call the recent index makes (``XRANGE``), over a list."""

    def __init__(self, entries: list[dict[str, Any]]) -> None:
        vec = np.ones(4, np.float32).tobytes()
        self.rows = [(f"{i + 1}-0".encode(), {b"meta": json.dumps(m).encode(), b"vec": vec})
                     for i, m in enumerate(entries)]

    def xrange(self, key: str, min: str = "-", count: int | None = None
               ) -> list[tuple[bytes, dict[bytes, bytes]]]:
        after = int(min[1:].split("-")[0]) if min.startswith("(") else 0
        rows = [r for r in self.rows if int(r[0].split(b"-")[0]) > after]
        return rows[:count] if count else rows


def _meta(i: int, version: str, reference: str, station: str = "s1") -> dict[str, Any]:
    return {"event_id": f"{version}-{i}", "ts": 1_790_000_000.0 + i, "station": station,
            "shift": "day", "lot": "L1", "model_version": version, "cluster": i % 2,
            "pred": "ok", "score": 0.9, "label": None, "reference_id": reference}


def test_events_of_another_reference_are_counted_not_compared() -> None:
    entries = ([_meta(i, "A", "ref-a") for i in range(30)]
               + [_meta(i, "A", "ref-a", station="s2") for i in range(30, 40)]
               + [_meta(i, "B", "ref-b") for i in range(25)])
    index = RecentIndex(_Stream(entries), None)  # type: ignore[arg-type]
    index.reference = SimpleNamespace(  # type: ignore[assignment]
        reference_id="ref-b", dim=4, space_dim=4, project=lambda raw: raw)
    ctx = SimpleNamespace(recent=lambda: index)
    res = compare_versions(ctx, None, "A", "B")  # type: ignore[arg-type]
    assert res.events == {"A": 0, "B": 25}
    assert res.other_reference == {"A": 40}
    at_s1 = compare_versions(ctx, None, "A", "B", station="s1")  # type: ignore[arg-type]
    assert at_s1.other_reference == {"A": 30}
