"""``build_reference``'s parameters: the range in which each means what it says."""

from __future__ import annotations

import math

from driftline.core.baselines import DEFAULT_CONFIDENCE
from driftline.core.error_rates import P0_QUANTILE
from driftline.reference.space import KMEANS_RESTARTS

# Predicted labels with a category of their own (the rest share "other"): a defect classifier
# has a handful; the bound keeps a slice's prediction-mix bank small whatever the model.
MAX_LABELS = 7


class ParameterError(ValueError):
    """A build parameter outside its range; ``name`` is the parameter's (the CLI names its
    flag), ``problem`` what is wrong with ``value``."""

    def __init__(self, name: str, value: object, problem: str) -> None:
        super().__init__(f"{name} {value}: {problem}")
        self.name, self.value, self.problem = name, value, problem


# faiss takes a 32-bit seed, and each k-means restart adds its number (space.spherical_kmeans)
SEED_RANGE = (-(2 ** 31), 2 ** 31 - 1 - KMEANS_RESTARTS)


def check_parameters(
    *, k: int | None = None, pca_dim: int | None = None, quantile: float = 0.99,
    min_count: int = 200, alpha: float = 0.5, exclude_within_s: float | None = None,
    seed: int = 0, max_labels: int = MAX_LABELS, confidence_quantile: float = 0.05,
    error_quantile: float = P0_QUANTILE, bound_confidence: float = DEFAULT_CONFIDENCE,
) -> None:
    """Raise :class:`ParameterError` for the first of :func:`build_reference`'s parameters
    outside the range where it means what its docstring says."""
    unit = "must lie strictly between 0 and 1"
    checks = [
        ("k", k, k is None or k >= 2, "must be at least 2: with one cluster there is no "
                                      "cluster mix to watch"),
        ("pca_dim", pca_dim, pca_dim is None or pca_dim >= 1, "must be at least 1"),
        ("quantile", quantile, 0 < quantile < 1, unit),
        ("min_count", min_count, min_count >= 1, "must be at least 1: the fewest reference "
                                                 "samples a baseline is built from"),
        ("alpha", alpha, 0 < alpha < math.inf, "must be a positive number of pseudo-counts"),
        ("exclude_within_s", exclude_within_s, exclude_within_s is None
         or 0 <= exclude_within_s < math.inf, "must be a number of seconds, 0 or more"),
        ("seed", seed, SEED_RANGE[0] <= seed <= SEED_RANGE[1],
         f"must lie in [{SEED_RANGE[0]}, {SEED_RANGE[1]}]"),
        ("max_labels", max_labels, max_labels >= 1, "must be at least 1"),
        ("confidence_quantile", confidence_quantile, 0 < confidence_quantile < 1, unit),
        ("error_quantile", error_quantile, 0.5 < error_quantile < 1,
         "must lie strictly between 0.5 and 1"),
        ("bound_confidence", bound_confidence, 0 < bound_confidence < 1, unit),
    ]
    for name, value, ok, problem in checks:
        if not ok:
            raise ParameterError(name, value, problem)
