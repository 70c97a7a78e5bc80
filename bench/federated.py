"""Federated accuracy: the pooled estimate over K = 2, 4 and 8 sites against OpenDP Context on the union.

One command: ``uv run --group bench python bench/federated.py`` (``--quick`` for a smoke run). One
registry of ``--rows`` patients is split by patient into K site files (the same union for every
K). Per site, the real engine computes the exact components of each query and the site's own
noise source (OpenDP) releases them at the query's epsilon; the broker's pooling code
(:func:`gateway.broker.pooling.pool`) pools the K answers. OpenDP's polars Context answers the
same query on the union at the same epsilon. Reported: the relative RMSE of each against the
exact answer over ``--draws`` releases. Survival by stage: the pooled events and censorings per
month give a Kaplan-Meier curve per stage (:mod:`gateway.survival`); OpenDP Context releases the
same counts on the union (one noisy count per stage, outcome and month: each patient in one cell,
as at a site) and the same code draws its curve; reported, the curves' mean absolute error over the
grid against the union's exact curve, averaged over the stages. Post-processing and noise only, no gRPC: the figures are
the mechanisms' and the pooling's. Writes ``bench/results/federated.json``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from fractions import Fraction
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import duckdb

from bench._common import RESULTS, WORK, bench_policy, dataset, quick, write_json
from bench.compare import Case, OpenDPContext, _cases, _vector
from gateway import _mechanisms as mechanisms
from gateway._engine import Engine
from gateway._proto.gateway.v1 import gateway_pb2 as pb
from gateway._sqlfront import parse_sql
from gateway._wire import rows_to_wire
from gateway.aggregates import KINDS
from gateway.broker.pooling import pool
from gateway.policy import load_policy
from gateway.query import check_query
from gateway.survival import kaplan_meier, split_counts

QUERIES = ("count, filtered", "group-by count", "mean")
STAGES = ("I", "II", "III", "IV")
SURVIVAL = "SELECT stage, survival(survival_months, death) FROM patients GROUP BY stage"


def split(union: Path, k: int, workdir: Path) -> list[Path]:
    """``union``'s patients (and their treatments) in ``k`` site files, by patient id."""
    paths = []
    for i in range(k):
        path = workdir / "federated" / f"{union.stem}-site{i}-of-{k}.duckdb"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            with duckdb.connect(str(path)) as con:
                con.execute(f"ATTACH '{union}' AS u (READ_ONLY)")
                for table in ("patients", "treatments"):
                    con.execute(f"CREATE TABLE {table} AS SELECT * FROM u.{table} WHERE patient_id % {k} = {i}")
        paths.append(path)
    return paths


class Site:
    """One site's plan and exact components for a query (the real engine on its split)."""

    def __init__(self, data: Path, name: str, workdir: Path) -> None:
        self.name = name
        self.loaded = load_policy(bench_policy(data, workdir / "federated" / f"{data.stem}.yaml", site=name))
        self.engine = Engine(self.loaded)

    def prepare(self, case: Case, epsilon: float) -> tuple[Any, Any, Any]:
        query = check_query(parse_sql(case.gateway), self.loaded.policy)
        dataset_ = self.loaded.policy.datasets[query.dataset]
        return query, mechanisms.plan_query(query, dataset_, Fraction(repr(epsilon))), self.engine.run(query)

    def answer(self, prepared: tuple[Any, Any, Any]) -> pb.QueryResponse:
        query, plan, exact = prepared
        rows = mechanisms.release(plan, exact.groups, exact.components, mechanisms.Noise(),
                                  self.loaded.policy.suppression.min_count)
        response = pb.QueryResponse(dataset=query.dataset, group_by=list(query.group_by),
                                    aggregates=[a.label for a in query.aggregates], served_by=self.name)
        response.rows.extend(rows_to_wire(rows, query.group_by))
        return response


