"""Linear regression from noisy sufficient statistics: the fit, its standard errors, its intervals.

Pure post-processing of released values (numpy; no OpenDP, no DuckDB, no I/O): the site and the
broker call :func:`fit` on the same released vector and get the same answer (the bootstrap's
generator is seeded from the released values). The client reads the fit from the answer and never
needs this module.

What a site releases, per group (``regression(y, x1, ..., xp)``): each variable is clamped to its
policy bounds [l, u] and standardised, s = (v - c) / h with c = (l + u) / 2 and h = (u - l) / 2,
so that |s| <= 1; then, for Z = [1, s_x1, ..., s_xp, s_y] (d = p + 2 columns), the upper triangle
of ZᵀZ, row by row (d (d + 1) / 2 entries): the number of rows n, the sums, the cross-products
XᵀX and Xᵀy, and yᵀy. A row that misses any of the variables is left out of every entry. Each
entry of one row is a product of two numbers in [-1, 1], so one row moves the vector by at most
d (d + 1) / 2 in L1, and one patient's k rows by k times that: the vector is one discrete Laplace
measurement with that sensitivity, the same noise on every entry (in these standardised units).

One vector rather than blocks (XᵀX, Xᵀy, yᵀy, n with their own shares of epsilon): a block b of
m_b entries, each of sensitivity 1, released at epsilon_b has noise scale m_b / epsilon_b; the sum
of the noise variances over all entries, sum of m_b (m_b / epsilon_b)^2 under sum of epsilon_b =
epsilon, is smallest at epsilon_b proportional to m_b, where every scale is (sum of m_b) / epsilon:
exactly the single vector. A split could only move noise from one block to another.

The fit (:func:`fit`), in standardised units, then back:

- A = ZᵀZ without y's row and column, b = Zᵀs_y, c = s_yᵀs_y, from the noisy vector;
- A is made positive definite by flooring its eigenvalues at :func:`ridge` = s, the noise's
  standard deviation on one entry: in the directions where the noise swamps the data this is a
  ridge of the noise's size, which keeps the solve stable; where the data dominate the noise
  nothing is added. A larger floor, or a ridge on every direction, shrinks the coefficients of
  weakly varying features: a floor of s sqrt(p + 1) left a coefficient biased by 0.4 standard
  errors at 400 rows and epsilon 0.5 (its interval covered 90%), and a ridge of s sqrt(p + 1) on
  every direction shrank coefficients by 8% at 3000 rows and epsilon 1. Without noise the floor
  is a negligible fraction of the largest eigenvalue, and this is least squares;
- beta = A⁻¹ b; the residual sum of squares RSS = c - 2 betaᵀb + betaᵀA beta (at least s),
  sigma^2 = RSS / (n - p - 1), R^2 = 1 - RSS / (c - b_0^2 / n);
- the noise's part, by a parametric bootstrap: :data:`DRAWS` fresh noise vectors of the released
  noise's variance (Laplace, as one site draws it; pooled over sites a sum of Laplaces, whose tails
  are lighter) added to the released statistics, each solved as above. The inverse of a noisy
  matrix is biased (noise in A attenuates beta, as errors in variables do): the draws' mean minus
  beta estimates that bias, which is subtracted; the draws' covariance is added to the sampling
  part sigma^2 A⁻¹;
- un-standardising is exact and linear: the coefficient of x_j is h_y beta_j / h_j, the intercept
  c_y + h_y beta_0 - sum of (h_y beta_j / h_j) c_j; covariances follow (T cov Tᵀ); the 95%
  intervals are estimate ± 1.96 standard errors.

The tests show by simulation (fresh data from a known model, OpenDP's noise) that the intervals
cover the true coefficients near 95% where the data dominate the noise, and that half as wide ones
do not. Where the noise dominates, the bootstrap around values that are already noisy overstates
the noise's variance and the intervals err on the wide side (at 300-400 rows and epsilon 0.5-1,
95% intervals covered 95-99%).

Logistic regression is not offered yet. The sound route is noisy sufficient statistics of a
polynomial approximation of the log-likelihood (Zhang et al.'s functional mechanism): a second
order Taylor expansion of log(1 + e^(x beta)) at 0 makes the objective quadratic in beta, with the
statistics ZᵀZ and Zᵀ(y - 1/2) that this kind already releases. But the approximation is only
good where |x beta| is small (the error of the quadratic grows like (x beta)^4 / 192), so the
fitted coefficients are biased towards 0 for effects of a useful size, by an amount that depends on
the data and is not captured by any interval computed from the noise; the honest intervals the
gateway promises would need a bias bound or a higher order expansion (fourth order needs the
fourth moments of the features: (p + 1)^4 / 24 more entries, and far more noise). Until a method
whose intervals are shown to cover is implemented, a researcher can fit a linear probability model
with ``regression(event, x...)``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .answers import Z95

DRAWS = 400  # bootstrap draws: the standard errors' own relative error is about 1 / sqrt(2 x 400), 3.5%


@dataclass(frozen=True)
class Fit:
    """A fitted regression: coefficients (intercept first) with their accuracy, n and R^2."""

    estimate: tuple[float, ...]
    std_error: tuple[float, ...]
    ci_low: tuple[float, ...]
    ci_high: tuple[float, ...]
    n: float
    r_squared: float
    projected: bool  # the noisy matrix needed its eigenvalues raised to be positive definite


def entries(variables: int) -> int:
    """The released entries for ``variables`` columns (y and the features): the upper triangle of ZᵀZ."""
    d = variables + 1
    return d * (d + 1) // 2


def terms(y: str, features: Sequence[str]) -> list[str]:
    """The names of the coefficients, in the order of a fit: the intercept, then each feature."""
    del y
    return ["(intercept)", *features]


def ridge(noise_sd: float) -> float:
    """The eigenvalue floor, in standardised units: the noise's standard deviation s (0 without noise)."""
    return noise_sd


