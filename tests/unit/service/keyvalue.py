"""A stand-in for the two Redis calls reference activation and start-up make (no server)."""

from __future__ import annotations

from types import SimpleNamespace


class KeyValue:
    """The two Redis calls activation and start-up make (a stand-in, no server)."""

    def __init__(self) -> None:
        self.kv: dict[str, bytes] = {}
        self.connection_pool = SimpleNamespace(connection_kwargs={"host": "stub", "port": 0})

    def get(self, key: str) -> bytes | None:
        return self.kv.get(key)

    def set(self, key: str, value: str) -> bool:
        self.kv[key] = value.encode()
        return True
