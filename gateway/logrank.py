"""The log-rank test between the groups of a survival answer, calibrated for the noise in its counts.

Pure post-processing of released values (no OpenDP, no I/O, no budget): a survival answer already
holds, per group g, the noisy number of events D_gj and of censorings C_gj at each time t_j of the
policy's grid, and which noise each carries (every count of one site's answer has the same discrete
Laplace noise, with a known scale on the integer lattice; a pooled count the sum of its sites').

The statistic is the standard log-rank over the grid, the grid's times taken as (tied) event times,
computed from the released counts as if they were exact: at risk N_gj = the group's total minus its
removals before t_j (the suffix sum of D + C from t_j on, clamped at 0), events D_gj clamped into
[0, N_gj]; with d_j and n_j the sums over groups, observed O_g = sum_j D_gj, expected
E_g = sum_j d_j N_gj / n_j, and the hypergeometric covariance
V_gh = sum_j d_j (n_j - d_j) / (n_j - 1) x N_gj / n_j x (delta_gh - N_hj / n_j);
the statistic is U' V^+ U over the first G - 1 groups (U = O - E), with G - 1 degrees of freedom for
G groups. Without noise this is lifelines' ``logrank_test`` / ``multivariate_logrank_test`` on the
rows with their times moved up to the grid.

Its chi-square p-value would be wrong: the noise adds variance to O - E that V knows nothing of, so
at small epsilon the statistic is far larger than chi-square under the null (in the tests, a test at
5% rejects a true null in 80-96% of answers at epsilon 0.1). The p-value here is a parametric
bootstrap under the null instead:

1. the null's parameters, from the released counts (post-processing): the common hazard h_j at each
   grid time from the Kaplan-Meier curve of all groups' pooled counts (made non-increasing, as
   :mod:`gateway.survival` does, so each h_j is in [0, 1]); each group's own censoring hazard q_gj
   the same way from its own counts (censorings as the events, at risk N_gj - D_gj: the null says
   nothing about censoring, which may differ between groups); each group's size, its released total
   rounded, at least 0;
2. :data:`DRAWS` simulated answers under the null: each group's patients die at t_j with probability
   h_j and are censored with probability q_gj (the rest at the grid's end: censored there, as the
   gateway counts them), and each count gets noise with exactly the released noise's distribution:
   for a group's count, one discrete Laplace draw per site that answered for the group, at that
   site's scale and lattice (the sum of k sites' draws at one scale drawn at once, as the
   difference of two negative binomials);
3. the statistic of each simulated answer, computed as the observed one is; the p-value is
   (1 + the number at least as large as the observed) / (DRAWS + 1).

Why this is sound: the observed statistic and the simulated ones are the same function of counts
with the same noise, so when the null's parameters are right the observed statistic is one more
draw from the distribution the others come from, and the p-value is exactly valid (the +1 makes it
so for any number of draws). The parameters are estimated from noisy counts, so the calibration is
approximate: what the noise adds to the statistic depends on them through the numbers at risk
(where a noisy number at risk is clamped at 0, say). Measured over 600 simulated federations of 4
sites under the null (tests/test_logrank.py; 24 monthly times, groups of 150-400): a test at 5%
rejects in 3.3-4.2% of them at epsilon 0.1 and 1 (2.8-6.8% over other seeds), where the
chi-square p-value of the same statistic rejects in 17-40% at epsilon 1 and 80-96% at 0.1, and a
bootstrap that assumes half the noise rejects too often (twice: too rarely). Under stress it is
conservative where the noise swamps the counts (0.3-3% at epsilon 0.1 with groups of tens or 60
times), and it rejected 7-10% with one group censored 30% per month in its first four months at
epsilon 0.5: its censoring, estimated from noisy counts, is the weak point (with the true
censoring hazards, 4.6%). Smoother censoring
estimates (an isotonic fit of the numbers at risk) and a noise-studentised statistic did no better;
leaving the noisy events unclamped below 0 kept every case measured under 6.5% but made the test
far more conservative (0.5% for two groups of 300 at epsilon 0.1), with the standard statistic's
clamping given up.

Assumptions: the grid's bins are tied event times (the test compares the groups' binned
hazards, as any analysis of these counts does); censoring is independent of death within groups;
each group is one public group of the answer (with several group-by columns, each combination of
keys: the answer's rows). Groups whose cells are withheld (suppressed) are left out, with a note;
a group with no patients still counts in the degrees of freedom. Past :data:`MAX_GROUPS` groups
there is no test (its work grows with the cube of the groups); the draws are simulated in batches,
so memory stays bounded whatever the grid.

The draws use numpy's generator, seeded from a digest of the released counts and their noise, so
the same answer always gives the same p-value. numpy is imported on first use.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from ._proto.gateway.v1 import gateway_pb2 as pb
from ._wire import parts_from_wire
from .survival import _non_increasing, split_counts

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray

    Floats = NDArray[np.float64]

_MOST = 1e12  # the largest count simulated (binomial draws in 64-bit integers)
DRAWS = 1999  # null draws: p-values are multiples of 1/2000, down to 0.0005
# the most groups compared: each draw's statistic inverts a (groups - 1)-square matrix, so the work
# grows with the cube of the groups (100 groups over 121 times: 15 s; the 450 an answer can hold: minutes)
MAX_GROUPS = 100
_BATCH = 1 << 21  # values per simulated array, at most, in one batch of draws (16 MB of float64)
METHOD = "log-rank over the grid's times, p-value from a noise-calibrated parametric bootstrap under the null"

# one noise source of a count: (scale, lattice step) of a discrete Laplace, step x D with
# P(D = d) proportional to exp(-|d| step / scale); a scale of 0 is no noise
Source = tuple[float, float]


@dataclass(frozen=True)
class LogRank:
    """A log-rank test between groups: its statistic, degrees of freedom and noise-calibrated p-value.

    ``groups`` are the compared groups' keys; ``left_out`` those of groups not compared (withheld
    cells); ``note`` says why there is no test when ``statistic`` is NaN (one group, a dry run).
    """

    statistic: float
    df: int
    p_value: float
    draws: int
    groups: tuple[tuple[Any, ...], ...] = ()
    left_out: tuple[tuple[Any, ...], ...] = ()
    method: str = METHOD
    note: str = ""

    def __str__(self) -> str:
        if math.isnan(self.statistic):
            return f"log-rank: no test ({self.note})"
        shown = f"<= {self.p_value:.2g}" if self.p_value <= 1 / (self.draws + 1) else f"{self.p_value:.4g}"
        text = (f"log-rank between {len(self.groups)} groups: chi-square {self.statistic:.4g}, df {self.df}, "
                f"p {shown} ({self.draws} null draws with the answer's noise)")
        return text + (f"; {self.note}" if self.note else "")


def no_test(note: str, groups: Sequence[tuple[Any, ...]] = (), left_out: Sequence[tuple[Any, ...]] = ()) -> LogRank:
    """The answer when there is nothing to test, and why."""
    return LogRank(math.nan, 0, math.nan, 0, tuple(groups), tuple(left_out), note=note)


def logrank_of(response: pb.QueryResponse, aggregate: int = 0, draws: int = DRAWS) -> LogRank:
    """The test between the groups (rows) of a survival answer, for its ``aggregate``-th aggregate.

    A pooled count's noise is read from the sites' answers: one source per site that has the group,
    at the scale its answer states, on its lattice (the integers, for survival's counts).
    """
    if response.dry_run:
        return no_test("a dry run holds no counts")
    groups, left_out, events, censored, sources = [], [], [], [], []
    for row in response.rows:
        keys = tuple(getattr(k.value, k.value.WhichOneof("kind") or "string_value") for k in row.keys)
        counts = parts_from_wire(row.estimates[aggregate]).get("counts")
        if row.estimates[aggregate].suppressed or counts is None or not counts.values:
            left_out.append(keys)
            continue
        groups.append(keys)
        d, c = split_counts(counts.values)
        events.append(d)
        censored.append(c)
        sources.append(list(counts.sources) or _site_sources(response, row, aggregate, counts.std_error))
    if len(groups) < 2:
        why = (f"{len(left_out)} group(s) withheld, " if left_out else "") + (
            "one group: nothing to compare (ask for survival by a column, e.g. by='stage')" if groups else
            "no group with released counts")
        return no_test(why, groups, left_out)
    result = logrank(events, censored, sources, groups, draws)
    if left_out:
        result = replace(result, left_out=tuple(left_out), note=f"left out: {len(left_out)} withheld group(s) "
                         f"({', '.join('/'.join(map(str, k)) for k in left_out)})")
    return result


def _site_sources(response: pb.QueryResponse, row: pb.ResultRow, aggregate: int, std_error: float) -> list[Source]:
    """The noises of a pooled count: one per site whose answer has ``row``'s group.

    A site's estimate keeps its noise scale even where its cell is withheld; its lattice is the
    integers unless its counts say otherwise. Without the sites' answers, a continuous Laplace
    with the pooled standard error.
    """
    key = [k.SerializeToString(deterministic=True) for k in row.keys]
    found: list[Source] = []
    for answer in response.site_answers:
        for site_row in answer.rows:
            if [k.SerializeToString(deterministic=True) for k in site_row.keys] != key:
                continue
            e = site_row.estimates[aggregate]
            lattice = next((c.lattice for c in e.components if c.lattice > 0), 1.0)
            if math.isfinite(e.noise_scale) and e.noise_scale >= 0:
                found.append((e.noise_scale, lattice))
    return found or [(std_error / math.sqrt(2), math.nan)]


def logrank(events: Sequence[Sequence[float]], censored: Sequence[Sequence[float]],
            sources: Sequence[Sequence[Source]], groups: Sequence[tuple[Any, ...]] = (),
            draws: int = DRAWS, seed: int | None = None) -> LogRank:
    """The test between the groups whose noisy counts at each grid time are ``events`` and ``censored``.

    ``sources[g]`` lists the noises each of group g's counts carries (one per site that answered for
    it). ``seed`` defaults to a digest of the inputs (the same counts give the same p-value).
    """
    import numpy as np

    d, c = np.asarray(events, dtype=float), np.asarray(censored, dtype=float)
    if d.ndim != 2 or d.shape != c.shape or d.shape[1] < 1 or len(sources) != d.shape[0]:
        raise ValueError("events and censored need one row per group over the same grid, and sources one entry "
                         "per group")
    keys = tuple(groups) or tuple((g,) for g in range(d.shape[0]))
    if d.shape[0] < 2:
        return no_test("one group: nothing to compare (ask for survival by a column, e.g. by='stage')", keys)
    if not (np.all(np.abs(d) < _MOST) and np.all(np.abs(c) < _MOST)):  # NaN, infinite or past any registry
        return no_test("the counts are not numbers of patients this test can simulate", keys)
    if d.shape[0] > MAX_GROUPS:
        return no_test(f"{d.shape[0]} groups: this test compares at most {MAX_GROUPS} (ask for fewer groups, "
                       "e.g. with a filter)", keys)
    if draws < 1:
        raise ValueError("draws must be at least 1")
    observed = float(statistic(d, c))
    rng = np.random.default_rng(_seed(d, c, sources, draws) if seed is None else seed)
    # in batches, so that memory stays bounded for many groups or a fine grid (one batch for a small answer)
    batch = max(1, _BATCH // (d.shape[0] * max(d.shape[1], d.shape[0])))
    simulated = np.concatenate([statistic(*null_answers(d, c, sources, min(batch, draws - done), rng))
                                for done in range(0, draws, batch)])
    p = (1 + int(np.count_nonzero(simulated >= observed * (1 - 1e-12)))) / (draws + 1)
    return LogRank(observed, d.shape[0] - 1, p, draws, keys)


def statistic(events: Floats, censored: Floats) -> Floats:
    """The log-rank statistic of counts shaped (..., groups, times), clamped as the module docstring says."""
    import numpy as np

    at_risk = np.maximum(np.flip(np.cumsum(np.flip(events + censored, -1), -1), -1), 0.0)
    dead = np.clip(events, 0.0, at_risk)
    d, n = dead.sum(-2), at_risk.sum(-2)  # (..., times)
    live = n > 0
    share = np.divide(at_risk, n[..., None, :], out=np.zeros_like(at_risk), where=live[..., None, :])
    u = (dead - d[..., None, :] * share).sum(-1)  # O - E per group
    spread = np.divide(d * (n - d), n - 1, out=np.zeros_like(d), where=n > 1)  # hypergeometric, times n
    first = share[..., :-1, :]
    weighted = first * spread[..., None, :]
    v = weighted.sum(-1)[..., :, None] * np.eye(first.shape[-2]) - weighted @ np.swapaxes(first, -1, -2)
    w = u[..., :-1]
    # V is singular when a group has nobody at risk (its row is 0, and so is its U): the pseudo-inverse
    solved = np.einsum("...gh,...h->...g", np.linalg.pinv(v, rcond=1e-10, hermitian=True), w)
    result: Floats = np.maximum(np.einsum("...g,...g->...", w, solved), 0.0)
    return result


def null_answers(events: Floats, censored: Floats, sources: Sequence[Sequence[Source]], draws: int,
                 rng: Any) -> tuple[Floats, Floats]:
    """``draws`` noisy answers (events, censorings), each shaped (draws, groups, times), under the null."""
    import numpy as np

    hazard, censoring, sizes = null_parameters(events, censored)
    groups, times = events.shape
    alive = np.broadcast_to(sizes, (draws, groups)).astype(np.int64)
    dead = np.zeros((draws, groups, times))
    lost = np.zeros((draws, groups, times))
    for j in range(times):
        dead[:, :, j] = died = rng.binomial(alive, hazard[j])
        lost[:, :, j] = gone = alive - died if j == times - 1 else rng.binomial(alive - died, censoring[:, j])
        alive = alive - died - gone
    for g, noises in enumerate(sources):
        for (scale, step), sites in Counter(noises).items():  # the same noise at several sites: one draw of their sum
            noise = _discrete_laplace(rng, scale, step, (draws, 2, times), sites)
            dead[:, g, :] += noise[:, 0]
            lost[:, g, :] += noise[:, 1]
    return dead, lost


def null_parameters(events: Floats, censored: Floats) -> tuple[Floats, Floats, Floats]:
    """(common hazard per time, each group's censoring hazard per time, each group's size) from noisy counts."""
    import numpy as np

    hazard = _hazards(events.sum(0), censored.sum(0), of_censoring=False)
    censoring = np.stack([_hazards(d, c, of_censoring=True) for d, c in zip(events, censored, strict=True)])
    sizes = np.maximum(np.rint(events.sum(1) + censored.sum(1)), 0.0)
    return hazard, censoring, sizes


def _hazards(events: Floats, censored: Floats, of_censoring: bool) -> Floats:
    """Per-time hazards of the events (or censorings), from a non-increasing product-limit curve.

    At risk of an event at t_j: everyone removed at t_j or later; of a censoring: the same less the
    events at t_j (a censoring at t_j follows the deaths there, as in the Kaplan-Meier curve).
    """
    import numpy as np

    at_risk = np.flip(np.cumsum(np.flip(events + censored)))
    removed = censored if of_censoring else events
    if of_censoring:
        at_risk = at_risk - np.clip(events, 0.0, None)
    raw, s = [], 1.0
    for n, r in zip(at_risk, removed, strict=True):
        if n >= 1:  # the noisy count as released, as gateway.survival does: clamping each would bias
            s *= 1 - min(r / n, 1.0)
        raw.append(s)
    curve = np.clip(np.asarray(_non_increasing(raw)), 0.0, 1.0)
    before = np.concatenate(([1.0], curve[:-1]))
    hazard: Floats = np.where(before > 0, 1 - np.divide(curve, before, out=np.ones_like(curve), where=before > 0),
                              1.0)
    return np.clip(hazard, 0.0, 1.0)


def _discrete_laplace(rng: Any, scale: float, step: float, shape: tuple[int, ...], terms: int = 1) -> Floats:
    """Draws of the sum of ``terms`` independent step x D, D the integer discrete Laplace with scale ``scale / step``.

    D is the difference of two geometric counts of failures, so a sum of them is the difference of
    two negative binomial counts. A scale of 0 is no noise; a step that is 0 or NaN, a continuous
    Laplace (a lattice far finer than the noise).
    """
    import numpy as np

    if not scale > 0:
        return np.zeros(shape)
    if not (step > 0 and math.isfinite(step)):
        laplace: Floats = sum((rng.laplace(0.0, scale, shape) for _ in range(terms)), np.zeros(shape))
        return laplace
    p = -math.expm1(-step / scale)
    draws: Floats = (rng.negative_binomial(terms, p, shape) - rng.negative_binomial(terms, p, shape)).astype(float)
    return draws * step


def _seed(events: Floats, censored: Floats, sources: Sequence[Sequence[Source]], draws: int) -> int:
    digest = hashlib.sha256()
    digest.update(events.tobytes() + censored.tobytes())
    digest.update(repr(([tuple(map(float, s)) for g in sources for s in g], draws)).encode())
    return int.from_bytes(digest.digest()[:8], "big")
