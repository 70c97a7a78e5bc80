"""Central intervals from the noise's actual distribution: sums of independent discrete Laplace noises.

One site's released value carries OpenDP's discrete Laplace noise on its fixed-point lattice: the
integer noise D with P(D = d) proportional to a^|d|, a = exp(-1/b), times the lattice's spacing.
A pooled value carries one such noise per site, and a mean's error is, to first order, a linear
combination of its sum's and its count's noises. The central 95% interval of such a combination is
computed here from the exact distributions, not from a normal approximation (which is too narrow
for one Laplace noise: 2.77 scales where 3.00 are needed).

One noise alone: its exact quantile, closed form. Several: their distributions convolved (FFT) on a
grid. When every term lives on the same lattice the grid is that lattice and the result is exact;
otherwise each term's mass is binned exactly into grid cells of width h, which moves each term by
at most h/2, and the half-width returned is widened by the sum of those moves, so it never covers
less than asked. Mass beyond the grid (tails of probability under 1e-12) counts as outside.

Post-processing of released values only: no noise is drawn here. numpy is imported on first use
(the researcher's client does not ship this module and never calls it).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache

from .answers import discrete_laplace_half_width

# (coefficient, scale, step): coefficient x step x D, D the integer discrete Laplace with scale
# scale/step (step NaN or 0: a continuous Laplace with this scale, for an answer that lacks its step)
Term = tuple[float, float, float]

_GRID = 1 << 12      # grid points when terms have different lattices
_EXACT_GRID = 1 << 16  # the most lattice points used for the exact computation
_TAIL = 30.0         # each term is truncated at 30 scales (tail mass e^-30 per side)


def half_width(terms: Sequence[Term], level: float = 0.95) -> float:
    """The smallest t with P(|sum of coefficient x noise| <= t) >= ``level`` (up to the grid, rounded up)."""
    # a lattice far finer than the noise is a continuous Laplace for every purpose here
    live = tuple(sorted((abs(c), s, st if st > 0 and math.isfinite(st) and s / st < 1e9 else 0.0) for c, s, st in terms
                        if c != 0 and s > 0 and math.isfinite(c) and math.isfinite(s)))
    if not live:
        return 0.0
    return _half_width(live, level)


@lru_cache(maxsize=8192)
def _half_width(terms: tuple[Term, ...], level: float) -> float:
    if len(terms) == 1:
        coef, scale, step = terms[0]
        if step == 0:
            return coef * scale * math.log(1 / (1 - level))
        return coef * step * discrete_laplace_half_width(scale / step, level)
    import numpy as np

    spacings = {coef * step for coef, _, step in terms}
    sd = math.sqrt(sum((coef * scale) ** 2 * 2 for coef, scale, _ in terms))
    reach = 12 * sd + _TAIL * max(coef * scale for coef, scale, _ in terms)
    (common,) = spacings if len(spacings) == 1 else (0.0,)
    exact = common > 0 and reach / common <= _EXACT_GRID / 2
    step = common if exact else 2 * reach / _GRID
    half = math.ceil(reach / step)
    size = 2 * half + 1
    n_fft = 1 << (2 * size - 1).bit_length()
    total = np.ones(n_fft // 2 + 1, dtype=complex)
    for (coef, scale, lattice), times in Counter(terms).items():  # identical sites' noises: one transform
        total *= np.fft.rfft(_binned(np, coef, scale, lattice, step, half), n_fft) ** times
    # the sum's support is twice as wide; centre it and keep |x| <= reach
    dist = _centred(np, np.fft.irfft(total, n_fft), len(terms), half)
    dist = np.clip(dist, 0.0, None)
    inside = np.cumsum(dist[half:] + np.concatenate(([0.0], dist[:half][::-1])))
    j = int(np.searchsorted(inside, level))
    if j >= len(inside):
        raise ArithmeticError("the noise's distribution did not fit its grid")
    widen = 0.0 if exact else len(terms) * step / 2
    return j * step + widen


def _centred(np, conv, n_terms: int, half: int):  # type: ignore[no-untyped-def]
    """The circular convolution of ``n_terms`` arrays each centred at index ``half``, at -half..half about 0.

    The FFT's length is at least twice the grid's, so mass wraps onto the window only from beyond
    three times the grid's reach, where the sum has none worth counting.
    """
    return np.take(conv, np.arange(-half, half + 1) + n_terms * half, mode="wrap")


def _binned(np, coef: float, scale: float, lattice: float, step: float, half: int):  # type: ignore[no-untyped-def]
    """P(coef x noise in each grid cell [x - step/2, x + step/2)), x = -half..half steps."""
    edges = (np.arange(-half, half + 2) - 0.5) * step
    if lattice == 0:  # continuous Laplace with scale coef x scale
        b = coef * scale
        cdf = np.where(edges < 0, 0.5 * np.exp(np.minimum(edges, 0) / b), 1 - 0.5 * np.exp(-np.maximum(edges, 0) / b))
    else:  # P(D <= k) for the integer discrete Laplace, at k = ceil(edge / spacing) - 1
        b = scale / lattice
        a = math.exp(-1 / b)
        k = np.ceil(edges / (coef * lattice) - 1e-9) - 1
        cdf = np.where(k < 0, np.power(a, np.maximum(-k, 0)) / (1 + a),
                       1 - np.power(a, np.maximum(k, 0) + 1) / (1 + a))
    return np.diff(cdf)
