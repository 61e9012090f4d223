"""``/api/v1/references``: list, show and (admin) activate reference artifacts."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Body, HTTPException, status
from fastapi import Path as PathParam

from driftline.core.baselines import DEFAULT_CONFIDENCE
from driftline.reference.artifact import MANIFEST, ReferenceError
from driftline.reference.entries import EntryError, check_clusters
from driftline.runner import ood_detector_rate
from driftline.service import references_store as store
from driftline.service.deps import Admin, RedisDep, SettingsDep, Viewer
from driftline.service.schemas.common import COMMON_ERRORS, errors
from driftline.service.schemas.references import (
    ActivationRequest,
    ActivationView,
    BaselineRow,
    ClusterRow,
    ReferenceDetail,
    ReferenceRow,
)

router = APIRouter(prefix="/references", tags=["references"], responses=COMMON_ERRORS)
ACTIVATION_REFUSED = (
    "the stages could not run on this reference: an array or manifest fails its checks, it was "
    "built with another model than DRIFTLINE_MODEL_PATH, a section the stages read is missing, "
    "or it takes other events than the reference running now (images vs precomputed "
    "embeddings, or another embedding dimension); or several directories hold it and the "
    "body's name does not say which; the detail says which")
SHOW_REFUSED = ("its manifest is not what a build writes (a cluster entry missing a field, or "
                "one of another type): the detail names the file and the field")
ReferenceId = Annotated[str, PathParam(max_length=64, examples=["3f9c2a7b1d4e8f60"])]


def _flags(settings: SettingsDep, r: RedisDep) -> tuple[str | None, str | None]:
    """The configured directory and the activated one (the directory the stages start on: a
    backup copy holding the same reference id is not it)."""
    configured = str(Path(settings.reference_dir).resolve()) if settings.reference_dir else None
    doc = store.activation(r)
    cand = (store.find(settings, str(doc.get("reference_id")), [doc.get("path")])
            if doc else None)
    return configured, str(cand.path) if cand else None


def _row(c: store.Candidate, configured: str | None, active: str | None) -> ReferenceRow:
    return ReferenceRow.of(str(c.path), c.manifest, str(c.path) == configured,
                           str(c.path) == active)


def _missing(reference_id: str, name: str | None = None) -> HTTPException:
    return HTTPException(status.HTTP_404_NOT_FOUND, detail=(
        f"no reference {reference_id!r}{f' in a directory {name!r}' if name else ''} among "
        "DRIFTLINE_REFERENCE_DIR and its siblings (list them at /api/v1/references)"))


def _found(settings: SettingsDep, r: RedisDep, reference_id: str,
           name: str | None = None) -> store.Candidate:
    """The directory holding ``reference_id`` (named ``name`` if given); of several (a backup
    copy), the activated one, else the configured one, else 409 asking for ``name``."""
    matches = [c for c in store.matching(settings, reference_id)
               if name is None or c.path.name == name]
    if not matches:
        raise _missing(reference_id, name)
    active = store.activation(r) or {}
    prefer = [active.get("path") if active.get("reference_id") == reference_id else None,
              settings.reference_dir]
    cand = store.preferred(matches, prefer)
    if cand is None:
        raise HTTPException(status.HTTP_409_CONFLICT, detail=(
            f"reference {reference_id} is in {len(matches)} directories "
            f"({', '.join(c.path.name for c in matches)}): say which with \"name\" in the body"))
    return cand


@router.get("", response_model=list[ReferenceRow])
def list_references(settings: SettingsDep, r: RedisDep, _: Viewer) -> list[ReferenceRow]:
    """The configured reference and every sibling artifact directory next to it."""
    configured, active = _flags(settings, r)
    return [_row(c, configured, active) for c in store.candidates(settings)]


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, int | float) else None


def baseline_rows(section: dict[str, Any]) -> list[BaselineRow]:
    """A manifest's baselines, each with the OOD rate its detector judges against (computed
    as the detect stage does for references built before it was stored)."""
    confidence = float(section.get("bound_confidence", DEFAULT_CONFIDENCE))
    return [BaselineRow(key=k, parent=b.get("parent"), n=b.get("n"),
                        ood_threshold=_num(b.get("ood_threshold")),
                        ood_rate=_num(b.get("ood_rate")),
                        ood_rate_bound=(None if _num(b.get("ood_rate")) is None
                                        else ood_detector_rate(k, b, confidence)))
            for k, b in sorted((section.get("items") or {}).items())]


@router.get("/{reference_id}", response_model=ReferenceDetail,
            responses=errors(404, 409, why={409: SHOW_REFUSED}))
def show_reference(reference_id: ReferenceId, settings: SettingsDep, r: RedisDep,
                   _: Viewer) -> ReferenceDetail:
    """Summary of a reference's manifest: clusters, baselines, aggressor clusters."""
    configured, active = _flags(settings, r)
    cand = store.find(settings, reference_id, [active])
    if cand is None:
        raise _missing(reference_id)
    try:
        check_clusters(cand.manifest)
        return _detail(cand, configured, active)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:  # EntryError names it
        why = str(exc) if isinstance(exc, EntryError) else f"{type(exc).__name__}: {exc}"
        raise HTTPException(status.HTTP_409_CONFLICT, detail=(
            f"reference {reference_id} cannot be shown: {cand.path / MANIFEST}: {why}")
        ) from None


def _detail(cand: store.Candidate, configured: str | None, active: str | None
            ) -> ReferenceDetail:
    m = cand.manifest
    items = (m.get("clusters") or {}).get("items") or []
    emb = dict(m.get("embedding") or {})
    return ReferenceDetail(
        **_row(cand, configured, active).model_dump(),
        driftline_version=m.get("driftline_version"), source=dict(m.get("source") or {}),
        embedding=emb,
        cluster_items=[ClusterRow(
            id=int(c["id"]), size=c.get("size"), share=_num(c.get("share")),
            median_distance_to_centroid=_num(c.get("median_distance_to_centroid")),
            exemplars=[str(x) for x in c.get("exemplars") or []],
            performance=c.get("performance")) for c in items],
        baselines=baseline_rows(m.get("baselines") or {}),
        aggressors=list((m.get("performance") or {}).get("aggressors") or []))


@router.post("/{reference_id}/activate", response_model=ActivationView,
             responses=errors(404, 409, 415, why={409: ACTIVATION_REFUSED}))
def activate_reference(reference_id: ReferenceId, settings: SettingsDep, r: RedisDep,
                       caller: Admin,
                       body: Annotated[ActivationRequest | None, Body()] = None
                       ) -> ActivationView:
    """Make this reference the active one (admin). Stages use it from their next restart; it is
    refused (409) unless they could start on it and it takes the events they take now."""
    cand = _found(settings, r, reference_id, body.name if body else None)
    try:
        doc = store.activate(r, settings, cand, caller.name, body.note if body else None)
    except ReferenceError as exc:
        raise HTTPException(status.HTTP_409_CONFLICT,
                            detail=f"reference {reference_id} cannot be activated: {exc}"
                            ) from None
    return ActivationView(reference_id=doc["reference_id"], path=doc["path"],
                          activated_by=doc["who"], activated_at=doc["at"], note=doc["note"])
