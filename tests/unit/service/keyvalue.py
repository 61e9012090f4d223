"""A stand-in for the Redis calls of reference activation, start-up and thumbnails (no server)."""

from __future__ import annotations

from types import SimpleNamespace


class KeyValue:
    """Strings by key, as reference activation, start-up and the thumbnail cache use them (a
    stand-in, no server; expiry is not kept)."""

    def __init__(self) -> None:
        self.kv: dict[str, bytes] = {}
        self.connection_pool = SimpleNamespace(connection_kwargs={"host": "stub", "port": 0})

    def get(self, key: str) -> bytes | None:
        return self.kv.get(key)

    def getex(self, key: str, ex: int | None = None) -> bytes | None:
        return self.kv.get(key)

    def set(self, key: str, value: str | bytes, ex: int | None = None) -> bool:
        self.kv[key] = value.encode() if isinstance(value, str) else value
        return True
