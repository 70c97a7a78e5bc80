"""Accuracy of quantiles from a noisy histogram against OpenDP's quantile mechanism at one site.

Reproducible: ``uv run python bench/quantile_accuracy.py [--draws 200]``. Synthetic patients with
a value drawn from Normal(50, 10) (clamped to [0, 100]), n = 200 and 1,000 per sample, bins of
width 1 over [0, 100] (the candidates of OpenDP's mechanism are the same 101 edges). Per epsilon,
n and level q it reports the root mean squared error against the true quantile of:

- the gateway's estimate: OpenDP's discrete Laplace on the histogram (sensitivity 1), then
  :func:`gateway.quantiles.quantiles_of` (what a site and a broker do);
- the single-site quantile (``single_site``): the gateway's own selection, OpenDP's report noisy
  max over OpenDP's quantile scores of the 101 edges (:func:`gateway._mechanisms.quantile_scores`
  from the rows per cell, then ``Noise.select``, calibrated by the site's own
  ``selection_scale_for``) — what a site asked directly releases;

and how often the gateway's 95% interval covers the true quantile; then the three quartiles asked
in one call: from one histogram at epsilon, or each selected at epsilon / 3. Prints tables and
writes JSON. Post-processing only: no engine, no gRPC.
"""

from __future__ import annotations

import argparse
import bisect
import json
import random
from fractions import Fraction
from pathlib import Path
from statistics import NormalDist

from gateway import _mechanisms as mechanisms
from gateway.quantiles import quantiles_of

ROOT = Path(__file__).resolve().parent.parent
EDGES = tuple(float(t) for t in range(101))


def binned(values: list[float]) -> list[int]:
    """Rows per bin [t, t + 1) of :data:`EDGES`, the last bin closed."""
    counts = [0] * (len(EDGES) - 1)
    for value in values:
        counts[min(int(value), len(counts) - 1)] += 1
    return counts


def cells(values: list[float]) -> list[int]:
    """Rows per cell of the line :data:`EDGES` cut: below t0, at t0, between t0 and t1, ..., above tm."""
    counts = [0] * (2 * len(EDGES) + 1)
    for value in values:
        below = bisect.bisect_left(EDGES, value)
        counts[2 * below + 1 if below < len(EDGES) and EDGES[below] == value else 2 * below] += 1
    return counts


def selecting(q: float, epsilon: Fraction) -> mechanisms.Component:
    """The site's selecting component for level ``q`` at ``epsilon``, one row per patient."""
    level = mechanisms.exact_level(q)
    sensitivity = max(level.numerator, level.denominator - level.numerator)
    return mechanisms.Component("choice", sensitivity, epsilon, mechanisms.selection_scale_for(sensitivity, epsilon),
                                level.denominator, (2 * len(EDGES) + 1,), level)


def main() -> None:
    """Run the comparison and print it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=200)
    args = parser.parse_args()
    rows = []
    print(f"{'epsilon':>7} {'n':>5} {'q':>4} {'histogram rmse':>15} {'opendp quantile rmse':>21} {'coverage':>9}")
    for epsilon in (1.0, 0.1):
        scale = mechanisms.scale_for(1, Fraction(str(epsilon)))
        variance = mechanisms.Component("counts", 1, Fraction(str(epsilon)), scale, 1, (100,)).std_error ** 2
        for n in (200, 1000):
            for q in (0.1, 0.5, 0.9):
                truth = NormalDist(50, 10).inv_cdf(q)
                component = selecting(q, Fraction(str(epsilon)))
                rng = random.Random(3)
                histogram_error = opendp_error = 0.0
                covered = 0
                for _ in range(args.draws):
                    values = [min(max(rng.gauss(50, 10), 0.0), 100.0) for _ in range(n)]
                    noisy = list(mechanisms.measurement(scale)(binned(values)))
                    found = quantiles_of(EDGES, noisy, variance, (q,))[0]
                    histogram_error += (found.value - truth) ** 2
                    covered += found.ci_low <= truth <= found.ci_high
                    (chosen,) = mechanisms.Noise().select(component, tuple(cells(values)))
                    opendp_error += (EDGES[chosen] - truth) ** 2
                row = {"epsilon": epsilon, "n": n, "q": q, "histogram_rmse": (histogram_error / args.draws) ** 0.5,
                       "opendp_quantile_rmse": (opendp_error / args.draws) ** 0.5, "coverage": covered / args.draws}
                rows.append(row)
                print(f"{epsilon:>7g} {n:>5} {q:>4g} {row['histogram_rmse']:>15.2f} "
                      f"{row['opendp_quantile_rmse']:>21.2f} {row['coverage']:>9.3f}", flush=True)
    quartiles = split(args.draws)
    out = ROOT / "bench" / "results" / "quantile_accuracy.json"
    out.write_text(json.dumps({"draws": args.draws, "rows": rows, "quartiles": quartiles}, indent=2) + "\n",
                   encoding="utf-8")


def split(draws: int) -> list[dict[str, float]]:
    """The three quartiles in one call: from one histogram at epsilon, or each selected at epsilon / 3.

    Why ``Client.quantiles(method="auto")`` uses the single-site mechanism for one level only: the
    histogram's levels share one epsilon, the mechanism's split it.
    """
    rows = []
    print(f"\nquartiles in one call\n{'epsilon':>7} {'n':>5} {'q':>4} {'histogram rmse':>15} "
          f"{'opendp at eps/3 rmse':>21}")
    for epsilon in (1.0, 0.1):
        total = Fraction(str(epsilon))
        scale = mechanisms.scale_for(1, total)
        variance = mechanisms.Component("counts", 1, total, scale, 1, (100,)).std_error ** 2
        levels = (0.25, 0.5, 0.75)
        components = {q: selecting(q, total / len(levels)) for q in levels}
        for n in (200, 1000):
            rng = random.Random(3)
            histogram_error = dict.fromkeys(levels, 0.0)
            opendp_error = dict.fromkeys(levels, 0.0)
            for _ in range(draws):
                values = [min(max(rng.gauss(50, 10), 0.0), 100.0) for _ in range(n)]
                noisy = list(mechanisms.measurement(scale)(binned(values)))
                for found in quantiles_of(EDGES, noisy, variance, levels):
                    histogram_error[found.q] += (found.value - NormalDist(50, 10).inv_cdf(found.q)) ** 2
                counted = tuple(cells(values))
                for q in levels:
                    (chosen,) = mechanisms.Noise().select(components[q], counted)
                    opendp_error[q] += (EDGES[chosen] - NormalDist(50, 10).inv_cdf(q)) ** 2
            for q in levels:
                row = {"epsilon": epsilon, "n": n, "q": q, "histogram_rmse": (histogram_error[q] / draws) ** 0.5,
                       "opendp_split_rmse": (opendp_error[q] / draws) ** 0.5}
                rows.append(row)
                print(f"{epsilon:>7g} {n:>5} {q:>4g} {row['histogram_rmse']:>15.2f} "
                      f"{row['opendp_split_rmse']:>21.2f}", flush=True)
    return rows


if __name__ == "__main__":
    main()
