"""Accuracy of quantiles from a noisy histogram against OpenDP's quantile mechanism at one site.

Reproducible: ``uv run python bench/quantile_accuracy.py [--draws 200]``. Synthetic patients with
a value drawn from Normal(50, 10) (clamped to [0, 100]), n = 200 and 1,000 per sample, bins of
width 1 over [0, 100] (the candidates of OpenDP's mechanism are the same 101 edges). Per epsilon,
n and level q it reports the root mean squared error against the true quantile of:

- the gateway's estimate: OpenDP's discrete Laplace on the histogram (sensitivity 1), then
  :func:`gateway.quantiles.quantiles_of` (what a site and a broker do);
- OpenDP's ``make_private_quantile`` (the exponential mechanism over the candidates, scale found
  by ``binary_search_chain`` for the same epsilon), which needs the rows themselves;

and how often the gateway's 95% interval covers the true quantile. Prints a table and writes
JSON. Post-processing only: no engine, no gRPC.
"""

from __future__ import annotations

import argparse
import json
import random
from fractions import Fraction
from pathlib import Path
from statistics import NormalDist

import opendp.prelude as dp

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


def main() -> None:
    """Run the comparison and print it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=200)
    args = parser.parse_args()
    dp.enable_features("contrib")
    space = dp.vector_domain(dp.atom_domain(T=float, nan=False)), dp.symmetric_distance()
    rows = []
    print(f"{'epsilon':>7} {'n':>5} {'q':>4} {'histogram rmse':>15} {'opendp quantile rmse':>21} {'coverage':>9}")
    for epsilon in (1.0, 0.1):
        scale = mechanisms.scale_for(1, Fraction(str(epsilon)))
        variance = mechanisms.Component("counts", 1, Fraction(str(epsilon)), scale, 1, (100,)).std_error ** 2
        for n in (200, 1000):
            for q in (0.1, 0.5, 0.9):
                truth = NormalDist(50, 10).inv_cdf(q)
                quantile = dp.binary_search_chain(
                    lambda s, q=q: dp.m.make_private_quantile(*space, dp.max_divergence(), candidates=list(EDGES),
                                                              alpha=q, scale=s), d_in=1, d_out=epsilon)
                rng = random.Random(3)
                histogram_error = opendp_error = 0.0
                covered = 0
                for _ in range(args.draws):
                    values = [min(max(rng.gauss(50, 10), 0.0), 100.0) for _ in range(n)]
                    noisy = list(mechanisms.measurement(scale)(binned(values)))
                    found = quantiles_of(EDGES, noisy, variance, (q,))[0]
                    histogram_error += (found.value - truth) ** 2
                    covered += found.ci_low <= truth <= found.ci_high
                    opendp_error += (quantile(values) - truth) ** 2
                row = {"epsilon": epsilon, "n": n, "q": q, "histogram_rmse": (histogram_error / args.draws) ** 0.5,
                       "opendp_quantile_rmse": (opendp_error / args.draws) ** 0.5, "coverage": covered / args.draws}
                rows.append(row)
                print(f"{epsilon:>7g} {n:>5} {q:>4g} {row['histogram_rmse']:>15.2f} "
                      f"{row['opendp_quantile_rmse']:>21.2f} {row['coverage']:>9.3f}", flush=True)
    out = ROOT / "bench" / "results" / "quantile_accuracy.json"
    out.write_text(json.dumps({"draws": args.draws, "rows": rows}, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
