"""All detectors of one slice behind one ``update``: the unit the detect stage keeps per slice."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from driftline.core.baselines import DetectorBaseline
from driftline.core.bernoulli import (
    CONFIDENCE_ALTERNATIVES,
    OOD_ALTERNATIVES,
    BernoulliCusum,
    ErrorRateCusum,
)
from driftline.core.counts import SliceCounts
from driftline.core.cusum import CusumBank, shared_float
from driftline.core.mix import ClusterMixCusum, PredictionMixCusum
from driftline.core.predictions import PredictionRates

DETECTORS = ("cluster_mix", "ood_rate", "prediction_mix", "confidence", "error_rate")
_KINDS: dict[str, type[CusumBank]] = {
    cls.kind: cls for cls in (ClusterMixCusum, PredictionMixCusum, BernoulliCusum, ErrorRateCusum)
}
SNAPSHOT_VERSION = 2
_NO_THRESHOLDS: dict[str, float] = {}
# The pace is a running mean of the slice's inter-event times over about its last PACE_EVENTS
# (a plain mean until then; no gap is seen before MIN_PACE_EVENTS intervals). Only intervals
# forward from the newest time seen enter it: an event older than that (out of order) or at
# that time (a burst sharing a timestamp) is none.
PACE_EVENTS = 32
MIN_PACE_EVENTS = 16
# A gap is an interval longer than GAP_FACTOR paces: Poisson arrivals never make one (e^-50),
# a shift slice's 16 hours off shift do (thousands of paces), so do an hour's break in a slice
# that sees an event a minute. Intervals enter the pace clipped at GAP_FACTOR paces, so a gap
# barely moves it while a lasting drop in the rate is followed within a few events.
GAP_FACTOR = 50.0


@dataclass(frozen=True, slots=True)
class EventUpdate:
    """What one event contributes to its slice; optional parts feed optional detectors.

    ``baseline`` is the event's own baseline (its station/shift one), as one object per
    baseline: the stated cluster mix and OOD rate, which the counts (evidence) compare against,
    and the bounds the cluster-mix and OOD detectors judge against — the least favourable laws
    that the reference sample allows (:mod:`driftline.core.baselines`). It feeds the
    cluster-mix detector when ``cluster`` is given and the OOD detector when ``ood`` is.
    ``prediction_baseline`` is likewise what the prediction-mix (``prediction``: the predicted
    label's category) and confidence (``low_confidence``) detectors judge against
    (:mod:`driftline.core.predictions`); ``expected_error`` the reference error rate of the
    event's cluster. ``time`` is event time in seconds (e.g. a POSIX timestamp).
    ``label_only``: a late label or loss for an event counted when it was embedded — it feeds
    the error detector and is not another event.
    """

    cluster: int | None = None
    baseline: DetectorBaseline | None = None
    ood: bool | None = None
    time: float | None = None
    prediction: int | None = None
    prediction_baseline: PredictionRates | None = None
    low_confidence: bool | None = None
    error: bool | None = None
    expected_error: float | None = None
    label_only: bool = False


@dataclass(frozen=True)
class Alarm:
    """A detector above its threshold after an event; ``rising`` on the first such event."""

    detector: str
    statistic: float
    threshold: float
    onset_index: int | None
    onset_time: float | None
    argmax: dict[str, Any]
    rising: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class SliceDetectors:
    """The detectors of one slice, created on first use, plus its mergeable counts.

    Gaps: the slice tracks its own pace (a running mean of its inter-event times, out-of-order
    events left out) and, when an event comes more than ``GAP_FACTOR`` paces after the newest
    one before it, asks every detector to keep its onset after the gap unless the evidence
    before it alone is substantial
    (:meth:`~driftline.core.cusum.CusumBank.onset_after_gap`). This lives here, not in each
    bank nor in the detect stage's slice: a gap is a property of the slice's event stream — one
    pace for all its detectors, not one per bank, and the banks' hot path (the Bernoulli one does
    not read the time of a no-flag event) stays free of clock policy — and it is statistics on
    event time that the benchmarks and the snapshot round trip exercise without Kafka.

    Parameters
    ----------
    arl0
        Per-detector ARL0 target ``γ`` in events (from :class:`~driftline.core.budget.Budget`).
    thresholds
        Optional explicit thresholds per detector name (e.g. tightened by simulation).
    bucket_seconds, max_buckets
        Resolution and horizon of the :class:`~driftline.core.counts.SliceCounts`.

    >>> import numpy as np
    >>> sd = SliceDetectors(arl0=1000.0)
    >>> b = DetectorBaseline.exact(np.full(8, 1 / 8), 0.01)
    >>> alarms = [sd.update(EventUpdate(cluster=3, baseline=b, ood=False, time=float(t)))
    ...           for t in range(200)]
    >>> alarms[-1][0].detector, alarms[-1][0].argmax["category"], sd.counts.since(0.0).n
    ('cluster_mix', 3, 200)
    """

    __slots__ = ("arl0", "thresholds", "bucket_seconds", "max_buckets", "detectors", "counts",
                 "n", "_last_time", "_pace", "_intervals")

    def __init__(
        self,
        arl0: float = 1e4,
        thresholds: Mapping[str, float] | None = None,
        bucket_seconds: float = 300.0,
        max_buckets: int = 48,
    ) -> None:
        # one object per value, not 24 B in each slice (restored slices decode their own)
        self.arl0 = shared_float(arl0)
        # most slices have none: they share one empty dict (never written to) instead of 64 B each
        self.thresholds = dict(thresholds) if thresholds else _NO_THRESHOLDS
        self.bucket_seconds = shared_float(bucket_seconds)
        self.max_buckets = int(max_buckets)
        self.detectors: dict[str, CusumBank] = {}
        self.counts: SliceCounts | None = None
        self.n = 0
        self._last_time: float | None = None  # the newest event time (label-only updates: no)
        self._pace = 0.0  # running mean inter-event time over _intervals (capped) intervals
        self._intervals = 0

    def _after_gap(self, t: float) -> bool:
        """Move the pace on to an event at ``t``; True if a gap comes before it.

        Intervals are measured from the newest time seen. An event older than that (out of
        order) neither moves the pace nor the newest time: a lot or shift slice reads several
        stations' partitions in turns, so its times go back by a batch's span at each turn, and
        taking those events as intervals of zero drove the pace towards zero — then an ordinary
        second's step counted as dozens of paces, a gap, and moved onsets late. An event at the
        newest time itself is none either: senders that stamp a batch of frames with one time
        (or clocks with whole seconds) send bursts sharing a timestamp, and their zeros drove the
        pace towards zero (each next interval enters clipped at GAP_FACTOR paces), so that every
        next batch was taken for a gap. The pace is thus the mean time between the distinct
        times the slice sees.
        """
        last = self._last_time
        if last is None:
            self._last_time = t
            return False
        dt = t - last
        if dt <= 0.0:  # out of order, or the newest time again: no interval of the pace
            return False
        self._last_time = t
        pace, k = self._pace, self._intervals
        cap = GAP_FACTOR * pace
        gap = dt > cap and pace > 0.0 and k >= MIN_PACE_EVENTS
        if dt > cap and pace > 0.0:
            dt = cap
        if k < PACE_EVENTS:
            k = self._intervals = k + 1
        self._pace = pace + (dt - pace) / k
        if gap:
            for det in self.detectors.values():
                det.onset_after_gap(t)
        return gap

    def _settings_now(self, name: str, det: dict[str, Any]) -> dict[str, Any]:
        """Detector snapshot ``det`` under this slice's settings: its ``arl0``, and the explicit
        threshold for ``name`` if any, else none (the bank's own from ``arl0``, as in
        :meth:`_make`)."""
        return {**det, "config": {**det["config"], "arl0": self.arl0},
                "threshold": self.thresholds.get(name)}

    def _make(self, name: str, size: int = 0) -> CusumBank:
        kw: dict[str, Any] = {"arl0": self.arl0, "threshold": self.thresholds.get(name)}
        det: CusumBank
        if name == "cluster_mix":
            det = ClusterMixCusum(size, **kw)
        elif name == "prediction_mix":
            det = PredictionMixCusum(size, **kw)
        elif name == "ood_rate":
            det = BernoulliCusum(OOD_ALTERNATIVES, **kw)
        elif name == "confidence":
            det = BernoulliCusum(CONFIDENCE_ALTERNATIVES, **kw)
        else:
            det = ErrorRateCusum(**kw)
        self.detectors[name] = det
        return det

    def _get(self, name: str, size: int = 0) -> Any:
        return self.detectors.get(name) or self._make(name, size)

    def update(self, u: EventUpdate) -> list[Alarm]:
        """Feed one event to every detector it has data for; return those now alarming."""
        fed: list[tuple[str, bool]] = []
        t = u.time
        if t is not None and not u.label_only:
            self._after_gap(t)
        b, pb = u.baseline, u.prediction_baseline
        if u.cluster is not None and b is not None:
            det = self._get("cluster_mix", b.p.size)
            fed.append(("cluster_mix", det.alarm))
            det.update(u.cluster, b.bounds, t)
        if u.ood is not None and b is not None:
            det = self._get("ood_rate")
            fed.append(("ood_rate", det.alarm))
            det.update(u.ood, b.ood_bound, t)
        if u.prediction is not None and pb is not None:
            det = self._get("prediction_mix", pb.p.size)
            fed.append(("prediction_mix", det.alarm))
            det.update(u.prediction, pb.bounds, t)
        if u.low_confidence is not None and pb is not None:
            det = self._get("confidence")
            fed.append(("confidence", det.alarm))
            det.update(u.low_confidence, pb.low_confidence_bound, t)
        if u.error is not None and u.expected_error is not None:
            det = self._get("error_rate")
            fed.append(("error_rate", det.alarm))
            det.update(u.error, u.expected_error, t)
        if b is not None:
            if self.counts is None:
                self.counts = SliceCounts(b.p.size, self.bucket_seconds, self.max_buckets)
            self.counts.update(u.cluster, b.p, ood=u.ood, ood_p0=b.ood_rate,
                               time=float(self.n) if t is None else t, index=self.n)
        if not u.label_only:
            self.n += 1
        return [self._alarm(name, not before) for name, before in fed if self.detectors[name].alarm]

    def observe(self, cluster: int, baseline: DetectorBaseline, ood: bool, time: float,
                prediction: int | None = None,
                prediction_baseline: PredictionRates | None = None,
                low_confidence: bool | None = None) -> list[Alarm]:
        """The detect stage's common event, cluster and OOD flag, with its prediction's
        category and low-confidence flag if it has one: the same as ``update(EventUpdate(…))``
        with these fields, faster.

        Parameters
        ----------
        cluster, ood
            The event's reference cluster and OOD flag.
        baseline
            The event's baseline, built once per baseline (not per event): its detectors judge
            against its bounds, its counts against its stated rates.
        time
            Event time in seconds.
        prediction, low_confidence
            The predicted label's category and whether its score is below the baseline's
            low-confidence cut; each feeds its detector when given with
            ``prediction_baseline``, what those detectors judge against.

        Returns
        -------
        list[Alarm]
            The detectors alarming after the event: cluster mix, OOD rate, then prediction
            mix and confidence.
        """
        dets = self.detectors
        self._after_gap(time)
        mix = dets.get("cluster_mix") or self._make("cluster_mix", baseline.p.size)
        rate = dets.get("ood_rate") or self._make("ood_rate")
        mix_before, rate_before = mix.alarm, rate.alarm
        mix_alarm = mix.update(cluster, baseline.bounds, time)  # type: ignore[attr-defined]
        rate_alarm = rate.update(ood, baseline.ood_bound, time)  # type: ignore[attr-defined]
        fired: list[tuple[str, bool]] = []
        if prediction_baseline is not None:
            if prediction is not None:
                pmix = (dets.get("prediction_mix")
                        or self._make("prediction_mix", prediction_baseline.p.size))
                before = pmix.alarm
                if pmix.update(  # type: ignore[attr-defined]
                        prediction, prediction_baseline.bounds, time):
                    fired.append(("prediction_mix", before))
            if low_confidence is not None:
                conf = dets.get("confidence") or self._make("confidence")
                before = conf.alarm
                if conf.update(  # type: ignore[attr-defined]
                        low_confidence, prediction_baseline.low_confidence_bound, time):
                    fired.append(("confidence", before))
        counts = self.counts
        if counts is None:
            counts = self.counts = SliceCounts(baseline.p.size, self.bucket_seconds,
                                               self.max_buckets)
        counts.update(cluster, baseline.p, ood=ood, ood_p0=baseline.ood_rate, time=time,
                      index=self.n)
        self.n += 1
        if not (mix_alarm or rate_alarm or fired):
            return []
        out = []
        if mix_alarm:
            out.append(self._alarm("cluster_mix", not mix_before))
        if rate_alarm:
            out.append(self._alarm("ood_rate", not rate_before))
        out.extend(self._alarm(name, not before) for name, before in fired)
        return out

    def _alarm(self, name: str, rising: bool) -> Alarm:
        d = self.detectors[name]
        return Alarm(name, d.statistic, d.threshold, d.onset_index, d.onset_time, d.argmax, rising)

    def status(self) -> dict[str, dict[str, Any]]:
        """Per detector: statistic, threshold, ratio, alarm and events seen (for gauges)."""
        return {
            name: {
                "statistic": d.statistic,
                "threshold": d.threshold,
                "ratio": d.ratio,
                "alarm": d.alarm,
                "n": d.n,
            }
            for name, d in self.detectors.items()
        }

    def snapshot(self) -> dict[str, Any]:
        """State of every detector and the counts: JSON-ready values and numpy arrays
        (:func:`driftline.core.snapshot.pack` stores it compactly)."""
        return {
            "version": SNAPSHOT_VERSION,
            "arl0": self.arl0,
            "thresholds": self.thresholds,
            "bucket_seconds": self.bucket_seconds,
            "max_buckets": self.max_buckets,
            "n": self.n,
            "last_time": self._last_time,
            "pace": self._pace,
            "intervals": self._intervals,
            "detectors": {name: d.snapshot() for name, d in self.detectors.items()},
            "counts": None if self.counts is None else self.counts.snapshot(),
        }

    @classmethod
    def restore(cls, snap: dict[str, Any], arl0: float | None = None,
                thresholds: Mapping[str, float] | None = None) -> SliceDetectors:
        """Rebuild from :meth:`snapshot` output (v1 JSON too).

        ``arl0`` and ``thresholds`` (as for the constructor), when ``arl0`` is given, are the
        settings now: they replace the snapshot's, and every detector takes the threshold they
        give — a tightened budget, or a reference that feeds more detectors per slice (a
        smaller share of the budget each), applies to a restored slice as to a new one. The
        statistics are kept: the new threshold applies from the next event on, so a statistic
        between the old and the new one raises an alarm at once (threshold lowered) or lets an
        open one clear sooner (raised). Unchanged settings restore exactly as without them.
        Without ``arl0`` (reading a checkpoint as it was written) the snapshot's settings stay.
        """
        if snap.get("version") not in (1, SNAPSHOT_VERSION):
            raise ValueError(f"not a slice-detectors v{SNAPSHOT_VERSION} snapshot")
        current = arl0 is not None
        if arl0 is None:
            arl0, thresholds = snap["arl0"], snap["thresholds"]
        obj = cls(arl0, thresholds, snap["bucket_seconds"], snap["max_buckets"])
        obj.n = int(snap["n"])
        # absent from snapshots written before gaps were seen: the pace starts afresh
        last = snap.get("last_time")
        obj._last_time = None if last is None else float(last)
        obj._pace, obj._intervals = float(snap.get("pace", 0.0)), int(snap.get("intervals", 0))
        obj.detectors = {n: _KINDS[d["kind"]].restore(obj._settings_now(n, d) if current else d)
                         for n, d in snap["detectors"].items()}
        if snap["counts"] is not None:
            obj.counts = SliceCounts.restore(snap["counts"])
        return obj
