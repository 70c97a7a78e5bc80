"""A pooled mean's accuracy against OpenDP's own central mean on the union of the same data.

Reproducible: ``uv run --group dev python bench/mean_accuracy.py [--draws 1000]``. The NCCTG lung
cancer data (228 patients, as lifelines ships it) is split over 4 sites (and 2 and 8); each site's
real engine computes the exact components of ``SELECT mean(age) FROM lung`` under a policy with
age bounds [0, 120] (also [18, 100]), and the site's own noise source (OpenDP) releases them at
each epsilon; the releases are pooled as the broker pools them. Against it: OpenDP's polars
``Context`` releasing ``dp.mean`` of the same bounds on the union, at the same epsilon, for the
same number of draws. Per system it reports the empirical standard error of the estimates (their
root mean squared error against the exact mean), the mean 95% half-width the system reports (OpenDP
reports none for a mean), and how often that interval covers the exact mean. Prints a table and
writes JSON. Post-processing only: no gRPC, so the figures are the mechanisms', not the network's.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
from fractions import Fraction
from pathlib import Path

import duckdb
import opendp.prelude as dp
import polars as pl
from lifelines.datasets import load_lung

from gateway import _mechanisms as mechanisms
from gateway._engine import Engine, ExactResult
from gateway._sqlfront import parse_sql
from gateway.aggregates import KINDS
from gateway.policy import load_policy
from gateway.query import check_query

ROOT = Path(__file__).resolve().parent.parent
SQL = "SELECT mean(age) FROM lung"
EPSILONS = (Fraction(1), Fraction(1, 10))
BOUNDS = ((0, 120), (18, 100))
SITES = (2, 4, 8)
POLICY = """site: {site}
accounting: pure
epsilon: {{default: 1.0, max: 1.0}}
period_start: 2026-01-01T00:00:00Z
datasets:
  lung:
    source: {{database: {site}.duckdb, table: lung}}
    privacy_unit: patient_id
    max_rows_per_unit: 1
    aggregates: [count, mean]
    columns:
      age: {{type: integer, roles: [aggregate], bounds: [{low}, {high}]}}
"""

Release = tuple[mechanisms.Plan, ExactResult]


def lung() -> pl.DataFrame:
    """The lung data with a patient id per row."""
    frame = pl.from_pandas(load_lung()[["age"]]).with_columns(pl.col("age").cast(pl.Int64))
    return frame.with_row_index("patient_id").with_columns(pl.col("patient_id").cast(pl.Int64))


def exact_releases(workdir: Path, data: pl.DataFrame, sites: int, bounds: tuple[int, int],
                   epsilon: Fraction) -> list[Release]:
    """Each site's plan and exact components, the patients dealt to the sites in turn."""
    releases = []
    for index in range(sites):
        folder = workdir / f"k{sites}-{bounds[0]}-{bounds[1]}"
        folder.mkdir(parents=True, exist_ok=True)
        site = f"site{index}"
        part = data.filter(pl.col("patient_id") % sites == index)
        with duckdb.connect(str(folder / f"{site}.duckdb")) as con:
            con.register("part", part.to_arrow())
            con.execute("CREATE OR REPLACE TABLE lung AS SELECT * FROM part")
        (folder / f"{site}.yaml").write_text(POLICY.format(site=site, low=bounds[0], high=bounds[1]))
        loaded = load_policy(folder / f"{site}.yaml")
        query = check_query(parse_sql(SQL), loaded.policy)
        plan = mechanisms.plan_query(query, loaded.policy.datasets["lung"], epsilon)
        engine = Engine(loaded)
        try:
            releases.append((plan, engine.run(query)))
        finally:
            engine.close()
    return releases


def pooled(releases: list[Release], draws: int, truth: float) -> dict[str, float]:
    """Pooled means over ``draws`` releases: RMSE, reported half-width, coverage of the exact mean."""
    kind = KINDS["mean"]
    errors, halves, covered = [], [], 0
    for _ in range(draws):
        parts = []
        for plan, result in releases:
            rows = mechanisms.release(plan, result.groups, result.components, mechanisms.Noise())
            parts.append({p.name: p for p in rows[0].estimates[0].parts})
        declared = releases[0][0].aggregates[0].declared
        value = kind.estimate(kind.pool(parts), declared, clamp=True)
        errors.append(value.value - truth)
        halves.append(value.half_width)
        covered += value.ci_low <= truth <= value.ci_high
    return {"rmse": math.sqrt(statistics.fmean(e * e for e in errors)), "half_width": statistics.fmean(halves),
            "coverage": covered / draws}


def opendp_context(data: pl.DataFrame, bounds: tuple[int, int], epsilon: Fraction, draws: int,
                   truth: float) -> dict[str, float]:
    """OpenDP's ``Context`` releasing ``dp.mean`` on the union ``draws`` times at ``epsilon`` each."""
    dp.enable_features("contrib")
    context = dp.Context.compositor(data=data.lazy(), privacy_unit=dp.unit_of(contributions=1),
                                    privacy_loss=dp.loss_of(epsilon=float(epsilon)), split_evenly_over=1,
                                    margins=[dp.polars.Margin(by=[], max_length=10_000)])
    # the Context's measurement for this query, resolved once and applied afresh for each draw
    measurement = context.query().select(pl.col("age").fill_null(0).dp.mean(bounds)).resolve()
    errors = [measurement(data.lazy()).collect().item() - truth for _ in range(draws)]
    return {"rmse": math.sqrt(statistics.fmean(e * e for e in errors)), "half_width": math.nan,
            "coverage": math.nan}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=1000)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "gateway-mean-accuracy")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "mean_accuracy.json")
    args = parser.parse_args()
    data = lung()
    truth = float(data["age"].mean())  # type: ignore[arg-type]
    rows = []
    for bounds in BOUNDS:
        for epsilon in EPSILONS:
            central = opendp_context(data, bounds, epsilon, args.draws, truth)
            rows.append({"bounds": list(bounds), "epsilon": float(epsilon), "system": "OpenDP Context (union)",
                         **central})
            for sites in SITES:
                ours = pooled(exact_releases(args.workdir, data, sites, bounds, epsilon), args.draws, truth)
                rows.append({"bounds": list(bounds), "epsilon": float(epsilon), "system": f"gateway, {sites} sites",
                             **ours, "se_ratio_to_opendp": ours["rmse"] / central["rmse"]})
    print(f"lung: {data.height} patients, exact mean age {truth:.2f}; {args.draws} draws per row")
    print(f"{'bounds':>9} {'eps':>4} {'system':<24} {'rmse':>7} {'±95%':>7} {'cover':>6} {'ratio':>6}")
    for r in rows:
        ratio = r.get("se_ratio_to_opendp", math.nan)
        print(f"{tuple(r['bounds'])!s:>9} {r['epsilon']:>4g} {r['system']:<24} {r['rmse']:>7.3f} "
              f"{r['half_width']:>7.3f} {r['coverage']:>6.3f} {ratio:>6.2f}")
    report = {"data": "NCCTG lung (lifelines), age", "patients": data.height, "exact_mean": truth,
              "draws": args.draws, "rows": [{k: None if isinstance(v, float) and math.isnan(v) else v
                                             for k, v in r.items()} for r in rows]}
    args.out.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
