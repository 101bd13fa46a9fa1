"""Statistics over seeds: means with Student-t confidence intervals, and paired comparisons of two
methods run on the same seeds (the same data split, the same initialisation)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import stats as scipy_stats


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float | None]:
    """(mean, half-width of its two-sided Student-t confidence interval) of n values:
    t_{n-1, (1+level)/2} * s / sqrt(n), s the sample standard deviation; None when n < 2."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("mean_ci needs at least one value")
    if x.size < 2:
        return float(x.mean()), None
    t = scipy_stats.t.ppf((1 + level) / 2, df=x.size - 1)
    return float(x.mean()), float(t * x.std(ddof=1) / np.sqrt(x.size))


def paired_difference(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> dict:
    """Paired comparison of a and b over the same seeds (a[i], b[i] from seed i): the mean
    difference a - b, its Student-t confidence interval, the two-sided paired t-test p-value and
    the seeds where a beats b. CI and p are None with one pair; with equal differences (zero
    spread) the interval is the point and p is 0 (1 when they are all 0)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"paired_difference needs two equally long 1-D samples, got {a.shape} and {b.shape}")
    d = a - b
    mean, half = mean_ci(d, level)
    out = {"pairs": int(d.size), "mean_difference": mean, "ci_low": None, "ci_high": None, "p_value": None,
           "wins": int(np.sum(d > 0)), "losses": int(np.sum(d < 0))}
    if half is None:
        return out
    out["ci_low"], out["ci_high"] = mean - half, mean + half
    spread = d.std(ddof=1)
    if spread == 0:
        out["p_value"] = 1.0 if mean == 0 else 0.0
    else:
        t = mean / (spread / np.sqrt(d.size))
        out["p_value"] = float(2 * scipy_stats.t.sf(abs(t), df=d.size - 1))
    return out


def ci_band(values: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-column (mean, lower, upper) of values [S, R] over its S rows, NaN left out: the
    Student-t interval of each column's finite values (the point where fewer than 2)."""
    values = np.atleast_2d(np.asarray(values, dtype=np.float64))
    mean, low, high = (np.full(values.shape[1], np.nan) for _ in range(3))
    for j in range(values.shape[1]):
        column = values[:, j][np.isfinite(values[:, j])]
        if column.size:
            m, half = mean_ci(column, level)
            mean[j], low[j], high[j] = m, m - (half or 0.0), m + (half or 0.0)
    return mean, low, high
