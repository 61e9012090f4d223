"""Reference artifacts the API can list, show and activate.

The candidates are the configured reference (``DRIFTLINE_REFERENCE_DIR``) and its siblings:
every directory next to it holding a ``manifest.json``. Activation stores
``{reference_id, path, who, at}`` in Redis (:data:`ACTIVE_REFERENCE_KEY`) after verifying the
artifact's hashes; running stages keep the reference they loaded, and pick the activated one up
on restart through :func:`active_reference_dir`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis

from driftline.config import Settings
from driftline.reference.artifact import MANIFEST, ReferenceError, read_artifact
from driftline.service.keys import ACTIVE_REFERENCE_KEY

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Candidate:
    path: Path
    manifest: dict[str, Any]

    @property
    def reference_id(self) -> str:
        return str(self.manifest.get("reference_id", ""))


def _read_manifest(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and doc.get("reference_id") else None


def candidates(settings: Settings) -> list[Candidate]:
    """The configured reference first, then its siblings by name."""
    configured = settings.reference_dir
    if configured is None:
        return []
    configured = Path(configured).resolve()
    dirs = [configured]
    try:
        dirs += sorted(p.resolve() for p in configured.parent.iterdir()
                       if p.is_dir() and not p.name.startswith(".") and p.resolve() != configured)
    except OSError:
        pass
    out = []
    for d in dirs:
        manifest = _read_manifest(d)
        if manifest is not None:
            out.append(Candidate(d, manifest))
    return out


def find(settings: Settings, reference_id: str) -> Candidate | None:
    return next((c for c in candidates(settings) if c.reference_id == reference_id), None)


def activation(client: redis.Redis) -> dict[str, Any] | None:
    raw: Any = client.get(ACTIVE_REFERENCE_KEY)
    if raw is None:
        return None
    try:
        doc = json.loads(raw)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def activate(client: redis.Redis, cand: Candidate, who: str,
             note: str | None = None) -> dict[str, Any]:
    """Verify the artifact (hashes of every array) and record it as the active reference."""
    read_artifact(cand.path)  # raises ReferenceError naming the problem
    doc = {"reference_id": cand.reference_id, "path": str(cand.path), "who": who,
           "at": datetime.now(UTC).isoformat().replace("+00:00", "Z"), "note": note}
    client.set(ACTIVE_REFERENCE_KEY, json.dumps(doc))
    log.info("reference activated", extra=doc)
    return doc


def active_reference_dir(settings: Settings, client: redis.Redis) -> Path | None:
    """For stages at start-up: the activated reference's directory if it is still one of the
    candidates and intact, else ``DRIFTLINE_REFERENCE_DIR``."""
    doc = activation(client)
    if doc is not None:
        cand = find(settings, str(doc.get("reference_id")))
        if cand is not None:
            try:
                read_artifact(cand.path)
                return cand.path
            except ReferenceError as exc:
                log.error("activated reference is unusable; using the configured one",
                          extra={"error": str(exc)})
    return settings.reference_dir
