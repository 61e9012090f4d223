"""Peer online detectors (river, frouros, alibi-detect) on the detection benchmark's streams.

The peers live in a side virtual environment (default ``/tmp/driftline-peers-venv``) that this
script creates and fills with ``pip install river frouros alibi-detect``; they are never a
dependency of driftline (alibi-detect is BSL-licensed). The script then re-runs itself inside
that environment with the repository on ``PYTHONPATH`` (driftline's core needs only numpy and
scipy, which the peers bring along).

Protocol, at γ = 10³ (peers run event by event in Python):

* streams as in ``benchmarks/detection.py``: cluster ids from K = 16 uniform clusters, mass 0.1
  moved into one cluster or that cluster vanishing; OOD flags, p0 = 0.01, rising ×3 and ×10;
* ours uses its tightened threshold; its ARL0 is measured on ``--runs`` no-change streams, and
  each peer's documented sensitivity knob is tuned by bisection on the *same* streams until its
  ARL0 is within ±10 % of ours (other parameters: library defaults); alibi-detect's FET
  calibrates itself to an ERT, so it gets ERT = our ARL0 and one correction step;
* univariate peers watch a categorical stream as K one-hot indicators, one detector each,
  alarming when any does (the usual way to watch a categorical feature with them);
* delay: change at ν = 200, conditional mean over runs without an alarm before ν, on the same
  post-change streams for every detector.

alibi-detect runs on the OOD stream only: its FET threshold calibration simulates every feature
separately and took over 10 minutes for K = 16 features on the benchmark machine.

``python benchmarks/peers.py [--runs N] [--quick] [--venv PATH]`` writes its section into
``benchmarks/results/detection.md`` (after the ``<!-- peers -->`` marker).
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("river", "frouros", "alibi-detect")
MARKER = "<!-- peers -->"
GAMMA, NU, K = 1e3, 200, 16
Feed = Callable[[int], bool]  # one event in, "alarm now?" out
READING = """Reading the recorded run (300 runs per estimate, so about ±6 % is noise):

* **Cluster mix** — every peer is 2–9 × slower: K one-hot detectors pay the same
  multiplicity as our bank without using the likelihood ratio, and mean-based detectors barely
  see a cluster vanishing (Page–Hinkley 7.5 ×, frouros CUSUM 8.8 ×).
* **OOD ×10** — ours is as fast as or faster than every peer matched to the same ARL0
  (Page–Hinkley and frouros CUSUM 1.09 ×, FET 1.14 ×; DDM's 0.99 × counts only the 37 % of runs
  it had not already falsely alarmed on within 200 events).
* **OOD ×3** — *not* met: Page–Hinkley (river, and frouros's CUSUM, which is the same
  recursion) and alibi-detect's FET are 0.88–0.90 × our delay, about 1.5 standard errors. With
  its default δ = 0.005 on 1 % flags, PH is a CUSUM with reference value p0 + δ = 0.015, close
  to the LLR-optimal 0.018 for exactly this shift, so it is near the optimal CUSUM here; our
  bank spreads its threshold over ρ ∈ {2, 3, 5, 10} (1.03–1.13 × optimal in the main table)
  and is the one that also holds at ×10, where PH is 1.09 ×.
* ADWIN cannot alarm as often as once per 10³ events on 1 % flags even at δ ≈ 1, so it is not
  matched (its ARL0 is 7.2·10³).
