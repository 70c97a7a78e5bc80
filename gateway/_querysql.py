"""The SQL the engine asks DuckDB: one statement per query, every value a bound parameter.

Names come only from the policy (quoted identifiers). Each aggregate's components are computed as
the table of aggregate kinds declares them (:mod:`gateway.aggregates`): counts, fixed-point sums
clamped *as integers* to the policy's bounds (or not clamped, for a column whose loaded values are
all known to lie within them: the same numbers), sums about the bounds' midpoint, and vectors over
a declared grid (survival's events and censorings, a histogram's bins, a single-site quantile's
cells around the edges) or a regression's products.
Group keys that are not public are computed here but never leave the engine.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from .aggregates import REGRESSION_UNIT, ComponentSpec, Kind
from .answers import Scalar
from .policy import MISSING_GROUP, OTHER_GROUP, Column, Dataset
from .query import Aggregate, Filter, Query


def quote(name: str) -> str:
    """Quote an identifier taken from the policy (policy names are already plain identifiers)."""
    return '"' + name.replace('"', '""') + '"'


def build_sql(query: Query, dataset: Dataset, relation: str,
              cohorts: Mapping[str, tuple[str, str]] | None = None, within: frozenset[str] = frozenset()
              ) -> tuple[str, list[object], tuple[tuple[Scalar, ...], ...]]:
    """One statement for ``query``: clamped fixed-point aggregates, grouped by the group-by columns.

    ``cohorts``: per dataset a cohort filter reads, its privacy-unit column and the relation of all
    its rows; ``within``: columns known to lie within their bounds in ``relation`` (not clamped).
    Returns the SQL, its bound parameters and the public group keys in answer order.
    Groups whose key is not public are computed but never leave the engine (see :meth:`Engine.run`).
    """
    params: list[object] = []  # bound in the order the statement names them: groups, aggregates, filters
    keys = [k for name in query.group_by for k in _group_sql(name, dataset.columns[name], params)]
    exprs = [e for a, kind in zip(query.aggregates, query.kinds(), strict=True)
             for e in _aggregate_sql(a, kind, dataset, params, within)]
    where = [_cohort_sql(f, (cohorts or {})[f.cohort.dataset], params) if f.cohort is not None
             else _filter_sql(f, params) for f in query.filters]
    where_sql = f" WHERE {' AND '.join(where)}" if where else ""
    if not query.group_by:
        return f"SELECT {', '.join(exprs)} FROM {relation}{where_sql}", params, ((),)
    sql = f"SELECT {', '.join(keys)}, {', '.join(exprs)} FROM {relation}{where_sql} GROUP BY ALL"
    return sql, params, product_of_keys([dataset.columns[c].group_keys for c in query.group_by])


def _group_sql(name: str, column: Column, params: list[object]) -> tuple[str, ...]:
    """The select items a group-by column contributes.

    Its value; with ``other_groups`` instead the value if it is a public key, and a flag (0: a
    public key, 1: missing, 2: another value) that puts every other value in one group.
    """
    if not column.other_groups:
        return (quote(name),)
    marks = ", ".join("?" for _ in column.public_keys)
    params += [*column.public_keys, *column.public_keys]
    return (f"CASE WHEN {quote(name)} IN ({marks}) THEN {quote(name)} END",
            f"CASE WHEN {quote(name)} IN ({marks}) THEN 0 WHEN {quote(name)} IS NULL THEN 1 ELSE 2 END")


def group_key(values: Sequence[object], columns: Sequence[Column]) -> tuple[object, ...]:
    key: list[object] = []
    i = 0
    for column in columns:
        if column.other_groups:
            value, flag = values[i], values[i + 1]
            key.append(value if flag == 0 else MISSING_GROUP if flag == 1 else OTHER_GROUP)
            i += 2
        else:
            key.append(values[i])
            i += 1
    return tuple(key)


def product_of_keys(keys: Sequence[Sequence[Scalar]]) -> tuple[tuple[Scalar, ...], ...]:
    groups: list[tuple[Scalar, ...]] = [()]
    for column_keys in keys:
        groups = [(*g, k) for g in groups for k in column_keys]
    return tuple(groups)


def _aggregate_sql(agg: Aggregate, kind: Kind, dataset: Dataset, params: list[object],
                   within: frozenset[str] = frozenset()) -> list[str]:
    return [_regression_sql(agg.columns, dataset, params, within) if spec.sql == "regression_products"
            else _component_sql(spec, agg, dataset, params, within) for spec in kind.components]


def _component_sql(spec: ComponentSpec, agg: Aggregate, dataset: Dataset,  # noqa: PLR0911 (one per kind of sql)
                   params: list[object], within: frozenset[str] = frozenset()) -> str:
    sql, name = spec.sql, agg.column
    if sql == "rows":
        return "count(*)"
    assert name is not None
    column = dataset.columns[name]
    if sql == "values":
        return f"count({quote(name)})"
    if sql == "survival_bins":
        return _survival_sql(name, column, agg.more_columns[0], params)
    if sql == "histogram_bins":
        return _histogram_sql(name, column, params)
    clamp = name not in within
    if sql == "candidate_cells":
        return _cells_sql(name, column, params, clamp)
    fixed = _fixed_point(name, column, params, clamp)
    if sql == "sum":
        return f"coalesce(sum({fixed}), 0)"
    if sql == "midpoint_sum":  # twice the distance from the bounds' exact midpoint: an integer
        # sum(2 x fixed - (low + high)) over the values, as 2 x sum(fixed) - (low + high) x count: the
        # same integer (a value is NULL in both or in neither), and DuckDB sums a bare column faster.
        # |fixed| <= 2^31 (policy check); the sum is a HUGEINT, and so is the count's product
        low, high = column.fixed_bounds
        return (f"coalesce(2 * sum({fixed}) - {low + high} * CAST(count({quote(name)}) AS HUGEINT), 0)")
    centered = f"({fixed} - {column.fixed_center})"
    if sql == "centered_sum":  # sum(fixed - center) as sum(fixed) - center x count, as above
        return (f"coalesce(sum({fixed}) - {column.fixed_center} * CAST(count({quote(name)}) AS HUGEINT), 0)")
    # |centered| <= 2^31, so its square fits a BIGINT; DuckDB sums BIGINTs into a HUGEINT. The second
    # factor binds its own parameters (they are positional).
    again = f"({_fixed_point(name, column, params, clamp)} - {column.fixed_center})"
    return f"coalesce(sum({centered} * {again}), 0)"


def _fixed_point(name: str, column: Column, params: list[object], clamp: bool = True) -> str:
    """The value scaled to fixed point, rounded, and clamped *as an integer* to ``column.fixed_bounds``.

    Clamping after rounding, against the integers the DP layer sizes its noise from, makes the
    sensitivity exact by construction, whatever rounding rule DuckDB uses (half away from zero,
    where Python rounds half to even: clamping before rounding once let a row add one unit more).
    """
    low, high = column.fixed_bounds
    value = fixed_value(name, column)
    if not clamp:  # every value is known to lie within [low, high] (Engine._within_bounds): the same number
        return f"CAST({value} AS BIGINT)"
    params += [low, low, high, high]
    # CASE rather than least/greatest: same result, about twice as fast in DuckDB
    return f"CAST(CASE WHEN {value} < ? THEN ? WHEN {value} > ? THEN ? ELSE {value} END AS BIGINT)"


def fixed_value(name: str, column: Column) -> str:
    """The value scaled to fixed point and rounded, not yet clamped nor cast."""
    if column.type == "integer" and column.scale_digits == 0:
        # integers at unit precision are already fixed-point: clamping alone (about 4x faster)
        return quote(name)
    # |bounds| <= 2^31 (policy check), so these are exact integers in a double
    return f"round(CAST({quote(name)} AS DOUBLE) * {column.unit})"


def _regression_sql(names: Sequence[str], dataset: Dataset, params: list[object],
                    within: frozenset[str] = frozenset()) -> str:
    """The upper triangle of ZᵀZ, Z = [1, x1..xp, y] (``names`` is y, x1..xp), as one list per group.

    Each variable is standardised as an integer: its clamped fixed-point value f in [l, u] becomes
    round(R (2f - l - u) / (u - l)), R = REGRESSION_UNIT, computed as (4R (f - l) + w) // 2w - R
    with w = u - l (a non-negative numerator, so integer division rounds half up, never toward
    zero): exactly -R at l and R at u, within [-R, R] between. The constant column is R, so every
    entry is a sum of products of at most R^2 (BIGINT products, summed into HUGEINT). A row where
    any of the variables is missing adds to no entry.
    """
    order = [*names[1:], names[0]]
    complete = " AND ".join(f"{quote(name)} IS NOT NULL" for name in order)

    def standardised(name: str) -> str:  # each use binds its own parameters (they are positional)
        column = dataset.columns[name]
        low, high = column.fixed_bounds
        fixed = _fixed_point(name, column, params, name not in within)
        params.extend([low, high - low, 2 * (high - low)])
        return f"((4 * {REGRESSION_UNIT} * ({fixed} - ?) + ?) // ? - {REGRESSION_UNIT})"

    def factor(i: int) -> str:
        return str(REGRESSION_UNIT) if i == 0 else standardised(order[i - 1])

    entries = []
    for i in range(len(order) + 1):
        for j in range(i, len(order) + 1):
            left = factor(i)
            entries.append(f"coalesce(sum(CASE WHEN {complete} THEN CAST({left} AS BIGINT) * {factor(j)} END), 0)")
    return f"list_value({', '.join(entries)})"


def _cohort_sql(f: Filter, source: tuple[str, str], params: list[object]) -> str:
    """Membership of the row's unit in the units with a matching row in the cohort's dataset.

    NULL units are kept out of the list (``NOT IN`` a list holding NULL matches nothing).
    """
    assert f.cohort is not None
    unit, relation = source
    conditions = [f"{quote(unit)} IS NOT NULL", *(_filter_sql(g, params) for g in f.cohort.filters)]
    return (f"{quote(f.column)} {f.op.upper()} (SELECT {quote(unit)} FROM {relation} "
            f"WHERE {' AND '.join(conditions)})")


def _survival_sql(time_name: str, time: Column, event_name: str, params: list[object]) -> str:
    """Rows per (outcome, grid time) of the time grid t0 < ... < t[n-1], as a ``histogram`` map per group.

    A time counts at the first grid time at or after it: index i (0 <= i < n) counts rows with event
    1 in (t[i-1], t[i]] (index 0: every time up to t0); index n + i counts rows with event 0 there;
    a time past the last grid time is censored there (index 2n - 1), whatever its event. A row whose
    time is missing, or whose event is missing or neither 0 nor 1, counts nowhere. Each row adds 1
    to at most one index. Times are compared in fixed point at the column's precision, as sums read
    them, against the grid's exact integer edges, so no float rounding moves a time across an edge.
    """
    edges = time.fixed_grid
    n = len(edges)
    event = quote(event_name)

    def fixed() -> str:  # each use binds its own parameters (they are positional)
        return _fixed_time(time_name, time, edges[0], edges[-1], params)

    def bin_index() -> str:
        if time.bins is not None and time.bins.regular:
            start, width = edges[0], edges[1] - edges[0]
            first = fixed()
            params.append(start)
            rest = fixed()
            params.extend([start + 1, width])  # t in (start + (i-1) width, start + i width] is at index i
            return f"(CASE WHEN {first} <= ? THEN 0 ELSE ({rest} - ?) // ? + 1 END)"
        whens = []
        for i, edge in enumerate(edges[:-1]):
            whens.append(f"WHEN {fixed()} <= ? THEN {i}")
            params.append(edge)
        return f"(CASE {' '.join(whens)} ELSE {n - 1} END)"

    past_end = fixed()
    params.extend([edges[-1], 2 * n - 1])
    on_event = bin_index()
    params.append(n)
    censored = bin_index()
    # least/greatest skip NULLs, so a missing time is ruled out before the time is clamped
    return (f"histogram(CASE WHEN {event} IN (0, 1) AND {quote(time_name)} IS NOT NULL THEN CASE WHEN {past_end} > ? "
            f"THEN ? WHEN {event} = 1 THEN {on_event} ELSE ? + {censored} END END)")


def _histogram_sql(name: str, column: Column, params: list[object]) -> str:
    """Rows per bin [t[i], t[i+1]) of the declared edges t0 < ... < tm, as a ``histogram`` map per group.

    Index i (0 <= i < m) counts values in [t[i], t[i+1]); the last bin also holds tm; a value below
    t0 counts at index 0 and one above tm at index m - 1 (clamped); a missing value (NULL, NaN)
    counts nowhere. Each row adds 1 to at most one index. Values are compared in fixed point at the
    column's precision against the grid's exact integer edges, as survival times are.
    """
    edges = column.fixed_grid
    m = len(edges) - 1
    if column.bins is not None and column.bins.regular:
        value = _fixed_time(name, column, edges[0], edges[-1], params)
        params.extend([edges[0], edges[1] - edges[0], m - 1])
        index = f"least(greatest(({value} - ?) // ?, 0), ?)"
    else:
        whens = []
        for i, edge in enumerate(edges[1:-1]):
            whens.append(f"WHEN {_fixed_time(name, column, edges[0], edges[-1], params)} < ? THEN {i}")
            params.append(edge)
        index = f"(CASE {' '.join(whens)} ELSE {m - 1} END)" if whens else "0"
    return f"histogram(CASE WHEN {quote(name)} IS NOT NULL THEN {index} END)"


def _cells_sql(name: str, column: Column, params: list[object], clamp: bool) -> str:
    """Rows per cell of the line the declared edges t0 < ... < tm cut, as a ``histogram`` map per group.

    Cell 0 holds values below t0, cell 2i + 1 values equal to t[i], cell 2i + 2 values between t[i]
    and t[i+1] (cell 2m + 2: above tm). Values are compared as sums read them: in fixed point at the
    column's precision, clamped as integers to its bounds, against the grid's exact integer edges.
    A missing value (NULL, NaN) counts nowhere; each row adds 1 to at most one cell. The exponential
    mechanism's scores of the edges are functions of these counts (:mod:`gateway._mechanisms`).
    """
    edges = column.fixed_grid
    cells = 2 * len(edges)
    if column.bins is not None and column.bins.regular:
        # v - t0 = j w + r (0 <= r < w) within [t0, tm]: at edge j when r = 0 (cell 2j + 1), else past it
        start, width = edges[0], edges[1] - edges[0]
        below = _fixed_point(name, column, params, clamp)
        params.append(start)
        above = _fixed_point(name, column, params, clamp)
        params.append(edges[-1])
        steps = _fixed_point(name, column, params, clamp)
        params.extend([start, width])
        rest = _fixed_point(name, column, params, clamp)
        params.extend([start, width])
        index = (f"(CASE WHEN {below} < ? THEN 0 WHEN {above} > ? THEN {cells} ELSE 1 + 2 * (({steps} - ?) // ?) "
                 f"+ CASE WHEN ({rest} - ?) % ? = 0 THEN 0 ELSE 1 END END)")
    else:
        whens = []
        for i, edge in enumerate(edges):
            whens.append(f"WHEN {_fixed_point(name, column, params, clamp)} < ? THEN {2 * i}")
            params.append(edge)
            whens.append(f"WHEN {_fixed_point(name, column, params, clamp)} = ? THEN {2 * i + 1}")
            params.append(edge)
        index = f"(CASE {' '.join(whens)} ELSE {cells} END)"
    return f"histogram(CASE WHEN {quote(name)} IS NOT NULL THEN {index} END)"


def _fixed_time(name: str, column: Column, start: int, end: int, params: list[object]) -> str:
    """The time in fixed point, first clamped to one unit around [start, end].

    Clamping keeps every time's bin, and keeps a huge or infinite time inside 64 bits.
    """
    unit = column.unit
    if column.type == "integer" and column.scale_digits == 0:
        params.extend([start - 1, end + 1])
        return f"least(greatest({quote(name)}, ?), ?)"
    params.extend([(start - unit) / unit, (end + unit) / unit, unit])
    return f"CAST(round(least(greatest(CAST({quote(name)} AS DOUBLE), ?), ?) * ?) AS BIGINT)"


def _filter_sql(f: Filter, params: list[object]) -> str:
    column = quote(f.column)
    params.extend(f.values)
    if f.op == "between":
        return f"{column} BETWEEN ? AND ?"
    if f.op in ("in", "not in"):
        return f"{column} {f.op.upper()} ({', '.join('?' for _ in f.values)})"
    return f"{column} {f.op} ?"
