"""Grow the slice-updates topic without losing slice state: ``driftline detect repartition``.

The detect stage stores each slice's checkpoint under the input partition its slice id hashed to
(``{prefix}:state:{partition}``). More partitions change that hash for most slices, so after
growing the topic their updates arrive on another partition, whose owner would start them afresh
while the old record sat unused. This moves every record to the partition its slice now maps to
(the producer's murmur2 partitioner), in one Redis transaction per record.

It runs with both stages stopped and the detect stage caught up: updates still waiting in an old
partition would otherwise be applied there to a slice whose state has moved.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from kafka.partitioner import murmur2

from driftline.alerts.store import stream_id
from driftline.consumers.checkpoint import CheckpointStore

log = logging.getLogger(__name__)


def partition_for(slice_id: str, partitions: int) -> int:
    """The partition kafka-python's (and Java's) default partitioner gives a slice's key."""
    return int(murmur2(slice_id.encode()) & 0x7FFFFFFF) % partitions


@dataclass(frozen=True)
class Moved:
    records: int
    kept: int


def undrained(stored: Mapping[int, int], ends: Mapping[int, int]) -> dict[int, int]:
    """Partitions whose updates the detect stage has not all checkpointed: partition → lag."""
    return {p: end - stored.get(p, 0) for p, end in ends.items() if stored.get(p, 0) < end}


def move_state(store: CheckpointStore, partitions: int) -> Moved:
    """Move each slice's record to the state hash of the partition it maps to among
    ``partitions``; partitions that get state for the first time take over the latest reset
    request already applied (``control_seen``), so old requests are not applied again."""
    r = store.r
    moved = kept = 0
    seen: dict[bytes, bytes] = r.hgetall(store._k("control_seen"))  # type: ignore[assignment]
    latest = max((v.decode() for v in seen.values()), key=stream_id, default=None)
    prefix = store._k("state", "")
    for key in list(r.scan_iter(match=f"{prefix}*")):
        old = int(key.decode()[len(prefix):])
        for sid_raw, record in r.hscan_iter(key):
            sid = sid_raw.decode()
            new = partition_for(sid, partitions)
            if new == old:
                kept += 1
                continue
            pipe = r.pipeline(transaction=True)
            pipe.hset(store._k("state", new), sid, record)
            pipe.hdel(key, sid)
            if latest is not None:
                pipe.hsetnx(store._k("control_seen"), str(new), latest)
            pipe.execute()
            moved += 1
    log.info("slice state repartitioned", extra={"partitions": partitions, "moved": moved,
                                                 "kept": kept})
    return Moved(moved, kept)
