"""Answer values and their accuracy: released estimates, the noisy parts behind them, and intervals.

Everything here is post-processing of values already released, so it is free of OpenDP, DuckDB,
sqlglot and pydantic: site, broker and client all import it. No noise is drawn here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

Scalar = int | float | str
Z95 = 1.959963984540054


@dataclass(frozen=True)
class Part:
    """One released noisy quantity behind an estimate (a count, a sum, ...), in the estimate's units.

    ``half_width`` is the half-width of the central 95% interval of its noise, from the noise's
    actual distribution: one site's discrete Laplace, or once pooled the sum of the sites' (see
    :mod:`gateway._intervals`). ``sources`` lists those independent noises as (scale, lattice
    step), in the part's units; it is empty when unknown (a part read back from a broker's answer).
    A vector part (per-bin counts, say) holds its ``values`` row-major with their ``shape``, each
    with the same noise; its ``value`` is NaN.
    """

    name: str
    value: float
    std_error: float
    half_width: float
    noise_scale: float
    values: tuple[float, ...] = ()
    shape: tuple[int, ...] = ()
    sources: tuple[tuple[float, float], ...] = ()

    @staticmethod
    def pooled(parts: list[Part]) -> Part:
        """Parts of the same name from several sites: values add (element by element), and so do their noises."""
        head = parts[0]
        se = math.sqrt(sum(p.std_error ** 2 for p in parts))
        sources = tuple(s for p in parts for s in p.sources) if all(p.sources for p in parts) else ()
        half = noise_half_width([(1.0, p) for p in parts]) if sources else Z95 * se
        if not head.shape:
            return Part(head.name, sum(p.value for p in parts), se, half, math.nan, sources=sources)
        if any(p.shape != head.shape or len(p.values) != len(head.values) for p in parts):
            raise ValueError(f"{head.name}: the sites' vectors have different shapes")
        values = tuple(math.fsum(column) for column in zip(*(p.values for p in parts), strict=True))
        return Part(head.name, math.nan, se, half, math.nan, values, head.shape, sources)


def noise_half_width(terms: list[tuple[float, Part]]) -> float:
    """The 95% half-width of the noise of sum(coefficient x part), from the parts' noise sources.

    A normal approximation from the standard errors when a part's sources are unknown.
    """
    if any(not part.sources for _, part in terms):
        return Z95 * math.sqrt(sum((c * part.std_error) ** 2 for c, part in terms))
    from ._intervals import half_width  # numpy: servers only (the client never pools)

    try:
        return half_width([(c, scale, step) for c, part in terms for scale, step in part.sources])
    except (ArithmeticError, ValueError):  # scales no site releases (a broker checks answers): approximate
        return Z95 * math.sqrt(sum((c * part.std_error) ** 2 for c, part in terms))


@dataclass(frozen=True)
class Vector:
    """A vector estimate (a survival curve), element by element: values, std errors, 95% intervals."""

    values: tuple[float, ...]
    std_errors: tuple[float, ...]
    ci_lows: tuple[float, ...]
    ci_highs: tuple[float, ...]
    shape: tuple[int, ...]

    def withheld(self) -> Vector:
        """The same shape with every value and interval withheld (NaN)."""
        nan = (math.nan,) * len(self.values)
        return Vector(nan, nan, nan, nan, self.shape)


@dataclass(frozen=True)
class Value:
    """What post-processing of an aggregate's parts gives: the estimate and its accuracy."""

    value: float
    std_error: float
    half_width: float
    ci_low: float
    ci_high: float
    clamped: bool = False
    vector: Vector | None = None


@dataclass(frozen=True)
class Estimate:
    """One released value with its accuracy, the parts it was computed from and its kind."""

    aggregate: str
    function: str
    value: float
    std_error: float
    noise_scale: float
    ci_low: float
    ci_high: float
    ci_half_width: float
    mechanism: str
    epsilon: Fraction
    suppressed: bool = False
    clamped: bool = False
    parts: tuple[Part, ...] = ()
    bounds: tuple[float, float] | None = None
    vector: Vector | None = None
    edges: tuple[float, ...] = ()
    level: float = 0.0  # a quantile's q (0: the kind is no quantile)
    column_bounds: tuple[tuple[float, float], ...] = ()  # each column's, for kinds over several bounded columns
    rank_error_95: float = math.nan  # a single-site quantile's public 95% bound on its rank error (in rows)

    def withheld(self) -> Estimate:
        """The same estimate suppressed: its value, interval and any vector withheld from display.

        The released parts are kept: suppression is presentation, not privacy (they are noisy
        already), and a broker needs them to pool the cell with other sites'.
        """
        return Estimate(self.aggregate, self.function, math.nan, self.std_error, self.noise_scale, math.nan,
                        math.nan, self.ci_half_width, self.mechanism, self.epsilon, suppressed=True,
                        parts=self.parts, bounds=self.bounds,
                        vector=self.vector.withheld() if self.vector is not None else None, edges=self.edges,
                        level=self.level, column_bounds=self.column_bounds, rank_error_95=self.rank_error_95)


@dataclass(frozen=True)
class Row:
    """One public group (empty keys without group-by) and its estimates."""

    keys: tuple[Scalar, ...]
    estimates: tuple[Estimate, ...]


def symmetric(value: float, std_error: float, half_width: float, clamped: bool = False) -> Value:
    """An estimate with the interval value ± half_width."""
    return Value(value, std_error, half_width, value - half_width, value + half_width, clamped)


def discrete_laplace_std(scale: float) -> float:
    """Standard deviation of the discrete Laplace with ``scale`` b: sqrt(2a)/(1-a), a = exp(-1/b).

    Computed without cancellation at both ends: 1 - a = -expm1(-1/b) for a huge b, and a = 0 (no
    noise worth the name) for a tiny one.
    """
    a = math.exp(-1.0 / scale)
    return math.sqrt(2 * a) / -math.expm1(-1.0 / scale)


def discrete_laplace_half_width(scale: float, level: float = 0.95) -> float:
    """Smallest integer t with P(|X| <= t) >= level for the discrete Laplace with ``scale`` b.

    P(|X| > t) = 2 a^(t+1) / (1 + a), a = exp(-1/b), so t = ceil(b * log(1 / tail) - 1), with
    log(a) = -1/b taken exactly (it underflows to 0 for a tiny b and rounds to 1 for a huge one).
    """
    a = math.exp(-1.0 / scale)
    tail = (1 - level) * (1 + a) / 2
    return float(max(0, math.ceil(-math.log(tail) * scale - 1 - 1e-12)))
