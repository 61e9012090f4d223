"""Readiness probe for the local broker: a raw Metadata request (standard library only).

Exit 0 when the broker at HOST:PORT answers a Metadata v4 request listing at least one
registered broker, i.e. it has joined the KRaft quorum and been unfenced. Exit 1 otherwise.
Metadata v4 is inside the range that both Kafka 3.x and 4.x (KIP-896) still serve.
"""

from __future__ import annotations

import socket
import struct
import sys

API_KEY_METADATA = 3
API_VERSION = 4
CORRELATION_ID = 7


def _read_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("broker closed the connection")
        buf += chunk
    return buf


def registered_brokers(host: str, port: int, timeout: float = 2.0) -> list[tuple[int, str, int]]:
    """Return (node_id, host, port) of every broker the cluster metadata lists."""
    client_id = b"driftline-probe"
    header = struct.pack(">hhih", API_KEY_METADATA, API_VERSION, CORRELATION_ID, len(client_id))
    body = struct.pack(">ib", -1, 0)  # topics: null (all), allow_auto_topic_creation: false
    request = header + client_id + body
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(struct.pack(">i", len(request)) + request)
        (size,) = struct.unpack(">i", _read_exact(sock, 4))
        payload = _read_exact(sock, size)
    correlation_id, _throttle, count = struct.unpack_from(">iii", payload, 0)
    if correlation_id != CORRELATION_ID:
        raise ValueError("unexpected correlation id")
    pos = 12
    brokers = []
    for _ in range(count):
        node_id, host_len = struct.unpack_from(">ih", payload, pos)
        pos += 6
        broker_host = payload[pos : pos + host_len].decode()
        pos += host_len
        (broker_port, rack_len) = struct.unpack_from(">ih", payload, pos)
        pos += 6 + max(rack_len, 0)
        brokers.append((node_id, broker_host, broker_port))
    return brokers


def main() -> int:
    host, _, port = sys.argv[1].rpartition(":")
    try:
        brokers = registered_brokers(host, int(port))
    except (OSError, ValueError, struct.error) as exc:
        print(f"probe failed: {exc}", file=sys.stderr)
        return 1
    if not brokers:
        print("no broker registered yet", file=sys.stderr)
        return 1
    print(" ".join(f"{node}@{h}:{p}" for node, h, p in brokers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
