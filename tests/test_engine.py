"""The engine (gateway._engine) sums fixed-point integers: no row contributes more than the noise is sized for.

A bound times 10^precision that ends in .5 once let a clamped row add one unit more than the
sensitivity (Python rounds half to even, DuckDB half away from zero): the true epsilon was up to
1.5x the charge. The fix clamps the scaled, rounded integer against ``Column.fixed_bounds``, the
same integers the DP layer reads; these tests hold the engine's SQL to that, for any bounds.
"""

from __future__ import annotations

import math
import time
from concurrent import futures
from decimal import ROUND_HALF_UP, Decimal
from fractions import Fraction

import duckdb
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from gateway import _engine as engine_module
from gateway import _mechanisms as mechanisms
from gateway._engine import Engine, EngineLimits
from gateway._querysql import build_sql, quote
from gateway.aggregates import KINDS, Kind
from gateway.errors import FailedPrecondition, Unavailable
from gateway.policy import MAX_FIXED_BOUND, Bins, Column, Dataset, Source, load_policy
from gateway.query import Aggregate, Query
from tests.helpers.data import copy_data, exact, slow_copy
from tests.helpers.policies import example_policy, with_column, with_dataset, with_slow_dataset, write_policy
from tests.helpers.servers import ExactNoise, client


def _dataset(column: Column, rows: int, k: int = 1) -> Dataset:
    return Dataset(source=Source(database="x.duckdb", table="t"), privacy_unit="pid", max_rows_per_unit=k,
                   columns={"x": column, "i": Column(type="integer", roles=("group_by",), keys=tuple(range(rows)))})


def _adversarial(column: Column) -> list[float]:
    """Values at, beyond and half a unit around every bound, and far outside them."""
    assert column.bounds is not None
    unit = column.unit
    low, high = column.bounds
    fixed_low, fixed_high = column.fixed_bounds
    edges = [low, high, fixed_low / unit, fixed_high / unit]
    values = [e + d / unit for e in edges for d in (-1.5, -1, -0.5, -0.25, 0, 0.25, 0.5, 1, 1.5)]
    values += [math.nextafter(e, s) for e in edges for s in (-math.inf, math.inf)]
    values += [0.0, 1e15, -1e15, math.inf, -math.inf]
    if column.type == "integer":
        return sorted({float(round(v)) for v in values if math.isfinite(v)})
    return values


def per_row_components(column: Column, values: list[float], function: str = "sum") -> list[tuple[int, ...]]:
    """The engine's own SQL for ``function(x)``, grouped so that each row is its own group: per row,
    what it adds to each of the kind's components."""
    dataset = _dataset(column, len(values))
    query = Query("d", (Aggregate(function, "x"),), group_by=("i",))
    sql, params, _groups = build_sql(query, dataset, "t")
    con = duckdb.connect()
    sql_type = "BIGINT" if column.type == "integer" else "DOUBLE"
    con.execute(f"CREATE TABLE t (i BIGINT, pid BIGINT, {quote('x')} {sql_type})")
    con.executemany("INSERT INTO t VALUES (?, ?, ?)",
                    [(i, i, int(v) if column.type == "integer" else v) for i, v in enumerate(values)])
    got = {row[0]: tuple(int(v) for v in row[1:]) for row in con.execute(sql, params).fetchall()}
    return [got[i] for i in range(len(values))]


def per_row_contributions(column: Column, values: list[float]) -> list[int]:
    """What each row adds to ``sum(x)``."""
    return [c[0] for c in per_row_components(column, values)]


@st.composite
def columns(draw: st.DrawFn) -> Column:
    kind = draw(st.sampled_from(["integer", "float"]))
    precision = draw(st.integers(-1, 6))
    # bounds on a grid of halves and quarters at the column's precision hit the rounding ties
    step = Fraction(1, 4 * 10 ** max(precision, 0))
    low = draw(st.integers(-4000, 4000)) * step * draw(st.sampled_from([1, 10, 1000]))
    width = draw(st.integers(1, 8000)) * step * draw(st.sampled_from([1, 10, 1000]))
    try:
        return Column(type=kind, roles=("aggregate",), bounds=(float(low), float(low + width)), precision=precision)
    except ValidationError:
        assume(False)
        raise


