"""DuckDB execution: exact, bounded, clamped aggregates in one statement per query.

Rows never leave this module; it returns exact aggregates to the DP layer only. Names in the
SQL come only from the policy (quoted identifiers); every value is a bound parameter.

Contribution bounding: a dataset whose privacy-unit column is not verified unique is
materialised once into a bounded snapshot that keeps at most ``max_rows_per_unit`` rows per
unit, chosen by a keyed hash of the row with a secret per-site seed (so which rows a patient
keeps does not depend on other patients). The snapshot is rebuilt when the source changes.

A statement whose caller has gone (cancelled, or past its deadline) is interrupted, so that a
worker is not held for an answer nobody can receive.
"""

from __future__ import annotations

import glob
import itertools
import logging
import math
import os
import re
import secrets
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import yaml

from ._yamlfile import line_index
from .aggregates import REGRESSION_UNIT, ComponentSpec, kind_of
from .answers import Scalar
from .errors import DeadlineExceeded, FailedPrecondition, Unavailable
from .policy import MAX_SOURCE_ROWS, MISSING_GROUP, OTHER_GROUP, Column, Dataset, LoadedPolicy
from .query import Aggregate, Filter, Query

log = logging.getLogger("gateway.engine")
_I64_SAFE = 1 << 62  # exact values stay below this, leaving headroom for the noise (see _mechanisms)


class SchemaMismatch(FailedPrecondition):
    """A dataset's declared columns do not match its source (one line: file, dataset, column, types)."""


@dataclass(frozen=True)
class ExactResult:
    """Exact aggregates, one vector per component, aligned with ``groups`` (policy key order).

    Components per aggregate: count -> [count]; sum -> [fixed-point sum]; mean -> [sum, count];
    survival -> [counts]. A component with several values per group (survival's 2m counts) holds
    them group by group: group g's values are ``vector[g * size:(g + 1) * size]``.
    """

    groups: tuple[tuple[Scalar, ...], ...]
    components: tuple[tuple[int, ...], ...]


@dataclass
class _Prepared:
    relation: str  # what aggregates read: at most k rows per unit
    fingerprint: tuple[object, ...]
    bounded: bool
    rows: int
    every_row: str  # what cohorts read: every row, NaN as NULL (the relation itself when unbounded)
    # columns whose every fixed-point value in ``relation`` lies within its bounds: clamping them is
    # a no-op, so their aggregates skip it (same answer, up to 3x faster); see _within_bounds
    within: frozenset[str] = frozenset()


def quote(name: str) -> str:
    """Quote an identifier taken from the policy (policy names are already plain identifiers)."""
    return '"' + name.replace('"', '""') + '"'


class _Interrupter:
    """Interrupts the running statements whose caller has gone: one thread per engine, idle without statements.

    It polls rather than waiting for a cancellation callback because DuckDB forgets an interrupt
    that arrives before its statement has started: a statement stays watched, and interrupted
    again, until it has ended.
    """

    POLL_SECONDS = 0.02  # the added latency of an interrupt; a poll costs a few microseconds per statement

    def __init__(self) -> None:
        self._running: dict[int, tuple[duckdb.DuckDBPyConnection, Callable[[], bool]]] = {}
        self._numbers = itertools.count()
        self._changed = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    @contextmanager
    def watching(self, cursor: duckdb.DuckDBPyConnection, expired: Callable[[], bool]) -> Iterator[None]:
        """Interrupt ``cursor``'s statements while ``expired()`` holds, until the block ends."""
        number = next(self._numbers)
        with self._changed:
            self._running[number] = (cursor, expired)
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._watch, name="engine-interrupter", daemon=True)
                self._thread.start()
            self._changed.notify()
        try:
            yield
        finally:
            with self._changed:  # under the lock: the watcher never interrupts a cursor that was closed
                del self._running[number]
                self._changed.notify_all()

    def close(self) -> None:
        """Interrupt the running statements, wait for them to end, and stop the thread. Idempotent.

        DuckDB refuses to close a connection that a statement is still using.
        """
        with self._changed:
            self._closed = True
            while self._running:  # interrupted again each round: an interrupt before a statement starts is lost
                for cursor, _expired in self._running.values():
                    cursor.interrupt()
                self._changed.wait(self.POLL_SECONDS)
            self._changed.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()

    def _watch(self) -> None:
        with self._changed:
            while not self._closed:
                if not self._running:
                    self._changed.wait()
                    continue
                for cursor, expired in self._running.values():
                    if expired():
                        cursor.interrupt()
                self._changed.wait(self.POLL_SECONDS)


