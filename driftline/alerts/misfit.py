"""An alarmed slice whose cell is judged against a parent baseline that does not fit it.

The build records every station and station×shift cell without a baseline of its own in the
manifest's ``baselines.fallbacks`` (:mod:`driftline.reference.fallbacks`). One whose own
reference events do not fit the baseline it falls back to alarms on unchanged data, so an
alarm there is more likely a gap in the reference (root cause ``data_coverage``) than drift.
A station slice is judged in its station's cell, a station+shift slice in its own; shift and
lot slices span cells and each of their events is judged against its own baseline, so they
never are.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from driftline.core.baselines import station_key, station_shift_key


@dataclass(frozen=True)
class BaselineMisfit:
    """The cell, its reference events, the baseline it is judged against and the G-test's p."""

    cell: str
    reference_events: int
    judged_against: str
    p_value: float

    @property
    def hint(self) -> str:
        """What it means for the alarm, and what to do about the reference."""
        p = f"p = {self.p_value:.2g}" if self.p_value > 0 else "p ≈ 0"
        return (f"this cell had {self.reference_events} reference events and is judged "
                f"against {self.judged_against}, whose cluster mix its own reference events "
                f"do not fit ({p}): an alarm here may be a gap in the reference, not drift "
                "(root cause data_coverage) — rebuild the reference with more reference "
                f"events for it or with --min-count {self.reference_events} or lower")

    @property
    def sentence(self) -> str:
        """One sentence for an alert's description."""
        return (f"{self.cell} has no baseline of its own and its {self.reference_events} "
                f"reference events do not fit {self.judged_against}'s, which it is judged "
                "against: this alarm may be a gap in the reference, not drift.")


def slice_cell(dims: Mapping[str, str]) -> str | None:
    """The baseline cell a slice's events are all judged in: ``station=X`` for a station
    slice, ``station=X|shift=Y`` for a station+shift slice; None for any other template."""
    if set(dims) == {"station"}:
        return station_key(dims["station"])
    if set(dims) == {"station", "shift"}:
        return station_shift_key(dims["station"], dims["shift"])
    return None