@pytest.mark.slow
@settings(max_examples=150, deadline=None)
@given(columns())
def test_no_row_contributes_more_than_the_sensitivity(column: Column) -> None:
    k = 3
    plan = mechanisms.plan_query(Query("d", (Aggregate("sum", "x"),)), _dataset(column, 1, k), Fraction(1))
    sensitivity_per_row = plan.aggregates[0].components[0].sensitivity / k
    contributions = per_row_contributions(column, _adversarial(column))
    low, high = column.fixed_bounds
    assert all(low <= c <= high for c in contributions)
    assert max(abs(c) for c in contributions) <= sensitivity_per_row
    # and the bound is tight: a row at the declared upper bound reaches the fixed-point upper bound
    assert high in contributions


@pytest.mark.slow
@settings(max_examples=100, deadline=None)
@given(columns(), st.sampled_from([k for k in KINDS.values() if k.columns == 1 and not k.parameters
                                    and not any(spec.shape_over(2) for spec in k.components)]))
def test_no_row_adds_more_to_any_component_than_its_sensitivity(column: Column, kind: Kind) -> None:
    k = 2
    plan = mechanisms.plan_query(Query("d", (Aggregate(kind.name, "x"),)), _dataset(column, 1, k), Fraction(1))
    sensitivities = [c.sensitivity / k for c in plan.aggregates[0].components]
    rows = per_row_components(column, _adversarial(column), kind.name)
    for j, bound in enumerate(sensitivities):
        assert max(abs(row[j]) for row in rows) <= bound, kind.components[j].name


@pytest.mark.parametrize(("bounds", "precision", "expected"), [
    ((0, 2.5), 0, (0, 2)),       # the reported case: Python's round(2.5) == 2, DuckDB's round(2.5) == 3
    ((0, 0.25), 1, (0, 2)),
    ((-2.5, 2.5), 0, (-2, 2)),
    ((0.1, 0.7), 1, (1, 7)),     # decimal meaning: 0.1 is one tenth, not the float just above it
    ((15, 50), 1, (150, 500)),
])
def test_fixed_bounds_round_inward_exactly(bounds, precision, expected) -> None:
    column = Column(type="float", roles=("aggregate",), bounds=bounds, precision=precision)
    assert column.fixed_bounds == expected
    contributions = per_row_contributions(column, [bounds[1], bounds[1] + 0.5, bounds[0] - 0.5, 1e12])
    assert max(contributions) == expected[1]
    assert min(contributions) >= expected[0]


@pytest.mark.parametrize(("bounds", "precision", "reason"), [
    ((0, math.inf), 0, "bounds must be finite numbers"),
    ((-math.inf, 0), 0, "bounds must be finite numbers"),
    ((0, math.nan), 0, "bounds must be finite numbers"),
    ((0.1, 0.4), 0, "hold fewer than two values at precision 0"),
    ((0, MAX_FIXED_BOUND + 1), 0, "could overflow 64-bit integers"),
    ((0, 1e6), 6, "could overflow 64-bit integers"),
])
def test_bounds_that_cannot_be_summed_exactly_are_refused(bounds, precision, reason) -> None:
    with pytest.raises(ValidationError, match=reason):
        Column(type="float", roles=("aggregate",), bounds=bounds, precision=precision)


def test_a_half_unit_bound_charges_what_a_row_can_add_through_the_site(start_site, token, site_data, tmp_path):
    # bmi bounded at 20.25 with precision 1: a row above it adds 20.2 (202 units), never 20.3
    halves = with_column(example_policy(), "patients", "bmi", roles=("filter", "aggregate"), bounds=(15, 20.25))
    site = start_site(noise=ExactNoise(), policy=write_policy(tmp_path, site_data, policy=halves))
    (above,), = exact(site_data, "SELECT count(*) FROM patients WHERE bmi >= 20.3")
    assert above > 10
    with client(site, token) as c:
        result = c.query("SELECT sum(bmi) FROM patients WHERE bmi >= 20.3", epsilon=1)
    estimate = result.response.rows[0].estimates[0]
    assert estimate.value == pytest.approx(20.2 * above)
    assert estimate.noise_scale == pytest.approx(202 / 1 / 10)  # sensitivity 202 units, in units of 0.1


@pytest.mark.slow
def test_closing_the_engine_stops_its_running_statement(tmp_path, site_data) -> None:
    """A reload retires an engine and a stopping site closes its own: a statement still running is
    interrupted (the caller is told to retry; nothing was charged) instead of the close failing on a
    busy DuckDB connection."""
    data = slow_copy(site_data, tmp_path / "slow.duckdb", copies=500, work=200)
    folder = tmp_path / "policy"
    folder.mkdir()
    engine = Engine(load_policy(write_policy(folder, data, policy=with_slow_dataset(example_policy()))), tmp_path)
    engine.prepare_all()
    query = Query("slow", (Aggregate("sum", "age_at_diagnosis"),))
    with futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(engine.run, query)
        time.sleep(0.5)  # inside the statement
        started = time.monotonic()
        engine.close()
        closing = time.monotonic() - started
        with pytest.raises(Unavailable, match="stopped the query"):
            running.result(timeout=10)
    assert closing < 1.0  # the statement alone takes seconds


