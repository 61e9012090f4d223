"""Synthetic outbox messages: a slice whose events since onset are a share ``f`` changed."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from datetime import datetime
from typing import Any

import numpy as np

from driftline.alerts.attribution import SliceStatus
from driftline.alerts.grouping import Grouper
from driftline.schema import parse_slice_id

K = 8
ONSET = 1_700_000_000.0


def counts(n: int, f: float, eps: float = 0.3, cluster: int = 0,
           ood_shift: float = 0.0) -> dict[str, Any]:
    """Counts of ``n`` events of which a share ``f`` moved mass ``eps`` into ``cluster``."""
    p = np.full(K, 1.0 / K)
    q = (1 - f * eps) * p
    q[cluster] += f * eps
    obs = np.round(q * n).astype(int)
    obs[cluster] += n - int(obs.sum())
    p0 = 0.01
    return {"n": n, "clusters": obs.tolist(), "expected": (p * n).tolist(), "n_ood": n,
            "ood": round(n * (p0 + f * ood_shift)), "ood_expected": p0 * n, "truncated": False}


def alarm(slice_id: str, f: float, n: int = 400, *, kind: str = "alarm",
          detector: str = "cluster_mix", t: float = ONSET + 600.0, eps: float = 0.3,
          cluster: int = 0, onset: float = ONSET, ood_shift: float = 0.0,
          exemplars: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    dims = parse_slice_id(slice_id)
    return {
        "kind": kind, "detector": detector, "statistic": 12.0, "threshold": 11.0,
        "onset_index": 3, "onset_time": onset, "argmax": {"category": cluster},
        "time": t, "slice_n": 1000 + n, "dims": dims, "slice_id": slice_id,
        "template": "+".join(dims),
        "evidence": {"counts": counts(n, f, eps, cluster, ood_shift),
                     "exemplars": exemplars if exemplars is not None else [
                         {"event_id": f"{slice_id}-e{i}", "cluster": cluster if i % 2 else 1,
                          "distance": 0.1 * i, "ts": t - i, "ood": False} for i in range(4)],
                     "model_versions": {"v1": n}},
    }


def clear(slice_id: str, detector: str = "cluster_mix", t: float = ONSET + 7200.0,
          onset: float = ONSET) -> dict[str, Any]:
    dims = parse_slice_id(slice_id)
    return {"kind": "clear", "detector": detector, "time": t, "onset_time": onset,
            "dims": dims, "slice_n": 5000, "slice_id": slice_id, "template": "+".join(dims)}


def summary_entry(slice_id: str, n: int, open_: bool = False,
                  ratio: float = 0.1) -> dict[str, Any]:
    dims = parse_slice_id(slice_id)
    return {"template": "+".join(dims), "dims": dims, "n": n, "last_time": ONSET,
            "ratios": {"cluster_mix": ratio}, "ood_ratio": 1.0,
            "open": ["cluster_mix"] if open_ else []}


STATIONS = ["press-1", "press-2", "press-3", "press-4"]
SHIFTS = ["day", "night"]
LOTS = ["L6", "L7"]


def fleet(n: int = 1000) -> dict[str, dict[str, Any]]:
    """A summary hash of the whole fleet's slices, all quiet."""
    out = {}
    for s in STATIONS:
        out[f"station={s}"] = summary_entry(f"station={s}", n)
        for h in SHIFTS:
            out[f"station={s}|shift={h}"] = summary_entry(f"station={s}|shift={h}", n)
    for h in SHIFTS:
        out[f"shift={h}"] = summary_entry(f"shift={h}", n)
    for lot in LOTS:
        out[f"lot={lot}"] = summary_entry(f"lot={lot}", n)
    return out


def opened_apart(*slices: str, now: datetime
                 ) -> tuple[Grouper, Callable[[], str], dict[str, SliceStatus]]:
    """An incident per slice, each opened by its alarm in a batch of its own (over
    :func:`fleet`): the Grouper, its id source and the summary, for a next batch's Grouper."""
    ids = itertools.count(1)

    def new_id() -> str:
        return f"DL-{next(ids):06d}"
    summary = {k: SliceStatus.from_summary(k, v) for k, v in fleet().items()}
    g = Grouper([], summary, now=now, new_id=new_id, signatures=dict)
    for k, sid in enumerate(slices):
        g.apply(alarm(sid, 1.0, cluster=k))
        g.finish()
    return g, new_id, summary
