"""What the API builds on its reference (the cluster catalogue, the recent index, the clusters of
reference samples) is built on the one chosen as of now. Chosen while Redis was down, the
reference is chosen again later (the activated one); a request that had read the old one just
before must not cache what it builds on it after the choice has reset those caches: nothing
resets them again, and every later request would read the old reference's."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from driftline.config import load_settings
from driftline.service.context import ServiceContext
from tests.unit.service.keyvalue import KeyValue


def _ref(rid: str, dim: int, samples: list[str]) -> Any:
    return SimpleNamespace(reference_id=rid, dim=dim, manifest={"reference_id": rid},
                           event_ids=samples, clusters=np.arange(len(samples)))


@pytest.mark.parametrize("built", [
    lambda ctx: ctx.catalog().reference_id,
    lambda ctx: ctx.recent().reference.reference_id,
    lambda ctx: sorted(ctx.reference_clusters()),
])
def test_what_is_built_on_the_reference_is_built_on_the_one_chosen_now(
        built: Callable[[ServiceContext], Any]) -> None:
    old, new = _ref("configured", 4, ["a1"]), _ref("activated", 8, ["b1", "b2"])
    ctx = ServiceContext(settings=load_settings(), redis=KeyValue(),  # type: ignore[arg-type]
                         book=None, tokens=[])  # type: ignore[arg-type]
    ctx._reference, ctx._reference_loaded = old, True

    def chosen_again_meanwhile() -> Any:
        # as another request's reference() does under the lock once Redis answers again
        # (_load_reference), between this request's read and its taking the lock
        ctx._reference = new
        ctx._built.clear()
        return old

    ctx.reference = chosen_again_meanwhile  # type: ignore[method-assign]
    got = built(ctx)
    ctx.reference = lambda: new  # type: ignore[method-assign]
    assert got == built(ctx) and got in ("activated", ["b1", "b2"])
