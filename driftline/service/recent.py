"""The recent-events buffer (``dl:recent``, written by the embed stage) as a searchable index.

Each stream entry has ``meta`` (JSON: event_id, ts, station, shift, lot, model_version,
cluster, distance, pred, score, label) and ``vec`` (float32 bytes of the L2-normalised raw
embedding). The index keeps the entries in memory and refreshes incrementally: a request reads
only the entries added since the last one and drops those the stream has trimmed, so a busy
buffer of thousands of embeddings is not copied out of Redis per request.

Search space: the reference space (:meth:`Reference.project`) when a reference is loaded, so
distances compare with the reference's OOD thresholds; else the raw unit vectors.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np
import redis
from numpy.typing import NDArray

from driftline.alerts.store import stream_id
from driftline.reference.index import Reference, unit_rows
from driftline.service.keys import RECENT_KEY

F32 = NDArray[np.float32]
_READ_CHUNK = 1000


@dataclass(frozen=True)
class Snapshot:
    """An immutable view of the buffer: metadata and unit vectors, newest last."""

    metas: list[dict[str, Any]]
    vectors: F32
    raw: F32
    rows: dict[str, int]
    index: Any
    space: str
    other_reference: list[dict[str, Any]] = field(default_factory=list)
    """Metadata of the events left out: embedded on another reference than this one (before
    an activation), their clusters another space's."""

    def __len__(self) -> int:
        return len(self.metas)

    def search(self, queries: F32, k: int) -> tuple[F32, NDArray[np.int64]]:
        """``k`` nearest buffer rows per query row: Euclidean distances and row numbers."""
        k = max(1, min(k, len(self.metas)))
        sq, idx = self.index.search(np.ascontiguousarray(queries, np.float32), k)
        return np.sqrt(np.maximum(sq, 0.0)).astype(np.float32), idx.astype(np.int64)


class RecentIndex:
    """Incrementally refreshed in-memory copy of ``dl:recent`` with a faiss flat index."""

    def __init__(self, client: redis.Redis, reference: Reference | None,
                 key: str = RECENT_KEY) -> None:
        self.r: Any = client
        self.reference = reference
        self.key = key
        self._lock = threading.Lock()
        self._ids: list[str] = []  # stream ids, oldest first
        self._metas: list[dict[str, Any]] = []
        self._raw: list[F32] = []
        self._proj: list[F32 | None] = []  # projected rows; None: unusable (dim, NaN)
        self._snap: Snapshot | None = None

    def snapshot(self) -> Snapshot:
        with self._lock:
            changed = self._refresh()
            if self._snap is None or changed:
                self._project_new()
                self._snap = self._build()
            return self._snap

    def _project_new(self) -> None:
        """Project only the rows added since the last snapshot (a full buffer of large raw
        embeddings is not re-projected per request)."""
        start = len(self._proj)
        dim = self.reference.dim if self.reference is not None else (
            self._raw[-1].size if self._raw else 0)
        fresh = self._raw[start:]
        ok = [i for i, v in enumerate(fresh) if v.size == dim and np.isfinite(v).all()]
        out: list[F32 | None] = [None] * len(fresh)
        if ok:
            for i, row in zip(ok, self.project(np.stack([fresh[i] for i in ok])), strict=True):
                out[i] = row
        self._proj.extend(out)

    def _refresh(self) -> bool:
        changed = False
        first = self.r.xrange(self.key, count=1)
        if not first:
            changed = bool(self._ids)
            self._ids, self._metas, self._raw, self._proj = [], [], [], []
            return changed
        oldest = stream_id(first[0][0].decode())
        drop = 0
        while drop < len(self._ids) and stream_id(self._ids[drop]) < oldest:
            drop += 1
        if drop:
            del self._ids[:drop], self._metas[:drop], self._raw[:drop], self._proj[:drop]
            changed = True
        start = f"({self._ids[-1]}" if self._ids else "-"
        while True:
            rows = self.r.xrange(self.key, min=start, count=_READ_CHUNK)
            for sid, fields in rows:
                parsed = _parse(fields)
                if parsed is not None:
                    self._ids.append(sid.decode())
                    self._metas.append(parsed[0])
                    self._raw.append(parsed[1])
                    changed = True
            if len(rows) < _READ_CHUNK:
                return changed
            start = f"({rows[-1][0].decode()}"

    def _build(self) -> Snapshot:
        # events embedded on another reference (before an activation) have their clusters in
        # another space: left out; rows written before they named theirs are kept
        ref_id = self.reference.reference_id if self.reference is not None else None
        usable: list[tuple[int, F32]] = []
        other: list[dict[str, Any]] = []
        for i, v in enumerate(self._proj):
            if ref_id is None or self._metas[i].get("reference_id", ref_id) == ref_id:
                if v is not None:
                    usable.append((i, v))
            else:
                other.append(self._metas[i])
        width = usable[-1][1].size if usable else 0  # raw space: the newest dimension wins
        keep = [(i, v) for i, v in usable if v.size == width]
        space = "reference" if self.reference is not None else "raw"
        if keep:
            metas = [self._metas[i] for i, _ in keep]
            raw = np.stack([self._raw[i] for i, _ in keep])
            vecs = np.ascontiguousarray(np.stack([v for _, v in keep]), np.float32)
        else:
            dim = self.reference.dim if self.reference is not None else 1
            out = self.reference.space_dim if self.reference is not None else 1
            metas, raw, vecs = [], np.zeros((0, dim), np.float32), np.zeros((0, out), np.float32)
        index = faiss.IndexFlatL2(vecs.shape[1])
        if len(vecs):
            index.add(vecs)
        rows = {m["event_id"]: i for i, m in enumerate(metas)}
        return Snapshot(metas, vecs, raw, rows, index, space, other)

    def project(self, raw: F32) -> F32:
        if self.reference is not None and len(raw):
            return self.reference.project(raw)
        return unit_rows(raw) if len(raw) else raw


def _parse(fields: dict[bytes, bytes]) -> tuple[dict[str, Any], F32] | None:
    try:
        meta = json.loads(fields[b"meta"])
        vec = np.frombuffer(fields[b"vec"], dtype=np.float32).copy()
    except (KeyError, ValueError):
        return None
    if not isinstance(meta, dict) or not isinstance(meta.get("event_id"), str) or not vec.size:
        return None
    return meta, vec
