"""What the reference API tests share: an admin token, settings that accept it with
``ref-a`` of a :func:`~tests.unit.service.populate.build_references` root configured, and a
reference's id as its manifest says."""

from __future__ import annotations

import json
from pathlib import Path

from driftline.config import Settings, load_settings
from driftline.reference.artifact import MANIFEST

ADMIN = "tokadmin-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {ADMIN}"}


def admin_settings(root: Path) -> Settings:
    return load_settings(reference_dir=str(root / "ref-a"), api_tokens=f"adm:admin:{ADMIN}")


def reference_id(path: Path) -> str:
    return str(json.loads((path / MANIFEST).read_text())["reference_id"])
