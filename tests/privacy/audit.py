"""Empirical privacy auditing: a statistical lower bound on the privacy a release really loses.

A release M is epsilon-DP when, for every pair of neighbouring datasets D and D' and every set S
of outputs, P[M(D') in S] <= e^epsilon P[M(D) in S], and the same with D and D' swapped. Draw M
n times on D and n times on D', count how often an event S happens under each, and the ratio of
the two frequencies estimates e^(loss on S). One-sided Clopper-Pearson bounds make it a
confidence bound: with p_low a lower bound on the larger probability and q_high an upper bound on
the smaller, log(p_low / q_high) is at most the true loss on S unless one of the two bounds
failed. The largest of these over a fixed family of events, each bound at alpha / (2 x the number
of events) (Bonferroni), is a lower bound on the release's epsilon at confidence 1 - alpha. A
release that loses more than it is charged shows up as a lower bound above the charge.

The events are chosen from the exact aggregates and the plan, never from the samples. Let x and x'
be the exact vectors on D and D' and d = x' - x; only coordinates with d != 0 take part, and
"progress" a = (y - x) / d measures how far a noisy coordinate y went from D's value (0) to D''s (1):

- product events: every coordinate has a >= t ("towards D'"), or a <= 1 - t ("towards D"), for
  offsets t in :data:`OFFSETS`. One coordinate gives a tail event; several (groups of a vector, or
  the components of one aggregate, sampled independently as the site noises them) give a product
  event, whose loss is the sum of the coordinates' losses: what basic composition charges. For the
  discrete Laplace at the worst case, every t >= 1 has a likelihood ratio of exactly e^epsilon, so
  the family holds an optimal event; the other offsets are there for tails that are not Laplace.
- likelihood-ratio events (Neyman-Pearson): the log-likelihood ratio of y under the *planned*
  discrete Laplace is at least (or, towards D, at most minus) a fraction :data:`LIKELIHOOD` of its
  largest value. With many coordinates these are likelier than the product event, so they see
  more of the loss at a given n.

Samples come from OpenDP through the site's own noise source. One call on n copies of an exact
vector is n independent releases (OpenDP's vector Laplace noises each entry independently), and
it is 4-10x faster than n calls (about 7 us a sample).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
from scipy.stats import beta

from gateway._mechanisms import Component, Noise, measurement

# The reported bound is at 95%. Tests decide at a far stricter level: the discrete Laplace meets its
# charge exactly at the worst case, so a correct release would exceed a 95% bound in up to 5% of runs.
# At 1e-6 a correct release fails less than once in a million runs per claim, and planted bugs still show.
REPORT_ALPHA = 0.05
FAIL_ALPHA = 1e-6
OFFSETS = (0.5, 1.0, 1.5, 2.0, 3.0)
LIKELIHOOD = (0.5, 0.75)

Sampler = Callable[[Component, tuple[int, ...], int], np.ndarray]
Test = Callable[[np.ndarray, np.ndarray], np.ndarray]


def site_noise(component: Component, exact: tuple[int, ...], n: int) -> np.ndarray:
    """``n`` releases of ``exact`` by the site's noise source, one row each."""
    noisy = Noise().apply(component, exact * n)
    return np.asarray(noisy, dtype=np.int64).reshape(n, len(exact))


def noise_scaled_by(factor: float) -> Sampler:
    """A planted bug: OpenDP's measurement at ``factor`` times the component's planned scale."""
    def draw(component: Component, exact: tuple[int, ...], n: int) -> np.ndarray:
        noisy = measurement(component.scale * factor)(list(exact) * n)
        return np.asarray(noisy, dtype=np.int64).reshape(n, len(exact))
    return draw


@dataclass(frozen=True)
class Released:
    """One noisy component as the site releases it: its plan, its exact vector on D and on D'."""

    component: Component
    base: tuple[int, ...]
    neighbour: tuple[int, ...]

    @property
    def distance(self) -> int:
        """L1 distance between the exact vectors: at most the component's sensitivity."""
        return sum(abs(a - b) for a, b in zip(self.neighbour, self.base, strict=True))


@dataclass(frozen=True)
class LowerBound:
    """The audit of one claim: a release charged ``charged``, and what the samples prove it loses."""

    claim: str
    charged: Fraction
    lower95: float
    strict: float
    plug_in: float
    event: str
    samples: int
    seconds: float

    def row(self) -> str:
        """One line of the audit table."""
        return (f"{self.claim:<56} {float(self.charged):>7.4f} {self.lower95:>7.4f} {self.strict:>7.4f} "
                f"{self.plug_in:>7.4f} {self.samples:>7} {self.seconds:>6.2f}s  {self.event}")


HEADER = (f"{'release / component':<56} {'charged':>7} {'lb 95%':>7} {'lb 1e-6':>7} {'plug-in':>7} "
          f"{'n':>7} {'time':>7}  best event (95%)")


def audit(name: str, released: Sequence[Released], charged: Fraction, n: int,
          sampler: Sampler = site_noise) -> list[LowerBound]:
    """Lower bounds for each component at its own share of epsilon, then for the whole release.

    Each of ``released`` is sampled ``n`` times on D and ``n`` times on D', independently of the
    others, as the site noises them; ``seconds`` is the sampling time of them all.
    """
    start = time.perf_counter()
    draws = [_Draws.of(r, sampler(r.component, r.base, n), sampler(r.component, r.neighbour, n)) for r in released]
    seconds = time.perf_counter() - start
    claims: list[tuple[str, Fraction, list[_Draws]]] = []
    if len(draws) > 1:
        claims += [(f"{name} / {r.component.name}", r.component.epsilon, [d])
                   for r, d in zip(released, draws, strict=True)]
    claims.append((name, charged, draws))
    return [_bound(claim, epsilon, group, n, seconds) for claim, epsilon, group in claims]