# --- clamping skipped where the loaded data lies within its bounds: the same exact components ----------------

WITHIN_QUERIES = [
    Query("patients", (Aggregate("sum", "age_at_diagnosis"), Aggregate("mean", "survival_months"),
                       Aggregate("variance", "bmi"), Aggregate("count"))),
    Query("patients", (Aggregate("mean", "bmi"), Aggregate("sum", "survival_months")), group_by=("stage",)),
    Query("treatments", (Aggregate("sum", "cycles"), Aggregate("mean", "days_from_diagnosis"),
                         Aggregate("sum", "cost_usd"), Aggregate("variance", "cost_usd"))),
    Query("treatments", (Aggregate("mean", "cycles"),), group_by=("treatment_type",)),
]


def _engine(tmp_path, data, policy=None) -> Engine:
    folder = tmp_path / "policy"
    folder.mkdir(exist_ok=True)
    engine = Engine(load_policy(write_policy(folder, data, policy=policy)), tmp_path)
    engine.prepare_all()
    return engine


def test_only_columns_whose_loaded_values_all_lie_within_bounds_skip_clamping(tmp_path, site_data) -> None:
    engine = _engine(tmp_path, site_data)
    try:
        assert engine._ensure("patients").within == {"age_at_diagnosis", "survival_months", "bmi"}
        # the synthetic costs reach 250,000 and the policy bounds them at 100,000: clamped
        assert exact(site_data, "SELECT max(cost_usd) FROM treatments")[0][0] > 100_000
        assert engine._ensure("treatments").within == {"days_from_diagnosis", "cycles"}
    finally:
        engine.close()


@pytest.mark.parametrize("query", WITHIN_QUERIES, ids=lambda q: f"{q.dataset}-{len(q.aggregates)}-{q.group_by}")
def test_skipping_the_clamp_gives_the_same_exact_components(tmp_path, site_data, query: Query) -> None:
    engine = _engine(tmp_path, site_data)
    try:
        prepared = engine._ensure(query.dataset)
        assert prepared.within  # the skip is in play
        dataset = engine._loaded.policy.datasets[query.dataset]
        fast = build_sql(query, dataset, prepared.relation, within=prepared.within)[0]
        clamped, params, _ = build_sql(query, dataset, prepared.relation)
        assert fast != clamped
        assert engine.run(query).components == _components(engine, query, clamped, params)
    finally:
        engine.close()


def _components(engine: Engine, query: Query, sql: str, params: list[object]) -> tuple[tuple[int, ...], ...]:
    """The exact components of ``sql`` (every column clamped), grouped as the engine groups them."""
    rows = engine._con.execute(sql, params).fetchall()
    if not query.group_by:
        return tuple((int(v),) for v in rows[0])
    groups = build_sql(query, engine._loaded.policy.datasets[query.dataset], "x")[2]
    found = {(r[0],): r[1:] for r in rows}
    return tuple(tuple(int(found[g][i]) if g in found else 0 for g in groups) for i in range(len(rows[0]) - 1))


def test_a_snapshot_built_in_passes_keeps_exactly_the_rows_of_one_pass(tmp_path, site_data, monkeypatch) -> None:
    """Building in passes over disjoint sets of patients bounds memory, not which rows are kept."""
    total = exact(site_data, "SELECT count(*) FROM treatments")[0][0]
    kept = []
    for rows_per_pass in (10**12, 97):  # one pass; then several, each only a part of the patients
        monkeypatch.setattr(engine_module, "SNAPSHOT_PASS_ROWS", rows_per_pass)
        folder = tmp_path / str(rows_per_pass)
        folder.mkdir()
        engine = Engine(load_policy(write_policy(folder, site_data)), folder, seed=b"\x01" * 16)
        try:
            prepared = engine._ensure("treatments")
            assert prepared.bounded
            kept.append(sorted(engine._con.execute(f"SELECT * FROM {prepared.relation}").fetchall(), key=repr))
        finally:
            engine.close()
    assert total > 5 * 97
    assert kept[0] == kept[1]
    assert 0 < len(kept[0]) < total  # the bound is in play: some patients have more rows than it keeps


