"""Reference artifacts the API can list, show and activate.

The candidates are the configured reference (``DRIFTLINE_REFERENCE_DIR``) and its siblings:
every directory next to it holding a driftline reference's ``manifest.json``. Activation stores
``{reference_id, path, who, at}`` in Redis (:data:`ACTIVE_REFERENCE_KEY`) after running on the
artifact what the stages' start-up runs (:func:`driftline.runner.usable_reference`) and checking
that it takes the events the stages take now; running stages keep the reference they loaded,
and pick the activated one up on restart (:func:`activated_dir`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis

from driftline.config import Settings
from driftline.reference.artifact import FORMAT, MANIFEST, ReferenceError
from driftline.reference.index import Reference
from driftline.runner import configured_model_sha256, usable_reference
from driftline.service.keys import ACTIVE_REFERENCE_KEY
from driftline.service.schemas.references import ReferenceRow

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Candidate:
    path: Path
    manifest: dict[str, Any]

    @property
    def reference_id(self) -> str:
        return str(self.manifest.get("reference_id", ""))


_SKIPPED: set[str] = set()  # directories whose manifest was skipped, each warned about once


def _read_manifest(path: Path) -> dict[str, Any] | None:
    """A driftline reference manifest with what the listing shows; None for a directory
    without one. Another tool's ``manifest.json`` beside the references (a ``reference_id`` of
    its own, ``source.events: "many"``) made every listing answer 500: it is skipped, with a
    warning the first time."""
    try:
        doc = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        _skip(path, f"unreadable: {exc}")
        return None
    why = _not_a_reference(path, doc)
    if why is not None:
        _skip(path, why)
        return None
    return dict(doc)


def _not_a_reference(path: Path, doc: Any) -> str | None:
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        return f"not a {FORMAT} manifest"
    if not doc.get("reference_id"):
        return "it has no reference_id"
    try:
        ReferenceRow.of(str(path), doc, configured=False, activated=False)
    except (ValueError, TypeError, AttributeError) as exc:
        return f"its fields are not a reference's: {exc}"
    return None


def _skip(path: Path, why: str) -> None:
    if str(path) not in _SKIPPED:
        _SKIPPED.add(str(path))
        log.warning(f"{path / MANIFEST} is skipped among the references: {why}",
                    extra={"path": str(path)})


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


def find(settings: Settings, reference_id: str,
         prefer: Sequence[str | Path | None] = ()) -> Candidate | None:
    """The candidate holding ``reference_id``; of several (a backup copy beside it), the one
    at the first path of ``prefer`` that holds it, else the configured one, else the first by
    name."""
    matches = matching(settings, reference_id)
    return preferred(matches, [*prefer, settings.reference_dir]) or next(iter(matches), None)


def matching(settings: Settings, reference_id: str) -> list[Candidate]:
    return [c for c in candidates(settings) if c.reference_id == reference_id]


def preferred(matches: list[Candidate], prefer: Sequence[str | Path | None]
              ) -> Candidate | None:
    """The only one of ``matches``, or the one at the first path of ``prefer`` among them."""
    if len(matches) == 1:
        return matches[0]
    for path in prefer:
        if path is not None:
            where = Path(path).resolve()
            cand = next((c for c in matches if c.path == where), None)
            if cand is not None:
                return cand
    return None


def activation(client: redis.Redis) -> dict[str, Any] | None:
    raw: Any = client.get(ACTIVE_REFERENCE_KEY)
    if raw is None:
        return None
    try:
        doc = json.loads(raw)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def current(settings: Settings, client: redis.Redis) -> Candidate | None:
    """The reference the stages run on now, as far as the manifests tell: the activated one if
    still a candidate, else the configured one."""
    doc = activation(client)
    if doc is not None:
        cand = find(settings, str(doc.get("reference_id")), [doc.get("path")])
        if cand is not None:
            return cand
    configured = (Path(settings.reference_dir).resolve() if settings.reference_dir is not None
                  else None)
    return next((c for c in candidates(settings) if c.path == configured), None)


def _kind(manifest: dict[str, Any]) -> tuple[str, Any]:
    emb = manifest.get("embedding")
    emb = emb if isinstance(emb, dict) else {}
    model = emb.get("model")
    return ("images through an ONNX model" if model else "precomputed embeddings",
            emb.get("input_dim"))


def check_fits(cand: Candidate, now: Candidate | None) -> None:
    """:class:`ReferenceError` unless ``cand`` takes the events the stages take now (``now``):
    images or precomputed embeddings alike, of the same dimension."""
    if now is None or now.path == cand.path:
        return
    (kind, dim), (now_kind, now_dim) = _kind(cand.manifest), _kind(now.manifest)
    if kind != now_kind:
        raise ReferenceError(f"it was built from {kind}, but the stages now run on "
                             f"{now.reference_id} ({now.path.name}), built from {now_kind}: "
                             "the events they receive are of the other kind")
    if dim != now_dim:
        raise ReferenceError(f"its embeddings have dimension {dim}, but those of "
                             f"{now.reference_id} ({now.path.name}), which the stages now run "
                             f"on, have {now_dim}")


def activate(client: redis.Redis, settings: Settings, cand: Candidate, who: str,
             note: str | None = None) -> dict[str, Any]:
    """Record ``cand`` as the active reference once the stages could start on it: it loads
    and verifies as at their start-up (with the configured model; if this process cannot read
    that file, the model of the reference running now), and takes the events they take now.
    Raises :class:`ReferenceError` naming the problem."""
    now = current(settings, client)
    model_sha256 = configured_model_sha256(settings)
    if model_sha256 is None and now is not None:
        model = (now.manifest.get("embedding") or {}).get("model")
        model_sha256 = str(model["model_sha256"]) if isinstance(model, dict) and \
            model.get("model_sha256") else None
    usable_reference(settings, cand.path, model_sha256)
    check_fits(cand, now)
    doc = {"reference_id": cand.reference_id, "path": str(cand.path), "who": who,
           "at": datetime.now(UTC).isoformat().replace("+00:00", "Z"), "note": note}
    client.set(ACTIVE_REFERENCE_KEY, json.dumps(doc))
    log.info("reference activated", extra=doc)
    return doc


def activated_dir(settings: Settings, client: redis.Redis) -> Path | None:
    """The directory of the reference activated through the API if it is still one of the
    candidates."""
    doc = activation(client)
    if doc is None:
        return None
    cand = find(settings, str(doc.get("reference_id")), [doc.get("path")])
    if cand is None:
        log.error("the activated reference is no longer among DRIFTLINE_REFERENCE_DIR and its "
                  "siblings; using the configured one", extra={"activation": doc})
        return None
    return cand.path


def active_reference(settings: Settings, client: redis.Redis
                     ) -> tuple[Path | None, Reference | None]:
    """For stages and the API at start-up: the activated reference (its directory and, loaded,
    the reference) if the stages can use it (:func:`driftline.runner.usable_reference`), else
    ``(DRIFTLINE_REFERENCE_DIR, None)``, logging an error naming the activated directory and
    why. Whatever fails with the activated one, the configured one is the way out; every
    process decides alike (the artifact, the settings, the model file), so embed and detect
    workers do not end up on different references (an unreadable model file is no reason)."""
    activated = activated_dir(settings, client)
    configured = settings.reference_dir
    if activated is None or (configured is not None
                             and activated == Path(configured).resolve()):
        return configured, None
    try:
        return activated, usable_reference(settings, activated,
                                           configured_model_sha256(settings))
    except Exception as exc:  # any failure: the configured reference is the way out
        log.error(f"THE REFERENCE ACTIVATED THROUGH THE API ({activated}) CANNOT BE USED: "
                  f"{exc}; starting on DRIFTLINE_REFERENCE_DIR ({configured}) instead. "
                  "Activate a usable reference through the API",
                  extra={"activated_dir": str(activated), "error": repr(exc),
                         "configured_dir": str(configured)})
    return configured, None
