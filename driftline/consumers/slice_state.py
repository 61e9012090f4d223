"""One slice's detectors in the stream: slice-update → detector update → outbox messages.

The alarm lifecycle per detector: the first crossing raises an ``alarm`` message (with onset
and evidence) and restarts that detector, so that while the change persists it crosses again
(``update`` messages, fresh evidence); once ``autoresolve_events`` events of the slice pass with
no crossing, a ``clear`` message says the slice is back at its no-drift level.

While a detector's alarm is open its evidence counts come from a tally of the slice's counts
(:meth:`SliceState._start_tally`): exact from the onset on, however long the alarm stays open.
It also counts its events per cell (station × shift × lot, :mod:`driftline.core.cells`) from
the alarm on, so that the book can tell which alarmed slices share the changed events.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Iterable
from datetime import datetime
from typing import Any, Protocol

import numpy as np

from driftline.consumers.exemplars import EXEMPLAR_FIELDS, ExemplarRing
from driftline.core.baselines import DetectorBaseline
from driftline.core.cells import CellTally
from driftline.core.counts import Counts
from driftline.core.predictions import PredictionRates
from driftline.core.slices import Alarm, EventUpdate, SliceDetectors
from driftline.schema import CLEAR_REFERENCE_CHANGED, parse_slice_id

log = logging.getLogger(__name__)

# Gauges read cluster shares and OOD rate over the last hour of event time.
GAUGE_WINDOW_S = 3600.0
# An open alarm clears after events without a crossing — at least ``autoresolve_events``, and at
# least RECROSS_FACTOR times the events its slowest crossing took from the excursion's start —
# once its detector is back near the no-drift level (statistic below QUIET_RATIO of the
# threshold, where it stays but for rare excursions when nothing changed). After each crossing
# the detector restarts from zero, so a change that persists climbs again and crosses after
# about as many events as it took before: a moderate change detected in 1,800 events was
# cleared after 500 quiet ones and alarmed again, one incident every 15 minutes.
RECROSS_FACTOR = 3
QUIET_RATIO = 0.25
_EXCURSION = "~excursion"  # a tally made and read for one message (no detector's name)


class PredictionLike(Protocol):
    """A slice-update's prediction: :class:`~driftline.schema.Prediction`, or the detect
    stage's lighter tuple."""

    @property
    def label(self) -> str: ...
    @property
    def score(self) -> float: ...


class UpdateView(Protocol):
    """What a slice reads of a slice-update: :class:`~driftline.schema.SliceUpdate`, or the
    detect stage's lighter :class:`~driftline.consumers.detect_stage.FastUpdate`."""

    @property
    def slice_id(self) -> str: ...
    @property
    def template(self) -> str: ...
    @property
    def event_id(self) -> str: ...
    @property
    def ts(self) -> datetime: ...
    @property
    def station(self) -> str: ...
    @property
    def shift(self) -> str: ...
    @property
    def lot(self) -> str: ...
    @property
    def source_partition(self) -> int: ...
    @property
    def source_offset(self) -> int: ...
    @property
    def baseline(self) -> str: ...
    @property
    def cluster(self) -> int | None: ...
    @property
    def distance(self) -> float | None: ...
    @property
    def ood(self) -> bool | None: ...
    @property
    def model_version(self) -> str | None: ...
    @property
    def prediction(self) -> PredictionLike | None: ...
    @property
    def label(self) -> str | None: ...
    @property
    def error(self) -> bool | None: ...
    @property
    def late_label(self) -> bool: ...
    @property
    def reference_id(self) -> str | None: ...


def is_late_label(upd: UpdateView) -> bool:
    """A label that arrived after its event (records written before ``late_label`` existed: a
    label without a distance): it is not an event, and counts for the error rate only."""
    return upd.late_label or (upd.label is not None and upd.distance is None)


class PredictionBaseline(PredictionRates, Protocol):
    """A baseline's expected prediction mix over ``labels`` plus *other* (the last of ``p``)
    and its low-confidence cut (``score < cut``), with what the detectors judge against
    (:class:`~driftline.core.predictions.PredictionRates`; see
    :class:`driftline.reference.index.PredictionView`)."""

    @property
    def labels(self) -> tuple[str, ...]: ...
    @property
    def low_confidence_cut(self) -> float: ...

    def category(self, label: str) -> int: ...


