"""Shared by the benchmark scripts: the run's metadata header and the statistics of the text
they generate from their own figures (ratio standard errors, ranges, verdicts).

Imported as ``_report`` (scripts here run with their folder on ``sys.path``).
"""

from __future__ import annotations

import math
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def git_commit() -> str:
    """``git rev-parse --short HEAD`` of the checkout, ``+dirty`` if anything is uncommitted."""

    def git(*a: str) -> str:
        return subprocess.run(  # noqa: S603 - fixed argv, no shell
            ["git", "-C", str(ROOT), *a],  # noqa: S607 - git from PATH
            capture_output=True, text=True, check=True,
        ).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        return head + ("+dirty" if git("status", "--porcelain") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout, or no git)"


def _load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


@dataclass
class RunMeta:
    """What a results file starts with: taken when the run starts, rendered when it ends."""

    argv: Sequence[str] = field(default_factory=lambda: list(sys.argv))
    started: datetime = field(default_factory=lambda: datetime.now(UTC))
    t0: float = field(default_factory=time.perf_counter)
    load0: str = field(default_factory=_load)
    commit: str = field(default_factory=git_commit)

    def command(self) -> str:
        return shlex.join(["python", *self.argv])

    def lines(self, extra_versions: Iterable[str] = ()) -> list[str]:
        """Markdown bullets: date, command, machine and versions, commit, runtime, load."""
        import scipy

        runtime = time.perf_counter() - self.t0
        versions = ", ".join([f"numpy {np.__version__}", f"scipy {scipy.__version__}",
                              *extra_versions])
        return [
            f"- date: {self.started.strftime('%Y-%m-%d %H:%M:%S')} UTC (start)",
            f"- command: `{self.command()}`",
            f"- machine: {cpu_model()}, {os.cpu_count()} cores; Python "
            f"{platform.python_version()}; {versions}",
            f"- commit: {self.commit}",
            f"- runtime: {runtime:.0f} s; load average (1/5/15 min) at start {self.load0}, "
            f"at end {_load()}",
        ]


# -- statistics ---------------------------------------------------------------------------------
def mean_influence(times: np.ndarray, nu: int = 0) -> tuple[float, np.ndarray]:
    """Conditional mean delay ``D = mean(T - ν | T > ν)`` over runs and each run's influence
    on it (``D`` ≈ ``D_true + mean(influence)``), for the delta method."""
    t = np.asarray(times, np.float64)
    a = (t > nu).astype(np.float64)
    if not a.any():  # every run alarmed before ν: no delay to estimate
        return math.nan, np.full(t.size, math.nan)
    x = a * (t - nu)
    d = x.sum() / a.sum()
    return float(d), (x - d * a) / a.mean()


def ratio_se(num: np.ndarray, den: np.ndarray | float, nu: int = 0) -> tuple[float, float]:
    """``D(num) / D(den)`` of two detectors' conditional mean delays on the **same** runs
    (common random numbers), and its standard error by the delta method on per-run
    influences — paired, so the two delays' correlation is used; each detector keeps its own
    runs without an alarm before ``ν``. With ``den`` a constant (an exact value), pass a
    scalar."""
    dn, inf_n = mean_influence(num, nu)
    if not isinstance(den, np.ndarray):
        r = dn / den
        return r, float(np.std(inf_n, ddof=1) / math.sqrt(inf_n.size) / den)
    dd, inf_d = mean_influence(den, nu)
    r = dn / dd
    inf = r * (inf_n / dn - inf_d / dd)
    return r, float(np.std(inf, ddof=1) / math.sqrt(inf.size))


def bootstrap_se(fn: Callable[..., float], *arrays: np.ndarray, n_boot: int = 1000,
                 seed: int = 0) -> float:
    """Standard error of ``fn(*arrays)`` (arrays indexed by run) over run-resamples."""
    rng = np.random.default_rng(seed)
    n = len(arrays[0])
    out = [fn(*(a[idx] for a in arrays)) for idx in (rng.integers(0, n, n) for _ in range(n_boot))]
    return float(np.std(out, ddof=1))


def span(values: Iterable[float], fmt: str = "{:.2f}") -> str:
    """``a–b`` over the values (one value if they agree to the format)."""
    v = [x for x in values if math.isfinite(x)]
    if not v:
        return "—"
    lo, hi = fmt.format(min(v)), fmt.format(max(v))
    return lo if lo == hi else f"{lo}–{hi}"


def with_se(r: float, se: float) -> str:
    return f"{r:.2f} ± {se:.2f}"


def verdict(items: Sequence[tuple[str, float, float, float, bool]], what: str,
            show_target: bool = True) -> str:
    """One sentence from ``(label, value, se, target, met)`` items: met by all, or the misses
    listed with their figures; near the target (within 2 s.e.) says so."""
    if not items:
        return f"{what}: no cell to judge"
    misses = [i for i in items if not i[4]]
    near = [i for i in items if abs(i[1] - i[3]) < 2 * i[2]]
    near_note = ""
    if near:
        near_note = ("; within 2 s.e. of the target, so not told apart from it by this run: "
                     + ", ".join(f"{lab} {with_se(v, s)}" for lab, v, s, _, _ in near))
    if not misses:
        return f"{what}: met in all {len(items)} cells{near_note}"
    listed = ", ".join(f"{lab} {with_se(v, s)}" + (f" (target {t:g})" if show_target else "")
                       for lab, v, s, t, _ in misses)
    return (f"{what}: **not met** in {len(misses)} of {len(items)} cells — {listed}"
            f"{near_note}")
