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
* that leg of ours is handed the exact pre-change law, while the peers learn the baseline
  (from the stream, or FET from 5,000 reference samples). A second driftline leg judges
  against what a finite reference allows, as the service does: the bounds
  :func:`driftline.core.baselines.mix_bounds` / :func:`~driftline.core.baselines.tail_rate_bound`
  build from a 5,000-sample reference (the very sample FET gets, on the OOD stream), its
  threshold tuned like a peer's knob to the same measured ARL0;
* univariate peers watch a categorical stream as K one-hot indicators, one detector each,
  alarming when any does (the usual way to watch a categorical feature with them);
* delay: change at ν = 200, conditional mean over runs without an alarm before ν, on the same
  post-change streams for every detector.

alibi-detect runs on the OOD stream only: its FET threshold calibration simulates every feature
separately and took over 10 minutes for K = 16 features on the benchmark machine.

Every ratio carries a paired standard error (delta method on the per-run delays of the common
post-change streams); the closing "Reading" text is generated from the run's own figures.

``python benchmarks/peers.py [--runs N] [--quick] [--venv PATH] [--out FILE]`` writes its
section, headed by the run's date, command line, machine, commit, runtime and load, into
``benchmarks/results/detection.md`` (after the ``<!-- peers -->`` marker).
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from _report import RunMeta, ratio_se, span, verdict, with_se

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("river", "frouros", "alibi-detect")
MARKER = "<!-- peers -->"
GAMMA, NU, K = 1e3, 200, 16
Feed = Callable[[int], bool]  # one event in, "alarm now?" out
REF_N = 5000  # reference samples: FET's, and the finite-reference driftline leg's
MATCH = 0.1  # a detector is matched when its measured ARL0 is within ±10 % of ours


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


def run_lengths(factory: Callable[[float], Feed], knob: float, post: list) -> np.ndarray:
    return np.array([run_length(factory(knob), s) for s in post])


def reference_sample(p: np.ndarray) -> np.ndarray:
    """The ``REF_N``-sample reference FET and driftline's finite-reference leg get (seed 99)."""
    rng = np.random.default_rng(99)
    if p.size == 2:  # flags
        return (rng.random(REF_N) < p[1]).astype(int)
    return rng.choice(p.size, size=REF_N, p=p)


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


def ours_from_reference(categorical: bool, p: np.ndarray) -> tuple[Callable[[float], Feed], str]:
    """Our detector judging against the bounds a ``REF_N``-sample reference allows (what the
    service builds: ``build_baselines``' defaults, global baseline), threshold = the knob."""
    from driftline.core.baselines import frozen, mix_bounds, tail_rate_bound
    from driftline.core.bernoulli import OOD_ALTERNATIVES, BernoulliCusum
    from driftline.core.mix import ClusterMixCusum

    ref = reference_sample(p)
    if categorical:
        counts = np.bincount(ref, minlength=p.size)
        lower, upper = mix_bounds(counts, np.full(p.size, 1 / p.size), 0.5)
        bounds = frozen(np.stack([lower, upper]))

        def mix(h: float) -> Feed:
            det = ClusterMixCusum(p.size, threshold=h)
            return lambda c: det.update(c, bounds)

        return mix, f"{REF_N:,} samples: shares bounded to {lower.min():.3f}–{upper.max():.3f}"
    flagged = int(ref.sum())
    bound = tail_rate_bound(REF_N, flagged)

    def ood(h: float) -> Feed:
        det = BernoulliCusum(OOD_ALTERNATIVES, threshold=h)
        return lambda x: det.update(bool(x), bound)

    return ood, f"{flagged} of {REF_N:,} flagged: p0 bound {bound:.4f}"


def alibi_fet(p: np.ndarray) -> Callable[[float], Feed]:
    """FETDriftOnline on the flag stream; one (slow) threshold calibration per ERT."""
    from alibi_detect.cd import FETDriftOnline

    x_ref = reference_sample(p).reshape(-1, 1)
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


KNOWN, FINITE = "**driftline**, known baseline", f"**driftline**, {REF_N:,}-sample reference"


