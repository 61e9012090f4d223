"""A bank of one-sided CUSUMs on per-event log-likelihood ratios, with onset tracking.

Every detector in :mod:`driftline.core` is a bank of ``M`` Page CUSUMs

    S_m(n) = max(0, S_m(n-1) + llr_m(x_n)),     alarm when  max_m S_m(n) >= h,

where ``llr_m`` is the log-likelihood ratio of alternative ``m`` against the event's baseline.
Subclasses only say how an event maps to the ``M`` increments; this module owns the state, the
onset estimate (the first event after the alarming statistic last left zero), the read-only
properties and the snapshot format.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Self

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
SNAPSHOT_VERSION = 1


def union_threshold(arl0: float, bank_size: int) -> float:
    """Threshold ``ln γ + ln M`` that guarantees ``ARL0 >= γ`` for a bank of ``M`` CUSUMs.

    Each member is a CUSUM on a true likelihood ratio, so ``exp(S_m) <= R_m``, the
    Shiryaev–Roberts statistic, and ``R_m(n) - n`` is a martingale under the baseline even when
    the baseline changes from event to event. Summing over the bank and stopping at the first
    alarm ``T`` gives ``M·E[T] = E[Σ_m R_m(T)] >= e^h``, i.e. ``E[T] >= e^h / M`` (Lorden 1971;
    Pollak 1987). See :mod:`driftline.core.budget` for where ``γ`` comes from.

    >>> round(union_threshold(1000.0, 1), 3)
    6.908
    """
    if arl0 <= 1.0 or bank_size < 1:
        raise ValueError("need arl0 > 1 and bank_size >= 1")
    return math.log(arl0) + math.log(bank_size)


class CusumBank:
    """State and read-only view shared by every CUSUM bank (use a subclass)."""

    kind: ClassVar[str] = "cusum"

    def __init__(self, bank_size: int, threshold: float) -> None:
        if not threshold > 0.0:
            raise ValueError("threshold must be positive")
        self._h = float(threshold)
        self._s: FloatArray = np.zeros(bank_size)
        self._start = np.zeros(bank_size, dtype=np.int64)
        self._start_time: FloatArray = np.full(bank_size, np.nan)
        self._n = 0
        self._top = 0.0

    # -- subclass hooks -------------------------------------------------------------------
    def describe_member(self, m: int) -> dict[str, Any]:
        """What alternative bank member ``m`` stands for (JSON-ready)."""
        return {"member": m}

    def config(self) -> dict[str, Any]:
        """Constructor arguments other than the threshold (JSON-ready)."""
        return {}

    # -- update machinery -----------------------------------------------------------------
    def _begin(self) -> npt.NDArray[np.bool_]:
        return np.equal(self._s, 0.0)

    def _finish(self, was_zero: npt.NDArray[np.bool_], time: float | None) -> bool:
        s = self._s
        np.maximum(s, 0.0, out=s)
        started = was_zero & (s > 0.0)
        np.copyto(self._start, self._n, where=started)
        np.copyto(self._start_time, np.nan if time is None else float(time), where=started)
        self._n += 1
        self._top = float(s.max())
        return self._top >= self._h

    # -- read-only view -------------------------------------------------------------------
    @property
    def bank_size(self) -> int:
        return int(self._s.size)

    @property
    def statistic(self) -> float:
        """``max_m S_m``: the largest statistic in the bank."""
        return self._top

    @property
    def threshold(self) -> float:
        return self._h

    @property
    def ratio(self) -> float:
        """Statistic over threshold; ``>= 1`` means alarm (handy as a gauge)."""
        return self._top / self._h

    @property
    def alarm(self) -> bool:
        return self._top >= self._h

    @property
    def n(self) -> int:
        """Events seen since creation or the last :meth:`reset`."""
        return self._n

    @property
    def argmax(self) -> dict[str, Any]:
        """The bank member with the largest statistic (ties: the first)."""
        return self.describe_member(int(np.argmax(self._s)))

    @property
    def onset_index(self) -> int | None:
        """Index (0-based, in events) of the first event of the leading excursion, if any."""
        if self._top <= 0.0:
            return None
        return int(self._start[int(np.argmax(self._s))])

    @property
    def onset_time(self) -> float | None:
        """Event time of :attr:`onset_index`, if times were given."""
        if self._top <= 0.0:
            return None
        t = float(self._start_time[int(np.argmax(self._s))])
        return None if math.isnan(t) else t

    def reset(self) -> None:
        """Forget every event: statistics to zero, ``n`` to zero."""
        self._s[:] = 0.0
        self._start[:] = 0
        self._start_time[:] = np.nan
        self._n = 0
        self._top = 0.0

    # -- persistence ----------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """JSON-serialisable state; :meth:`restore` continues exactly where this left off."""
        return {
            "kind": self.kind,
            "version": SNAPSHOT_VERSION,
            "config": self.config(),
            "threshold": self._h,
            "n": self._n,
            "s": self._s.tolist(),
            "start": self._start.tolist(),
            "start_time": [None if math.isnan(t) else t for t in self._start_time.tolist()],
        }

    @classmethod
    def restore(cls, snap: dict[str, Any]) -> Self:
        """Rebuild a detector from :meth:`snapshot` output."""
        if snap.get("kind") != cls.kind or snap.get("version") != SNAPSHOT_VERSION:
            raise ValueError(f"not a {cls.kind} v{SNAPSHOT_VERSION} snapshot")
        det = cls(**snap["config"], threshold=snap["threshold"])
        s = np.asarray(snap["s"], dtype=np.float64)
        if s.shape != det._s.shape:
            raise ValueError("snapshot bank size does not match its config")
        det._s[:] = s
        det._start[:] = np.asarray(snap["start"], dtype=np.int64)
        det._start_time[:] = [np.nan if t is None else t for t in snap["start_time"]]
        det._n = int(snap["n"])
        det._top = float(s.max())
        return det
