"""DuckDB execution: exact, bounded, clamped aggregates in one statement per query.

Rows never leave this module; it returns exact aggregates to the DP layer only. The statements
are :mod:`gateway._querysql`'s: names only from the policy, every value a bound parameter.

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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import yaml

from ._querysql import build_sql, fixed_value, group_key, quote
from ._yamlfile import line_index
from .answers import Scalar
from .errors import DeadlineExceeded, FailedPrecondition, Unavailable
from .policy import MAX_SOURCE_ROWS, Dataset, LoadedPolicy
from .query import Query

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


@dataclass(frozen=True)
class EngineLimits:
    """The operator's limits on DuckDB (``engine_memory_limit``, ``engine_threads``); None: DuckDB's default."""

    memory_bytes: int | None = None
    threads: int | None = None

    def describe(self) -> str:
        memory = f"{self.memory_bytes / 2**20:,.0f} MiB" if self.memory_bytes else "DuckDB's default"
        return f"memory limit {memory}, threads {self.threads or 'one per core'}"


NO_LIMITS = EngineLimits()


SNAPSHOT_PASS_ROWS = 8_000_000
"""Source rows per pass when a bounded snapshot is built (its window's memory is one pass's)."""


class Engine:
    """Runs checked queries against the site's data; one instance per site process."""

    def __init__(self, loaded: LoadedPolicy, workdir: Path | None = None, seed: bytes | None = None,
                 limits: EngineLimits = NO_LIMITS) -> None:
        self._loaded = loaded
        self.limits = limits
        self._seed = int.from_bytes(seed or _site_seed(workdir), "big") & ((1 << 63) - 1)
        # each engine has its own working file: a reload builds a new engine while the old one serves
        self._path = workdir / f"engine-{uuid.uuid4().hex[:12]}.duckdb" if workdir is not None else None
        self._con = duckdb.connect(str(self._path) if self._path else ":memory:")
        if self._path is not None:
            self._path.chmod(0o600)  # bounded snapshots are row-level copies of the data
        if limits.memory_bytes is not None:
            self._con.execute(f"SET memory_limit = '{int(limits.memory_bytes)}B'")
        if limits.threads is not None:
            self._con.execute(f"SET threads = {int(limits.threads)}")
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
        except duckdb.OutOfMemoryException as err:
            log.error("query on %s ran out of the engine's memory (%s): %s", query.dataset, self.limits.describe(),
                      _without_values(err))
            raise FailedPrecondition("the site's query engine ran out of memory for this query; nothing was charged; "
                                     "ask the site operator (engine_memory_limit)") from err
        except duckdb.Error as err:
            log.error("query on %s failed: %s", query.dataset, _without_values(err))
            raise FailedPrecondition(f"the site could not run the query on its data ({type(err).__name__}); "
                                     "ask the site operator to check the data source") from err
        shapes = [spec.shape(dataset.columns[a.column] if a.column is not None else None, len(a.columns))
                  for a, kind in zip(query.aggregates, query.kinds(), strict=True) for spec in kind.components]
        if not query.group_by:
            return ExactResult(groups, tuple(_dense(rows[0][i], shape) for i, shape in enumerate(shapes)))
        # every group gets a value (zero when absent); rows with non-public keys are dropped here,
        # unless the column releases them as (missing) / (other) groups
        columns = [dataset.columns[c] for c in query.group_by]
        width_keys = sum(2 if c.other_groups else 1 for c in columns)
        found = {group_key(row[:width_keys], columns): row[width_keys:] for row in rows}
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
            # in passes over disjoint sets of units (by a hash of the unit), so that the window's
            # memory is one pass's: a unit's rows all fall in one pass, so the rows kept are the same
            passes = max(1, math.ceil(rows / SNAPSHOT_PASS_ROWS))
            select = (f"SELECT {keep_unit}{projected} FROM ("
                      f" SELECT {keep_unit}{columns}, row_number() OVER (PARTITION BY {unit}"
                      f" ORDER BY hash(?::BIGINT, {unit}, {columns})) AS _rank"
                      f" FROM {source} WHERE {unit} IS NOT NULL AND hash({unit}) % ? = ?) WHERE _rank <= ?")
            with self._con.cursor() as build:  # one transaction: a query never sees a part-built snapshot
                build.execute("BEGIN TRANSACTION")
                for i in range(passes):
                    build.execute(f"CREATE OR REPLACE TABLE {snapshot} AS {select}" if i == 0
                                  else f"INSERT INTO {snapshot} {select}",
                                  [self._seed, passes, i, dataset.max_rows_per_unit])
                build.execute("COMMIT")
            return _Prepared(snapshot, fingerprint, bounded=True, rows=rows, every_row=every_row,
                             within=self._within_bounds(dataset, snapshot))
        except duckdb.Error as err:
            # DuckDB's message can quote data values: it goes to the site's log, never to the caller
            log.error("loading dataset %s failed (%s): %s", name, self.limits.describe(), _without_values(err))
            if isinstance(err, duckdb.OutOfMemoryException):
                raise FailedPrecondition(f"the site could not load dataset {name!r} within the engine's memory "
                                         f"({self.limits.describe()}); raise engine_memory_limit") from err
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
            exprs.append(f"count(*) FILTER (WHERE {fixed_value(n, dataset.columns[n])} NOT BETWEEN ? AND ?)")
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
    for agg, kind in zip(query.aggregates, query.kinds(), strict=True):
        column = dataset.columns[agg.column] if agg.column is not None else None
        for spec in kind.components:
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