def family(
    title: str, p: np.ndarray, cells: list[tuple[str, np.ndarray]], runs: int, with_alibi: bool
) -> tuple[list[str], list[dict]]:
    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    categorical = p.size > 2
    null = streams(p, None, runs, int(10 * GAMMA), seed=1)
    posts = [streams(p, q, runs, NU + int(10 * GAMMA), seed=2) for _, q in cells]
    mine, h = ours(categorical, p)
    target = arl0(mine, 0.0, null)
    tuned: dict[str, tuple[Callable[[float], Feed], float, float, str]] = {
        KNOWN: (mine, 0.0, target, f"h = {h:.2f} (tightened)")
    }
    finite, how = ours_from_reference(categorical, p)
    log(f"{title}: tuning {FINITE}")
    k, a = tune(finite, 0.3, 30.0, target, null, log)
    tuned[FINITE] = (finite, k, a, f"h = {k:.2f}; {how}")
    for name, (factory, lo, hi, knob) in peers(categorical).items():
        log(f"{title}: tuning {name}")
        k, a = tune(factory, lo, hi, target, null, log)
        tuned[name] = (factory, k, a, f"{knob} = {k:.3g}")
    if with_alibi and not categorical:
        log(f"{title}: calibrating alibi-detect FETDriftOnline")
        fet = alibi_fet(p)
        ert, a = target, arl0(fet, target, null)
        if abs(a / target - 1) > MATCH:
            ert2 = target * target / a
            a2 = arl0(fet, ert2, null)
            ert, a = (ert2, a2) if abs(a2 / target - 1) < abs(a / target - 1) else (ert, a)
        tuned["alibi-detect FETDriftOnline"] = (fet, ert, a, f"ERT = {ert:.0f}")
    rows, results = [], []
    for (cell, _), post in zip(cells, posts, strict=True):
        times = {}
        for name, (factory, k, _a, _knob) in tuned.items():
            log(f"{title} {cell}: delay of {name}")
            times[name] = run_lengths(factory, k, post)
        for name, (_f, _k, a, knob) in tuned.items():
            t = times[name]
            d = t[t > NU] - NU
            res: dict[str, Any] = {
                "stream": title, "cell": cell, "name": name, "arl0": a, "target": target,
                "matched": abs(a / target - 1) <= MATCH, "delay": float(d.mean()),
                "se": float(d.std(ddof=1) / math.sqrt(d.size)), "kept": int(d.size),
                "runs": len(post), "vs_known": ratio_se(t, times[KNOWN], NU),
                "vs_finite": ratio_se(t, times[FINITE], NU),
            }
            results.append(res)
            miss = "" if res["matched"] else " (not matched)"
            rows.append(
                f"| {title} | {cell} | {name} | {knob} | {a:.0f}{miss} | {res['delay']:.1f} ± "
                f"{res['se']:.1f} ({res['kept']}) | {with_se(*res['vs_known'])} | "
                f"{with_se(*res['vs_finite'])} |"
            )
    return rows, results


def reading(results: list[dict]) -> str:
    """The conclusions, every figure computed from this run's table."""
    ours = (KNOWN, FINITE)
    peers_ = [r for r in results if r["name"] not in ours]
    matched = [r for r in peers_ if r["matched"]]
    out = []
    unmatched = {(r["stream"], r["name"]): r for r in peers_ if not r["matched"]}
    finite_unmatched = {r["stream"]: r for r in results if r["name"] == FINITE and not r["matched"]}
    if unmatched or finite_unmatched:
        out.append(
            f"* **Not matched** (ARL0 not within ±{MATCH:.0%} of driftline's known-baseline "
            "leg, so left out of the verdicts): "
            + ", ".join(f"{n} on {s} (ARL0 {r['arl0']:.0f} vs {r['target']:.0f})"
                        for (s, n), r in {**unmatched,
                                          **{(s, FINITE): r for s, r in finite_unmatched.items()}
                                          }.items())
            + "."
        )
    for stream in dict.fromkeys(r["stream"] for r in results):
        rs = [r for r in matched if r["stream"] == stream]
        if not rs:
            continue
        text = (
            f"* **{stream}** — matched peers' delay at ν = {NU} is "
            f"{span(r['vs_known'][0] for r in rs)} × driftline's with the known baseline and "
            f"{span(r['vs_finite'][0] for r in rs)} × driftline's judging against a "
            f"{REF_N:,}-sample reference. "
        )
        for key, who in (("vs_known", "known baseline"), ("vs_finite", "finite reference")):
            if key == "vs_finite" and stream in finite_unmatched:
                continue
            items = [(f"{r['name']} on {r['cell']}", r[key][0], r[key][1], 1.0, r[key][0] > 1.0)
                     for r in rs]
            text += verdict(items, f"Lower delay than each peer, driftline with the {who} "
                            "(peer / driftline > 1)", show_target=False) + ". "
        out.append(text.rstrip())
    fin = [r for r in results if r["name"] == FINITE]
    if fin:
        out.append(
            f"* **Price of a finite reference** — judging against the bounds of a {REF_N:,}-sample "
            "reference, at the same measured ARL0, driftline's delay is "
            + ", ".join(f"{with_se(*r['vs_known'])} × (on {r['stream']} {r['cell']})" for r in fin)
            + " its delay with the baseline known exactly."
        )
    known = {(r["stream"], r["cell"]): r["kept"] for r in results if r["name"] == KNOWN}
    low = [r for r in results if r["kept"] < 0.8 * known[r["stream"], r["cell"]]]
    if low:
        out.append(
            f"* **Runs kept** — delays are conditional on no false alarm before ν = {NU}; "
            "fewer than 80 % as many runs as driftline's (known baseline) remain for "
            + ", ".join(f"{r['name']} on {r['stream']} {r['cell']} ({r['kept']} of {r['runs']}, "
                        f"driftline {known[r['stream'], r['cell']]})" for r in low)
            + ": their delays describe only the runs that survived."
        )
    return "\n".join(out)


