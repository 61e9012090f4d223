"""A bank of one-sided CUSUMs on per-event log-likelihood ratios, with onset tracking.

Every detector in :mod:`driftline.core` is a bank of ``M`` Page CUSUMs

    S_m(n) = max(0, S_m(n-1) + llr_m(x_n)),     alarm when  max_m S_m(n) >= h,

where ``llr_m`` is the log-likelihood ratio of alternative ``m`` against the event's baseline.
Subclasses only say how an event maps to the ``M`` increments; this module owns the state, the
onset estimate (the first event after the alarming statistic last left zero), the read-only
properties and the snapshot format.

The update is written for the detect stage's hot path, a few small numpy calls per event:

* the onset of member ``m`` is stamped (event index and time) on every event that finds
  ``S_m = 0`` before its step. Only the stamp of a member with ``S_m > 0`` is ever read, and
  that one was made when ``S_m`` last left zero, so this is the "first event after the last
  zero" without a second comparison after the step;
* the maximum ``max_m S_m`` is not taken on every event. The bank keeps an upper bound ``u``
  (``u <- max(0, u + hi)``, ``hi`` the largest increment of the event) and takes the exact
  maximum only when ``u`` comes within ``_BOUND_SLACK`` of the threshold (or every
  ``_EXACT_EVERY`` events, so float rounding of the bound cannot build up). Alarms are decided
  on the exact maximum; the state (``S``, stamps, ``n``) never depends on the bound.

Each event's float operations on ``S`` are the same whichever way the stream is cut into batches
or restarted from a snapshot, so a restored detector continues bit for bit.

A gap in observation (a shift slice sees nothing for 16 hours between its shifts) is the
caller's to see — :class:`~driftline.core.slices.SliceDetectors` knows the slice's event times —
and :meth:`CusumBank.onset_after_gap` is what it does to the onset estimate; ``S`` is never
touched, so the false-alarm guarantee stays that of the plain CUSUM.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Self

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
SNAPSHOT_VERSION = 2
# The bound adds one rounded sum per event where S adds two: a few ulps of h per event at most.
_BOUND_SLACK = 1e-6
_EXACT_EVERY = 4096
# A member's statistic at a gap must reach ln(M / GAP_ALPHA) for its onset to stay before the
# gap: under no change the bank's statistic at a given event exceeds that with probability at
# most GAP_ALPHA (see CusumBank.onset_after_gap).
GAP_ALPHA = 0.05
_SHARED_FLOATS = 1024
# ratio: banks up to this size are read as a list (cheaper there), larger ones by ndarray.max
_LIST_MAX_MEMBERS = 24
_floats: dict[float, float] = {}


def shared_float(x: float) -> float:
    """``float(x)`` as one object per value (for the first ``_SHARED_FLOATS`` values): the
    per-slice settings — thresholds, ARL0 targets, bucket widths, reference rates — are a few
    values held by thousands of slices, 24 bytes each as objects of their own (as every slice
    restored from a checkpoint would hold them: its values come from decoding)."""
    f = float(x)
    # NaN is never equal to itself (never found again); -0.0 would be found as 0.0
    if f != f or not f or len(_floats) >= _SHARED_FLOATS:
        return f
    return _floats.setdefault(f, f)


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

    __slots__ = ("_h", "_s", "_onset", "_n", "_bound", "_alarm")
    kind: ClassVar[str] = "cusum"

    def __init__(self, bank_size: int, threshold: float) -> None:
        if not threshold > 0.0:
            raise ValueError("threshold must be positive")
        # banks of one kind share a threshold: one float object, not 24 B in each bank
        self._h: float = shared_float(threshold)
        self._s: FloatArray = np.zeros(bank_size)
        # Per member, the stamp of the last step that started from S = 0: event index + 1j·time
        # (NaN: no time). One complex array, so that stamping is one masked store.
        self._onset = np.full(bank_size, complex(0.0, math.nan))
        self._n = 0
        self._bound = 0.0  # >= max_m S_m (see the module docstring)
        self._alarm = False

    # -- subclass hooks -------------------------------------------------------------------
    def describe_member(self, m: int) -> dict[str, Any]:
        """What alternative bank member ``m`` stands for (JSON-ready)."""
        return {"member": m}

    def config(self) -> dict[str, Any]:
        """Constructor arguments other than the threshold (JSON-ready)."""
        return {}

    # -- update machinery -----------------------------------------------------------------
    def _begin(self, time: float | None) -> None:
        """Stamp the members that start this step from zero (call before adding)."""
        self._onset[self._s == 0.0] = complex(self._n, math.nan if time is None else time)

    def _finish(self, hi: float) -> bool:
        """Clamp at zero and decide the alarm; ``hi`` bounds every increment just added."""
        s = self._s
        np.maximum(s, 0.0, out=s)
        self._n += 1
        bound = self._bound + hi
        if bound >= self._h - _BOUND_SLACK or not self._n % _EXACT_EVERY:
            bound = float(s.max())
            self._alarm = bound >= self._h
        else:
            self._alarm = False
        self._bound = bound if bound > 0.0 else 0.0
        return self._alarm

    def onset_after_gap(self, time: float | None) -> None:
        """A long gap in observation comes before the next event: members whose excursion so far
        carries less than :attr:`gap_evidence` take that event as their onset.

        The onset estimate of member ``m`` (the first event after ``S_m`` last left zero) is the
        change point that maximises its likelihood ratio, and the ratio of that maximum to the
        best change point at or after the gap is ``exp(S_m)`` at the gap. Under no change a CUSUM
        at a given event is a time-reversed likelihood-ratio supremum, so by Ville's inequality
        ``P(S_m >= x) <= e^-x``, and ``P(max_m S_m >= x) <= M e^-x`` for the bank. A little
        evidence before a gap is therefore what no change leaves behind ~half the time, and
        carried across the gap it dates a change that starts after it by the gap's length (hours
        for a shift slice), not by the few events it spans. So the onset stays before the gap only
        where the evidence before it alone rejects "no change yet" at level ``GAP_ALPHA``.
        ``S`` is unchanged: alarms, and the false-alarm guarantee, are those of the plain CUSUM.

        >>> from driftline.core.bernoulli import BernoulliCusum
        >>> det = BernoulliCusum(arl0=1000.0)
        >>> _ = det.update(True, 0.01, time=0.0)  # one OOD event: S = ln 10 < ln(4 / 0.01)
        >>> det.onset_after_gap(time=57_600.0)
        >>> _ = det.update(True, 0.01, time=57_600.0)
        >>> det.onset_index, det.onset_time
        (1, 57600.0)
        """
        s = self._s
        weak = (s > 0.0) & (s < self.gap_evidence)
        if weak.any():
            self._onset[weak] = complex(self._n, math.nan if time is None else time)

    # -- read-only view -------------------------------------------------------------------
    @property
    def gap_evidence(self) -> float:
        """``ln(M / GAP_ALPHA)``: the statistic a member needs at a gap for its onset to stay
        before it (see :meth:`onset_after_gap`)."""
        return math.log(self._s.size / GAP_ALPHA)

    @property
    def bank_size(self) -> int:
        return int(self._s.size)

    @property
    def statistic(self) -> float:
        """``max_m S_m``: the largest statistic in the bank."""
        return float(self._s.max())

    @property
    def threshold(self) -> float:
        return self._h

    @property
    def ratio(self) -> float:
        """Statistic over threshold; ``>= 1`` means alarm (handy as a gauge).

        :attr:`statistic`'s value (read for every detector of every dirty slice at each
        checkpoint). A small bank (the OOD, confidence and error-rate ones) is read as a list,
        a few times cheaper than ``ndarray.max`` there; a large one (a cluster mix of K×6
        members) by ``ndarray.max``, which the list loses to beyond ~25 members (5.7 vs 1.2 µs
        at 200). ``max`` skips a NaN that ``ndarray.max`` returns; the sum tells (``S >= 0``,
        so it is NaN only with a NaN member)."""
        if self._s.size > _LIST_MAX_MEMBERS:
            return float(self._s.max()) / self._h
        s = self._s.tolist()
        top, total = max(s), sum(s)
        return (top if total == total else math.nan) / self._h

    @property
    def alarm(self) -> bool:
        return self._alarm

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
        m = int(np.argmax(self._s))
        if not self._s[m] > 0.0:
            return None
        return int(self._onset[m].real)

    @property
    def onset_time(self) -> float | None:
        """Event time of :attr:`onset_index`, if times were given."""
        m = int(np.argmax(self._s))
        if not self._s[m] > 0.0:
            return None
        t = float(self._onset[m].imag)
        return None if math.isnan(t) else t

    def reset(self) -> None:
        """Forget every event: statistics to zero, ``n`` to zero."""
        self._s[:] = 0.0
        self._onset[:] = complex(0.0, math.nan)
        self._n = 0
        self._bound = 0.0
        self._alarm = False

    # -- persistence ----------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """State as JSON-ready scalars plus numpy arrays (``s``; per member ``start`` and
        ``start_time``, the onset stamps, NaN for no time); :meth:`restore` continues exactly
        where this left off.
        :func:`driftline.consumers.checkpoint.encode_record` stores the arrays as raw bytes."""
        return {
            "kind": self.kind,
            "version": SNAPSHOT_VERSION,
            "config": self.config(),
            "threshold": self._h,
            "n": self._n,
            "s": self._s.copy(),
            "start": self._onset.real.astype(np.int64),
            "start_time": self._onset.imag.copy(),
        }

    @classmethod
    def restore(cls, snap: dict[str, Any]) -> Self:
        """Rebuild a detector from :meth:`snapshot` output (arrays or lists; v1 JSON too)."""
        if snap.get("kind") != cls.kind or snap.get("version") not in (1, SNAPSHOT_VERSION):
            raise ValueError(f"not a {cls.kind} v{SNAPSHOT_VERSION} snapshot")
        det = cls(**snap["config"], threshold=snap["threshold"])
        s = np.asarray(snap["s"], dtype=np.float64)
        start = np.asarray(snap["start"], dtype=np.int64)
        start_time = np.asarray(snap["start_time"], dtype=np.float64)  # v1: None for NaN
        if not s.shape == start.shape == start_time.shape == det._s.shape:
            raise ValueError("snapshot bank size does not match its config")
        det._s[:] = s
        det._onset.real = start
        det._onset.imag = start_time
        det._n = int(snap["n"])
        det._bound = float(s.max())
        det._alarm = det._bound >= det._h
        return det
