"""Statistics in the paper's cumulative form: accuracy per activation quantile (``not``, ``q1`` ..
``q10``, where ``q_j`` pools deciles j..10), with bootstrap-over-features or Wilson intervals."""
from __future__ import annotations

import math
from statistics import NormalDist
from typing import Any

import numpy as np

QUANTILES = ["not"] + [f"q{j}" for j in range(1, 11)]


def wilson_interval(correct: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (NaN for n = 0)."""
    if n <= 0:
        return math.nan, math.nan
    z = NormalDist().inv_cdf(0.5 + level / 2)
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_interval(correct: np.ndarray, total: np.ndarray, level: float = 0.95, samples: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Percentile interval of the pooled accuracy Σcorrect/Σtotal, resampling features."""
    correct, total = np.asarray(correct, dtype=float), np.asarray(total, dtype=float)
    keep = total > 0
    correct, total = correct[keep], total[keep]
    if len(total) == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(len(total), np.full(len(total), 1 / len(total)), size=samples)
    acc = (weights @ correct) / np.maximum(weights @ total, 1e-12)
    lo, hi = np.quantile(acc, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def quantile_groups(deciles: np.ndarray) -> dict[str, np.ndarray]:
    """Masks of the judgements in each reported quantile: ``not`` (decile 0) and the cumulative
    ``q_j`` = deciles j..10 (q10: top decile alone; q1: every activating example)."""
    deciles = np.asarray(deciles)
    groups = {"not": deciles == 0}
    for j in range(1, 11):
        groups[f"q{j}"] = deciles >= j
    return groups


def quantile_accuracy(
    feature: np.ndarray, decile: np.ndarray, correct: np.ndarray, ci: str = "bootstrap",
    level: float = 0.95, samples: int = 1000, seed: int = 0,
) -> list[dict[str, Any]]:
    """One row per quantile: pooled accuracy, confidence interval and number of judgements."""
    feature, correct = np.asarray(feature), np.asarray(correct, dtype=bool)
    rows = []
    for quantile, mask in quantile_groups(decile).items():
        n, k = int(mask.sum()), int(correct[mask].sum())
        if n == 0:
            lo = hi = acc = math.nan
        else:
            acc = k / n
            if ci == "wilson":
                lo, hi = wilson_interval(k, n, level)
            else:
                feats, inverse = np.unique(feature[mask], return_inverse=True)
                c = np.bincount(inverse, weights=correct[mask].astype(float), minlength=len(feats))
                t = np.bincount(inverse, minlength=len(feats)).astype(float)
                lo, hi = bootstrap_interval(c, t, level, samples, seed)
        rows.append({"quantile": quantile, "accuracy": acc, "ci_low": lo, "ci_high": hi, "n": n})
    return rows
