"""The shape of a manifest's cluster entries, checked when a reference is read.

A reference's ``reference_id`` covers its manifest, so an edited manifest is refused on load
(:mod:`driftline.reference.artifact`); but a format-1 artifact's manifest is not covered, and
one whose id was recomputed after an edit passes. Readers index the cluster entries directly
(``driftline reference show``, the API's reference detail, the book's cluster catalogue), and a
missing ``size`` or a ``size`` of ``"many"`` made them fail with a bare ``KeyError`` or an HTTP
500. :func:`check_clusters` names the first such field instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# field -> the JSON kinds it may hold; "?" first: the field may be absent
Spec = Mapping[str, tuple[str, ...]]
CLUSTER: Spec = {"id": ("int",), "size": ("int",), "share": ("number",),
                 "median_distance_to_centroid": ("?", "number", "null"),
                 "exemplars": ("list",), "lift": ("list",), "performance": ("object",)}
LIFT: Spec = {"field": ("str",), "value": ("str",), "lift": ("number",), "count": ("int",)}
PERFORMANCE: Spec = {"cluster": ("int",), "labelled": ("int",), "errors": ("int",),
                     "error_rate": ("number", "null"), "mean_loss": ("number", "null"),
                     # recorded by builds since the error-rate detector's reference
                     "expected_error": ("?", "number", "null"),
                     "error_p0": ("?", "number", "null")}


class EntryError(ValueError):
    """A manifest field is missing or of the wrong kind; the message names it by its path
    (``clusters.items[2].size: missing``)."""


_TYPES = {"str": str, "list": list, "object": dict, "null": type(None)}
_NAMES = {"int": "an integer", "number": "a number", "str": "a string",
          "list": "a list", "object": "an object", "null": "null"}


def _is(value: Any, kind: str) -> bool:
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":  # NaN too: a build's error_p0 may be one, and readers expect it
        return isinstance(value, int | float) and not isinstance(value, bool)
    return type(value) is _TYPES[kind]


def _check(doc: Any, spec: Spec, where: str) -> dict[str, Any]:
    """``doc``, once it is an object whose fields are of the kinds ``spec`` gives."""
    if not isinstance(doc, dict):
        raise EntryError(f"{where}: {_kind(doc)}, not an object")
    for key, kinds in spec.items():
        if key not in doc:
            if "?" in kinds:
                continue
            raise EntryError(f"{where}.{key}: missing")
        allowed = [k for k in kinds if k != "?"]
        if not any(_is(doc[key], k) for k in allowed):
            raise EntryError(f"{where}.{key}: {doc[key]!r:.40} is not "
                             + " or ".join(_NAMES[k] for k in allowed))
    return doc


def _kind(value: Any) -> str:
    """What JSON value ``value`` is, for a message."""
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            type(None): "null"}.get(type(value), "a number")


def check_clusters(manifest: Mapping[str, Any]) -> None:
    """Raise :class:`EntryError` naming the first field of the ``clusters`` section that a
    reader of the manifest would fail on: ``k``, and each of the ``k`` entries in order of id
    (:data:`CLUSTER`), their ``lift`` rows (:data:`LIFT`) and ``performance``
    (:data:`PERFORMANCE`)."""
    section = _check(manifest.get("clusters"), {"k": ("int",), "items": ("list",)}, "clusters")
    items = section["items"]
    if len(items) != section["k"]:
        raise EntryError(f"clusters.items: {len(items)} entries for k={section['k']}")
    for n, c in enumerate(items):
        where = f"clusters.items[{n}]"
        _check(c, CLUSTER, where)
        if c["id"] != n:
            raise EntryError(f"{where}.id: {c['id']}, not its position {n}")
        for m, x in enumerate(c["exemplars"]):
            if not isinstance(x, str):
                raise EntryError(f"{where}.exemplars[{m}]: {_kind(x)}, not an event id")
        for m, row in enumerate(c["lift"]):
            _check(row, LIFT, f"{where}.lift[{m}]")
        _check(c["performance"], PERFORMANCE, f"{where}.performance")
