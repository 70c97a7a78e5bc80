"""Quantiles from noisy histograms over declared bins: a monotone CDF, interpolation, honest intervals.

Pure post-processing of released values (no OpenDP, no I/O, standard library only): the site, the
broker and the client call :func:`quantile_of`, so they derive the same quantile from the same
counts, and any number of quantiles of one released histogram cost nothing more.

The input is the bin edges t0 < t1 < ... < tm the policy declares and the noisy count c_i of rows in
each bin [t_i, t_(i+1)) (the last bin closed; a value below t0 counts in the first bin, one above
tm in the last), every count with the same noise variance v (pooled over sites, the variances add).

- the CDF at the edges: the cumulative sums S_j = c_0 + ... + c_(j-1) (S_0 = 0), made
  non-decreasing by a least-squares fit (pool adjacent violators) and clipped at 0, over the total
  N = S_m. A fit, not clipping each count at 0: where bins are sparse next to the noise, clipping
  adds the noise's positive draws only, a bias that sums up along the CDF; the fit keeps the
  negative draws, which cancel (the same reason as for survival curves);
- the q-quantile: the first edge t_j with F(t_j) >= q, interpolated linearly within its bin
  (rows are taken as spread evenly over a bin); with a fitted total under one row nothing is known
  beyond the bins' range: the middle of the range, the whole range as the interval;
- its 95% interval inverts a pointwise band on the CDF at the edges: F(t_j) +- z sd_j with
  sd_j^2 = p (1 - p) / N (the sampling variability of an empirical CDF: the interval is for the
  population's quantile, of which the rows are a sample) + v (j (1 - p)^2 + (m - j) p^2) / N^2 (the
  noise, by the delta method in the j counts below t_j and the m - j above), p = F(t_j). The low
  end is where the band's upper curve reaches q, the high end where its lower curve does. With k
  rows per patient the rows are not independent and the sampling part is too small by up to a
  factor k; the bins' width limits the resolution (a quantile inside one bin is interpolated).

The tests check the interval's coverage of the true quantile by simulation (a band half as wide
fails) and that exact sample quantiles fall inside it.

OpenDP's own quantile (the exponential mechanism over the bin edges) is more accurate for a
median at one site at small epsilon (``bench/quantile_accuracy.py``). Its one draw cannot be added
to other sites' by a broker and gives no interval, and a site cannot tell a direct call from a
broker's forward of the same signed request; so a caller asks for it explicitly, with the request
flag ``single_site`` that a broker refuses (:class:`gateway.aggregates.SiteQuantile`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from .answers import Z95, Vector
from .survival import _non_increasing  # pool adjacent violators, shared with survival curves


@dataclass(frozen=True)
class Found:
    """A quantile of a histogram: the value, its 95% interval, and whether the counts were adjusted."""

    q: float
    value: float
    ci_low: float
    ci_high: float
    clamped: bool


@dataclass(frozen=True)
class Cdf:
    """The monotone CDF at every edge, its pointwise 95% band, and the fitted total."""

    edges: tuple[float, ...]
    cdf: tuple[float, ...]
    low: tuple[float, ...]
    high: tuple[float, ...]
    total: float
    clamped: bool


def cdf_of(edges: Sequence[float], counts: Sequence[float], noise_variance: float, z: float = Z95) -> Cdf:
    """The CDF of noisy per-bin ``counts`` at the ``edges`` with its band; see the module docstring."""
    m = len(counts)
    if m < 1 or len(edges) != m + 1:
        raise ValueError(f"{len(edges)} edges need {len(edges) - 1} counts, got {m}")
    raw = [0.0]
    for c in counts:
        raw.append(raw[-1] + c)
    fitted = [max(-s, 0.0) for s in _non_increasing([-s for s in raw])]
    clamped = fitted != raw
    total = fitted[-1]
    if total < 1:
        nothing = tuple([0.0] * m + [1.0])
        return Cdf(tuple(edges), nothing, nothing, nothing, total, True)
    cdf = [min(s / total, 1.0) for s in fitted]
    cdf[0], cdf[-1] = 0.0, 1.0
    low, high = [0.0], [0.0]
    for j in range(1, m):
        p = cdf[j]
        variance = p * (1 - p) / total + noise_variance * (j * (1 - p) ** 2 + (m - j) * p ** 2) / total ** 2
        spread = z * math.sqrt(variance)
        low.append(max(low[-1], p - spread, 0.0))
        high.append(max(high[-1], min(p + spread, 1.0)))
    low.append(1.0)
    high.append(1.0)
    return Cdf(tuple(edges), tuple(cdf), tuple(low), tuple(high), total, clamped)


def _inverse(edges: Sequence[float], curve: Sequence[float], q: float) -> float:
    """The first t where the piecewise linear, non-decreasing ``curve`` over ``edges`` reaches q."""
    for j in range(1, len(curve)):
        if curve[j] >= q:
            below = curve[j - 1]
            if below >= q:
                return edges[j - 1]
            return edges[j - 1] + (q - below) / (curve[j] - below) * (edges[j] - edges[j - 1])
    return edges[-1]


def quantiles_of(edges: Sequence[float], counts: Sequence[float], noise_variance: float,
                 qs: Sequence[float]) -> list[Found]:
    """Each q-quantile in ``qs`` of one histogram (post-processing: one release, any number of quantiles)."""
    band = cdf_of(edges, counts, noise_variance)
    if band.total < 1:  # nothing is known beyond the range
        middle = (edges[0] + edges[-1]) / 2
        return [Found(q, middle, edges[0], edges[-1], True) for q in qs]
    return [Found(q, _inverse(edges, band.cdf, q), _inverse(edges, band.high, q), _inverse(edges, band.low, q),
                  band.clamped) for q in qs]


def quantile_of(edges: Sequence[float], counts: Sequence[float], noise_variance: float, q: float) -> Found:
    """The q-quantile of one histogram with its 95% interval."""
    return quantiles_of(edges, counts, noise_variance, (q,))[0]


def histogram_vector(counts: Sequence[float], std_error: float, half_width: float) -> Vector:
    """The counts as shown: clipped at 0, each with the noise's standard error and 95% interval."""
    shown = tuple(max(c, 0.0) for c in counts)
    return Vector(shown, (std_error,) * len(counts), tuple(max(c - half_width, 0.0) for c in counts),
                  tuple(max(c + half_width, 0.0) for c in counts), (len(counts),))


def histogram_note(label: str, column: str, edges: Sequence[float], quantile: bool = False) -> str:
    """What a reader of a histogram or quantile answer should know about its bins."""
    what = ("interpolated within the bins of the noisy histogram over" if quantile
            else "rows per bin, noisy, over")
    return (f"{label}: {what} the {len(edges) - 1} declared bins {edges[0]:g}..{edges[-1]:g} of {column} "
            f"([t0, t1), ..., [t(m-1), tm]); a {column} below {edges[0]:g} counts in the first bin and one above "
            f"{edges[-1]:g} in the last; rows whose {column} is missing are left out")
