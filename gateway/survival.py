"""Kaplan-Meier survival from noisy per-bin counts: the curve, its band, numbers at risk, the median.

Pure post-processing of released values (no OpenDP, no I/O, standard library only): the site, the
broker and the client all call :func:`kaplan_meier`, so they derive the same curve from the same
counts.

The input is the time grid t_0 < t_1 < ... < t_m that the policy declares and, at each grid time,
the noisy number of events d_i and of censorings c_i in (t_(i-1), t_i] (at t_0: up to t_0), every
element with the same noise variance v (pooled over sites, the sites' variances add). Each patient
row lands in exactly one of these counts (a time past t_m is censored at t_m), so:

- at risk at t_i (after t_(i-1)): n_i = sum over j >= i of (d_j + c_j), which is the total minus
  the removals up to t_(i-1), clamped at 0 (shown with the events clamped into [0, n_i]);
- the hazard h_i = d_i / n_i, with the noisy d_i as released (at most 1; 0 with less than one
  patient at risk), and the product of (1 - h_j) over j <= i, made non-increasing by a
  least-squares fit (pool adjacent violators) and clipped to [0, 1]: that is S(t_i). Clamping
  each d_i at 0 instead would keep the product monotone too, but where events are rare next to
  the noise it adds a bias at every time that sums up (in the tests, a 5-year survival of 0.90 came
  out as 0.57 on average at epsilon 0.1 over about 1,600 patients); the fit keeps the noise's
  positive and negative draws, which cancel;
- the variance of log S(t_i) is Greenwood's G_i = sum over j <= i of d_j / (n_j (n_j - d_j)) (the
  sampling variance) plus the variance the noise adds, by the delta method in the 2(m + 1)
  independent noise terms. With r_j = n_j - d_j, log S(t_i) = sum over j <= i of (log r_j - log
  n_j); an event at t_l is in n_j for j <= l and in r_j for j < l, a censoring at t_l in both for
  j <= l. So d log S(t_i) / d d_l = G_(l-1) - 1/n_l and d log S(t_i) / d c_l = G_l for l <= i (G_(-1)
  = 0), and both are G_i for l > i (a removal after t_i was at risk at every time up to t_i):

      noise(i) = v * (sum over l <= i of [(G_(l-1) - 1/n_l)^2 + G_l^2] + 2 (m - i) G_i^2)

- the pointwise 95% band is the log-log ("exponential Greenwood") interval, as lifelines draws it:
  theta = log(-log S), sd = sqrt(G_i + noise(i)) / |log S|, [exp(-exp(theta + z sd)),
  exp(-exp(theta - z sd))]; where S = 1 it is [exp(-z sqrt(V)), 1], where S = 0 it is [0, the
  band's upper end before];
- median survival: the first t_i with S(t_i) <= 0.5; its interval runs from the first t_i where
  the lower band is <= 0.5 to the first where the upper band is (NaN where not reached).

The variance is evaluated at the released values (events clamped for Greenwood's sum). Where
counts are small the delta method is rough: in the divisions, n and n - d are taken as at least 1,
and the band widens towards [0, 1] as the number at risk falls towards the noise. The tests check
the band's coverage, of the true survival function and of the exact curve, at epsilon 1 and 0.1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from .answers import Z95


@dataclass(frozen=True)
class Curve:
    """A Kaplan-Meier curve at the grid's times, with its accuracy, and its median."""

    times: tuple[float, ...]
    survival: tuple[float, ...]
    ci_low: tuple[float, ...]
    ci_high: tuple[float, ...]
    std_error: tuple[float, ...]
    noise_std_error: tuple[float, ...]
    noise_ci_low: tuple[float, ...]  # the band of the noise alone (what the band would be for these patients)
    noise_ci_high: tuple[float, ...]
    at_risk: tuple[float, ...]
    events: tuple[float, ...]
    median: float
    median_low: float
    median_high: float
    clamped: bool


def split_counts(values: Sequence[float]) -> tuple[list[float], list[float]]:
    """A released survival vector (events at each grid time, then censorings) as its two halves."""
    m = len(values) // 2
    return list(values[:m]), list(values[m:])