def test_a_view_is_always_clamped(tmp_path, site_data) -> None:
    """A view may read files of its own that change under the engine: its values are never trusted."""
    data = copy_data(site_data, tmp_path / "views.duckdb")
    with duckdb.connect(str(data)) as con:
        con.execute("CREATE VIEW patients_view AS SELECT * FROM patients")
    patients = example_policy().datasets["patients"]
    policy = with_dataset(example_policy(), "patients",
                          source=patients.source.model_copy(update={"table": "patients_view"}))
    engine = _engine(tmp_path, data, policy)
    try:
        assert engine._ensure("patients").within == frozenset()
        assert engine._ensure("treatments").within  # a bounded snapshot is the engine's own table
    finally:
        engine.close()


# --- survival: each row adds 1 to one grid time's count, the one the policy's grid documents ----------------

EVENTS = (1, 0, None, 2, -1)


@st.composite
def time_columns(draw: st.DrawFn) -> Column:
    """A time column with a grid: regular or explicit edges, at the column's precision, anywhere."""
    kind = draw(st.sampled_from(["integer", "float"]))
    precision = draw(st.integers(-1, 3)) if kind == "float" else draw(st.sampled_from([-1, 0, 1]))
    unit = 10 ** (precision if precision >= 0 else (0 if kind == "integer" else 2))
    start = draw(st.integers(-500, 500))
    if draw(st.booleans()):
        width, count = draw(st.integers(1, 60)), draw(st.integers(1, 40))
        bins = Bins(min=Fraction(start, unit), width=Fraction(width, unit), max=Fraction(start + width * count, unit))
    else:
        steps = draw(st.lists(st.integers(1, 60), min_size=1, max_size=30))
        edges = [start + sum(steps[:i]) for i in range(len(steps) + 1)]
        bins = Bins(edges=tuple(Fraction(e, unit) for e in edges))
    low, high = float(bins.exact_edges[0]) - 1, float(bins.exact_edges[-1]) + 1
    return Column(type=kind, roles=("aggregate",), bounds=(low, high), precision=precision, bins=bins)


def _times(column: Column) -> list[float | None]:
    """At, just around and half a unit around every grid time, far outside the grid, and missing."""
    unit = column.unit
    values: list[float | None] = [e + d / unit for e in column.grid for d in (-1, -0.5, -0.25, 0, 0.25, 0.5, 1)]
    values += [column.grid[0] - 1e6, column.grid[-1] + 1e6, 1e15, -1e15, None]
    if column.type == "integer":
        return [None if v is None else float(round(v)) for v in values]
    return [*values, math.inf, -math.inf]


