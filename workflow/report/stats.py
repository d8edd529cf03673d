"""Uncertainty from per-item results: bootstrap standard errors, paired differences and
baselines (chance, majority class).

A metric's per-item values are numbers (accuracy: its mean is the score) or
``[loglikelihood, units]`` pairs (perplexity metrics: the score is a ratio of sums, as in
lm-eval), so a bootstrap resamples items and recomputes the score, never averages ratios.
"""

from __future__ import annotations

import math
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from workflow.report.load import Items

BOOTSTRAP = 1000  # replicates; a 95% percentile interval moves by ~0.1 se between seeds
SEED = 0
Z95 = 1.959964


def score(metric: str, values: np.ndarray) -> np.ndarray:
    """The metric over the last-but-one axis of ``values`` (items); batched for bootstraps."""
    if values.ndim >= 2 and values.shape[-1] == 2 and metric != "acc":
        ratio = -values[..., 0].sum(axis=-1) / values[..., 1].sum(axis=-1)
        if "bits_per_byte" in metric:
            return ratio / math.log(2)
        return np.exp(ratio)  # byte / word perplexity
    return values.mean(axis=-1)


def _indices(n: int, replicates: int = BOOTSTRAP) -> np.ndarray:
    return np.random.default_rng(SEED).integers(0, n, size=(replicates, n))


def replicates(metric: str, values: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """The metric on each bootstrap resample (rows of ``idx``) of ``values``."""
    return score(metric, values[idx])


def bootstrap_se(metric: str, values: np.ndarray) -> float:
    """Bootstrap standard error of the metric over items."""
    if len(values) < 2:
        return float("nan")
    return float(replicates(metric, values, _indices(len(values))).std(ddof=1))


@dataclass(frozen=True)
class Difference:
    """A paired difference a - b with its 95% bootstrap interval, over ``n`` shared items."""

    value: float
    low: float
    high: float
    n: int

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def text(self) -> str:
        return f"{self.value:+.3f} [{self.low:+.3f}, {self.high:+.3f}]"


def aligned(a: Items, b: Items, metric: str) -> tuple[np.ndarray, np.ndarray] | None:
    """The two models' per-item values on the items both scored, in the same order."""
    if metric not in a.metrics or metric not in b.metrics:
        return None
    shared, ia, ib = np.intersect1d(a.doc_id, b.doc_id, return_indices=True)
    if len(shared) < 2:
        return None
    return a.metrics[metric][ia], b.metrics[metric][ib]


def paired_difference(metric: str, pairs: Sequence[tuple[np.ndarray, np.ndarray]],
                      weights: Sequence[float] | None = None,
                      keys: Sequence[str] | None = None) -> Difference | None:
    """The weighted sum over groups of score(a) - score(b) (default: their mean), with a 95%
    percentile interval from a bootstrap over items: paired (one resample serves both models
    of a group), and groups with the same ``key`` (the same language's test set) resampled
    with the same items, other groups independently.

    One group is one language; several give the average column's difference. A difference
    of differences (a trend over budgets) takes weights +w / -w.
    """
    if not pairs:
        return None
    weights = list(weights) if weights is not None else [1.0 / len(pairs)] * len(pairs)
    keys = list(keys) if keys is not None else [str(k) for k in range(len(pairs))]
    point = 0.0
    reps = np.zeros(BOOTSTRAP)
    for (a, b), weight, key in zip(pairs, weights, keys, strict=True):
        seed = zlib.crc32(f"{key}:{len(a)}".encode()) + SEED
        idx = np.random.default_rng(seed).integers(0, len(a), size=(BOOTSTRAP, len(a)))
        point += weight * float(score(metric, a) - score(metric, b))
        reps += weight * (replicates(metric, a, idx) - replicates(metric, b, idx))
    low, high = np.percentile(reps, [2.5, 97.5])
    return Difference(point, float(low), float(high), int(sum(len(a) for a, _ in pairs)))


def chance(items: Items) -> float | None:
    """Expected accuracy of a uniform guess: the mean of 1 / (number of choices)."""
    if not items.n_choices or any(not isinstance(n, int) or n < 1 for n in items.n_choices):
        return None
    return float(np.mean([1.0 / n for n in items.n_choices]))


def majority(items: Items) -> float | None:
    """Accuracy of always answering the eval set's most frequent gold label."""
    gold = [g for g in items.gold if g is not None]
    if not gold or len(gold) != len(items.gold):
        return None
    return Counter(map(str, gold)).most_common(1)[0][1] / len(gold)


def separated(best: tuple[float, float], other: tuple[float, float]) -> bool:
    """Whether two (value, standard error) scores differ beyond their 95% interval:
    |a - b| > 1.96 sqrt(se_a^2 + se_b^2). Unknown errors never separate."""
    (a, se_a), (b, se_b) = best, other
    if any(math.isnan(x) for x in (a, se_a, b, se_b)):
        return False
    return abs(a - b) > Z95 * math.hypot(se_a, se_b)
