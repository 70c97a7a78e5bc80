"""Intervals from the noise's actual distribution: one site's discrete Laplace, sums of several, a mean's error.

References are computed independently here: brute-force convolution of probability mass functions,
and Monte Carlo with a fixed seed (numpy's generator; these draws only check post-processing).
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from gateway._intervals import half_width
from gateway._mechanisms import Component, scale_for
from gateway._proto.gateway.v1 import gateway_pb2 as pb
from gateway._wire import part_to_wire, parts_from_wire
from gateway.aggregates import KINDS, Declared
from gateway.answers import Z95, Part, discrete_laplace_half_width, discrete_laplace_std


def dl_pmf(scale: float, reach: int) -> np.ndarray:
    """P(D = d) for d = -reach..reach, D the integer discrete Laplace with ``scale``."""
    a = math.exp(-1 / scale)
    d = np.arange(-reach, reach + 1)
    return (1 - a) / (1 + a) * a ** np.abs(d)


def dl_draws(rng: np.random.Generator, scale: float, n: int) -> np.ndarray:
    """Discrete Laplace draws: the difference of two geometric variables."""
    p = 1 - math.exp(-1 / scale)
    return (rng.geometric(p, n) - rng.geometric(p, n)).astype(float)


def smallest_integer_cover(pmf: np.ndarray, level: float = 0.95) -> int:
    middle = len(pmf) // 2
    for t in range(middle + 1):
        if pmf[middle - t:middle + t + 1].sum() >= level:
            return t
    raise AssertionError("no cover")


def test_one_noise_is_its_exact_quantile_and_wider_than_the_normal_approximation() -> None:
    for scale in (0.5, 1.0, 7.3, 250.0):
        assert half_width([(1.0, scale, 1.0)]) == discrete_laplace_half_width(scale)
        assert half_width([(1.0, scale, 1.0)]) == smallest_integer_cover(dl_pmf(scale, int(60 * scale) + 5))
    # the normal approximation misses: a Laplace's 95% quantile is 3.00 scales, the normal's 2.77
    assert half_width([(1.0, 100.0, 0.0)]) == pytest.approx(100 * math.log(20))
    assert Z95 * math.sqrt(2) * 100 < 0.93 * half_width([(1.0, 100.0, 0.0)])


@pytest.mark.parametrize("scales", [(1.0, 1.0, 1.0, 1.0), (2.0, 3.0, 5.0), (0.7,) * 8])
def test_pooled_counts_on_one_lattice_are_exact(scales: tuple[float, ...]) -> None:
    reach = int(40 * max(scales)) + 5
    pmf = np.array([1.0])
    for scale in scales:
        pmf = np.convolve(pmf, dl_pmf(scale, reach))
    assert half_width([(1.0, s, 1.0) for s in scales]) == smallest_integer_cover(pmf)


@pytest.mark.parametrize("terms", [
    [(0.01, 250.0, 1.0)] * 3 + [(0.3, 5.0, 1.0)] * 3,        # a mean's sums and counts over three sites
    [(1.0, 3.0, 1.0), (1.0, 30.0, 0.01)],                   # two lattices
    [(1 / 40, 67.5, 0.5), (-0.4, 2.5, 1.0)],                 # one site's mean: half units and a count
])
def test_mixed_lattices_match_the_monte_carlo_quantile(terms: list[tuple[float, float, float]]) -> None:
    rng = np.random.default_rng(20261124)
    n = 400_000
    total = np.zeros(n)
    for coef, scale, step in terms:
        total += coef * step * dl_draws(rng, scale / step, n)
    got = half_width(terms)
    q = float(np.quantile(np.abs(total), 0.95))
    assert got == pytest.approx(q, rel=0.02)  # the grid's widening is well under 1%; Monte Carlo's error ~0.5%
    assert 0.945 <= float(np.mean(np.abs(total) <= got)) <= 0.958


def test_hostile_scales_give_a_finite_width_or_the_normal_fallback() -> None:
    assert math.isfinite(half_width([(1.0, 1.0, 1e-300), (1.0, 1.0, 1.0)]))
    assert half_width([]) == 0.0
    assert half_width([(0.0, 5.0, 1.0)]) == 0.0


def test_a_sites_part_carries_its_noise_and_a_broker_pools_it_exactly() -> None:
    scale = scale_for(1, Fraction(1, 2))
    component = Component("count", 1, Fraction(1, 2), scale, 1)
    part = component.part([100])
    assert part.sources == ((scale, 1.0),)
    wire = part_to_wire(part)
    assert wire.lattice == 1.0
    back = parts_from_wire(pb.Estimate(components=[wire]))["count"]
    assert back.sources == part.sources
    pooled = Part.pooled([back, back, back, back])
    reach = int(40 * scale) + 5
    pmf = np.array([1.0])
    for _ in range(4):
        pmf = np.convolve(pmf, dl_pmf(scale, reach))
    assert pooled.half_width == smallest_integer_cover(pmf)
    # once pooled, no single lattice describes the noise: the wire says 0, and a reader falls back
    assert part_to_wire(pooled).lattice == 0.0
    assert parts_from_wire(pb.Estimate(components=[part_to_wire(pooled)]))["count"].sources == ()


def test_a_means_interval_covers_95_percent_of_its_noisy_answers() -> None:
    """One site's mean at epsilon 0.5 over 60 values in [18, 99]: the interval of every noisy answer.

    A 2x narrower interval would cover about 70%, a normal approximation a little under 95%.
    """
    rng = np.random.default_rng(7)
    low, high, n, true_mean, epsilon = 18.0, 99.0, 60, 71.0, Fraction(1, 2)
    mean = KINDS["mean"]
    sum_spec, count_spec = mean.components
    # the site's integer noise: the sum in half units (sensitivity 81) and the count (1)
    sum_scale, count_scale = scale_for(81, epsilon * sum_spec.share), scale_for(1, epsilon * count_spec.share)
    draws = 2000
    sums = n * (true_mean - (low + high) / 2) * 2 + dl_draws(rng, sum_scale, draws)
    counts = n + dl_draws(rng, count_scale, draws)
    covered = widths = 0.0
    for s, c in zip(sums, counts, strict=True):
        parts = {"sum": Part("sum", s / 2, discrete_laplace_std(sum_scale) / 2, 0, sum_scale / 2,
                             sources=((sum_scale / 2, 0.5),)),
                 "count": Part("count", c, discrete_laplace_std(count_scale), 0, count_scale,
                               sources=((count_scale, 1.0),))}
        value = mean.estimate(parts, Declared((low, high)), clamp=True)
        covered += value.ci_low <= true_mean <= value.ci_high
        widths += value.half_width
    assert 0.935 <= covered / draws <= 0.965
    assert widths / draws > 1.03 * Z95 * discrete_laplace_std(sum_scale) / 2 / n  # wider than a normal's