def _pooled_vector(response: pb.QueryResponse, case: Case) -> list[float]:
    if case.keys:
        values = {r.keys[0].value.string_value: r.estimates[0].value for r in response.rows}
        return [values.get(k, 0.0) for k in case.keys]
    return [e.value for e in response.rows[0].estimates]


def _relative_rmse(draws: list[list[float]], exact: list[float]) -> float:
    errors = [(v - e) / max(abs(e), 1.0) for d in draws for v, e in zip(d, exact, strict=True)]
    return math.sqrt(statistics.fmean(x * x for x in errors))


def _curve_error(counts_by_stage: list[list[float]], exact: list[list[float]], edges: tuple[float, ...],
                 noise_variance: float) -> float:
    """The curves' mean absolute error over the grid against the exact curves, averaged over the stages."""
    errors = []
    for counts, truth in zip(counts_by_stage, exact, strict=True):
        curve = kaplan_meier(edges, *split_counts(counts), noise_variance)
        errors.append(statistics.fmean(abs(a - b) for a, b in zip(curve.survival, truth, strict=True)))
    return statistics.fmean(errors)


def survival_rows(union: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Pooled survival curves by stage over K sites, and OpenDP Context's on the union, against the exact curve."""
    import opendp.prelude as dp
    import polars as pl

    dp.enable_features("contrib")
    whole = Site(union, "union", args.workdir)
    try:
        query = check_query(parse_sql(SURVIVAL), whole.loaded.policy)
        plan = mechanisms.plan_query(query, whole.loaded.policy.datasets["patients"], Fraction(1))
        edges = plan.aggregates[0].declared.edges
        result = whole.engine.run(query)
        counts = result.components[0]
        if [str(g[0]) for g in result.groups] != list(STAGES):
            raise SystemExit(f"the policy's stages are not {STAGES}: {result.groups}")
    finally:
        whole.engine.close()
    size = 2 * len(edges)
    exact = [kaplan_meier(edges, *split_counts(counts[g * size:(g + 1) * size]), 0.0).survival
             for g in range(len(STAGES))]
    # Context on the union: each patient's cell as the site counts it (monthly grid from 0: a time t
    # in (i - 1, i] is at index i; censored at n + i; past the grid's end censored at its last time)
    n, last = len(edges), int(edges[-1])
    with duckdb.connect(str(union), read_only=True) as con:
        frame = con.sql(f"SELECT stage, CASE WHEN survival_months > {last} THEN {2 * n - 1} "
                        f"WHEN death = 1 THEN greatest(survival_months, 0) ELSE {n} + greatest(survival_months, 0) "
                        "END AS cell FROM patients WHERE stage IN ('I', 'II', 'III', 'IV') AND death IN (0, 1) "
                        "AND survival_months IS NOT NULL").pl()
    keys = pl.DataFrame({"stage": [s for s in STAGES for _ in range(size)], "cell": list(range(size)) * len(STAGES)},
                        schema={"stage": pl.String, "cell": frame.schema["cell"]})
    results = []
    for eps in args.epsilons:
        context_errors = []
        for _ in range(args.context_draws):
            context = dp.Context.compositor(data=frame.lazy(), privacy_unit=dp.unit_of(contributions=1),
                                            privacy_loss=dp.loss_of(epsilon=eps), split_evenly_over=1,
                                            margins=[dp.polars.Margin(by=[], max_length=len(frame))])
            out = (context.query().group_by("stage", "cell").agg(dp.len(signed=True)).with_keys(keys)
                   .release().collect().sort("stage", "cell"))
            found = {(r[0], r[1]): float(r[2]) for r in out.rows()}
            released = [[found.get((stage, c), 0.0) for c in range(size)] for stage in STAGES]
            context_errors.append(_curve_error(released, exact, edges, 2 / eps**2))  # Laplace(1/eps) variance
        for k in args.sites:
            sites = [Site(path, f"site{i}", args.workdir) for i, path in enumerate(split(union, k, args.workdir))]
            try:
                prepared = [s.prepare(Case("survival", "patients", SURVIVAL, "", None, ""), eps) for s in sites]
                pooled_errors = []
                for _ in range(args.draws):
                    rows = [mechanisms.release(plan_, exact_.groups, exact_.components, mechanisms.Noise())
                            for _, plan_, exact_ in prepared]
                    by_stage = []
                    for g in range(len(STAGES)):
                        parts = [{p.name: p for p in site_rows[g].estimates[0].parts} for site_rows in rows]
                        pooled_counts = KINDS["survival"].pool(parts)["counts"]
                        by_stage.append((list(pooled_counts.values), pooled_counts.std_error ** 2))
                    pooled_errors.append(statistics.fmean(
                        _curve_error([values], [truth], edges, variance)
                        for (values, variance), truth in zip(by_stage, exact, strict=True)))
            finally:
                for s in sites:
                    s.engine.close()
            row = {"query": "survival by stage", "sites": k, "epsilon": eps, "metric": "curve_mean_abs_error",
                   "pooled_curve_error": statistics.fmean(pooled_errors),
                   "context_curve_error": statistics.fmean(context_errors)}
            results.append(row)
            print(f"K={k} survival by stage epsilon {eps:g}: pooled curve error {row['pooled_curve_error']:.2e}, "
                  f"OpenDP Context on the union {row['context_curve_error']:.2e}", flush=True)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000, help="patients in the union")
    parser.add_argument("--sites", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--epsilons", type=float, nargs="+", default=[0.1, 1.0])
    parser.add_argument("--draws", type=int, default=200, help="pooled releases per query, K and epsilon")
    parser.add_argument("--context-draws", type=int, default=20, help="OpenDP Context releases per query and epsilon")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 20,000 patients, few draws")
    parser.add_argument("--workdir", type=Path, default=WORK)
    parser.add_argument("--out", type=Path, default=RESULTS / "federated.json")
    args = parser.parse_args()
    if args.quick:
        quick(args, parser, rows=20_000, draws=20, context_draws=3, epsilons=[1.0])
    union = dataset(args.rows, args.workdir)
    cases = [c for c in _cases() if c.name in QUERIES]
    with duckdb.connect(str(union), read_only=True) as con:
        exact = {c.name: _vector([list(r) for r in con.execute(c.raw).fetchall()], c.keys) for c in cases}
    context = OpenDPContext(union)
    baseline = {(c.name, eps): _relative_rmse([context.run(c, eps, 0)[0] for _ in range(args.context_draws)],
                                              exact[c.name]) for c in cases for eps in args.epsilons}
    results = []
    for k in args.sites:
        sites = [Site(path, f"site{i}", args.workdir) for i, path in enumerate(split(union, k, args.workdir))]
        try:
            for case in cases:
                for eps in args.epsilons:
                    prepared = [s.prepare(case, eps) for s in sites]
                    draws = [_pooled_vector(pool([(s.name, s.answer(p)) for s, p in zip(sites, prepared, strict=True)],
                                                 "broker"), case) for _ in range(args.draws)]
                    row = {"query": case.name, "sites": k, "epsilon": eps,
                           "pooled_relative_rmse": _relative_rmse(draws, exact[case.name]),
                           "context_relative_rmse": baseline[(case.name, eps)]}
                    results.append(row)
                    print(f"K={k} {case.name:<16} epsilon {eps:g}: pooled {row['pooled_relative_rmse']:.2e}, "
                          f"OpenDP Context on the union {row['context_relative_rmse']:.2e}", flush=True)
        finally:
            for s in sites:
                s.engine.close()
    results += survival_rows(union, args)
    write_json(args.out, {"kind": "smoke" if args.quick else "full", "rows": args.rows, "draws": args.draws,
                          "context_draws": args.context_draws, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
