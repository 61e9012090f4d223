"""A slice's newest exemplar events, in one small numpy ring.

A detect worker holds thousands of slices, each with its last :data:`EXEMPLARS` events for
the evidence of an alarm. As tuples of Python objects they cost about 1.5 kB a slice (a 7-tuple,
two floats and, for real offsets, an int each); here one packed record array (33 bytes an
exemplar) and the list of event ids hold the same values in about 0.5 kB, which paid for the
prediction-mix and confidence detectors within the 10,000-slices-in-100-MB target.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

EXEMPLARS = 8
# source partition and offset in the events topic: where the API reads the image for a thumbnail
EXEMPLAR_FIELDS = ("event_id", "cluster", "distance", "ts", "ood", "source_partition",
                   "source_offset")
Exemplar = tuple[Any, ...]
# -1 (NaN for the distance) stands for None: a missing OOD flag, or a record saved before
# thumbnails, which had no source position
_DTYPE = np.dtype([("cluster", "<i4"), ("distance", "<f8"), ("ts", "<f8"), ("ood", "i1"),
                   ("partition", "<i4"), ("offset", "<i8")])


class ExemplarRing:
    """The newest ``EXEMPLARS`` exemplars; iterating yields tuples in
    :data:`EXEMPLAR_FIELDS` order, oldest first.

    >>> ring = ExemplarRing()
    >>> for i in range(10):
    ...     ring.add(f"e{i}", i % 3, 0.5, 100.0 + i, i == 9, 0, 1000 + i)
    >>> len(ring), next(iter(ring)), list(ring)[-1]
    (8, ('e2', 2, 0.5, 102.0, False, 0, 1002), ('e9', 0, 0.5, 109.0, True, 0, 1009))
    >>> ring.rows() == [list(e) for e in ring]
    True
    """

    __slots__ = ("_rec", "_ids", "_head")

    def __init__(self) -> None:
        self._rec: np.ndarray | None = None  # made with the first exemplar
        self._ids: list[str] = []
        self._head = 0  # where the next exemplar goes once the ring is full (the oldest)

    def add(self, event_id: str, cluster: int, distance: float | None, ts: float,
            ood: bool | None, partition: int | None, offset: int | None) -> None:
        rec = self._rec
        if rec is None:
            rec = self._rec = np.zeros(EXEMPLARS, _DTYPE)
        ids = self._ids
        if len(ids) < EXEMPLARS:
            at = len(ids)
            ids.append(event_id)
        else:
            at = self._head
            ids[at] = event_id
            self._head = (at + 1) % EXEMPLARS
        rec[at] = (cluster, math.nan if distance is None else distance, ts,
                   -1 if ood is None else ood, -1 if partition is None else partition,
                   -1 if offset is None else offset)

    def __len__(self) -> int:
        return len(self._ids)

    def __iter__(self) -> Iterator[Exemplar]:
        return (tuple(row) for row in self.rows())

    def rows(self) -> list[list[Any]]:
        """The exemplars as lists, oldest first: what a checkpoint stores (iterating gives the
        same as tuples)."""
        rec = self._rec
        if rec is None:
            return []
        ids, n, head = self._ids, len(self._ids), self._head
        rows = rec.tolist()
        if n < EXEMPLARS:
            rows = rows[:n]
        elif head:
            rows, ids = rows[head:] + rows[:head], ids[head:] + ids[:head]
        return [[event_id, None if cluster < 0 else cluster,
                 None if distance != distance else distance, ts,  # NaN: None
                 None if ood < 0 else bool(ood), None if partition < 0 else partition,
                 None if offset < 0 else offset]
                for event_id, (cluster, distance, ts, ood, partition, offset)
                in zip(ids, rows, strict=True)]

    def clear(self) -> None:
        self._rec, self._ids, self._head = None, [], 0

    @classmethod
    def restore(cls, saved: Iterable[dict[str, Any] | list[Any]]) -> ExemplarRing:
        """From a checkpoint's list: lists (dicts in format v1); records written before
        thumbnails had no source partition and offset (those read as None)."""
        ring = cls()
        for e in saved:
            row: tuple[Any, ...] = (
                tuple(e.get(f) for f in EXEMPLAR_FIELDS) if isinstance(e, dict)
                else (*e, *(None,) * (len(EXEMPLAR_FIELDS) - len(e))))
            event_id, cluster, distance, ts, ood, partition, offset = row
            ring.add(event_id, -1 if cluster is None else cluster, distance, ts, ood,
                     partition, offset)
        return ring
