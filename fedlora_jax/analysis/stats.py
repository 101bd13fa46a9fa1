"""Statistics over seeds: means with Student-t confidence intervals (clipped to the range a metric
can take), and paired comparisons of two methods run on the same seeds (the same data split, the
same initialisation)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats as scipy_stats

# (low, high) of a quantity no range is known for: intervals are left as they are.
UNBOUNDED = (-math.inf, math.inf)


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


def clip_interval(low: float, high: float, bounds: tuple[float, float]) -> tuple[float, float]:
    """The interval [low, high] cut to ``bounds``, e.g. an accuracy's t-interval to [0, 1]."""
    lower, upper = bounds
    return min(max(low, lower), upper), max(min(high, upper), lower)


def mean_interval(values: Sequence[float], bounds: tuple[float, float] = UNBOUNDED,
                  level: float = 0.95) -> tuple[float, float | None, float | None]:
    """(mean, low, high): the mean of n values and its Student-t interval (:func:`mean_ci`)
    clipped to ``bounds``, the range the values can take; low and high are None when n < 2."""
    mean, half = mean_ci(values, level)
    if half is None:
        return mean, None, None
    return (mean, *clip_interval(mean - half, mean + half, bounds))


def difference_range(bounds: tuple[float, float]) -> tuple[float, float]:
    """The range of a - b for a and b in ``bounds``: [0, 1] -> [-1, 1]."""
    lower, upper = bounds
    return lower - upper, upper - lower


def clip_note(bounds: tuple[float, float]) -> str:
    """How an interval was cut, for captions: ", clipped to [0, 1]", ", clipped at 0" or ""."""
    lower, upper = bounds
    if math.isfinite(lower) and math.isfinite(upper):
        return f", clipped to [{lower:g}, {upper:g}]"
    if math.isfinite(lower) or math.isfinite(upper):
        return f", clipped at {lower if math.isfinite(lower) else upper:g}"
    return ""


def paired_difference(a: Sequence[float], b: Sequence[float], level: float = 0.95,
                      bounds: tuple[float, float] = UNBOUNDED) -> dict:
    """Paired comparison of a and b over the same seeds (a[i], b[i] from seed i): the mean
    difference a - b, its Student-t confidence interval clipped to ``bounds`` (the range a - b
    can take, e.g. :func:`difference_range` of an accuracy's), the two-sided paired t-test
    p-value (``scipy.stats.ttest_rel``) and the seeds where a beats b. CI and p are None with one
    pair; with equal differences (zero spread, where scipy's t is undefined) the interval is the
    point and p is 0 (1 when they are all 0)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"paired_difference needs two equally long 1-D samples, got {a.shape} and {b.shape}")
    d = a - b
    mean = float(d.mean())
    out = {"pairs": int(d.size), "mean_difference": mean, "ci_low": None, "ci_high": None, "p_value": None,
           "wins": int(np.sum(d > 0)), "losses": int(np.sum(d < 0))}
    if d.size < 2:
        return out
    if d.std(ddof=1) == 0:
        low, high, p = mean, mean, 1.0 if mean == 0 else 0.0
    else:
        test = scipy_stats.ttest_rel(a, b)
        interval = test.confidence_interval(confidence_level=level)
        low, high, p = float(interval.low), float(interval.high), float(test.pvalue)
    out["ci_low"], out["ci_high"] = clip_interval(low, high, bounds)
    out["p_value"] = p
    return out


def ci_band(values: np.ndarray, level: float = 0.95,
            bounds: tuple[float, float] = UNBOUNDED) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-column (mean, lower, upper) of values [S, R] over its S rows, NaN left out: the
    Student-t interval of each column's finite values clipped to ``bounds`` (the point where
    fewer than 2)."""
    values = np.atleast_2d(np.asarray(values, dtype=np.float64))
    mean, low, high = (np.full(values.shape[1], np.nan) for _ in range(3))
    for j in range(values.shape[1]):
        column = values[:, j][np.isfinite(values[:, j])]
        if column.size:
            m, lo, hi = mean_interval(column, bounds, level)
            mean[j], low[j], high[j] = m, m if lo is None else lo, m if hi is None else hi
    return mean, low, high