def fit(values: Sequence[float], noise_sd: float, bounds: Sequence[tuple[float, float]], z: float = Z95) -> Fit:
    """The regression from a released vector (see the module docstring).

    ``values``: the upper triangle of ZᵀZ in standardised units; ``noise_sd``: the noise's standard
    deviation on each entry; ``bounds``: the clamping bounds of y, then of each feature.
    """
    p = len(bounds) - 1
    if p < 1 or len(values) != entries(len(bounds)):
        raise ValueError(f"{len(bounds)} variables need {entries(len(bounds))} statistics, got {len(values)}")
    matrix = _symmetric(np.asarray(values, dtype=float), p + 2)
    a, b, c = matrix[:-1, :-1], matrix[:-1, -1], matrix[-1, -1]
    n = float(a[0, 0])
    lam = ridge(noise_sd)
    if n < p + 2 or not np.all(np.isfinite(matrix)):
        nan = (math.nan,) * (p + 1)
        return Fit(nan, nan, nan, nan, n, math.nan, True)
    solved, projected = _regularised(a[None], lam)
    beta = np.linalg.solve(solved[0], b)
    rss = max(float(c - 2 * beta @ b + beta @ solved[0] @ beta), noise_sd, 1e-12)
    total = float(c - b[0] ** 2 / n)
    r_squared = min(max(1 - rss / total, 0.0), 1.0) if total > 0 else math.nan
    sigma2 = rss / max(n - p - 1, 1.0)
    cov = sigma2 * np.linalg.inv(solved[0])
    if noise_sd > 0:
        drawn = _bootstrap(matrix, noise_sd, lam, values)
        beta = beta - (drawn.mean(axis=0) - beta)  # the noise's bias, as the bootstrap sees it, taken away
        cov = cov + np.atleast_2d(np.cov(drawn, rowvar=False))
    transform, offset = _unstandardise(bounds)
    estimate = transform @ beta + offset
    cov = transform @ cov @ transform.T
    se = np.sqrt(np.maximum(np.diag(cov), 0.0))
    return Fit(tuple(map(float, estimate)), tuple(map(float, se)), tuple(map(float, estimate - z * se)),
               tuple(map(float, estimate + z * se)), n, r_squared, bool(projected[0]))


def _symmetric(values: np.ndarray, d: int) -> np.ndarray:
    """The d x d symmetric matrices whose upper triangles (row by row) are the last axis of ``values``."""
    rows, cols = np.triu_indices(d)
    out = np.zeros((*values.shape[:-1], d, d))
    out[..., rows, cols] = values
    out[..., cols, rows] = values
    return out


def _regularised(a: np.ndarray, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """A stack of symmetric matrices with their eigenvalues floored at ``lam``.

    Without noise (``lam`` 0) the floor is a tiny fraction of the largest eigenvalue, so that a
    singular matrix (a feature constant in the data) still solves. Also returns which were raised.
    """
    values, vectors = np.linalg.eigh(a)
    floor = max(lam, 1e-12 * float(np.max(np.abs(values))) if values.size else 0.0)
    raised = values < floor
    values = np.maximum(values, floor)
    out = (vectors * values[..., None, :]) @ np.swapaxes(vectors, -1, -2)
    return out, np.asarray(raised.any(axis=-1))


def _bootstrap(matrix: np.ndarray, noise_sd: float, lam: float, values: Sequence[float]) -> np.ndarray:
    """Coefficients fitted from the released statistics with fresh noise added, one row per draw."""
    d = matrix.shape[-1]
    seed = int.from_bytes(hashlib.sha256(np.asarray(values, dtype=float).tobytes()).digest()[:8], "big")
    rng = np.random.default_rng(seed)
    noise = rng.laplace(0.0, noise_sd / math.sqrt(2), size=(DRAWS, entries(d - 1)))
    drawn = matrix[None] + _symmetric(noise, d)
    solved, _ = _regularised(drawn[:, :-1, :-1], lam)
    betas: np.ndarray = np.linalg.solve(solved, drawn[:, :-1, -1:])[..., 0]
    return betas


def _unstandardise(bounds: Sequence[tuple[float, float]]) -> tuple[np.ndarray, np.ndarray]:
    """(T, offset): coefficients in the variables' units are T beta + offset for standardised beta."""
    centres = [(low + high) / 2 for low, high in bounds]
    halves = [(high - low) / 2 for low, high in bounds]
    p = len(bounds) - 1
    transform = np.zeros((p + 1, p + 1))
    transform[0, 0] = halves[0]
    for j in range(1, p + 1):
        slope = halves[0] / halves[j]
        transform[j, j] = slope
        transform[0, j] = -slope * centres[j]
    offset = np.zeros(p + 1)
    offset[0] = centres[0]
    return transform, offset
