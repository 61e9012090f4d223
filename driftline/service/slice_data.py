"""Read the detect stage's slice data from Redis without owning it.

``dl:detect:summary`` is one small hash (slice → status); a slice's full state lives in the
partition hash ``dl:detect:state:{p}`` of whichever detect worker owns it, so a state lookup
asks every partition hash at once (one pipeline; partitions are few).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import redis

from driftline.consumers.checkpoint import decode_record
from driftline.core.counts import SliceCounts
from driftline.core.slices import SliceDetectors
from driftline.service.keys import STATE_KEY_PREFIX, SUMMARY_KEY


class SliceData:
    """Summaries and states of the detect stage's slices."""

    def __init__(self, client: redis.Redis, summary_key: str = SUMMARY_KEY,
                 state_prefix: str = STATE_KEY_PREFIX) -> None:
        self.r: Any = client
        self.summary_key = summary_key
        self.state_prefix = state_prefix

    def summaries(self) -> dict[str, dict[str, Any]]:
        """Every slice's summary: template, dims, n, last_time, ratios, ood_ratio, open."""
        out = {}
        for k, v in self.r.hgetall(self.summary_key).items():
            try:
                doc = json.loads(v)
            except ValueError:
                continue
            if isinstance(doc, dict) and isinstance(doc.get("dims"), dict):
                out[k.decode()] = doc
        return out

    def summary(self, slice_id: str) -> dict[str, Any] | None:
        raw = self.r.hget(self.summary_key, slice_id)
        doc = json.loads(raw) if raw is not None else None
        return doc if isinstance(doc, dict) else None

    def _state_keys(self) -> list[str]:
        """The partitions' state hashes: of every partition a checkpoint wrote (its input
        offset and reset cursor are written with its states; ``detect repartition`` gives a
        partition that gets state its reset cursor, and a checkpoint its offset). Not a SCAN:
        the keyspace holds a prediction per event of the last week, millions of keys for one
        lookup."""
        base = self.state_prefix.rsplit(":", 1)[0]
        pipe = self.r.pipeline(transaction=False)
        pipe.hkeys(f"{base}:offsets")
        pipe.hkeys(f"{base}:control_seen")
        parts = {int(f) for fields in pipe.execute() for f in fields if f.isdigit()}
        return [f"{self.state_prefix}:{p}" for p in sorted(parts)]

    def states(self, slice_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
        """SliceState snapshots (``{"slice_id", "template", "detectors", …}``) by slice id."""
        ids = list(dict.fromkeys(slice_ids))
        keys = self._state_keys()
        if not ids or not keys:
            return {}
        pipe = self.r.pipeline(transaction=False)
        for key in keys:
            pipe.hmget(key, ids)
        out: dict[str, dict[str, Any]] = {}
        for values in pipe.execute():
            for sid, raw in zip(ids, values, strict=True):
                if raw is None or sid in out:
                    continue
                state = decode_record(raw).get("state")
                if isinstance(state, dict):
                    out[sid] = state
        return out

    def state(self, slice_id: str) -> dict[str, Any] | None:
        return self.states([slice_id]).get(slice_id)


def counts_of(state: dict[str, Any]) -> SliceCounts | None:
    snap = (state.get("detectors") or {}).get("counts")
    return SliceCounts.restore(snap) if snap else None


def detectors_of(state: dict[str, Any]) -> SliceDetectors | None:
    snap = state.get("detectors")
    return SliceDetectors.restore(snap) if snap else None
