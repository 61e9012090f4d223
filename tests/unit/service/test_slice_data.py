"""Slice states are looked up in the partitions the detect stage checkpointed, without a SCAN
of the keyspace (which holds a prediction per event of the last week)."""

from __future__ import annotations

from typing import Any

from driftline.consumers.checkpoint import encode_record
from driftline.service.slice_data import SliceData


class _Redis:
    """The reads SliceData makes, over dicts; SCAN refused."""

    def __init__(self, hashes: dict[str, dict[bytes, bytes]]) -> None:
        self.hashes = hashes
        self.queued: list[Any] = []

    def scan_iter(self, *args: Any, **kw: Any) -> Any:
        raise AssertionError("SCAN walks the whole keyspace")

    def pipeline(self, transaction: bool = True) -> _Redis:
        return self

    def hkeys(self, key: str) -> None:
        self.queued.append(list(self.hashes.get(key, {})))

    def hmget(self, key: str, fields: list[str]) -> None:
        self.queued.append([self.hashes.get(key, {}).get(f.encode()) for f in fields])

    def execute(self) -> list[Any]:
        out, self.queued = self.queued, []
        return out


def test_states_are_read_from_the_checkpointed_partitions() -> None:
    record = encode_record({"state": {"slice_id": "station=s1", "n": 7}, "applied": {}})
    r = _Redis({"dl:detect:offsets": {b"0": b"10", b"3": b"4"},
                "dl:detect:control_seen": {b"5": b"0-0"},  # moved there by a repartition
                "dl:detect:state:3": {b"station=s1": record},
                "dl:detect:state:5": {b"lot=L1": encode_record(
                    {"state": {"slice_id": "lot=L1", "n": 2}, "applied": {}})}})
    got = SliceData(r).states(["station=s1", "lot=L1", "station=s9"])  # type: ignore[arg-type]
    assert {sid: st["n"] for sid, st in got.items()} == {"station=s1": 7, "lot=L1": 2}