"""


def ensure_venv(venv: Path) -> dict[str, str]:
    """Create the side environment and install each peer; say what failed and why."""
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    status = {}
    for pkg in PACKAGES:
        r = subprocess.run(
            [str(venv / "bin" / "pip"), "install", "-q", pkg], capture_output=True, text=True
        )
        status[pkg] = "ok" if r.returncode == 0 else "install failed: " + r.stderr[-300:]
    return status


# -- detectors: factories param -> fresh feed ------------------------------------------------
def one_hot(make: Callable[[], Any], update: Callable[[Any, float], bool]) -> Feed:
    dets = [make() for _ in range(K)]

    def feed(c: int) -> bool:
        hits = [update(d, 1.0 if j == c else 0.0) for j, d in enumerate(dets)]
        return any(hits)

    return feed


def river_update(d: Any, x: float) -> bool:
    d.update(x)
    return bool(d.drift_detected)


def frouros_update(d: Any, x: float) -> bool:
    d.update(value=x)
    return bool(d.drift)


def peers(categorical: bool) -> dict[str, tuple[Callable[[float], Feed], float, float, str]]:
    """name -> (factory(knob), knob lo, knob hi, knob description); ARL0 grows with the knob."""
    from frouros.detectors.concept_drift import CUSUM, CUSUMConfig
    from river.drift import ADWIN, PageHinkley
    from river.drift.binary import DDM

    def wrap(make: Callable[[], Any], update: Callable[[Any, float], bool]) -> Feed:
        if categorical:
            return one_hot(make, update)
        det = make()
        return lambda x: update(det, float(x))

    mode = "both" if categorical else "up"
    out = {
        "river PageHinkley": (
            lambda t: wrap(lambda: PageHinkley(threshold=t, mode=mode), river_update),
            0.05,
            500.0,
            "threshold",
        ),
        "river ADWIN": (
            lambda t: wrap(lambda: ADWIN(delta=math.exp(-t)), river_update),
            0.01,
            60.0,
            "−ln delta",
        ),
        "frouros CUSUM": (
            lambda t: wrap(lambda: CUSUM(CUSUMConfig(lambda_=t)), frouros_update),
            0.05,
            500.0,
            "lambda_",
        ),
    }
    if not categorical:
        out["river DDM"] = (
            lambda t: wrap(lambda: DDM(drift_threshold=t), river_update),
            0.5,
            30.0,
            "drift_threshold",
        )
    return out


# -- streams and run lengths -----------------------------------------------------------------
def streams(p: np.ndarray, q: np.ndarray | None, runs: int, length: int, seed: int) -> list:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(runs):
        s = rng.choice(p.size, size=length, p=p)
        if q is not None:
            s[NU:] = rng.choice(p.size, size=length - NU, p=q)
        out.append(s.tolist())
    return out


def run_length(feed: Feed, stream: list[int]) -> int:
    for i, x in enumerate(stream):
        if feed(x):
            return i + 1
    return len(stream)


def arl0(factory: Callable[[float], Feed], knob: float, null: list) -> float:
    return float(np.mean([run_length(factory(knob), s) for s in null]))


def tune(
    factory: Callable[[float], Feed],
    lo: float,
    hi: float,
    target: float,
    null: list,
    log: Callable[[str], None],
) -> tuple[float, float]:
    """Bisection (in log knob) until ARL0 is within ±10 % of ``target``; a peer that cannot
    reach it within the knob's range returns the closest end."""
    a_lo = arl0(factory, lo, null)
    if a_lo > 1.1 * target:  # even the most sensitive setting alarms less often than ours
        log(f"    knob {lo:.4g} (most sensitive) -> ARL0 {a_lo:.0f}: cannot match")
        return lo, a_lo
    best = (lo, a_lo)
    for _ in range(14):
        mid = math.sqrt(lo * hi)
        a = arl0(factory, mid, null)
        log(f"    knob {mid:.4g} -> ARL0 {a:.0f}")
        if abs(a / target - 1) < abs(best[1] / target - 1):
            best = (mid, a)
        if abs(a / target - 1) <= 0.1:
            break
        lo, hi = (mid, hi) if a < target else (lo, mid)
    return best


def delay(factory: Callable[[float], Feed], knob: float, post: list) -> tuple[float, float, int]:
    t = np.array([run_length(factory(knob), s) for s in post])
    d = t[t > NU] - NU
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(d.size)), int(d.size)


def ours(categorical: bool, p: np.ndarray) -> tuple[Callable[[float], Feed], float]:
    """Our detector at the threshold ``benchmarks/detection.py`` uses (same tightening)."""
    from driftline.core.bernoulli import OOD_ALTERNATIVES, BernoulliCusum
    from driftline.core.budget import tighten_threshold
    from driftline.core.mix import DEFAULT_EPSILONS, DEFAULT_FRACTIONS, ClusterMixCusum
    from driftline.core.simulate import bernoulli_model, mix_model

    if categorical:
        h = tighten_threshold(mix_model([p], DEFAULT_EPSILONS, DEFAULT_FRACTIONS), p, GAMMA)

        def mix(_: float) -> Feed:
            det = ClusterMixCusum(K, threshold=h)
            return lambda c: det.update(c, p)

        return mix, h
    h = tighten_threshold(bernoulli_model(0.01, OOD_ALTERNATIVES), p, GAMMA)

    def ood(_: float) -> Feed:
        det = BernoulliCusum(OOD_ALTERNATIVES, threshold=h)
        return lambda x: det.update(bool(x), 0.01)

    return ood, h


def alibi_fet(p0: float) -> Callable[[float], Feed]:
    """FETDriftOnline on the flag stream; one (slow) threshold calibration per ERT."""
    from alibi_detect.cd import FETDriftOnline

    x_ref = (np.random.default_rng(99).random(5000) < p0).astype(int).reshape(-1, 1)
    built: dict[float, Any] = {}

    def factory(ert: float) -> Feed:
        if ert not in built:
            built[ert] = FETDriftOnline(
                x_ref, ert=ert, window_sizes=[20, 100], n_bootstraps=20_000, verbose=False
            )
        det = built[ert]
        det.reset_state()
        return lambda x: bool(det.predict(np.array([x]))["data"]["is_drift"])

    return factory


