"""One slice's detectors in the stream: slice-update → detector update → outbox messages.

The alarm lifecycle per detector: the first crossing raises an ``alarm`` message (with onset
and evidence) and restarts that detector, so that while the change persists it crosses again
(``update`` messages, fresh evidence); once ``autoresolve_events`` events of the slice pass with
no crossing, a ``clear`` message says the slice is back at its no-drift level.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Protocol

import numpy as np

from driftline.core.slices import EventUpdate, SliceDetectors
from driftline.schema import SliceUpdate, parse_slice_id

EXEMPLARS = 8
# Gauges read cluster shares and OOD rate over the last hour of event time.
GAUGE_WINDOW_S = 3600.0


class Baselines(Protocol):
    """What the detect stage needs of a reference (see ``driftline.reference``)."""

    def cluster_mix(self, key: str) -> np.ndarray: ...

    def ood_rate(self, key: str) -> float: ...

    def expected_error(self, cluster: int) -> float | None: ...


class SliceState:
    """Detectors, alarm lifecycle and exemplars of one slice (implements ``SliceModel``)."""

    def __init__(self, slice_id: str, template: str, detectors: SliceDetectors,
                 baselines: Baselines, autoresolve_events: int) -> None:
        self.slice_id, self.template = slice_id, template
        self.dims = parse_slice_id(slice_id)
        self.det = detectors
        self.baselines = baselines
        self.autoresolve = autoresolve_events
        self.open: dict[str, dict[str, Any]] = {}  # detector -> {onset_time, quiet, alarms}
        self.exemplars: deque[dict[str, Any]] = deque(maxlen=EXEMPLARS)
        self.versions: dict[str, int] = {}
        self.last_time: float | None = None

    @property
    def n(self) -> int:
        return self.det.n

    def update(self, upd: SliceUpdate) -> list[dict[str, Any]]:
        t = upd.ts.timestamp()
        self.last_time = t
        expected_error = (self.baselines.expected_error(upd.cluster)
                          if upd.error is not None and upd.cluster is not None else None)
        has_cluster = upd.cluster is not None and upd.label is None
        alarms = self.det.update(EventUpdate(
            cluster=upd.cluster if has_cluster else None,
            baseline=self.baselines.cluster_mix(upd.baseline) if has_cluster else None,
            ood=upd.ood if has_cluster else None,
            ood_p0=self.baselines.ood_rate(upd.baseline) if has_cluster else None,
            time=t, error=upd.error, expected_error=expected_error))
        if has_cluster:
            self.exemplars.append({"event_id": upd.event_id, "cluster": upd.cluster,
                                   "distance": upd.distance, "ts": t, "ood": upd.ood})
            if upd.model_version:
                self.versions[upd.model_version] = self.versions.get(upd.model_version, 0) + 1
        out = [self._on_alarm(a.as_dict(), t) for a in alarms]
        out.extend(self._quiet_tick(t, fired={a.detector for a in alarms}))
        return out

    def _on_alarm(self, alarm: dict[str, Any], t: float) -> dict[str, Any]:
        name = alarm["detector"]
        state = self.open.get(name)
        kind = "update" if state else "alarm"
        if state is None:
            state = self.open[name] = {"onset_time": alarm["onset_time"], "alarms": 0}
        state["quiet"] = 0
        state["alarms"] += 1
        onset = state["onset_time"]
        msg = {"kind": kind, **alarm, "onset_time": onset, "time": t, "slice_n": self.n,
               "dims": self.dims, "evidence": self.evidence(onset)}
        self.det.detectors[name].reset()  # restart: a persisting change crosses again
        return msg

    def _quiet_tick(self, t: float, fired: set[str]) -> list[dict[str, Any]]:
        cleared = []
        for name, state in list(self.open.items()):
            if name in fired:
                continue
            state["quiet"] += 1
            if state["quiet"] >= self.autoresolve:
                del self.open[name]
                cleared.append({"kind": "clear", "detector": name, "time": t,
                                "onset_time": state["onset_time"], "dims": self.dims,
                                "slice_n": self.n})
        return cleared

    def reset(self) -> None:
        """Start every detector afresh and forget open alarms (incident resolved by on-call);
        the counts and exemplars stay."""
        for det in self.det.detectors.values():
            det.reset()
        self.open = {}

    def evidence(self, since: float | None) -> dict[str, Any]:
        """Counts since ``since`` (cluster mix observed vs expected, OOD), exemplars, versions."""
        counts = self.det.counts.since(since) if self.det.counts is not None else None
        return {
            "counts": None if counts is None else {
                "n": counts.n, "clusters": counts.clusters, "expected": counts.expected,
                "n_ood": counts.n_ood, "ood": counts.ood, "ood_expected": counts.ood_expected,
                "truncated": counts.truncated},
            "exemplars": list(self.exemplars),
            "model_versions": dict(self.versions),
        }

    def gauges(self) -> dict[str, Any]:
        status = self.det.status()
        out: dict[str, Any] = {"ratios": {k: v["ratio"] for k, v in status.items()}}
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
                "exemplars": list(self.exemplars), "versions": self.versions,
                "last_time": self.last_time}

    @classmethod
    def restore(cls, snap: dict[str, Any], baselines: Baselines,
                autoresolve_events: int) -> SliceState:
        obj = cls(snap["slice_id"], snap["template"], SliceDetectors.restore(snap["detectors"]),
                  baselines, autoresolve_events)
        obj.open = snap["open"]
        obj.exemplars.extend(snap["exemplars"])
        obj.versions = snap["versions"]
        obj.last_time = snap["last_time"]
        return obj
