"""Detection-quality benchmark (DESIGN.md §7): ARL0, delay vs the optimal CUSUM, onset, speed.

Protocol
--------
* Streams: cluster ids from K ∈ {16, 64} uniform clusters; a shift moves absolute mass ε into one
  cluster (``q_k = 1/K + ε``, the rest scaled down — DESIGN §8's convention) or out of it
  (``q_k = 1/K - ε``, where feasible, and "k vanishes", ``ε = 1/K``; for K = 64 also half of
  it). OOD flags with ``p0 = 0.01`` rising ×3 and ×10.
* Thresholds: per detector and ``γ ∈ {10³, 10⁴}``, the analytic ``ln γ + ln M`` tightened by
  simulation (:func:`driftline.core.budget.tighten_threshold`, seed 0); ARL0 is then measured
  on independent runs (seed 1) — that measured ARL0 is what the references are matched to.
* References on the *same* streams (common random numbers): the exact optimal CUSUM, which knows
  the post-change law, with its threshold set by Brook–Evans so its ARL0 equals our measured
  ARL0; and an "oracle-ε bank" of K CUSUMs that knows ε but not which cluster, tightened to the
  same ARL0 — the best a k-unknown CUSUM bank can do, isolating the cost of our ε/f grids; and
  the uniform-prior Shiryaev–Roberts mixture over the same K alternatives (``mixture_sr.py``),
  the Bayes-flavoured k-unknown procedure, also matched to that ARL0.
* Delay: conditional average detection delay for a change at ν = 0 (Lorden's worst case for
  CUSUM) and ν = 200 (runs that alarmed before ν are dropped). Onset error: median
  ``|onset - ν|`` at ν = 200. Speed: µs per online ``update`` (Python, one event at a time).

Run ``python benchmarks/detection.py [--runs N] [--quick]``; results go to
``benchmarks/results/detection.md``.
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from collections.abc import Callable
from pathlib import Path

import mixture_sr  # benchmarks/ sibling (scripts here run with their folder on sys.path)
import numpy as np

from driftline.core.arl import arl_discrete, arl_normal, threshold_for_arl
from driftline.core.baselines import DetectorBaseline
from driftline.core.bernoulli import OOD_ALTERNATIVES, BernoulliCusum
from driftline.core.budget import DAY, Budget, tighten_threshold
from driftline.core.cusum import union_threshold
from driftline.core.mix import DEFAULT_EPSILONS, DEFAULT_FRACTIONS, ClusterMixCusum
from driftline.core.simulate import LlrModel, bernoulli_model, mix_model, simulate, single_model
from driftline.core.slices import EventUpdate, SliceDetectors

OUT = Path(__file__).parent / "results" / "detection.md"
NU = 200
PEERS = "<!-- peers -->"  # benchmarks/peers.py appends its section after this marker


def shifted(p: np.ndarray, k: int, eps: float, into: bool) -> np.ndarray:
    """Move absolute mass ``eps`` into (or out of) cluster ``k``, the rest proportionally."""
    scale = 1 - eps / (1 - p[k]) if into else 1 + eps / (1 - p[k])
    q = p * scale
    q[k] = p[k] + eps if into else p[k] - eps
    return q


def kl(q: np.ndarray, p: np.ndarray) -> float:
    m = q > 0
    return float(np.sum(q[m] * np.log(q[m] / p[m])))


def oracle_bank(p: np.ndarray, eps: float, into: bool) -> LlrModel:
    """K CUSUMs, member k = the true law with the shift in cluster k."""
    llr = np.array([np.log(shifted(p, k, eps, into) / p) for k in range(p.size)])  # [k, c]
    base = llr[np.arange(p.size), (np.arange(p.size) + 1) % p.size]  # value for c != k
    diff = (np.diag(llr) - base).reshape(-1, 1)
    return LlrModel(base.reshape(1, -1, 1), diff, np.arange(p.size), np.zeros(p.size, np.int64))


def mixture_lr(p: np.ndarray, eps: float, into: bool) -> np.ndarray:
    """``lr[k, c]``: likelihood ratio of cluster ``c`` when the shift is in cluster ``k``."""
    return np.array([shifted(p, k, eps, into) / p for k in range(p.size)])


def measure_arl0(model: LlrModel, h: float, p: np.ndarray, runs: int, gamma: float) -> dict:
    res = simulate([model], [[h]], p, n_runs=runs, horizon=int(40 * gamma), seed=1)[0]
    t = res.times[:, 0]
    return {"arl0": t.mean(), "se": t.std(ddof=1) / math.sqrt(runs), "cens": res.censored.sum()}


def delays(
    models: list[LlrModel],
    hs: list[float],
    p: np.ndarray,
    q: np.ndarray,
    runs: int,
    horizon: int,
    nu: int,
) -> list[tuple[float, float, float]]:
    """Per model: conditional mean delay, its s.e., median onset error."""
    out = []
    sims = simulate(
        models,
        [[h] for h in hs],
        p,
        post=q,
        change_at=nu,
        n_runs=runs,
        horizon=nu + horizon,
        seed=2 + nu,
        onset=True,
    )
    for r in sims:
        ok = r.times[:, 0] > nu
        d = r.times[ok, 0] - nu
        err = np.abs(r.onsets[ok, 0] - nu)
        out.append((d.mean(), d.std(ddof=1) / math.sqrt(d.size), float(np.median(err))))
    return out


def cell(
    name: str,
    model: LlrModel,
    h: float,
    arl: dict,
    p: np.ndarray,
    q: np.ndarray,
    opt_llr: np.ndarray,
    oracle: tuple[LlrModel, np.ndarray] | None,
    runs: int,
    tune_runs: int,
) -> dict:
    """One benchmark cell: our bank vs the optimal CUSUM (and the k-unknown references:
    ``oracle`` is the oracle-ε bank and the mixture's likelihood ratios)."""
    o = int(np.argmax(np.abs(opt_llr - np.median(opt_llr))))  # the outcome that moved
    values, pre = [opt_llr[o], np.delete(opt_llr, o)[0]], [p[o], 1 - p[o]]
    h_opt = threshold_for_arl(lambda x: arl_discrete(values, pre, x), arl["arl0"])
    opt_exact = arl_discrete(values, [q[o], 1 - q[o]], h_opt)
    models, hs = [model, single_model(opt_llr)], [h, h_opt]
    if oracle is not None:
        models.append(oracle[0])
        hs.append(tighten_threshold(oracle[0], p, arl["arl0"], n_runs=tune_runs, seed=0))
    horizon = int(60 * opt_exact) + 2000
    d0 = delays(models, hs, p, q, runs, horizon, 0)
    d1 = delays(models, hs, p, q, runs, horizon, NU)
    sr = None
    if oracle is not None:
        log_a = mixture_sr.tune(oracle[1], p, arl["arl0"], n_runs=tune_runs)
        sr = mixture_sr.delay(oracle[1], log_a, p, q, n_runs=runs, horizon=horizon, nu=0, seed=2)
    info = kl(q, p)
    target = 1.25 if info >= 0.1 else 1.5 if info >= 0.01 else None
    return {
        "name": name,
        "kl": info,
        "opt_exact": opt_exact,
        "d0": d0,
        "d1": d1,
        "target": target,
        "oracle": oracle is not None,
        "sr": sr,
    }


def per_update_us(fn: Callable[[int], object], n: int = 20_000) -> float:
    t0 = time.perf_counter()
    for i in range(n):
        fn(i)
    return (time.perf_counter() - t0) / n * 1e6


def speed_rows() -> list[str]:
    rng = np.random.default_rng(0)
    n = 20_000
    rows = []
    for k in (16, 64):
        det, p, cs = ClusterMixCusum(k), np.full(k, 1 / k), rng.integers(0, k, n).tolist()

        def mix(i: int, det: ClusterMixCusum = det, p: np.ndarray = p, cs: list = cs) -> bool:
            return det.update(cs[i], p, float(i))

        rows.append(f"| ClusterMixCusum K={k} (M={det.bank_size}) | {per_update_us(mix, n):.1f} |")
    flags, ood = (rng.random(n) < 0.01).tolist(), BernoulliCusum()
    us = per_update_us(lambda i: ood.update(flags[i], 0.01, float(i)), n)
    rows.append(f"| BernoulliCusum (OOD, M=4) | {us:.1f} |")
    sd, b64 = SliceDetectors(arl0=1e6), DetectorBaseline.exact(np.full(64, 1 / 64), 0.01)
    ups = [EventUpdate(int(rng.integers(64)), b64, flags[i], float(i)) for i in range(n)]
    us = per_update_us(lambda i: sd.update(ups[i]), n)
    rows.append(f"| SliceDetectors (cluster K=64 + OOD + counts) | {us:.1f} |")
    return rows


def anchor_rows() -> list[str]:
    rows = []
    for delta, anchors in ((1.0, (10.5, 15.1)), (0.5, (31.1, 49.1))):
        i, sd = delta**2 / 2, delta
        for g, a in zip((1e3, 1e4), anchors, strict=True):
            h = threshold_for_arl(lambda x, i=i, sd=sd: arl_normal(-i, sd, x), g)
            rows.append(f"| Gaussian δ={delta} | {g:.0e} | {a} | {arl_normal(i, sd, h):.1f} |")
    p = np.full(16, 1 / 16)
    for eps, anchors in ((0.10, (48.8, 85.4)), (0.05, (114, 231))):
        q = shifted(p, 0, eps, True)
        values = [math.log(q[0] / p[0]), math.log(q[1] / p[1])]
        for g, a in zip((1e3, 1e4), anchors, strict=True):
            h = threshold_for_arl(lambda x, v=values: arl_discrete(v, [p[0], 1 - p[0]], x), g)
            d = arl_discrete(values, [q[0], 1 - q[0]], h)
            rows.append(f"| K=16 ε={eps} into | {g:.0e} | {a} | {d:.1f} |")
    return rows


def fmt_cell(c: dict, det: str, gamma: float, arl: dict) -> str:
    (d0, s0, _), (o0, _, _) = c["d0"][0], c["d0"][1]
    (d1, s1, e1), (o1, _, _) = c["d1"][0], c["d1"][1]
    r0 = d0 / o0
    ok = "" if c["target"] is None else (" ✓" if r0 <= c["target"] else " ✗") + f" ≤{c['target']}"
    orc = "— | — | —"
    if c["oracle"]:
        orc = f"{c['d0'][2][0] / o0:.2f} | {c['sr'] / o0:.2f} | {d0 / c['d0'][2][0]:.2f}"
    return (
        f"| {det} | {c['name']} | {c['kl']:.4f} | {gamma:.0e} | {arl['arl0']:.0f} | "
        f"{d0:.1f} ± {s0:.1f} | {o0:.1f} ({c['opt_exact']:.1f}) | **{r0:.2f}**{ok} | {orc} | "
        f"{d1:.1f} ± {s1:.1f} | {d1 / o1:.2f} | {e1:.0f} | {e1 / d1:.2f} |"
    )


def production_rows(ks: tuple[int, ...], runs: int, tune: int) -> list[str]:
    """Delays at the Budget example's γ: thresholds extrapolated from simulation at 10⁴."""
    gamma = Budget(1, 30 * DAY, 120, 4, 2.0).arl0()
    rows = []
    for k in ks:
        p = np.full(k, 1 / k)
        model = mix_model([p], DEFAULT_EPSILONS, DEFAULT_FRACTIONS)
        h = tighten_threshold(model, p, gamma, n_runs=tune, max_simulated=1e4)
        for name, eps, into in (
            ("into ε=0.05", 0.05, True),
            ("into ε=0.1", 0.1, True),
            ("out: k vanishes", 1 / k, False),
        ):
            q, oracle = shifted(p, 0, eps, into), oracle_bank(p, eps, into)
            h_or = tighten_threshold(oracle, p, gamma, n_runs=tune, max_simulated=1e4)
            sims = simulate(
                [model, oracle], [[h], [h_or]], p, post=q, n_runs=runs, horizon=10**6, seed=7
            )
            ours, orc = (float(r.times[:, 0].mean()) for r in sims)
            with np.errstate(divide="ignore"):
                values, pre = np.log(q[:2] / p[:2]).tolist(), [p[0], 1 - p[0]]
            h_opt = threshold_for_arl(lambda x, v=values, w=pre: arl_discrete(v, w, x), gamma)
            opt = arl_discrete(values, [q[0], 1 - q[0]], h_opt)
            rows.append(
                f"| cluster mix K={k} | {name} | {kl(q, p):.4f} | {gamma:.2e} | "
                f"{h:.1f} ({union_threshold(gamma, model.base.size):.1f}) | {ours:.0f} | "
                f"{opt:.0f} | **{ours / opt:.2f}** | {orc / opt:.2f} | {ours / orc:.2f} |"
            )
    return rows


REPORT = """## Detection quality (`benchmarks/detection.py`)

{runs} runs per estimate, {tune} for tightening, {machine}, {elapsed:.0f} s
(`python benchmarks/detection.py{cmd}`). Delays in events, ± one standard error.

### Thresholds and measured ARL0 (independent runs)

| detector | bank M | γ | h = ln γ + ln M | h tightened | measured ARL0 | ARL0/γ | censored |
|---|---|---|---|---|---|---|---|
{arl_rows}

### Delay at equal measured ARL0

opt = exact optimal CUSUM that knows the post-change law, on the same streams (Brook–Evans
value in brackets); ratio = ours / opt at ν = 0 with the DESIGN §7 target (≤ 1.25 for KL ≥ 0.1,
≤ 1.5 for KL ≥ 0.01); oracle-ε = K CUSUMs that know ε but not the cluster, at the same ARL0 (the
price of not knowing k is oracle/opt, the price of our ε/f grids ours/oracle); SR-mix = the
uniform-prior Shiryaev–Roberts mixture over the same K alternatives (knows ε, not k), same ARL0,
delay at ν = 0; onset error = median |onset − ν| at ν = 200.

| detector | shift | KL | γ | ARL0 | delay ν=0 | opt | ratio | oracle/opt | SR-mix/opt \
| ours/oracle | delay ν=200 | ratio | onset err | err/delay |
|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|
{cell_rows}

### At a fleet budget's γ (1 false incident / 30 days, 120 slices × 4 detectors, 2 events/s)

Thresholds tightened at 10⁴ and 10⁴/16 and extended along ln ARL0(h)
(`tighten_threshold(max_simulated=1e4)`; union bound in brackets); optimal by Brook–Evans at
ARL0 = γ; delays at ν = 0, simulated.

| detector | shift | KL | γ | h (union) | delay | opt | ratio | oracle/opt | ours/oracle |
|---|---|---|---|---|---|---|---|---|---|
{prod_rows}

### Optimal-CUSUM anchors (DESIGN §8, Brook–Evans)

| law | γ | DESIGN | ours |
|---|---|---|---|
{anchor_rows}

### Speed (online, one event per call)

| detector | µs/update |
|---|---|
{speed_rows}

### Reading the results (default run)

* **ARL0** — tightened thresholds keep the measured ARL0 at 1.0–1.2 × γ (the one-standard-error
  margin errs high); ``ln γ + ln M`` alone is 3.3–4.6 nats higher, an order of magnitude
  conservative in ARL0 and 30–60 % slower.
* **OOD rate** — within 1.01–1.11 × the optimal CUSUM: meets DESIGN §7.
* **Cluster mix** — 1.7–3.6 × the optimal CUSUM at γ ≤ 10⁴, so DESIGN §7's 1.25 × / 1.5 × is
  *not* met. It is the price of not knowing which of K clusters moved, and no k-unknown
  procedure avoids it: K CUSUMs that know ε (oracle-ε) pay 1.45–3.1 × and the uniform-prior
  Shiryaev–Roberts mixture that knows ε pays 1.42–3.45 ×, at the same ARL0 on the same streams —
  about ln K nats of extra evidence before either can tell a real shift of one cluster from the
  largest of K noise excursions (Tartakovsky, Nikiforov & Basseville 2014, §8.3; Chan 2017).
  Against that k-unknown reference our detector, which knows neither ε nor k, is 1.06–1.07 × for
  KL ≥ 0.1 and 1.10–1.33 × for 0.01 ≤ KL < 0.1 — inside the 1.25 × / 1.5 × bands — and up to
  1.67 × for the weakest shifts (KL < 0.005, outside DESIGN's bands). The 4 + 2 ε/f grid gives
  the same delays as a 5 + 4 grid within ±3 %. The price of k falls as ln γ grows: at a fleet
  budget's γ ≈ 2.5·10⁹ the ratio to the k-known optimum is 1.32–1.50 (oracle alone 1.15–1.38).
* **Onset** — median error ≤ 0.25 × delay for every cluster shift at γ = 10⁴ (0.06–0.23) and for
  shifts with KL ≥ 0.01 at 10³ (0.11–0.25); the weakest shifts at 10³ and OOD ×3 miss it: with
  rare evidence no estimator can place the onset before the first informative event after the
  change (for OOD ×3 the median wait for a flag is ln 2 / p1, 23 events).
"""


def main() -> None:
    np.seterr(divide="ignore")  # ln 0 = -inf is the right increment when a cluster vanishes
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=300, help="runs per ARL0 and delay estimate")
    ap.add_argument("--tune-runs", type=int, default=400, help="runs for threshold tightening")
    ap.add_argument("--quick", action="store_true", help="K=16 and γ=10³ only, 100 runs")
    ap.add_argument("--no-tighten", action="store_true", help="use ln γ + ln M thresholds")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    runs, tune = (100, 200) if args.quick else (args.runs, args.tune_runs)
    ks, gammas = ((16,), (1e3,)) if args.quick else ((16, 64), (1e3, 1e4))
    t_start = time.perf_counter()
    arl_rows, cell_rows = [], []
    Cell = tuple[str, np.ndarray, tuple[LlrModel, np.ndarray] | None]
    streams: list[tuple[str, LlrModel, np.ndarray, list[Cell]]]
    streams = []
    for k in ks:
        p = np.full(k, 1 / k)
        shifts = [(f"into ε={e}", e, True) for e in (0.02, 0.05, 0.10)]
        shifts += [(f"out ε={e}", e, False) for e in (0.02, 0.05) if e < 1 / k]
        shifts += [] if k < 64 else [(f"out ε={0.5 / k:.4f} (half of k)", 0.5 / k, False)]
        shifts += [(f"out ε={1 / k:.4f} (k vanishes)", 1 / k, False)]
        cells = [
            (n, shifted(p, 0, e, i), (oracle_bank(p, e, i), mixture_lr(p, e, i)))
            for n, e, i in shifts
        ]
        model = mix_model([p], DEFAULT_EPSILONS, DEFAULT_FRACTIONS)
        streams.append((f"cluster mix K={k}", model, p, cells))
    p_ood = np.array([0.99, 0.01])
    ood_cells: list[Cell] = [
        (f"×{r}", np.array([1 - r * 0.01, r * 0.01]), None) for r in (3, 10)
    ]
    streams.append(("OOD rate p0=0.01", bernoulli_model(0.01, OOD_ALTERNATIVES), p_ood, ood_cells))
    for det, model, p, cells in streams:
        m = int(model.base[0].size)
        for gamma in gammas:
            h_u = union_threshold(gamma, m)
            h = h_u if args.no_tighten else tighten_threshold(model, p, gamma, n_runs=tune)
            arl = measure_arl0(model, h, p, runs, gamma)
            arl_rows.append(
                f"| {det} | {m} | {gamma:.0e} | {h_u:.2f} | {h:.2f} | "
                f"{arl['arl0']:.0f} ± {arl['se']:.0f} | {arl['arl0'] / gamma:.2f} | {arl['cens']} |"
            )
            for name, q, oracle in cells:
                c = cell(name, model, h, arl, p, q, np.log(q / p), oracle, runs, tune)
                cell_rows.append(fmt_cell(c, det, gamma, arl))
                print(cell_rows[-1], flush=True)
    prod_rows = production_rows(ks, runs, tune)
    elapsed = time.perf_counter() - t_start
    text = REPORT.format(
        runs=runs,
        tune=tune,
        machine=platform.machine(),
        elapsed=elapsed,
        cmd=" --quick" if args.quick else "",
        arl_rows="\n".join(arl_rows),
        cell_rows="\n".join(cell_rows),
        prod_rows="\n".join(prod_rows),
        anchor_rows="\n".join(anchor_rows()),
        speed_rows="\n".join(speed_rows()),
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    peers = args.out.read_text().partition(PEERS)[2] if args.out.exists() else ""
    args.out.write_text(text + (f"\n{PEERS}{peers}" if peers else ""))  # keep peers.py's part
    print(text)


if __name__ == "__main__":
    main()