class Engine:
    """Runs checked queries against the site's data; one instance per site process."""

    def __init__(self, loaded: LoadedPolicy, workdir: Path | None = None, seed: bytes | None = None) -> None:
        self._loaded = loaded
        self._seed = int.from_bytes(seed or _site_seed(workdir), "big") & ((1 << 63) - 1)
        # each engine has its own working file: a reload builds a new engine while the old one serves
        self._path = workdir / f"engine-{uuid.uuid4().hex[:12]}.duckdb" if workdir is not None else None
        self._con = duckdb.connect(str(self._path) if self._path else ":memory:")
        if self._path is not None:
            self._path.chmod(0o600)  # bounded snapshots are row-level copies of the data
        self._lock = threading.Lock()
        self._prepared: dict[str, _Prepared] = {}
        self._attached: dict[Path, tuple[str, tuple[int, int]]] = {}
        self._aliases = itertools.count()
        self._resolved: dict[str, Path] = {}
        self._interrupter = _Interrupter()

    def close(self) -> None:
        """Release the DuckDB connection and delete the working file (idempotent)."""
        self._interrupter.close()
        self._con.close()
        if self._path is not None:
            self._path.unlink(missing_ok=True)
            Path(f"{self._path}.wal").unlink(missing_ok=True)

    def prepare_all(self) -> None:
        """Attach every dataset's source and build bounded snapshots (done at start and reload)."""
        for name in self._loaded.policy.datasets:
            self._ensure(name)

    def run(self, query: Query, expired: Callable[[], bool] = lambda: False) -> ExactResult:
        """Exact aggregates for a query already checked against the policy.

        ``expired`` tells whether the caller has gone: the statement is then interrupted and
        :class:`DeadlineExceeded` raised.
        """
        dataset = self._loaded.policy.datasets[query.dataset]
        prepared = self._ensure(query.dataset)
        _check_fits(query, dataset, prepared.rows)
        cohorts = {f.cohort.dataset: (self._loaded.policy.datasets[f.cohort.dataset].privacy_unit,
                                      self._ensure(f.cohort.dataset).every_row)
                   for f in query.filters if f.cohort is not None}
        sql, params, groups = build_sql(query, dataset, prepared.relation, cohorts, prepared.within)
        try:
            with self._con.cursor() as cursor, self._interrupter.watching(cursor, expired):
                rows = cursor.execute(sql, params).fetchall()
        except duckdb.InterruptException as err:
            if not expired():  # the engine closed under it: a reload retired it, or the site is stopping
                raise Unavailable("the site stopped the query (it is reloading or shutting down); nothing was "
                                  "charged; retry") from err
            raise DeadlineExceeded("the call ended (deadline or cancel) while the site was running the query; "
                                   "nothing was charged; retry with a longer deadline") from err
        except duckdb.Error as err:
            log.error("query on %s failed: %s", query.dataset, _without_values(err))
            raise FailedPrecondition(f"the site could not run the query on its data ({type(err).__name__}); "
                                     "ask the site operator to check the data source") from err
        shapes = [spec.shape(dataset.columns[a.column] if a.column is not None else None, len(a.columns))
                  for a in query.aggregates for spec in kind_of(a.function).components]
        if not query.group_by:
            return ExactResult(groups, tuple(_dense(rows[0][i], shape) for i, shape in enumerate(shapes)))
        # every group gets a value (zero when absent); rows with non-public keys are dropped here,
        # unless the column releases them as (missing) / (other) groups
        columns = [dataset.columns[c] for c in query.group_by]
        width_keys = sum(2 if c.other_groups else 1 for c in columns)
        found = {_group_key(row[:width_keys], columns): row[width_keys:] for row in rows}
        absent = (None,) * len(shapes)
        ordered = [found.get(key, absent) for key in groups]
        return ExactResult(groups, tuple(tuple(v for values in ordered for v in _dense(values[i], shape))
                                         for i, shape in enumerate(shapes)))

    def _ensure(self, name: str) -> _Prepared:
        dataset = self._loaded.policy.datasets[name]
        fingerprint = self._fingerprint(dataset)
        current = self._prepared.get(name)
        if current is not None and current.fingerprint == fingerprint:
            return current
        with self._lock:
            current = self._prepared.get(name)
            if current is None or current.fingerprint != fingerprint:
                current = self._materialise(name, dataset, fingerprint)
                self._prepared[name] = current
        return current

    def _fingerprint(self, dataset: Dataset) -> tuple[object, ...]:
        source = dataset.source
        target = source.database if source.database is not None else source.parquet
        assert target is not None
        path = self._resolved.get(target)
        if path is None:  # resolving touches the file system: once per source, not per query
            path = self._resolved[target] = self._loaded.resolve(target)
        try:
            paths = [path] if path.exists() else sorted(path.parent.glob(path.name))
            return tuple((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in paths)
        except OSError:
            return ()

    def _source(self, dataset: Dataset) -> str:
        source = dataset.source
        if source.parquet is not None:
            resolved = self._loaded.resolve(source.parquet)
            if not glob.glob(str(resolved), recursive=True):
                # as for a database: the operator learns the path and the rule from the log (DuckDB's own
                # message would be masked, since it may quote values); a caller only that data is missing
                log.error("data source %s of the policy %s matches no file (a relative parquet path is resolved "
                          "from the policy file's folder)", resolved, self._loaded.path)
                raise FailedPrecondition(f"data source {resolved.name} is missing; ask the site operator")
            pattern = str(resolved).replace("'", "''")
            return f"read_parquet('{pattern}')"
        assert source.database is not None and source.table is not None
        path = self._loaded.resolve(source.database)
        stamp = file_stamp(path)
        attached = self._attached.get(path)
        if attached is not None and attached[1] == stamp:
            return f"{attached[0]}.{quote(source.table)}"
        if attached is not None:
            self._con.execute(f"DETACH {attached[0]}")
        if not path.is_file():
            # the operator learns the path and the rule from the log; a caller only that data is missing
            log.error("data source %s of the policy %s is missing (a relative database path is resolved from "
                      "the policy file's folder)", path, self._loaded.path)
            raise FailedPrecondition(f"data source {path.name} is missing; ask the site operator")
        alias = f"src{next(self._aliases)}"
        self._con.execute(f"ATTACH '{str(path).replace(chr(39), chr(39) * 2)}' AS {alias} (READ_ONLY)")
        self._attached[path] = (alias, stamp)
        return f"{alias}.{quote(source.table)}"

    def check_sources(self) -> list[str]:
        """For the operator: every dataset's source read and its columns checked against the policy's types.

        Without building anything: one problem per line, naming the file (with the path it resolved
        to) or the column; empty when every source matches.
        """
        problems = []
        for name, dataset in self._loaded.policy.datasets.items():
            target = dataset.source.database or dataset.source.parquet or ""
            resolved = self._loaded.resolve(target)
            if dataset.source.database is not None and not resolved.is_file():
                problems.append(f"{self._loaded.path}: datasets.{name}.source.database: {resolved} does not exist "
                                f"({target!r} is resolved from the policy file's folder)")
                continue
            try:
                source = self._source(dataset)
                types = dict(self._con.execute(f"SELECT column_name, column_type FROM (DESCRIBE SELECT * FROM "
                                               f"{source})").fetchall())
                self._check_schema(name, dataset, types)
            except SchemaMismatch as err:
                problems.append(err.message)
            except (FailedPrecondition, duckdb.Error) as err:
                problems.append(f"{self._loaded.path}: datasets.{name}.source: cannot read {resolved} "
                                f"({_without_values(err) if isinstance(err, duckdb.Error) else err})")
        return problems

    def _materialise(self, name: str, dataset: Dataset, fingerprint: tuple[object, ...]) -> _Prepared:
        try:
            source = self._source(dataset)
            unit = quote(dataset.privacy_unit)
            columns = ", ".join(quote(c) for c in dataset.columns)
            types = dict(self._con.execute(f"SELECT column_name, column_type FROM (DESCRIBE SELECT * FROM {source})")
                         .fetchall())
            self._check_schema(name, dataset, types)
            # NaN is missing data, like NULL, everywhere (DuckDB orders NaN above every number)
            projected = ", ".join(
                f"CASE WHEN isnan({quote(c)}) THEN NULL ELSE {quote(c)} END AS {quote(c)}"
                if types[c].split("(")[0] in _NAN_TYPES else quote(c) for c in dataset.columns)
            rows, unique = self._con.execute(
                f"SELECT count(*), count(*) = count(DISTINCT {unit}) AND count({unit}) = count(*) FROM {source}"
            ).fetchone() or (0, False)
            if rows > MAX_SOURCE_ROWS:
                # the policy's bounds keep sums inside 64 bits only up to this many rows
                raise FailedPrecondition(f"dataset {name!r} has more than 2^31 rows, more than the site can sum "
                                         "exactly; ask the site operator")
            every_row = source if projected == columns else f"(SELECT {unit}, {projected} FROM {source})"
            if dataset.privacy_unit in dataset.columns and projected != columns:
                every_row = f"(SELECT {projected} FROM {source})"
            if unique:
                fixed = self._is_base_table(dataset)
                return _Prepared(every_row, fingerprint, bounded=False, rows=rows, every_row=every_row,
                                 within=self._within_bounds(dataset, every_row) if fixed else frozenset())
            snapshot = quote(f"bounded_{name}")
            keep_unit = "" if dataset.privacy_unit in dataset.columns else f"{unit}, "  # cohort filters test it
            self._con.execute(
                f"CREATE OR REPLACE TABLE {snapshot} AS SELECT {keep_unit}{projected} FROM ("
                f" SELECT {keep_unit}{columns}, row_number() OVER (PARTITION BY {unit}"
                f" ORDER BY hash(?::BIGINT, {unit}, {columns})) AS _rank"
                f" FROM {source} WHERE {unit} IS NOT NULL) WHERE _rank <= ?",
                [self._seed, dataset.max_rows_per_unit])
            return _Prepared(snapshot, fingerprint, bounded=True, rows=rows, every_row=every_row,
                             within=self._within_bounds(dataset, snapshot))
        except duckdb.Error as err:
            # DuckDB's message can quote data values: it goes to the site's log, never to the caller
            log.error("loading dataset %s failed: %s", name, _without_values(err))
            raise FailedPrecondition(f"the site could not load dataset {name!r} ({type(err).__name__}); "
                                     "ask the site operator") from err

    def _is_base_table(self, dataset: Dataset) -> bool:
        """Whether ``dataset`` reads a base table of a DuckDB file (attached read-only).

        Such data cannot change while it is attached (DuckDB locks the file against writers; a
        replaced file has a new fingerprint and is loaded and checked again). A parquet source, or
        a view (which may read files of its own), is read afresh by every query: never trusted to
        stay within bounds. (A bounded snapshot is the engine's own table: it never changes.)
        """
        if dataset.source.database is None:
            return False
        attached = self._attached.get(self._loaded.resolve(dataset.source.database))
        if attached is None:
            return False
        row = self._con.execute("SELECT count(*) FROM duckdb_tables() WHERE database_name = ? AND table_name = ?",
                                [attached[0], dataset.source.table]).fetchone()
        return bool(row and row[0])

    def _within_bounds(self, dataset: Dataset, relation: str) -> frozenset[str]:
        """The bounded columns whose every fixed-point value in ``relation`` lies within the column's bounds.

        Checked once per load with the very expression the aggregates clamp, so skipping the clamp
        changes no answer. Only for data that cannot change after the check (see :meth:`_is_base_table`).
        """
        names = [n for n, c in dataset.columns.items() if c.bounds is not None and "aggregate" in c.roles]
        if not names:
            return frozenset()
        params: list[object] = []
        exprs = []
        for n in names:  # the unclamped expression binds no parameters; then the two bounds
            # compared before any cast: an infinite or huge value counts as outside instead of failing
            exprs.append(f"count(*) FILTER (WHERE {_fixed_value(n, dataset.columns[n])} NOT BETWEEN ? AND ?)")
            params += list(dataset.columns[n].fixed_bounds)
        row = self._con.execute(f"SELECT {', '.join(exprs)} FROM {relation}", params).fetchone()
        return frozenset(n for n, outside in zip(names, row or (), strict=False) if outside == 0)

    def _check_schema(self, name: str, dataset: Dataset, types: dict[str, str]) -> None:
        """Refuse a dataset whose declared columns are missing from its source or have another type."""
        lines = line_index(yaml.compose(self._loaded.path.read_text(encoding="utf-8"), Loader=yaml.SafeLoader))
        for column_name in (dataset.privacy_unit, *dataset.columns):
            column = dataset.columns.get(column_name)
            actual = types.get(column_name)
            field = ("datasets", name, "columns", column_name, "type") if column else ("datasets", name,
                                                                                        "privacy_unit")
            where = f"{self._loaded.path}:{lines.get(field, lines.get(field[:2], 1))}: {'.'.join(field)}"
            if actual is None:
                raise SchemaMismatch(f"{where}: the source of dataset {name!r} has no column {column_name!r} "
                                     f"(it has: {', '.join(sorted(types))}); fix the policy or the data")
            if column is not None and not _type_fits(column.type, actual) and not (
                    "event" in column.roles and actual == "BOOLEAN"):  # an event indicator may be a boolean
                raise SchemaMismatch(f"{where}: declared {column.type}, but column {column_name!r} of dataset "
                                     f"{name!r} is {actual} in the source; fix the declared type or the data "
                                     "(no query is answered from a mismatched column)")


_INTEGER_TYPES = {"TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UTINYINT", "USMALLINT", "UINTEGER",
                  "UBIGINT", "UHUGEINT"}
_NAN_TYPES = {"FLOAT", "DOUBLE", "REAL"}


def _type_fits(declared: str, actual: str) -> bool:
    """Whether a source column of DuckDB type ``actual`` holds what the policy declares."""
    base = actual.split("(", maxsplit=1)[0]
    if declared == "integer":
        return base in _INTEGER_TYPES or (base == "DECIMAL" and actual.replace(" ", "").endswith(",0)"))
    if declared == "float":
        return base in _INTEGER_TYPES | _NAN_TYPES | {"DECIMAL"}
    return base == "VARCHAR" or base.startswith("ENUM")


def _dense(value: Any, shape: tuple[int, ...]) -> tuple[int, ...]:
    """One group's exact value of a component: a scalar (NULL is 0), or a vector from a map or a list.

    The map is the ``histogram`` of {index: rows}; absent indexes are 0. A list holds every value.
    """
    if not shape:
        return (int(value or 0),)
    if isinstance(value, list):
        return tuple(int(v or 0) for v in value)
    dense = [0] * math.prod(shape)
    for index, rows in (value or {}).items():
        dense[int(index)] = int(rows)
    return tuple(dense)


def _check_fits(query: Query, dataset: Dataset, rows: int) -> None:
    """Refuse a component whose exact value over ``rows`` rows could leave 64 bits (sums of squares can)."""
    for agg in query.aggregates:
        column = dataset.columns[agg.column] if agg.column is not None else None
        for spec in kind_of(agg.function).components:
            if spec.row_bound(column, len(agg.columns)) * rows >= _I64_SAFE:
                raise FailedPrecondition(f"{agg.label} is not available on dataset {query.dataset!r}: over its "
                                         f"{rows} rows the exact {spec.name} could exceed 64 bits with the column's "
                                         "bounds; ask the site's privacy officer to narrow them")


_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
_NUMBER = re.compile(r"\b\d+(\.\d+)?\b")


def _without_values(err: Exception) -> str:
    """A DuckDB error's first line with quoted literals and numbers masked (they may be data values)."""
    first = str(err).splitlines()[0] if str(err) else type(err).__name__
    masked = _NUMBER.sub("<n>", _QUOTED.sub("<value>", first))
    return f"{type(err).__name__}: {masked[:300]}"


def file_stamp(path: Path) -> tuple[int, int]:
    """(mtime_ns, size) of a file, or (0, 0) when it is missing: a cheap change detector."""
    try:
        stat = path.stat()
    except OSError:
        return (0, 0)
    return (stat.st_mtime_ns, stat.st_size)


def _site_seed(workdir: Path | None) -> bytes:
    """The site's secret row-selection seed, kept in the state dir so snapshots are stable."""
    if workdir is None:
        return secrets.token_bytes(8)
    path = workdir / "bounding.seed"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(secrets.token_bytes(8))
    return path.read_bytes()


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
    exprs = [e for a in query.aggregates for e in _aggregate_sql(a, dataset, params, within)]
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


def _group_key(values: Sequence[object], columns: Sequence[Column]) -> tuple[object, ...]:
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


def _aggregate_sql(agg: Aggregate, dataset: Dataset, params: list[object],
                   within: frozenset[str] = frozenset()) -> list[str]:
    return [_regression_sql(agg.columns, dataset, params, within) if spec.sql == "regression_products"
            else _component_sql(spec, agg, dataset, params, within) for spec in kind_of(agg.function).components]


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
    fixed = _fixed_point(name, column, params, clamp)
    if sql == "sum":
        return f"coalesce(sum({fixed}), 0)"
    if sql == "midpoint_sum":  # twice the distance from the bounds' exact midpoint: an integer
        low, high = column.fixed_bounds
        return f"coalesce(sum(2 * CAST({fixed} AS HUGEINT) - {low + high}), 0)"
    centered = f"({fixed} - {column.fixed_center})"
    if sql == "centered_sum":
        return f"coalesce(sum({centered}), 0)"
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
    value = _fixed_value(name, column)
    if not clamp:  # every value is known to lie within [low, high] (Engine._within_bounds): the same number
        return f"CAST({value} AS BIGINT)"
    params += [low, low, high, high]
    # CASE rather than least/greatest: same result, about twice as fast in DuckDB
    return f"CAST(CASE WHEN {value} < ? THEN ? WHEN {value} > ? THEN ? ELSE {value} END AS BIGINT)"


def _fixed_value(name: str, column: Column) -> str:
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
