"""The on-disk reference artifact: ``manifest.json`` plus ``.npy`` arrays, hash-checked.

Layout of a reference directory::

    manifest.json          format version, identity, clusters, baselines, thresholds, hashes
    centroids.npy          float32 [K, d]   unit-norm k-means centroids
    embeddings.npy         float32 [n, d]   reference samples (projected, unit-norm)
    clusters.npy           int64   [n]      cluster of each reference sample
    distances.npy          float32 [n]      leave-one-out distance to the nearest other sample
    event_ids.npy          str     [n]      event id of each reference sample
    pca_mean.npy           float32 [D]      only with PCA
    pca_components.npy     float32 [d, D]   only with PCA

The directory is written under a temporary name and renamed into place, so a reader never sees
half an artifact. It gets the permissions ``mkdir`` would give (``0o777`` less the process
umask), not the owner-only mode of a temporary directory: a reference is built by one user and
read by a service running as another (the container's uid 10001, a mounted volume). Arrays
are loaded with ``allow_pickle=False``.

``reference_id`` is a content hash of the whole manifest — clusters, baselines, OOD thresholds
and rates, build parameters, and the sha256 of every array — except :data:`VOLATILE` fields
(``created_at``): two builds that differ in anything a detector reads get different ids, the
same build repeated gets the same id, and a manifest edited after the build is refused on load.
Format 1 artifacts (whose id covered the arrays only) are still read, with a warning: their
arrays are checked, their manifest cannot be. Either way, the cluster entries must be what a
build writes (:func:`~driftline.reference.entries.check_clusters`), or the error names the field.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from driftline.reference.entries import EntryError, check_clusters

FORMAT = "driftline-reference"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: reference_id covered the arrays only, the manifest unchecked
MANIFEST = "manifest.json"
REQUIRED_ARRAYS = ("centroids", "embeddings", "clusters", "distances", "event_ids")
VOLATILE = ("created_at",)  # left out of reference_id: a rebuild of the same content is the same

log = logging.getLogger(__name__)


class ReferenceError(Exception):  # shadows the builtin on purpose: the name driftline uses
    """A reference artifact is missing, corrupt, of another format, or for another model."""


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def content_id(manifest: dict[str, Any]) -> str:
    """``reference_id`` of a (format 2) manifest: sha256 of its canonical JSON, 16 hex digits,
    without ``reference_id`` itself and the :data:`VOLATILE` fields.

    The manifest is taken through JSON first, so the id computed when writing equals the one
    recomputed from the file (tuples become lists, float reprs round-trip exactly).
    """
    doc = json.loads(json.dumps(manifest))
    for key in ("reference_id", *VOLATILE):
        doc.pop(key, None)
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def check_out_dir(out_dir: Path, *, overwrite: bool = False, keep: Iterable[Path] = (),
                  overwrite_hint: str = "pass overwrite=True") -> None:
    """Raise :class:`ReferenceError` unless an artifact may be written to ``out_dir``.

    It may be a path to create (under a directory, not a file), an empty directory, or — with
    ``overwrite`` — a reference directory holding only the files of its own manifest: anything
    else would be deleted with it. Never the working directory or one holding it, nor one
    holding a file of ``keep`` (the manifest and model a build reads). ``overwrite_hint``: how
    the caller's user asks for ``overwrite``.
    """
    out_dir = Path(out_dir)
    where = out_dir.resolve()
    if where == Path.cwd().resolve() or where in Path.cwd().resolve().parents:
        raise ReferenceError(f"{out_dir} is the working directory or holds it: write the "
                             "reference to a directory of its own")
    for path in keep:
        if where in Path(path).resolve().parents:
            raise ReferenceError(f"{out_dir} holds {path}: write the reference to a directory "
                                 "of its own")
    if out_dir.is_symlink():
        raise ReferenceError(f"{out_dir} is a symbolic link: give the directory itself")
    if not out_dir.exists():
        ancestor = next(p for p in where.parents if p.exists())
        if not ancestor.is_dir():
            raise ReferenceError(f"cannot create {out_dir}: {ancestor} is not a directory")
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise ReferenceError(f"cannot create {out_dir}: {ancestor} is not writable")
        return
    if not out_dir.is_dir():
        raise ReferenceError(f"{out_dir} exists and is not a directory")
    if not os.access(where.parent, os.W_OK | os.X_OK):
        raise ReferenceError(f"cannot replace {out_dir}: {where.parent} is not writable")
    names = {p.name for p in out_dir.iterdir()}
    if not names:
        return
    if not overwrite:
        raise ReferenceError(f"{out_dir} exists and is not empty ({overwrite_hint} to replace "
                             "a reference there)")
    own = _own_files(out_dir)
    if own is None:
        raise ReferenceError(f"{out_dir} is not a reference (no {MANIFEST} of format "
                             f"{FORMAT}): refusing to replace it (only a reference or an empty "
                             "directory is replaced)")
    foreign = sorted(names - own)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if foreign[3:] else "")
        raise ReferenceError(f"{out_dir} holds a reference and also {shown}: refusing to delete "
                             "them with it; move them away or write elsewhere")


def _own_files(ref_dir: Path) -> set[str] | None:
    """The names of a reference directory's own files: its manifest and the arrays it lists;
    None when ``ref_dir`` holds no readable manifest of this format."""
    try:
        manifest = json.loads((ref_dir / MANIFEST).read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return None
    entries = manifest.get("arrays")
    files = [e.get("file") for e in entries.values() if isinstance(e, dict)] \
        if isinstance(entries, dict) else []
    return {MANIFEST, *(f for f in files if isinstance(f, str) and "/" not in f)}


def write_artifact(out_dir: Path, manifest: dict[str, Any], arrays: dict[str, NDArray[Any]],
                   *, overwrite: bool = False) -> Path:
    """Write ``arrays`` as ``<name>.npy`` and ``manifest`` (plus array hashes) atomically.

    ``out_dir`` must pass :func:`check_out_dir`; a reference there is replaced only once the
    new one is complete, and moved aside rather than deleted until the new one is in place.
    A write that fails (no space left, a read-only file system) raises :class:`ReferenceError`
    naming ``out_dir``, and leaves what was there.
    """
    out_dir = Path(out_dir)
    check_out_dir(out_dir, overwrite=overwrite)
    try:
        return _write(out_dir, manifest, arrays)
    except OSError as exc:
        at = f" ({exc.filename})" if exc.filename else ""
        raise ReferenceError(f"cannot write the reference to {out_dir}: "
                             f"{exc.strerror or exc}{at}") from None


def _write(out_dir: Path, manifest: dict[str, Any], arrays: dict[str, NDArray[Any]]) -> Path:
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    old: Path | None = None
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0o700 would hide it from other users
        entries = {}
        for name, arr in arrays.items():
            path = tmp / f"{name}.npy"
            np.save(path, arr, allow_pickle=False)
            entries[name] = {"file": path.name, "sha256": file_sha256(path),
                             "shape": list(arr.shape), "dtype": arr.dtype.str}
        full = {"format": FORMAT, "format_version": FORMAT_VERSION, "reference_id": "",
                **manifest, "arrays": entries}
        full["reference_id"] = content_id(full)
        (tmp / MANIFEST).write_text(json.dumps(full, indent=2, sort_keys=False) + "\n")
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
            os.replace(out_dir, old)
        try:
            os.replace(tmp, out_dir)
        except BaseException:
            if old is not None:
                os.replace(old, out_dir)
                old = None
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out_dir


def _umask() -> int:
    """The process umask (reading it means setting it: set back at once)."""
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def read_artifact(ref_dir: Path) -> tuple[dict[str, Any], dict[str, NDArray[Any]]]:
    """Read and verify an artifact; raise :class:`ReferenceError` naming the first problem."""
    ref_dir = Path(ref_dir)
    try:
        manifest = json.loads((ref_dir / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        why = (f"no {MANIFEST}" if ref_dir.is_dir() else "no such directory"
               if not ref_dir.exists() else "a file, not a directory")
        raise ReferenceError(f"{ref_dir} is not a reference: {why}") from None
    except NotADirectoryError:
        raise ReferenceError(f"{ref_dir} is not a reference: a file, not a directory") from None
    except (OSError, ValueError) as exc:
        raise ReferenceError(f"{ref_dir / MANIFEST} is unreadable: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ReferenceError(f"{ref_dir / MANIFEST} is not a {FORMAT} manifest")
    version = manifest.get("format_version")
    if version not in READABLE_VERSIONS:
        raise ReferenceError(f"{ref_dir}: format version {version!r} is not supported (this "
                             f"driftline reads {', '.join(map(str, READABLE_VERSIONS))})")
    if version == 1:
        log.warning("reference %s is format 1: its manifest (baselines, thresholds) cannot be "
                    "verified; rebuild it to get a content-hashed id", ref_dir)
    elif content_id(manifest) != manifest.get("reference_id"):
        raise ReferenceError(
            f"{ref_dir / MANIFEST} was modified after the build: its content hashes to "
            f"{content_id(manifest)}, not to its reference_id {manifest.get('reference_id')!r} "
            "(rebuild the reference rather than editing its manifest)")
    try:  # what readers index directly, named when it is not what the build writes
        check_clusters(manifest)
    except EntryError as exc:
        raise ReferenceError(f"{ref_dir / MANIFEST}: {exc}") from None
    entries = manifest.get("arrays", {})
    missing = [n for n in REQUIRED_ARRAYS if n not in entries]
    if missing:
        raise ReferenceError(f"{ref_dir}: manifest lists no {', '.join(missing)} array")
    arrays = {}
    for name, entry in entries.items():
        path = ref_dir / entry["file"]
        if not path.is_file():
            raise ReferenceError(f"{ref_dir}: array file {entry['file']} is missing")
        actual = file_sha256(path)
        if actual != entry["sha256"]:
            raise ReferenceError(f"{path} is corrupt or was modified: sha256 {actual[:12]}… "
                                 f"differs from the manifest's {entry['sha256'][:12]}…")
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ReferenceError(f"{path} is not a readable .npy array: {exc}") from None
        if list(arr.shape) != entry["shape"] or arr.dtype.str != entry["dtype"]:
            raise ReferenceError(f"{path}: shape/dtype {arr.shape}/{arr.dtype.str} differ from "
                                 f"the manifest's {entry['shape']}/{entry['dtype']}")
        arrays[name] = arr
    return manifest, arrays
