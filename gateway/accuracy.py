"""Accuracy of released values: noise distributions' spread and intervals (no noise is drawn here).

Kept free of OpenDP so that the broker, which only combines released values, stays light.
"""

from __future__ import annotations

import math

Z95 = 1.959963984540054


def ratio_estimate(total: float, count: float, total_se: float, count_se: float, low: float,
                   high: float) -> tuple[float, float, bool]:
    """A mean from a noisy sum and count: (value clamped to bounds, delta-method std error, clamped?).

    With a count under 1 nothing is known beyond the bounds: the midpoint, with half the range as error.
    """
    if count < 1:
        return (low + high) / 2, (high - low) / 2, True
    ratio = total / count
    value = min(max(ratio, low), high)
    se = math.sqrt(total_se ** 2 + value ** 2 * count_se ** 2) / count
    return value, se, value != ratio


def discrete_laplace_std(scale: float) -> float:
    """Standard deviation of the discrete Laplace with ``scale`` b: sqrt(2a)/(1-a), a = exp(-1/b)."""
    a = math.exp(-1.0 / scale)
    return math.sqrt(2 * a) / (1 - a)


def discrete_laplace_half_width(scale: float, level: float = 0.95) -> float:
    """Smallest integer t with P(|X| <= t) >= level for the discrete Laplace with ``scale`` b.

    P(|X| > t) = 2 a^(t+1) / (1 + a), a = exp(-1/b).
    """
    a = math.exp(-1.0 / scale)
    tail = (1 - level) * (1 + a) / 2
    return float(max(0, math.ceil(math.log(tail) / math.log(a) - 1 - 1e-12)))