def kaplan_meier(times: Sequence[float], events: Sequence[float], censored: Sequence[float],
                 noise_variance: float, z: float = Z95) -> Curve:
    """The curve from (noisy) counts at each of the grid's ``times``; see the module docstring."""
    n_times = len(times)
    if n_times < 1 or len(events) != n_times or len(censored) != n_times:
        raise ValueError(f"a grid of {n_times} times needs {n_times} event and {n_times} censoring counts, got "
                         f"{len(events)} and {len(censored)}")
    at_risk, deaths, clamped = numbers_at_risk(events, censored)
    raw, greenwood, noise = [], [], []
    s, g, sum_squares = 1.0, 0.0, 0.0
    for i in range(n_times):
        n, d = at_risk[i], deaths[i]
        if n >= 1:  # the noisy events, unclamped: clamping each at 0 would add up to a bias over many times
            s *= 1 - min(events[i] / n, 1.0)
        n_safe, r_safe = max(n, 1.0), max(n - d, 1.0)
        before = g
        g += d / (n_safe * r_safe)
        sum_squares += (before - 1 / n_safe) ** 2 + g ** 2
        raw.append(s)
        greenwood.append(g)
        noise.append(noise_variance * (sum_squares + 2 * (n_times - 1 - i) * g ** 2))
    survival = [min(max(x, 0.0), 1.0) for x in _non_increasing(raw)]
    clamped = clamped or survival != raw
    lows, highs = _bands(survival, [g + v for g, v in zip(greenwood, noise, strict=True)], z)
    noise_lows, noise_highs = _bands(survival, noise, z)
    errors = tuple(s * math.sqrt(g + v) for s, g, v in zip(survival, greenwood, noise, strict=True))
    noise_errors = tuple(s * math.sqrt(v) for s, v in zip(survival, noise, strict=True))
    grid = tuple(float(t) for t in times)
    return Curve(grid, tuple(survival), tuple(lows), tuple(highs), errors, noise_errors, noise_lows, noise_highs,
                 tuple(at_risk), tuple(deaths), _first_at_or_below(grid, survival),
                 _first_at_or_below(grid, lows), _first_at_or_below(grid, highs), clamped)


def _non_increasing(values: Sequence[float]) -> list[float]:
    """The least-squares non-increasing fit of ``values`` (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [sum, count] of each pooled run
    for value in values:
        blocks.append([value, 1.0])
        while len(blocks) > 1 and blocks[-2][0] * blocks[-1][1] < blocks[-1][0] * blocks[-2][1]:
            total, count = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += count
    return [total / count for total, count in blocks for _ in range(int(count))]


def numbers_at_risk(events: Sequence[float], censored: Sequence[float]) -> tuple[list[float], list[float], bool]:
    """(at risk at each grid time, events there, whether any was clamped): n_i >= 0, 0 <= d_i <= n_i."""
    m = len(events)
    raw = [0.0] * m
    total = 0.0
    for i in range(m - 1, -1, -1):  # suffix sums: everyone removed at grid time i or later
        total += events[i] + censored[i]
        raw[i] = total
    at_risk = [max(n, 0.0) for n in raw]
    deaths = [min(max(d, 0.0), n) for d, n in zip(events, at_risk, strict=True)]
    clamped = at_risk != raw or deaths != list(events)
    return at_risk, deaths, clamped


def _bands(survival: Sequence[float], variances: Sequence[float], z: float) -> tuple[tuple[float, ...],
                                                                                    tuple[float, ...]]:
    """The pointwise bands (lows, highs) of a curve with Var(log S) = ``variances``."""
    lows: list[float] = []
    highs: list[float] = []
    for s, variance in zip(survival, variances, strict=True):
        low, high = _band(s, variance, z, highs[-1] if highs else 1.0)
        lows.append(low)
        highs.append(high)
    return tuple(lows), tuple(highs)


def _band(s: float, variance: float, z: float, previous_high: float) -> tuple[float, float]:
    """The log-log 95% interval of S with Var(log S) = ``variance``, within [0, 1]."""
    if s <= 0:
        return 0.0, previous_high
    sd = math.sqrt(variance)
    if s >= 1:
        return math.exp(-z * sd), 1.0
    log_s = math.log(s)
    theta, spread = math.log(-log_s), z * sd / -log_s
    return _survival_at(theta + spread), _survival_at(theta - spread)


def _survival_at(theta: float) -> float:
    """exp(-exp(theta)): S from its log-log, 0 where exp(theta) overflows (S near 1 with a wide band)."""
    return math.exp(-math.exp(theta)) if theta < 700 else 0.0


def _first_at_or_below(times: Sequence[float], values: Sequence[float], level: float = 0.5) -> float:
    """The first time whose value is <= ``level``; NaN when none is."""
    return next((t for t, v in zip(times, values, strict=True) if v <= level), math.nan)