def _fixed(value: float, column: Column) -> int:
    """The time as the engine compares it: clamped near the grid, scaled, rounded half away from zero."""
    low, high = column.grid[0] - 1, column.grid[-1] + 1
    clamped = min(max(value, low), high)
    return int(Decimal(clamped * column.unit).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def _expected_index(value: float | None, event: int | None, column: Column) -> int | None:
    """The documented rule: the first grid time at or after the time; past the end, censored there."""
    if value is None or event not in (0, 1):
        return None
    edges, n = column.fixed_grid, len(column.grid)
    fixed = _fixed(value, column)
    if fixed > edges[-1]:
        return 2 * n - 1
    i = next(i for i, edge in enumerate(edges) if fixed <= edge)
    return i if event == 1 else n + i


@pytest.mark.slow
@settings(max_examples=120, deadline=None)
@given(time_columns())
def test_each_survival_row_adds_one_to_its_documented_count_and_nothing_else(column: Column) -> None:
    """Per row, the L1 norm of what it adds to the survival vector is at most the kind's row bound (1),
    exactly 1 for a row with a time and an event of 0 or 1, at the index the grid's rule gives."""
    (spec,) = KINDS["survival"].components
    times = _times(column)
    rows = [(i, t, EVENTS[i % len(EVENTS)]) for i, t in enumerate(times)]
    dataset = Dataset(source=Source(database="x.duckdb", table="t"), privacy_unit="pid", max_rows_per_unit=1,
                      columns={"t": column, "e": Column(type="integer", roles=("event",)),
                               "i": Column(type="integer", roles=("group_by",), keys=tuple(range(len(rows))))})
    sql, params, _ = build_sql(Query("d", (Aggregate("survival", "t", ("e",)),), group_by=("i",)), dataset, "t")
    con = duckdb.connect()
    con.execute(f"CREATE TABLE t (i BIGINT, pid BIGINT, t {'BIGINT' if column.type == 'integer' else 'DOUBLE'}, "
                "e BIGINT)")
    con.executemany("INSERT INTO t VALUES (?, ?, ?, ?)",
                    [(i, i, None if t is None else (int(t) if column.type == "integer" else t), e)
                     for i, t, e in rows])
    got = {row[0]: row[1] or {} for row in con.execute(sql, params).fetchall()}
    for i, t, e in rows:
        added = got.get(i, {})
        assert sum(abs(v) for v in added.values()) <= spec.row_bound(column)
        expected = _expected_index(t, e, column)
        assert added == ({} if expected is None else {expected: 1}), (t, e, column.grid)


def _expected_bin(value: float | None, column: Column) -> int | None:
    """The documented rule: the bin [t_i, t_(i+1)) holding the value, the last bin closed; outside, clamped."""
    if value is None:
        return None
    edges = column.fixed_grid
    fixed = _fixed(value, column)
    return min(max(sum(fixed >= edge for edge in edges[1:]), 0), len(edges) - 2)


@pytest.mark.slow
@settings(max_examples=120, deadline=None)
@given(time_columns())
def test_each_histogram_row_adds_one_to_its_documented_bin_and_nothing_else(column: Column) -> None:
    """Per row, the L1 norm of what it adds to the histogram is at most the kind's row bound (1), exactly 1
    for a row with a value, in the bin the declared edges' rule gives (values outside clamped into the end bins)."""
    (spec,) = KINDS["histogram"].components
    values = _times(column)
    dataset = Dataset(source=Source(database="x.duckdb", table="t"), privacy_unit="pid", max_rows_per_unit=1,
                      columns={"t": column,
                               "i": Column(type="integer", roles=("group_by",), keys=tuple(range(len(values))))})
    sql, params, _ = build_sql(Query("d", (Aggregate("histogram", "t"),), group_by=("i",)), dataset, "t")
    con = duckdb.connect()
    con.execute(f"CREATE TABLE t (i BIGINT, pid BIGINT, t {'BIGINT' if column.type == 'integer' else 'DOUBLE'})")
    con.executemany("INSERT INTO t VALUES (?, ?, ?)",
                    [(i, i, None if t is None else (int(t) if column.type == "integer" else t))
                     for i, t in enumerate(values)])
    got = {row[0]: row[1] or {} for row in con.execute(sql, params).fetchall()}
    for i, t in enumerate(values):
        added = got.get(i, {})
        assert sum(abs(v) for v in added.values()) <= spec.row_bound(column)
        expected = _expected_bin(t, column)
        assert added == ({} if expected is None else {expected: 1}), (t, column.grid)


def test_the_operators_engine_limits_reach_duckdb(tmp_path, site_data) -> None:
    folder = tmp_path / "policy"
    folder.mkdir()
    engine = Engine(load_policy(write_policy(folder, site_data)), tmp_path,
                    limits=EngineLimits(memory_bytes=96 * 2**20, threads=1))
    try:
        assert engine._con.execute("SELECT current_setting('memory_limit'), current_setting('threads')"
                                   ).fetchone() == ("96.0 MiB", 1)
    finally:
        engine.close()


def test_a_query_past_the_engines_memory_is_refused_naming_the_setting(tmp_path, site_data, caplog) -> None:
    engine = _engine(tmp_path, site_data)
    try:
        engine._con.execute("SET memory_limit = '1MiB'")  # an operator's limit far below what the query needs
        with pytest.raises(FailedPrecondition) as info:
            engine.run(Query("patients", (Aggregate("median", "age_at_diagnosis"),), group_by=("stage",)))
        assert "ran out of memory" in info.value.message and "engine_memory_limit" in info.value.message
        assert "nothing was charged" in info.value.message
        assert "ran out of the engine's memory" in caplog.text  # and the operator reads it in the log
    finally:
        engine.close()


def test_data_that_cannot_be_bounded_within_the_engines_memory_fails_its_load_naming_the_setting(
        tmp_path, site_data) -> None:
    data = copy_data(site_data, tmp_path / "many.duckdb")
    with duckdb.connect(str(data)) as con:
        while con.execute("SELECT count(*) FROM treatments").fetchone()[0] < 3_000_000:
            # as many patients again: the window that bounds each patient's rows needs memory for them all
            con.execute("INSERT INTO treatments SELECT * REPLACE (patient_id + (SELECT max(patient_id) FROM "
                        "treatments) AS patient_id) FROM treatments")
    folder = tmp_path / "policy"
    folder.mkdir()
    engine = Engine(load_policy(write_policy(folder, data)), tmp_path, limits=EngineLimits(memory_bytes=64 * 2**20))
    try:
        with pytest.raises(FailedPrecondition) as info:
            engine.prepare_all()
        assert "'treatments' within the engine's memory" in info.value.message
        assert "raise engine_memory_limit" in info.value.message
    finally:
        engine.close()
