"""Neighbouring datasets for the audit: D, and D' = D plus one patient at the worst case allowed.

D and D' are real DuckDB files behind a real policy file, each served by a real
:class:`~gateway._engine.Engine` (the same secret bounding seed for both, as one site keeps it), and
a query goes the site's way: SQL text, :func:`~gateway.query.check_query`, :func:`plan_query`, the
engine's exact vectors, and :func:`release`, which pairs each planned component with its vector.
What :func:`release` would hand the noise source is recorded, not noised: the audit samples it.

Two tables, same columns: ``patients`` (one row per patient, so the engine reads it as it is) and
``visits`` (up to six rows per patient; the policy keeps at most 3, so the engine bounds it). The
extra patient has one row in ``patients`` and five in ``visits``, every value at or past one of
the declared bounds: the bound itself, a quarter and half a unit past it (a rounding tie), far
past it, infinity. Which bound is worst depends on the aggregate (a sum's largest |value| is at one
end, a centred sum's at the other), so there are two D': the patient at the low or the high
bound of ``x``; :meth:`Neighbours.worst` keeps the one farther from D in the plan's own metric.
``x`` is also a time with a grid, and ``e`` an event (0 or 1; ordinary patients also have missing
and invalid ones), so survival(x, e) is audited on the same patients: each of the extra patient's
rows counts, at or past the grid's ends. regression(x, z) too: each of the extra patient's rows is
at a corner of the two bounds (x low or high, z high), where every product of the standardised
values is largest, so the patient moves every entry of ZᵀZ by its bound.
"""

from __future__ import annotations

import math
import random
import textwrap
from collections.abc import Iterable
from fractions import Fraction
from pathlib import Path
from typing import Literal

import duckdb
import yaml

from gateway._engine import Engine
from gateway._mechanisms import Component, Noise, Plan, plan_query, release
from gateway._sqlfront import parse_sql
from gateway.aggregates import KINDS
from gateway.policy import Column, Policy, load_policy
from gateway.query import check_query
from tests.privacy.audit import Released

Side = Literal["low", "high"]
SIDES: tuple[Side, ...] = ("low", "high")
KEYS = (1, 2, 3)
K = 3
PATIENT = 1_000_000
SEED = b"audit-17"
COLUMNS = """\
    columns:
      g: {type: integer, roles: [group_by, filter], keys: [1, 2, 3]}
      x: {type: float, roles: [aggregate], bounds: [-2.5, 1.25], precision: 0, bins: {edges: [-2, -1, 0, 1]}}
      z: {type: float, roles: [aggregate], bounds: [0, 2.5], precision: 0}
      e: {type: integer, roles: [event]}
"""


def audit_policy(columns: str, aggregates: Iterable[str], k: int = K) -> str:
    """The audit site's policy: ``patients`` (one row per patient) and ``visits`` (at most ``k``), both
    with ``columns`` (a YAML ``columns:`` block) and the kinds ``aggregates``."""
    kinds = ", ".join(aggregates)
    return f"""\
site: audit
epsilon: {{default: 1, max: 4}}
datasets:
  patients:
    source: {{database: data.duckdb, table: patients}}
    privacy_unit: pid
    max_rows_per_unit: 1
    aggregates: [{kinds}]
{columns}
  visits:
    source: {{database: data.duckdb, table: visits}}
    privacy_unit: pid
    max_rows_per_unit: {k}
    aggregates: [{kinds}]
{columns}"""


POLICY = audit_policy(COLUMNS, KINDS)
X_COLUMN = Column.model_validate(yaml.safe_load(textwrap.dedent(COLUMNS))["columns"]["x"])
"""Column ``x`` as both tables declare it (a kind's vector shape comes from its grid)."""
# The old engine clamped the float to the declared bounds, then rounded (DuckDB: half away from zero).
OLD_RULE_SUM = ("SELECT coalesce(sum(CAST(round(least(greatest(CAST(z AS DOUBLE), ?), ?) * ?) AS BIGINT)), 0) "
                "FROM patients")


class _Recorder(Noise):
    """Hands back what :func:`release` would noise: (component, exact vector), in the site's order."""

    def __init__(self) -> None:
        self.calls: list[tuple[Component, tuple[int, ...]]] = []

    def apply(self, component: Component, exact: tuple[int, ...]) -> list[int]:
        self.calls.append((component, tuple(exact)))
        return list(exact)


