"""Accuracy of pooled survival curves against the exact curve of the union, on the demo's data.

Reproducible: ``uv run python bench/survival_accuracy.py [--patients 20000] [--draws 200]``. The
demo's four registries (north, south, east, west, ``--patients`` each, the demo's seeds) and
policies (monthly grid to 120 months); per site the real engine computes the exact counts of
``SELECT stage, survival(survival_months, death) FROM patients GROUP BY stage`` and the site's
own noise source (OpenDP) releases them at each epsilon; the releases are pooled as the broker
pools them. Against the Kaplan-Meier curve of the union (no noise) it reports, per stage and
over ``--draws`` releases: the curve's error over the grid (largest absolute difference, and its
mean over the grid's times), the 5-year survival's error, the median's error in months (and how
often the noisy median is "not reached" when the exact one is, or the other way round), and how
often the reported band covers the exact curve at 12, 36 and 60 months. Prints a table and
writes JSON. Post-processing only: no gRPC, so the figures are the mechanism's, not the network's.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import tempfile
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

from gateway import _mechanisms as mechanisms
from gateway._engine import Engine, ExactResult
from gateway._sqlfront import parse_sql
from gateway.aggregates import KINDS
from gateway.demo.network import POLICIES, SITES
from gateway.demo.synth import synthesize
from gateway.policy import load_policy
from gateway.query import check_query
from gateway.survival import Curve, kaplan_meier, split_counts

ROOT = Path(__file__).resolve().parent.parent
SQL = "SELECT stage, survival(survival_months, death) FROM patients GROUP BY stage"
EPSILONS = (Fraction(1), Fraction(1, 10))


Release = tuple[mechanisms.Plan, ExactResult]


def exact_releases(workdir: Path, patients: int, epsilon: Fraction) -> list[Release]:
    """Each demo site's plan and exact counts (data synthesized as ``gateway demo`` does)."""
    releases = []
    for index, site in enumerate(SITES):
        folder = workdir / site
        (folder / "data").mkdir(parents=True, exist_ok=True)
        data = folder / "data" / f"{site}.duckdb"
        if not data.exists():
            synthesize(site, patients, data, seed=index)
        shutil.copy(POLICIES / f"{site}.yaml", folder / f"{site}.yaml")
        loaded = load_policy(folder / f"{site}.yaml")
        query = check_query(parse_sql(SQL), loaded.policy)
        plan = mechanisms.plan_query(query, loaded.policy.datasets["patients"], epsilon)
        engine = Engine(loaded)
        try:
            releases.append((plan, engine.run(query)))
        finally:
            engine.close()
    return releases


@dataclass
class Errors:
    """One stage's exact curve and the errors of its noisy curves."""

    truth: Curve
    largest: list[float] = field(default_factory=list)
    mean: list[float] = field(default_factory=list)
    five_years: list[float] = field(default_factory=list)
    median: list[float] = field(default_factory=list)
    median_reached_differs: int = 0
    covered: list[bool] = field(default_factory=list)
    noise_covered: list[bool] = field(default_factory=list)

    def add(self, curve: Curve) -> None:
        errors = [abs(a - b) for a, b in zip(curve.survival, self.truth.survival, strict=True)]
        self.largest.append(max(errors))
        self.mean.append(statistics.fmean(errors))
        self.five_years.append(errors[60])
        if math.isnan(curve.median) != math.isnan(self.truth.median):
            self.median_reached_differs += 1
        elif not math.isnan(self.truth.median):
            self.median.append(abs(curve.median - self.truth.median))
        for t in (12, 36, 60):
            self.covered.append(curve.ci_low[t] <= self.truth.survival[t] <= curve.ci_high[t])
            self.noise_covered.append(curve.noise_ci_low[t] <= self.truth.survival[t] <= curve.noise_ci_high[t])

    def summary(self, draws: int) -> dict[str, float]:
        medians = sorted(self.median)
        return {"patients": self.truth.at_risk[0], "exact_median": self.truth.median,
                "exact_5y": self.truth.survival[60], "curve_max_error": _mean(self.largest),
                "curve_mean_error": _mean(self.mean), "five_year_error": _mean(self.five_years),
                "median_error": _mean(self.median),
                "median_error_p90": medians[int(0.9 * len(medians))] if medians else math.nan,
                "median_reached_differs": self.median_reached_differs / draws,
                "band_coverage": _mean(self.covered), "noise_band_coverage": _mean(self.noise_covered)}


def _mean(values: list[float] | list[bool]) -> float:
    return statistics.fmean(values) if values else math.nan


def measure(releases: list[Release], draws: int) -> dict[str, dict[str, float]]:
    """Per stage, the errors of ``draws`` pooled noisy curves against the union's exact one."""
    kind = KINDS["survival"]
    groups = releases[0][1].groups
    edges = releases[0][0].aggregates[0].declared.edges
    size = 2 * len(edges)
    union = [sum(v) for v in zip(*(result.components[0] for _, result in releases), strict=True)]
    stages = [Errors(kaplan_meier(edges, *split_counts(union[g * size:(g + 1) * size]), 0.0))
              for g in range(len(groups))]
    for _ in range(draws):
        rows = [mechanisms.release(plan, result.groups, result.components, mechanisms.Noise())
                for plan, result in releases]
        for g, errors in enumerate(stages):
            pooled = kind.pool([{p.name: p for p in site_rows[g].estimates[0].parts} for site_rows in rows])["counts"]
            errors.add(kaplan_meier(edges, *split_counts(pooled.values), pooled.std_error ** 2))
    return {str(keys[0]): errors.summary(draws) for keys, errors in zip(groups, stages, strict=True)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=20_000, help="patients per site (the demo's default)")
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "gateway-survival-accuracy")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "survival_accuracy.json")
    args = parser.parse_args()
    results = {}
    for epsilon in EPSILONS:
        results[str(float(epsilon))] = measure(exact_releases(args.workdir, args.patients, epsilon), args.draws)
    print(f"{'epsilon':>7} {'stage':>5} {'n':>6} {'curve max':>9} {'curve mean':>10} {'5y err':>7} {'median':>6} "
          f"{'med err':>7} {'p90':>5} {'reach?':>6} {'band':>5} {'noise':>5}")
    for epsilon, stages in results.items():
        for stage, r in stages.items():
            print(f"{epsilon:>7} {stage:>5} {r['patients']:>6.0f} {r['curve_max_error']:>9.4f} "
                  f"{r['curve_mean_error']:>10.4f} {r['five_year_error']:>7.4f} {r['exact_median']:>6.0f} "
                  f"{r['median_error']:>7.2f} {r['median_error_p90']:>5.0f} {r['median_reached_differs']:>6.2f} "
                  f"{r['band_coverage']:>5.2f} {r['noise_band_coverage']:>5.2f}")
    report = {"patients_per_site": args.patients, "sites": len(SITES), "draws": args.draws, "grid": "monthly, 0..120",
              "results": {eps: {stage: {k: None if math.isnan(v) else v for k, v in r.items()}  # NaN: not reached
                                for stage, r in stages.items()} for eps, stages in results.items()}}
    args.out.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
