"""Argument checks shared by the JAX mechanisms (applied only to concrete, non-traced values)."""

from __future__ import annotations

import numbers

import numpy as np


def concrete_value(value) -> float | None:
    """Returns ``value`` as a float when it is a Python or NumPy scalar, else None (traced)."""
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return float(value)
    return None


def check_positive(name: str, value) -> None:
    """Raises ValueError if a concrete ``value`` is not > 0 (NaN included)."""
    concrete = concrete_value(value)
    if concrete is not None and not concrete > 0.0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


def check_non_negative(name: str, value) -> None:
    """Raises ValueError if a concrete ``value`` is not >= 0 (NaN included)."""
    concrete = concrete_value(value)
    if concrete is not None and not concrete >= 0.0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")


def check_positive_int(name: str, value) -> None:
    """Raises ValueError unless ``value`` is a Python int > 0 (a static size)."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive Python int (a static size), got {value!r}")
