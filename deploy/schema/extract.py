"""Print the Compose Specification JSON Schema embedded in a docker-compose (v2) binary."""

from __future__ import annotations

import json
import sys
from pathlib import Path

MARKER = b'"$id": "compose_spec.json"'


def extract(binary: bytes) -> str:
    at = binary.find(MARKER)
    if at < 0:
        raise SystemExit("no compose_spec.json schema in this file")
    text = binary[binary.rfind(b"{", 0, at):].decode("utf-8", "replace")
    schema, end = json.JSONDecoder().raw_decode(text)
    if schema.get("title") != "Compose Specification":
        raise SystemExit("found a schema, but not the Compose Specification")
    return text[:end]


if __name__ == "__main__":
    print(extract(Path(sys.argv[1]).read_bytes()))