def family(
    title: str, p: np.ndarray, cells: list[tuple[str, np.ndarray]], runs: int, with_alibi: bool
) -> list[str]:
    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    categorical = p.size > 2
    null = streams(p, None, runs, int(10 * GAMMA), seed=1)
    posts = [streams(p, q, runs, NU + int(10 * GAMMA), seed=2) for _, q in cells]
    mine, h = ours(categorical, p)
    target = arl0(mine, 0.0, null)
    tuned: dict[str, tuple[Callable[[float], Feed], float, float, str]] = {
        f"**driftline** (h = {h:.2f})": (mine, 0.0, target, "—")
    }
    for name, (factory, lo, hi, knob) in peers(categorical).items():
        log(f"{title}: tuning {name}")
        k, a = tune(factory, lo, hi, target, null, log)
        tuned[name] = (factory, k, a, f"{knob} = {k:.3g}")
    if with_alibi and not categorical:
        log(f"{title}: calibrating alibi-detect FETDriftOnline")
        fet = alibi_fet(float(p[1]))
        ert, a = target, arl0(fet, target, null)
        if abs(a / target - 1) > 0.1:
            ert2 = target * target / a
            a2 = arl0(fet, ert2, null)
            ert, a = (ert2, a2) if abs(a2 / target - 1) < abs(a / target - 1) else (ert, a)
        tuned["alibi-detect FETDriftOnline"] = (fet, ert, a, f"ERT = {ert:.0f}")
    rows = []
    for (cell, _), post in zip(cells, posts, strict=True):
        base = delay(mine, 0.0, post)[0]
        for name, (factory, k, a, knob) in tuned.items():
            log(f"{title} {cell}: delay of {name}")
            d, se, n = delay(factory, k, post)
            miss = "" if abs(a / target - 1) <= 0.1 else " (not matched)"
            rows.append(
                f"| {title} | {cell} | {name} | {knob} | {a:.0f}{miss} | {d:.1f} ± {se:.1f} "
                f"({n}) | {d / base:.2f} |"
            )
    return rows


def run(runs: int, with_alibi: bool) -> str:
    p = np.full(K, 1 / K)
    into = p * (1 - 0.1 / (1 - p[0]))
    into[0] = p[0] + 0.1
    vanish = p * (1 + p[0] / (1 - p[0]))
    vanish[0] = 0.0
    rows = family(
        f"cluster mix K={K}", p, [("into ε=0.1", into), ("k vanishes", vanish)], runs, with_alibi
    )
    p_ood = np.array([0.99, 0.01])
    rows += family(
        "OOD p0=0.01",
        p_ood,
        [(f"×{r}", np.array([1 - r / 100, r / 100])) for r in (3, 10)],
        runs,
        with_alibi,
    )
    return "\n".join(
        [
            "### Peers at equal measured ARL0 (`benchmarks/peers.py`, side environment)",
            "",
            f"γ = 10³, {runs} runs per estimate; ARL0 measured on the same no-change streams for "
            "every detector; delay at ν = 200 (runs with a false alarm before ν dropped; how many "
            "remain in brackets); last column = delay / ours.",
            "",
            "| stream | shift | detector | tuned knob | ARL0 | delay ν=200 | × ours |",
            "|---|---|---|---|---|---|---|",
            *rows,
            "",
            READING,
        ]
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--venv", type=Path, default=Path(tempfile.gettempdir()) / "driftline-peers-venv"
    )
    ap.add_argument("--runs", type=int, default=300, help="runs per ARL0 / delay estimate")
    ap.add_argument("--quick", action="store_true", help="30 runs, no alibi-detect")
    ap.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--status", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not args.inner:
        status = ensure_venv(args.venv)
        for pkg, s in status.items():
            print(f"{pkg}: {s}", flush=True)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        cmd = [
            str(args.venv / "bin" / "python"),
            __file__,
            "--inner",
            "--runs",
            str(args.runs),
            "--status",
            "; ".join(f"{k} {v[:80]}" for k, v in status.items()),
        ]
        sys.exit(subprocess.run(cmd + (["--quick"] if args.quick else []), env=env).returncode)
    from importlib.metadata import version

    t0 = time.perf_counter()
    section = run(runs=30 if args.quick else args.runs, with_alibi=not args.quick)
    versions = ", ".join(f"{p} {version(p)}" for p in PACKAGES)
    section += f"\n{versions} ({args.status}); {time.perf_counter() - t0:.0f} s.\n"
    out = ROOT / "benchmarks" / "results" / "detection.md"
    head = out.read_text().split(MARKER)[0] if out.exists() else ""
    out.write_text(head.rstrip("\n") + f"\n\n{MARKER}\n{section}")
    print(section)


if __name__ == "__main__":
    main()