@dataclass(frozen=True)
class _Draws:
    """One component's samples where D and D' differ, as progress from D's value (0) to D''s (1)."""

    base: np.ndarray
    neighbour: np.ndarray
    weights: np.ndarray  # |d| / planned scale per coordinate: its share of the planned loss

    @staticmethod
    def of(released: Released, base: np.ndarray, neighbour: np.ndarray) -> _Draws:
        x, x2 = np.asarray(released.base), np.asarray(released.neighbour)
        differ = x2 != x
        d = (x2 - x)[differ]
        return _Draws((base[:, differ] - x[differ]) / d, (neighbour[:, differ] - x[differ]) / d,
                      np.abs(d) / released.component.scale)


def _events() -> list[tuple[str, bool, Test]]:
    """The fixed family: (name, whether it points towards D', test on (progress, weights))."""
    events: list[tuple[str, bool, Test]] = []
    for t in OFFSETS:
        events.append((f"towards D', all {t:g}|d| past D", True, lambda a, w, t=t: (a >= t).all(axis=1)))
        events.append((f"towards D, all {t:g}|d| past D'", False, lambda a, w, t=t: (a <= 1 - t).all(axis=1)))
    for f in LIKELIHOOD:
        events.append((f"towards D', log-LR >= {f:g} x max", True,
                       lambda a, w, f=f: _log_likelihood_ratio(a, w) >= (f - 1e-9) * w.sum()))
        events.append((f"towards D, log-LR <= -{f:g} x max", False,
                       lambda a, w, f=f: _log_likelihood_ratio(a, w) <= -(f - 1e-9) * w.sum()))
    return events


EVENTS = len(_events())


def _log_likelihood_ratio(progress: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """log P[y | D'] - log P[y | D] under the planned discrete Laplace, per sample."""
    return (np.clip(2 * progress - 1, -1, 1) * weights).sum(axis=1)


def _bound(claim: str, charged: Fraction, draws: list[_Draws], n: int, seconds: float) -> LowerBound:
    if not any(d.weights.size for d in draws):
        return LowerBound(claim, charged, 0.0, 0.0, math.nan, "none: D and D' have the same exact values", n, seconds)
    weights = np.concatenate([d.weights for d in draws])
    on_base = np.concatenate([d.base for d in draws], axis=1)
    on_neighbour = np.concatenate([d.neighbour for d in draws], axis=1)
    counted = []
    for event, towards_neighbour, test in _events():
        hits_base, hits_neighbour = int(test(on_base, weights).sum()), int(test(on_neighbour, weights).sum())
        p, q = (hits_neighbour, hits_base) if towards_neighbour else (hits_base, hits_neighbour)
        counted.append((_log_ratio(p, q, n, REPORT_ALPHA), _log_ratio(p, q, n, FAIL_ALPHA), p, q, event))
    strict = max(found[1] for found in counted)
    lower95, _, p, q, event = max(counted, key=lambda found: found[0])
    plug_in = math.log(p / q) if p and q else math.inf
    return LowerBound(claim, charged, max(0.0, lower95), max(0.0, strict), plug_in, event, n, seconds)


def _log_ratio(p_hits: int, q_hits: int, n: int, alpha: float) -> float:
    """log(lower bound of p / upper bound of q), each one-sided at alpha / (2 x the number of events)."""
    level = alpha / (2 * EVENTS)
    p_low = beta.ppf(level, p_hits, n - p_hits + 1) if p_hits > 0 else 0.0
    q_high = beta.ppf(1 - level, q_hits + 1, n - q_hits) if q_hits < n else 1.0
    return math.log(p_low / q_high) if p_low > 0 else -math.inf


def noisy_max_probabilities(scores: Sequence[int], scale: float) -> np.ndarray:
    """Exact selection probabilities of report noisy min with exponential noise of ``scale`` on ``scores``.

    What OpenDP's ``make_noisy_max`` under pure DP releases (permute-and-flip): edge i wins when
    u_i + E_i is the largest, u = -scores, E_i ~ Exponential(scale), so P(i) is the integral of the
    density of u_i + E_i times P(u_j + E_j < x) for every other j, over x >= max u (numerically, on
    a fine grid; the probabilities sum to 1 within 1e-6).
    """
    u = -np.asarray(scores, dtype=float)
    x = np.linspace(u.max(), u.max() + 60 * scale, 100_001)
    log_cdf = np.log(np.clip(-np.expm1(-(x[None, :] - u[:, None]) / scale), 1e-300, None))
    others = log_cdf.sum(axis=0) - log_cdf
    density = np.exp(-(x[None, :] - u[:, None]) / scale) / scale
    return np.asarray(np.trapezoid(density * np.exp(others), x, axis=1))


def log_ratio_bound(p_hits: int, q_hits: int, n: int, alpha: float) -> float:
    """log(lower bound of p / upper bound of q) for an event of the audit's family (see :func:`audit`)."""
    return _log_ratio(p_hits, q_hits, n, alpha)