class Neighbours:
    """D and its two neighbours on disk, each with its own engine."""

    def __init__(self, root: Path) -> None:
        self.folders = {name: root / name for name in ("base", *SIDES)}
        loaded = {}
        for name, folder in self.folders.items():
            folder.mkdir()
            (folder / "policy.yaml").write_text(POLICY)
            loaded[name] = load_policy(folder / "policy.yaml")
        self.policy: Policy = loaded["base"].policy
        base_rows = _background(random.Random(2024))
        _write(self.folders["base"] / "data.duckdb", base_rows)
        for side in SIDES:
            _write(self.folders[side] / "data.duckdb", _with_patient(base_rows, self.policy, side))
        self.engines = {name: Engine(loaded[name], seed=SEED) for name in self.folders}

    def close(self) -> None:
        """Close every engine."""
        for engine in self.engines.values():
            engine.close()

    def released(self, sql: str, epsilon: Fraction, side: Side) -> tuple[Plan, list[Released]]:
        """The plan of ``sql`` and each component it releases, exact on D and on D' (patient at ``side``)."""
        query = check_query(parse_sql(sql), self.policy)
        plan = plan_query(query, self.policy.datasets[query.dataset], epsilon)
        base, neighbour = (self._recorded(plan, name, sql) for name in ("base", side))
        assert [c for c, _ in base] == [c for c, _ in neighbour], "one plan, the same components on D and D'"
        return plan, [Released(c, x, x2) for (c, x), (_, x2) in zip(base, neighbour, strict=True)]

    def worst(self, sql: str, epsilon: Fraction) -> tuple[Plan, list[Released]]:
        """:meth:`released` with the neighbour farther from D: the largest sum of L1 distance / scale."""
        options = [self.released(sql, epsilon, side) for side in SIDES]
        return max(options, key=lambda o: sum(r.distance / r.component.scale for r in o[1]))

    def old_rule_sums(self) -> tuple[tuple[int], tuple[int]]:
        """Exact ``sum(z)`` of ``patients`` on D and D' by the old engine's rule."""
        column = self.policy.datasets["patients"].columns["z"]
        assert column.bounds is not None
        sums = []
        for name in ("base", "high"):
            with duckdb.connect(str(self.folders[name] / "data.duckdb"), read_only=True) as con:
                (total,) = con.execute(OLD_RULE_SUM, [*column.bounds, column.unit]).fetchone() or (0,)
            sums.append(int(total))
        return (sums[0],), (sums[1],)

    def _recorded(self, plan: Plan, name: str, sql: str) -> list[tuple[Component, tuple[int, ...]]]:
        exact = self.engines[name].run(check_query(parse_sql(sql), self.policy))
        recorder = _Recorder()
        release(plan, exact.groups, exact.components, recorder)
        return recorder.calls


Row = tuple[int, int, float | None, float | None, int | None]


def _background(rng: random.Random) -> dict[str, list[Row]]:
    """Ordinary patients: values in and out of bounds, missing values, ties, a non-public group 4.

    No ordinary patient is in group 3 of ``patients``, so there the engine fills in D's zero.
    """
    def value(low: float, high: float) -> float | None:
        roll = rng.random()
        if roll < 0.1:
            return None
        return rng.choice((-2.5, 1.5, 2.5)) if roll < 0.2 else round(rng.uniform(low, high), 2)

    def event() -> int | None:
        return rng.choice((0, 1, 1, None, 2))

    patients = [(pid, rng.choice((1, 2, 4)), value(-4, 3), value(-1, 4), event()) for pid in range(1, 241)]
    visits = [(pid, rng.choice((1, 2, 3, 4)), value(-4, 3), value(-1, 4), event())
              for pid in range(1, 151) for _ in range(rng.randint(1, 2 * K))]
    return {"patients": patients, "visits": visits}


def _outward(column: Column, side: Side) -> list[float]:
    """Values at and past one declared bound, the most adversarial first."""
    assert column.bounds is not None
    sign, bound = (-1, column.bounds[0]) if side == "low" else (1, column.bounds[1])
    step = sign / column.unit
    return [bound, bound + step / 4, bound + step / 2, bound + sign * 1e12, sign * math.inf]


def _with_patient(base: dict[str, list[Row]], policy: Policy, side: Side) -> dict[str, list[Row]]:
    """D' = D plus the extra patient: one row in ``patients``, K + 2 in ``visits`` (bounding keeps K)."""
    columns = policy.datasets["patients"].columns
    xs, zs = _outward(columns["x"], side), _outward(columns["z"], "high")
    groups, events = (3, 1, 2, 3, 1), (1, 0, 1, 1, 0)
    extra = [(PATIENT, groups[i], xs[i], zs[i], events[i]) for i in range(K + 2)]
    return {"patients": [*base["patients"], extra[0]], "visits": [*base["visits"], *extra]}


def _write(path: Path, tables: dict[str, list[Row]]) -> None:
    with duckdb.connect(str(path)) as con:
        for table, rows in tables.items():
            con.execute(f"CREATE TABLE {table} (pid BIGINT, g BIGINT, x DOUBLE, z DOUBLE, e BIGINT)")
            con.executemany(f"INSERT INTO {table} VALUES (?, ?, ?, ?, ?)", rows)
