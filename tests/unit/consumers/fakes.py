"""Test doubles of what the detect stage needs of a reference (``slice_state.Baselines``), and
a failure book fed by one slice."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import numpy as np

from driftline.alerts.attribution import SliceStatus
from driftline.alerts.grouping import Grouper
from driftline.consumers.slice_state import SliceState
from driftline.core.baselines import DetectorBaseline


class FlatBaselines:
    """Every baseline the uniform mix over ``k`` clusters with OOD rate ``ood_rate``, known
    exactly: the detectors judge against the stated rates themselves. No predictions, no
    labels; ``reference_id`` names the reference the slice's updates must carry."""

    def __init__(self, k: int, ood_rate: float = 0.01, reference_id: str | None = None) -> None:
        self.p = np.full(k, 1 / k)
        self.rate = ood_rate
        self.exact = DetectorBaseline.exact(self.p, ood_rate)
        if reference_id is not None:
            self.reference_id = reference_id

    def cluster_mix(self, key: str) -> np.ndarray:
        return self.p

    def ood_rate(self, key: str) -> float:
        return self.rate

    def detector_baseline(self, key: str) -> DetectorBaseline:
        return self.exact

    def prediction(self, key: str) -> None:
        return None

    def expected_error(self, cluster: int) -> float | None:
        return None


def one_slice_book(state: SliceState, msgs: Sequence[Mapping[str, Any]],
                   now: datetime) -> Grouper:
    """A failure book fed ``msgs``, the outbox of ``state`` (a station slice), one message per
    batch as a live book mostly sees them, with the slice's summary as the detect stage writes
    it."""
    summary = {state.slice_id: SliceStatus.from_summary(state.slice_id, {
        "template": state.template, "dims": state.dims, "n": state.n,
        "last_time": state.last_time, "ratios": {}, "open": sorted(state.open)})}
    ids = itertools.count(1)
    g = Grouper([], summary, now=now, new_id=lambda: f"DL-{next(ids)}", signatures=dict)
    for m in msgs:
        g.apply(m)
        g.finish()
    return g