def run(runs: int, with_alibi: bool) -> str:
    p = np.full(K, 1 / K)
    into = p * (1 - 0.1 / (1 - p[0]))
    into[0] = p[0] + 0.1
    vanish = p * (1 + p[0] / (1 - p[0]))
    vanish[0] = 0.0
    rows, results = family(
        f"cluster mix K={K}", p, [("into ε=0.1", into), ("k vanishes", vanish)], runs, with_alibi
    )
    p_ood = np.array([0.99, 0.01])
    rows_ood, results_ood = family(
        "OOD p0=0.01",
        p_ood,
        [(f"×{r}", np.array([1 - r / 100, r / 100])) for r in (3, 10)],
        runs,
        with_alibi,
    )
    return "\n".join(
        [
            f"γ = 10³, {runs} runs per estimate; ARL0 measured on the same no-change streams for "
            f"every detector (matched: within ±{MATCH:.0%} of driftline's known-baseline leg); "
            f"delay at ν = {NU} (runs with a false alarm before ν dropped; how many remain in "
            "brackets); last columns = delay / driftline's with the known baseline and with "
            f"the {REF_N:,}-sample reference, ± one standard error (paired, delta method).",
            "",
            "| stream | shift | detector | tuned knob | ARL0 | delay ν=200 | × ours (known) | "
            "× ours (reference) |",
            "|---|---|---|---|---|---|---|---|",
            *rows,
            *rows_ood,
            "",
            "Reading this run (every figure computed from the table above):",
            "",
            reading(results + results_ood),
        ]
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--venv", type=Path, default=Path(tempfile.gettempdir()) / "driftline-peers-venv"
    )
    ap.add_argument("--runs", type=int, default=300, help="runs per ARL0 / delay estimate")
    ap.add_argument("--quick", action="store_true", help="30 runs, no alibi-detect")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "detection.md",
                    help="results file; the section goes after its peers marker")
    ap.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--status", default="", help=argparse.SUPPRESS)
    ap.add_argument("--argv", default="", help=argparse.SUPPRESS)
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
            "--out",
            str(args.out),
            "--status",
            "; ".join(f"{k} {v[:80]}" for k, v in status.items()),
            "--argv",
            shlex.join(sys.argv),
        ]
        sys.exit(subprocess.run(cmd + (["--quick"] if args.quick else []), env=env).returncode)
    from importlib.metadata import version

    meta = RunMeta(argv=shlex.split(args.argv) if args.argv else sys.argv)
    body = run(runs=30 if args.quick else args.runs, with_alibi=not args.quick)
    versions = [f"{p} {version(p)}" for p in PACKAGES]
    section = "\n".join([
        "### Peers at equal measured ARL0 (`benchmarks/peers.py`, side environment)",
        "",
        *meta.lines(versions),
        f"- side environment {args.venv}: {args.status}",
        "",
        body,
    ]) + "\n"
    out = args.out
    head = out.read_text().split(MARKER)[0] if out.exists() else ""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text((head.rstrip("\n") + "\n\n" if head.strip() else "") + f"{MARKER}\n{section}")
    print(section)


if __name__ == "__main__":
    main()