class Baselines(Protocol):
    """What the detect stage needs of a reference (see ``driftline.reference``): per baseline
    key, the stated mix and OOD rate (evidence) and what the detectors judge against."""

    def cluster_mix(self, key: str) -> np.ndarray: ...

    def ood_rate(self, key: str) -> float: ...

    def detector_baseline(self, key: str) -> DetectorBaseline: ...

    def prediction(self, key: str) -> PredictionBaseline | None:
        """None for a reference without predictions: the prediction detectors do not run."""

    def expected_error(self, cluster: int) -> float | None: ...


class SliceState:
    """Detectors, alarm lifecycle and exemplars of one slice (implements ``SliceModel``).

    Kept small, since a worker holds thousands: slots, exemplars in a packed ring
    (:class:`~driftline.consumers.exemplars.ExemplarRing`), dims parsed from the id on use.
    """

    __slots__ = ("slice_id", "template", "det", "baselines", "autoresolve", "open", "exemplars",
                 "versions", "last_time", "reference_id", "cells")

    def __init__(self, slice_id: str, template: str, detectors: SliceDetectors,
                 baselines: Baselines, autoresolve_events: int) -> None:
        self.slice_id, self.template = slice_id, sys.intern(template)  # one string per template
        self.det = detectors
        self.baselines = baselines
        self.autoresolve = autoresolve_events
        self.open: dict[str, dict[str, Any]] = {}  # detector -> {onset_time, quiet, alarms}
        self.cells: dict[str, CellTally] = {}  # open alarm's detector -> its per-cell counts
        self.exemplars = ExemplarRing()  # the newest exemplars, oldest first
        self.versions: dict[str, int] = {}
        self.last_time: float | None = None
        # the reference its statistics are about (None: baselines that do not say)
        self.reference_id: str | None = getattr(baselines, "reference_id", None)

    @property
    def dims(self) -> dict[str, str]:
        return parse_slice_id(self.slice_id)

    @property
    def n(self) -> int:
        return self.det.n

    def _reference_changed(self, k: int) -> bool:
        """Whether this slice's statistics are about another reference than the active one
        (another id, or, for baselines without one, another cluster count)."""
        if self.reference_id != getattr(self.baselines, "reference_id", None):
            return True
        mix, counts = self.det.detectors.get("cluster_mix"), self.det.counts
        return bool((mix is not None and getattr(mix, "n_categories", k) != k)
                    or (counts is not None and counts.n_clusters != k))

    def _restart_for_new_reference(self, k: int, t: float) -> list[dict[str, Any]]:
        """Another reference is active (``k`` clusters): this slice's cluster statistics,
        counts, open alarms and exemplars describe the old clusters — ids that mean other
        clusters now, even with the same count — so start them afresh. Open alarms are cleared
        (returned as ``clear`` messages whose ``reason`` says so), so that their incidents can
        resolve — saying that the detectors restarted, not that the change ended."""
        old, d = self.det.counts, self.det
        new_id = getattr(self.baselines, "reference_id", None)
        log.warning("reference changed: slice detectors restarted",
                    extra={"slice": self.slice_id, "clusters": k, "open": sorted(self.open),
                           "reference": new_id, "previous_reference": self.reference_id,
                           "previous": None if old is None else old.n_clusters, "events": d.n})
        cleared = [{**self._clear(name, state, t), "reason": CLEAR_REFERENCE_CHANGED}
                   for name, state in self.open.items()]
        # the settings now: the stage's restore put its current ARL0 target there (the one for
        # the active reference's detectors), not the checkpoint's
        self.det = SliceDetectors(d.arl0, d.thresholds, d.bucket_seconds, d.max_buckets)
        self.open = {}
        self.exemplars.clear()
        self.reference_id = new_id
        return cleared

    def _clear(self, name: str, state: dict[str, Any], t: float) -> dict[str, Any]:
        if self.det.counts is not None:
            self.det.counts.stop_tally(name)
        self.cells.pop(name, None)
        return {"kind": "clear", "detector": name, "time": t, "onset_time": state["onset_time"],
                "dims": self.dims, "slice_n": self.n}

    def update(self, upd: UpdateView) -> list[dict[str, Any]]:
        """Apply one slice-update; return the outbox messages it raises. Raises ``KeyError``
        (unknown baseline) or ``ValueError`` (cluster outside the reference) before changing
        anything."""
        t = upd.ts.timestamp()
        cluster = upd.cluster
        late = is_late_label(upd)
        restarted: list[dict[str, Any]] = []
        if cluster is not None and not late:
            key = upd.baseline
            b = self.baselines.detector_baseline(key)
            p = b.p
            if not 0 <= cluster < p.size:
                raise ValueError(f"cluster {cluster} outside the reference's 0..{p.size - 1}")
            if self._reference_changed(p.size):
                restarted = self._restart_for_new_reference(p.size, t)
            pred = upd.prediction
            pb = self.baselines.prediction(key) if pred is not None else None
            if pb is not None and self._labels_changed(pb.p.size):
                restarted += self._restart_predictions(pb.p.size, t)
            if upd.ood is not None and upd.error is None:  # the usual event: one fast call
                if pred is None or pb is None:
                    alarms = self.det.observe(cluster, b, upd.ood, t)
                else:
                    alarms = self.det.observe(cluster, b, upd.ood, t, pb.category(pred.label),
                                              pb, pred.score < pb.low_confidence_cut)
            else:
                alarms = self._update(upd, t, cluster=True, pb=pb)
            if self.cells:  # an alarm is open: count the event in its cell
                cell = (upd.station, upd.shift, upd.lot)
                for tally in self.cells.values():
                    tally.update(cell, cluster, p, ood=upd.ood, ood_p0=b.ood_rate)
            self.exemplars.add(upd.event_id, cluster, upd.distance, t, upd.ood,
                               upd.source_partition, upd.source_offset)
            version = upd.model_version
            if version:
                versions = self.versions
                if version in versions:
                    versions[version] += 1
                else:
                    versions[sys.intern(version)] = 1
        else:
            pb = None
            alarms = self._update(upd, t, cluster=False, label_only=late)
        # the newest event time seen (the gauges' window ends there, the slice's idleness
        # counts from it): events only — a late label is not activity of the slice, even one
        # dated after its last event — and never back
        if not late and (self.last_time is None or t > self.last_time):
            self.last_time = t
        if not alarms and not self.open:
            return restarted
        out = restarted + [self._on_alarm(_named(a.as_dict(), pb), t, upd) for a in alarms]
        if not late:  # quiet means events without an alarm; a late label is not an event
            out.extend(self._quiet_tick(t, fired={a.detector for a in alarms}))
        return out

    def _labels_changed(self, size: int) -> bool:
        mix = self.det.detectors.get("prediction_mix")
        return mix is not None and getattr(mix, "n_categories", size) != size

    def _restart_predictions(self, size: int, t: float) -> list[dict[str, Any]]:
        """The active baselines predict over another label vocabulary (baselines that do not
        name their reference; another reference restarts the whole slice): the prediction-mix
        statistics describe the old categories, so that detector starts afresh, its open alarm
        cleared (the others, confidence included, go on)."""
        log.warning("reference label vocabulary changed: prediction-mix detector restarted",
                    extra={"slice": self.slice_id, "categories": size})
        del self.det.detectors["prediction_mix"]
        state = self.open.pop("prediction_mix", None)
        return [] if state is None else [self._clear("prediction_mix", state, t)]

    def _update(self, upd: UpdateView, t: float, cluster: bool, label_only: bool = False,
                pb: PredictionBaseline | None = None) -> list[Alarm]:
        """Every other kind of update (labels, errors, missing parts) through ``EventUpdate``."""
        expected_error = (self.baselines.expected_error(upd.cluster)
                          if upd.error is not None and upd.cluster is not None else None)
        pred = upd.prediction if cluster and pb is not None else None
        b = self.baselines.detector_baseline(upd.baseline) if cluster else None
        return self.det.update(EventUpdate(
            cluster=upd.cluster if b is not None else None, baseline=b,
            ood=upd.ood if b is not None else None,
            time=t, error=upd.error, expected_error=expected_error, label_only=label_only,
            prediction=None if pred is None or pb is None else pb.category(pred.label),
            prediction_baseline=None if pred is None else pb,
            low_confidence=(None if pred is None or pb is None
                            else pred.score < pb.low_confidence_cut)))

    def _on_alarm(self, alarm: dict[str, Any], t: float, upd: UpdateView) -> dict[str, Any]:
        name = alarm["detector"]
        state = self.open.get(name)
        kind = "update" if state else "alarm"
        det = self.det.detectors[name]
        took = det.n - (alarm.get("onset_index") or 0)  # events from the excursion's start
        if state is None:
            state = self.open[name] = {"onset_time": alarm["onset_time"], "alarms": 0}
            state["missed"] = self._start_tally(name, name, alarm["onset_time"], took,
                                                upd.baseline)
            self._start_cells(name, alarm, upd)
        state["quiet"] = 0
        state["alarms"] += 1
        state["hold"] = max(state.get("hold", 0), RECROSS_FACTOR * took)
        onset = state["onset_time"]
        evidence = self.evidence(onset, name)
        counts = self.det.counts
        if kind == "update" and counts is not None:
            # this crossing's own excursion, from its onset: where the book starts a new
            # episode (the change had stopped in between), its counts hold no quiet events
            missed = self._start_tally(_EXCURSION, name, alarm["onset_time"], took,
                                       upd.baseline)
            excursion = counts.tally(_EXCURSION)
            counts.stop_tally(_EXCURSION)
            evidence["excursion"] = None if excursion is None else _counts(excursion, missed)
        msg = {"kind": kind, **alarm, "onset_time": onset, "time": t, "slice_n": self.n,
               "dims": self.dims, "evidence": evidence}
        self.det.detectors[name].reset()  # restart: a persisting change crosses again
        return msg

    def _start_cells(self, name: str, alarm: dict[str, Any], upd: UpdateView) -> None:
        """Count alarm ``name``'s events per cell from now on, the alarming event first (a
        cluster-mix alarm watches the cluster its crossing CUSUM named)."""
        argmax = alarm.get("argmax") or {}
        watch = argmax.get("category") if name == "cluster_mix" else None
        tally = self.cells[name] = CellTally(watch if isinstance(watch, int) else None,
                                             argmax.get("direction") if name == "cluster_mix"
                                             else None)
        if upd.cluster is None or is_late_label(upd):
            return
        try:
            b = self.baselines.detector_baseline(upd.baseline)
        except KeyError:
            return
        tally.update((upd.station, upd.shift, upd.lot), upd.cluster, b.p, ood=upd.ood,
                     ood_p0=b.ood_rate)

    def _start_tally(self, tally: str, name: str, onset: float | None, since_onset: int,
                     key: str) -> int | None:
        """Start ``tally``, the exact counts of detector ``name``'s alarm since its ``onset``;
        return how many of the detector's ``since_onset`` events (from its onset index) the
        seed leaves out — so that ``n + missed`` is the events since the onset — or None where
        that is not known (detectors other than cluster mix and OOD rate).

        The seed holds only events known to be from the onset on, none from before it: the
        ring's rows begun at or after the onset's arrival (this slice's event count less
        ``since_onset``: never earlier than the onset, whatever events the detector skips),
        plus the slice's exemplars (its last :data:`~driftline.consumers.exemplars.EXEMPLARS`
        events) among the ``since_onset`` newest and not in those rows. Arrival, not event
        time: a slice that mixes stations reads their partitions in turns, so a bucket later
        than the onset's can hold events read before the onset. The rest of the rows begun
        before the onset is counted there together with events from before it; it is left
        out (and reported as ``missed``) rather than diluting the share of events that moved
        by up to a bucket of unchanged events. So an alarm raised within ``EXEMPLARS`` events
        of its onset starts exact; later events are all counted. An error-rate detector counts
        labels, not events: its seed goes by event time (the buckets after the onset's, and
        exemplars from the onset's bucket not older than the onset). The exemplars do not
        record their baseline: they are taken against the alarming event's (the same for a
        slice's last few events but across a shift change, or for a lot spread over stations
        with different baselines)."""
        counts = self.det.counts
        if counts is None or onset is None:
            return None
        by_arrival = name != "error_rate"
        since_onset = max(since_onset, 0)
        seeded = counts.start_tally(tally, after=onset,
                                    since=self.n - since_onset if by_arrival else None)
        width = counts.bucket_seconds
        try:  # the stated rates, the object the counts got: found by identity
            b = self.baselines.detector_baseline(key)
            p: np.ndarray | None = b.p
            p0: float | None = b.ood_rate
        except KeyError:
            p = p0 = None
        # the newest events of the detector's are from the onset on (an error-rate detector
        # counts labels, not events: time alone tells)
        recent = list(self.exemplars)
        if by_arrival:
            recent = recent[len(recent) - min(since_onset, len(recent)):]
        for _, cluster, _, ts, ood, _, _ in recent:
            if math.floor(ts / width) not in seeded and (by_arrival or ts >= onset):
                counts.tally_event(cluster, None if cluster is None else p, ood=ood,
                                   ood_p0=p0, name=tally)
        got = counts.tally(tally)
        if got is None or name not in ("cluster_mix", "ood_rate"):
            return None
        missed = since_onset - (got.n if name == "cluster_mix" else got.n_ood)
        if missed < 0:  # the seed holds events from before the onset: a bug, said as it is
            log.warning("alarm counts hold more events than since the onset",
                        extra={"slice": self.slice_id, "detector": name, "missed": missed,
                               "since_onset": since_onset})
        return missed

    def _quiet_tick(self, t: float, fired: set[str]) -> list[dict[str, Any]]:
        cleared = []
        for name, state in list(self.open.items()):
            if name in fired:
                continue
            state["quiet"] += 1
            if (state["quiet"] >= max(self.autoresolve, state.get("hold", 0))
                    and self.det.detectors[name].ratio < QUIET_RATIO):
                del self.open[name]
                cleared.append(self._clear(name, state, t))
        return cleared

    def reset(self, detectors: Iterable[str] | None = None) -> None:
        """Start ``detectors`` (default: every one) afresh and forget their open alarms
        (incident resolved by on-call); the counts and exemplars stay. Another detector's open
        alarm, which another incident holds, goes on."""
        if detectors is not None:
            for name in set(detectors) & set(self.det.detectors):
                self.det.detectors[name].reset()
                if self.det.counts is not None:
                    self.det.counts.stop_tally(name)
                self.open.pop(name, None)
                self.cells.pop(name, None)
            return
        for det in self.det.detectors.values():
            det.reset()
        if self.det.counts is not None:
            for name in self.det.counts.tallies:
                self.det.counts.stop_tally(name)
        self.open = {}
        self.cells = {}

    def evidence(self, since: float | None, detector: str | None = None) -> dict[str, Any]:
        """Counts (cluster mix observed vs expected, OOD), exemplars, versions.

        The counts of ``detector``'s open alarm come from its tally: since its onset, with
        ``missed``, the events since the onset left out of them (None: not known; see
        :meth:`_start_tally`), and ``truncated`` if the ring had dropped events of the seed.
        Without a tally (another detector, a checkpoint written before tallies) they come from
        the ring, since ``since``'s bucket and within its horizon (``truncated`` if it reached
        back further), and carry no ``missed``."""
        ring = self.det.counts
        tally = ring.tally(detector) if ring is not None and detector is not None else None
        out: dict[str, Any] | None = None
        if tally is not None and detector is not None:
            out = _counts(tally, self.open.get(detector, {}).get("missed"))
        elif ring is not None:
            out = _counts(ring.since(since))
        cells = self.cells.get(detector) if detector is not None else None
        return {
            "counts": out,
            **({"cells": cells.as_dict()} if cells is not None else {}),
            "exemplars": [dict(zip(EXEMPLAR_FIELDS, e, strict=True)) for e in self.exemplars],
            "model_versions": dict(self.versions),
        }

    def gauges(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ratios": {k: d.ratio for k, d in self.det.detectors.items()}}
        if self.det.counts is not None and self.last_time is not None:
            c = self.det.counts.since(self.last_time - GAUGE_WINDOW_S)
            if c.ood_expected > 0:
                out["ood_ratio"] = c.ood / c.ood_expected
            if c.n > 0:
                out["cluster_shares"] = {k: v / c.n for k, v in enumerate(c.clusters)}
        return out

    def snapshot(self) -> dict[str, Any]:
        return {"slice_id": self.slice_id, "template": self.template,
                "detectors": self.det.snapshot(), "open": self.open,
                "exemplars": self.exemplars.rows(), "versions": self.versions,
                "last_time": self.last_time, "reference_id": self.reference_id,
                "cells": {name: c.snapshot() for name, c in self.cells.items()}}

    @classmethod
    def restore(cls, snap: dict[str, Any], baselines: Baselines, autoresolve_events: int,
                arl0: float | None = None) -> SliceState:
        """Rebuild from :meth:`snapshot` output; ``arl0``: the per-detector ARL0 target now,
        which the slice's detectors take on (:meth:`SliceDetectors.restore`; without it, the
        checkpoint's). A later restart for another reference keeps it."""
        obj = cls(snap["slice_id"], snap["template"],
                  SliceDetectors.restore(snap["detectors"], arl0), baselines, autoresolve_events)
        obj.open = snap["open"]
        counts = obj.det.counts
        if counts is not None:
            for name in counts.tallies:
                if name not in obj.open:  # never written so; but a tally lives with its alarm
                    counts.stop_tally(name)
        # checkpoints written before cells have none: those alarms' cells start empty
        obj.cells = {name: CellTally.restore(c) for name, c in (snap.get("cells") or {}).items()
                     if name in obj.open}
        for name in obj.open:
            obj.cells.setdefault(name, CellTally())
        obj.exemplars = ExemplarRing.restore(snap["exemplars"])
        # the model versions are a few strings held by every slice: one object each (as
        # update interns them), not one per restored slice
        obj.versions = {sys.intern(v): n for v, n in snap["versions"].items()}
        obj.last_time = snap["last_time"]
        # a checkpoint written before the field: taken to be of the active reference
        saved = snap.get("reference_id")
        obj.reference_id = sys.intern(saved) if saved else obj.reference_id
        return obj


class SliceRestorer:
    """The detect stage's ``restore_slice``: a slice from its checkpoint record, its detectors
    on the per-detector ARL0 target ``arl0`` the stage now runs with (as its new slices), not
    the one in the record. :attr:`retuned` counts the slices whose thresholds that moved (the
    stage logs how many per partition load): an operator's new budget, or a new reference
    feeding another number of detectors per slice, holds for the slices restored too."""

    __slots__ = ("baselines", "autoresolve", "arl0", "retuned")

    def __init__(self, baselines: Baselines, autoresolve_events: int, arl0: float) -> None:
        self.baselines, self.autoresolve, self.arl0 = baselines, autoresolve_events, arl0
        self.retuned = 0

    def __call__(self, snap: dict[str, Any]) -> SliceState:
        state = SliceState.restore(snap, self.baselines, self.autoresolve, self.arl0)
        saved = snap["detectors"]["detectors"]
        if any(det.threshold != saved[name]["threshold"]
               for name, det in state.det.detectors.items()):
            self.retuned += 1
        return state


def _counts(c: Counts, *missed: int | None) -> dict[str, Any]:
    """Counts as the evidence carries them; ``missed`` only for a tally's."""
    return {"n": c.n, "clusters": c.clusters, "expected": c.expected, "n_ood": c.n_ood,
            "ood": c.ood, "ood_expected": c.ood_expected, "truncated": c.truncated,
            **({"missed": missed[0]} if missed else {})}


def _named(alarm: dict[str, Any], pb: PredictionBaseline | None) -> dict[str, Any]:
    """A prediction-mix alarm names the label whose share moved, not only its category."""
    if alarm["detector"] == "prediction_mix" and pb is not None:
        k = alarm["argmax"].get("category")
        if isinstance(k, int):
            alarm["argmax"]["label"] = pb.labels[k] if k < len(pb.labels) else "(other)"
    return alarm
