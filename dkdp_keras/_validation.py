"""Argument checks shared by constructors: each error names the argument,
the value and what is allowed."""

import math


def number(name, value, low=None, high=None, low_open=False, high_open=False,
           integer=False):
    """Check that `value` is a real (or integer) number within the bounds."""
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        try:
            import numpy as np

            ok = isinstance(value, np.integer if integer else (np.integer, np.floating))
        except ImportError:  # pragma: no cover
            ok = False
        if not ok:
            what = "an integer" if integer else "a number"
            raise TypeError(f"{name} must be {what}, got {value!r}.")
    if not integer and not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number, got {value!r}.")
    bad_low = low is not None and (value <= low if low_open else value < low)
    bad_high = high is not None and (value >= high if high_open else value > high)
    if bad_low or bad_high:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        raise ValueError(
            f"{name} must be in {left}{lo}, {hi}{right}, got {value!r}."
        )
    return int(value) if integer else float(value)


def sparsity(name, value):
    """A target sparsity: a number in [0, 1)."""
    return number(name, value, low=0.0, high=1.0, high_open=True)


def choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}.")
    return value
