"""Site policy files: what may be queried, by whom, at what privacy cost (DESIGN §8).

A policy is YAML owned by the site's privacy officer. :func:`load_policy` parses it once into
frozen, validated objects; unknown keys are errors, and every error names the file, the line and
the field (:class:`PolicyFileError`). Relative data paths resolve against the policy's folder.
"""

from __future__ import annotations

import fnmatch
import hashlib
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from ._yamlfile import ConfigFileError, load_model
from .aggregates import KINDS

_NAME = r"^[A-Za-z_][A-Za-z0-9_]{0,62}$"
# Sums are exact 64-bit integers. A table may hold up to 2^31 rows; with every row's fixed-point value
# at most 2^31 in magnitude, a sum stays below 2^62 (headroom for the noise, which OpenDP adds in i64).
MAX_SOURCE_ROWS = 1 << 31
MISSING_GROUP, OTHER_GROUP = "(missing)", "(other)"
MAX_FIXED_BOUND = 1 << 31


def to_fraction(value: Any) -> Fraction:
    """Read an epsilon exactly: ``0.1`` means one tenth, not the nearest binary float."""
    if isinstance(value, bool):
        raise ValueError("must be a number")
    if isinstance(value, Fraction):
        return value
    if isinstance(value, int | float | str):
        try:
            return Fraction(repr(value) if isinstance(value, float) else str(value))
        except (ValueError, ZeroDivisionError) as err:
            raise ValueError("must be a number") from err
    raise ValueError("must be a number")


Epsilon = Annotated[Fraction, BeforeValidator(to_fraction)]
Exact = Annotated[Fraction, BeforeValidator(to_fraction)]  # a number read as the decimal it is written as
MAX_BINS = 1000


class _Model(BaseModel):
    # field descriptions come from the docstring under each field: the JSON Schema and docs/policy.md
    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True,
                              use_attribute_docstrings=True)

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        """A copy without the values :func:`~functools.cached_property` derived from the original's fields."""
        copy = super().model_copy(update=update, deep=deep)
        for name in [n for n in copy.__dict__ if n not in type(copy).model_fields]:
            del copy.__dict__[name]
        return copy


class KeyRange(_Model):
    """An inclusive integer range of public keys, e.g. diagnosis years 2010..2024."""

    range: tuple[int, int]
    """``[low, high]``, both included; at most 10,000 keys."""

    @model_validator(mode="after")
    def _ordered(self) -> KeyRange:
        low, high = self.range
        if high < low or high - low > 10_000:
            raise ValueError("range must be [low, high] with low <= high and at most 10000 keys")
        return self


class Bins(_Model):
    """A grid the officer declares on a numeric column: edges t0 < t1 < ... < tm.

    Regular (``width`` up to ``max``, from ``min``, default 0: ``{width: 1, max: 120}`` is monthly
    to ten years) or explicit ``edges: [t0, t1, ..., tm]``; at most 1000 bins. Survival uses it as
    its time grid: a time counts at the first edge at or after it (the bins are (-inf, t0], (t0, t1],
    ..., (t[m-1], tm]) and the curve is reported at every edge. Histograms, medians and quantiles use
    it as bins [t0, t1), ..., [t(m-1), tm], a value outside counted in the first or last bin.
    Declared by the officer, never taken from data.
    """

    width: Exact | None = None
    """The width of each bin of a regular grid (in the column's units)."""
    max: Exact | None = None
    """The last edge of a regular grid (a whole number of widths after ``min``)."""
    min: Exact | None = None
    """The first edge of a regular grid (default 0)."""
    edges: tuple[Exact, ...] | None = None
    """An explicit grid instead: at least two numbers, strictly increasing."""

    @model_validator(mode="after")
    def _one_form(self) -> Bins:
        if self.edges is not None:
            if (self.width, self.max, self.min) != (None, None, None):
                raise ValueError("give either edges: [t0, t1, ...] or width and max (with an optional min)")
            if len(self.edges) < 2 or any(b <= a for a, b in zip(self.edges, self.edges[1:], strict=False)):
                raise ValueError("edges must be at least two numbers, strictly increasing")
        else:
            if self.width is None or self.max is None:
                raise ValueError("give width and max (e.g. {width: 1, max: 120}), or edges: [t0, t1, ...]")
            if self.width <= 0 or self.max <= self.start:
                raise ValueError("need width > 0 and max > min")
            if (self.max - self.start) % self.width:
                raise ValueError(f"max - min ({float(self.max - self.start):g}) is not a whole number of widths "
                                 f"({float(self.width):g})")
        if len(self.exact_edges) - 1 > MAX_BINS:
            raise ValueError(f"{len(self.exact_edges) - 1} bins; at most {MAX_BINS} are allowed")
        return self

    @property
    def start(self) -> Fraction:
        """t0: where the grid starts."""
        return self.edges[0] if self.edges is not None else self.min or Fraction(0)

    @cached_property
    def exact_edges(self) -> tuple[Fraction, ...]:
        """Every edge t0 < t1 < ... < tm, exactly."""
        if self.edges is not None:
            return self.edges
        assert self.width is not None and self.max is not None
        count = int((self.max - self.start) // self.width)
        return tuple(self.start + i * self.width for i in range(count + 1))

    @property
    def regular(self) -> bool:
        """Whether every bin has the same width."""
        return self.edges is None


class Column(_Model):
    """A queryable column: its type, what it may be used for, bounds, public keys and grid."""

    type: Literal["integer", "float", "string"]
    """The values' type; checked against the data source's column type at every load."""
    roles: tuple[Literal["filter", "group_by", "aggregate", "event"], ...] = Field(min_length=1)
    """What queries may do with the column: ``filter`` (in WHERE), ``group_by`` (needs ``keys``),
    ``aggregate`` (sum, mean, ...: needs ``bounds``, not for strings), ``event`` (the 0/1 event of a
    survival analysis: an integer column)."""
    bounds: tuple[float, float] | None = None
    """``[lower, upper]``: values are clamped into them before aggregating, and the noise is sized
    from them (never from the data). Wider bounds mean more noise; values outside are clamped."""
    precision: int = Field(default=-1, ge=-1, le=6)
    """Decimal digits sums keep (values are rounded to them before clamping); -1: 0 for integer
    columns, 2 for float columns."""
    keys: tuple[int | float | str, ...] | KeyRange | None = None
    """The public key set of a ``group_by`` column: a list (``[I, II, III, IV]``; quote ``"yes"``/
    ``"no"``, which YAML reads as booleans) or ``{range: [2010, 2024]}``. Every key appears in a
    grouped answer, also with a count of zero: keys are public, never taken from the data."""
    other_groups: bool = False
    """Also release two more groups, ``(missing)`` and ``(other)`` (a value that is not a key),
    noised like any group; otherwise such rows are in no group."""
    bins: Bins | None = None
    """The time grid of a survival analysis on this column, or the bins of its histograms, medians and
    quantiles (``{width: 1, max: 120}`` or ``{edges: [...]}``), declared by the officer, never taken
    from the data."""
    description: str = ""
    """Shown to researchers by ListDatasets."""

    @field_validator("keys", mode="before")
    @classmethod
    def _no_booleans(cls, value: Any) -> Any:
        """``keys: [yes, no]`` reads as booleans, which would become the keys 1 and 0."""
        if isinstance(value, list | tuple):
            found = [str(k).lower() for k in value if isinstance(k, bool)]
            if found:
                raise ValueError(f"key {found[0]} is a boolean: YAML reads unquoted yes, no, on, off, true and "
                                 "false as booleans; quote the keys you mean as words (e.g. \"no\")")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Column:
        if "aggregate" in self.roles:
            if self.type == "string":
                raise ValueError("a string column cannot have the aggregate role")
            if self.bounds is None:
                raise ValueError("an aggregate column needs bounds: [lower, upper]")
        if "event" in self.roles and self.type != "integer":
            raise ValueError("an event column (the event role) must be an integer column: 1 for the event "
                             "(e.g. death), 0 for censored")
        if self.bounds is not None:
            self._check_bounds(self.bounds)
        if self.bins is not None:
            self._check_bins(self.bins)
        if "group_by" in self.roles and not self.public_keys:
            raise ValueError("a group_by column needs its public keys (keys: [...] or keys: {range: [a, b]})")
        for key in self.public_keys:
            if not _key_fits(self.type, key):
                raise ValueError(f"key {key!r} is not a {self.type}")
        if len(set(self.public_keys)) != len(self.public_keys):
            raise ValueError("keys must be distinct")
        if self.other_groups and "group_by" not in self.roles:
            raise ValueError("other_groups applies to a group_by column")
        if {MISSING_GROUP, OTHER_GROUP} & set(self.public_keys):
            raise ValueError(f"{MISSING_GROUP} and {OTHER_GROUP} are reserved group names, not keys")
        return self

    @property
    def public_keys(self) -> tuple[int | float | str, ...]:
        """The public key set in policy order (empty when none is declared)."""
        if isinstance(self.keys, KeyRange):
            return tuple(range(self.keys.range[0], self.keys.range[1] + 1))
        return self.keys or ()

    @property
    def group_keys(self) -> tuple[int | float | str, ...]:
        """The groups a group-by over this column answers.

        Its public keys, and with ``other_groups`` also ``(missing)`` (no value) and ``(other)`` (a
        value that is not a public key), noised like any group.
        """
        return self.public_keys + ((MISSING_GROUP, OTHER_GROUP) if self.other_groups else ())

    def _check_bounds(self, bounds: tuple[float, float]) -> None:
        low, high = bounds
        if not (math.isfinite(low) and math.isfinite(high)):
            raise ValueError("bounds must be finite numbers")
        if not low < high:
            raise ValueError("bounds must be [lower, upper] with lower < upper")
        fixed_low, fixed_high = self.fixed_bounds
        digits = self.scale_digits
        if fixed_low >= fixed_high:
            raise ValueError(f"bounds [{low:g}, {high:g}] hold fewer than two values at precision {digits} "
                             f"(steps of {10.0 ** -digits:g}); widen the bounds or raise precision")
        if max(-fixed_low, fixed_high) > MAX_FIXED_BOUND:
            raise ValueError(f"bounds [{low:g}, {high:g}] at precision {digits} are too large: sums over a "
                             f"table of up to 2^31 rows could overflow 64-bit integers; narrow the bounds "
                             f"or lower precision (|bound| x 10^precision must be at most 2^31)")

    def _check_bins(self, bins: Bins) -> None:
        if "aggregate" not in self.roles:
            raise ValueError("bins apply to a column with the aggregate role (e.g. survival's time column)")
        for edge in bins.exact_edges:
            fixed = edge * self.unit
            if fixed.denominator != 1:
                raise ValueError(f"bin edge {float(edge):g} is not a multiple of {10.0 ** -self.scale_digits:g} "
                                 f"(precision {self.scale_digits}); round the grid or raise precision")
            if abs(fixed) >= MAX_FIXED_BOUND:
                raise ValueError(f"bin edge {float(edge):g} at precision {self.scale_digits} is too large "
                                 "(|edge| x 10^precision must be under 2^31)")

    @cached_property
    def grid(self) -> tuple[float, ...]:
        """The declared bins' edges t0 < t1 < ... < tm (empty without bins)."""
        return tuple(float(e) for e in self.bins.exact_edges) if self.bins is not None else ()

    @cached_property
    def fixed_grid(self) -> tuple[int, ...]:
        """:attr:`grid` in fixed-point units of 1/:attr:`unit` (exact integers: the policy checks it)."""
        if self.bins is None:
            return ()
        return tuple(int(e * self.unit) for e in self.bins.exact_edges)

    @property
    def scale_digits(self) -> int:
        """Decimal digits kept when summing this column as fixed-point integers."""
        if self.precision >= 0:
            return self.precision
        return 0 if self.type == "integer" else 2

    @property
    def unit(self) -> int:
        """Fixed-point units per 1 of the column's value (10^scale_digits)."""
        return int(10 ** self.scale_digits)

    @cached_property
    def fixed_bounds(self) -> tuple[int, int]:
        """The clamping bounds as integers in units of 1/:attr:`unit`, rounded inward (exact decimals).

        The one definition of what a row can contribute to a sum: the engine clamps every scaled,
        rounded value to exactly these integers, and the DP layer sizes the noise from them. Inward
        rounding keeps every contribution inside the declared bounds.
        """
        if self.bounds is None:
            raise ValueError("a column without bounds has no fixed-point bounds")
        low, high = (to_fraction(b) * self.unit for b in self.bounds)
        return -(-low.numerator // low.denominator), high.numerator // high.denominator  # ceil, floor

    @property
    def fixed_center(self) -> int:
        """The integer (fixed-point) midpoint of :attr:`fixed_bounds`, rounded down."""
        low, high = self.fixed_bounds
        return (low + high) // 2

    @property
    def max_centered_contribution(self) -> int:
        """The largest |value - fixed_center| a row can have, in fixed-point units."""
        low, high = self.fixed_bounds
        return max(self.fixed_center - low, high - self.fixed_center)

    @property
    def max_contribution(self) -> int:
        """The largest |fixed-point value| one row can add to a sum of this column."""
        low, high = self.fixed_bounds
        return max(abs(low), abs(high))


def _key_fits(kind: str, key: object) -> bool:
    if kind == "string":
        return isinstance(key, str)
    if kind == "integer":
        return isinstance(key, int) and not isinstance(key, bool)
    return isinstance(key, int | float) and not isinstance(key, bool)


class Source(_Model):
    """Where a dataset's rows live: a table or view of a DuckDB file, or parquet files."""

    database: str | None = None
    """A DuckDB file; a relative path is resolved from the policy file's folder."""
    table: str | None = Field(default=None, pattern=_NAME)
    """A table or view in ``database``."""
    parquet: str | None = None
    """Parquet file(s) instead of a table (a glob such as ``data/*.parquet`` allowed), resolved like
    ``database``."""

    @model_validator(mode="after")
    def _one_kind(self) -> Source:
        if (self.parquet is None) == (self.table is None):
            raise ValueError("give either table (with database) or parquet")
        if self.table is not None and self.database is None:
            raise ValueError("a table source needs database: PATH.duckdb")
        return self


class EpsilonLimits(_Model):
    """Per-query privacy loss: the default when a request gives none, the minimum and the maximum.

    Below the minimum an answer is mostly noise while it still costs budget; the default minimum
    is 0.001.
    """

    default: Epsilon
    """Epsilon charged when a request gives none (a number or a fraction such as ``1/10``)."""
    max: Epsilon
    """The largest epsilon one query may spend."""
    min: Epsilon = Fraction(1, 1000)
    """The smallest epsilon a query may ask for."""

    @model_validator(mode="after")
    def _ordered(self) -> EpsilonLimits:
        if not 0 < self.default <= self.max:
            raise ValueError("need 0 < default <= max")
        if not 0 < self.min <= self.default:
            raise ValueError("need 0 < min <= default")
        return self


class Parameter(_Model):
    """A typed template parameter."""

    type: Literal["integer", "float", "string", "list[integer]", "list[float]", "list[string]"]
    """The value's type; a list type goes with ``IN :name``."""
    default: int | float | str | tuple[int | float | str, ...] | None = None
    """Used when a call gives no value; without one the parameter is required."""
    description: str = ""
    """Shown to researchers by ListDatasets."""


class Template(_Model):
    """A named, approved, parameterised query (``:name`` placeholders in its SQL)."""

    sql: str
    """One supported SELECT with ``:name`` placeholders; checked against the policy when loaded."""
    params: Mapping[str, Parameter] = Field(default_factory=dict)
    """The placeholders' types and defaults, by name."""
    projects: tuple[str, ...] = ("*",)
    """Projects that may run the template (shell-style patterns such as ``onc-*``)."""
    description: str = ""
    """Shown to researchers by ListDatasets."""


class KindEpsilon(_Model):
    """A kind's own per-query epsilon limits; each one given tightens the dataset's (never loosens it)."""

    default: Epsilon | None = None
    """Epsilon charged for a query with this kind when the request gives none (at most the dataset's)."""
    max: Epsilon | None = None
    """The largest epsilon one query with this kind may spend (at most the dataset's)."""
    min: Epsilon | None = None
    """The smallest epsilon a query with this kind may ask for (at least the dataset's)."""


class KindRule(_Model):
    """How one aggregate kind may be used on a dataset: listed means allowed, with optional own limits."""

    epsilon: KindEpsilon | None = None
    """This kind's per-query epsilon limits (e.g. ``{max: 0.5}``); a query with several kinds keeps to
    the strictest of their limits and the dataset's."""


def _kinds_mapping(value: Any) -> Any:
    """``aggregates: [count, mean]`` (allowed, with the dataset's limits) as ``{count: {}, mean: {}}``."""
    if isinstance(value, list | tuple):
        names = [str(v) for v in value]
        if len(set(names)) != len(names):
            raise ValueError("an aggregate is listed twice")
        return {name: {} for name in names}
    return {k: ({} if v is None else v) for k, v in value.items()} if isinstance(value, Mapping) else value


class Dataset(_Model):
    """One queryable dataset and how each patient's contribution is bounded."""

    source: Source
    """Where the rows are."""
    privacy_unit: str = Field(pattern=_NAME)
    """The column that identifies a patient (not queryable itself). The guarantee is per value of
    this column: it must identify patients, which the site cannot check."""
    max_rows_per_unit: int = Field(ge=1, le=1000)
    """At most this many rows per patient are used (chosen by a keyed hash, the same rows every
    time); the noise is sized for it. 1 for a table with one row per patient."""
    columns: Mapping[str, Column]
    """The queryable columns by name; columns not listed cannot be used."""
    aggregates: Annotated[Mapping[str, KindRule], BeforeValidator(
        _kinds_mapping, json_schema_input_type=list[str] | dict[str, KindRule])] = Field(
        default_factory=lambda: {name: KindRule() for name in ("count", "sum", "mean")})
    """The aggregate kinds allowed on this dataset (``count``, ``sum``, ``mean``, ``variance``,
    ``stddev``, ``survival``, ``histogram``, ``quantile``, ``median``): a list, or a mapping from
    each allowed kind to its own limits, e.g. ``{count: {}, median: {epsilon: {max: 0.5}}}``. A kind
    not listed is refused (PERMISSION_DENIED naming this field)."""
    epsilon: EpsilonLimits | None = None
    """Per-query epsilon limits for this dataset (default: the policy's ``epsilon``)."""
    templates_only: bool = False
    """Only approved templates may query this dataset (no free SQL or structured queries)."""
    population: str | None = Field(default=None, pattern=_NAME)
    """The population this dataset describes. Datasets of one population hold the same patients and
    share one budget per project; by default the privacy unit column's name."""
    description: str = ""
    """Shown to researchers by ListDatasets."""

    @property
    def population_name(self) -> str:
        """The population this dataset describes: ``population``, else its privacy unit column's name.

        Datasets of one population hold the same patients: they share one budget per project.
        """
        return self.population or self.privacy_unit

    @field_validator("aggregates", mode="after")
    @classmethod
    def _known_kinds(cls, value: Mapping[str, KindRule]) -> Mapping[str, KindRule]:
        for name in value:
            if name not in KINDS:
                raise ValueError(f"unknown aggregate {name!r}; known: {', '.join(KINDS)}")
        return value

    @model_validator(mode="after")
    def _names(self) -> Dataset:
        for name in self.columns:
            if not re.match(_NAME, name):
                raise ValueError(f"column name {name!r} is not a plain identifier")
        if self.privacy_unit in self.columns:
            raise ValueError("the privacy unit column must not be queryable (remove it from columns)")
        return self


class BudgetRule(_Model):
    """A privacy budget for every project matching ``project`` on the matching datasets."""

    project: str
    """The project claim this rule covers (shell-style pattern, e.g. ``onc-*``). The first matching
    rule wins; a project no rule matches has no access."""
    datasets: tuple[str, ...] = ("*",)
    """Datasets the rule grants (patterns); the budget is per population of the matched dataset."""
    epsilon: Epsilon
    """The project's budget per period on each population, in epsilon."""
    period: str = Field(default="365d", pattern=r"^(never|[1-9][0-9]{0,4}d)$")
    """``never`` (a lifetime budget) or a number of days such as ``365d``; windows start at
    ``period_start``. An edit takes effect at the end of the window in force."""
    roles: tuple[str, ...] = ("*",)
    """Token roles that may spend from this budget (patterns)."""

    @model_validator(mode="after")
    def _positive(self) -> BudgetRule:
        if self.epsilon <= 0:
            raise ValueError("epsilon must be > 0")
        return self

    def matches(self, project: str, dataset: str) -> bool:
        """Whether this rule covers ``project`` on ``dataset`` (shell-style patterns)."""
        return fnmatch.fnmatchcase(project, self.project) and any(
            fnmatch.fnmatchcase(dataset, d) for d in self.datasets)

    def allows_role(self, role: str) -> bool:
        """Whether a caller with ``role`` may spend from this budget."""
        return any(fnmatch.fnmatchcase(role, r) for r in self.roles)


class DatasetCap(_Model):
    """A cap over all projects together on a population.

    Given in ``population_caps``, or as older policies wrote it in ``dataset_caps`` (a dataset's
    cap caps the dataset's whole population).
    """

    epsilon: Epsilon
    """The most all projects together may spend on the population per period."""
    period: str = Field(default="365d", pattern=r"^(never|[1-9][0-9]{0,4}d)$")
    """``never`` or a number of days such as ``365d``."""


class Suppression(_Model):
    """Small-cell suppression: estimates of a group whose noisy count is under ``min_count``."""

    min_count: int = Field(default=0, ge=0)
    """Withhold estimates of groups whose noisy count is under this (presentation, not privacy); 0: off."""


class Policy(_Model):
    """A site's whole policy (one file)."""

    site: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
    """The site's name; a broker must know the site by it (callers sign proofs for it)."""
    accounting: Literal["pure"] = "pure"
    """``pure``: pure epsilon-differential privacy with basic composition."""
    epsilon: EpsilonLimits
    """Per-query epsilon limits for every dataset without its own."""
    period_start: datetime = datetime(2026, 1, 1, tzinfo=UTC)
    """Where budget windows are counted from (UTC when no time zone is given)."""
    suppression: Suppression = Suppression()
    """Small-cell suppression."""
    datasets: Mapping[str, Dataset] = Field(min_length=1)
    """The datasets researchers may query, by name."""
    budgets: tuple[BudgetRule, ...] = ()
    """Budget rules in order; the first rule matching a project and dataset applies."""
    population_caps: Mapping[str, DatasetCap] = Field(default_factory=dict)
    """Caps over all projects together, by population."""
    dataset_caps: Mapping[str, DatasetCap] = Field(default_factory=dict)
    """Older spelling of caps, by dataset: a dataset's cap caps its whole population."""
    templates: Mapping[str, Template] = Field(default_factory=dict)
    """Approved, parameterised queries by name."""
    officer_roles: tuple[Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,62}$")], ...] = ("officer",)
    """Token roles (exact names, no patterns) that may sign in to this site's console (``gateway console
    serve``), which shows every project's budget, the audit trail, the policy and its reloads. An
    empty list lets no token in (the one-time sign-in link printed at a loopback start still works)."""

    @field_validator("period_start", mode="after")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        """A start without a time zone means UTC."""
        return value if value.tzinfo is not None else value.replace(tzinfo=UTC)

    @model_validator(mode="after")
    def _references(self) -> Policy:
        for name in self.datasets:
            if not re.match(_NAME, name):
                raise ValueError(f"dataset name {name!r} is not a plain identifier")
        for name in self.dataset_caps:
            if name not in self.datasets:
                raise ValueError(f"dataset_caps names unknown dataset {name!r}")
        populations = self.populations()
        for name in self.population_caps:
            if name not in populations:
                raise ValueError(f"population_caps names unknown population {name!r}; populations: "
                                 f"{', '.join(sorted(populations))}")
        for name in self.templates:
            if not re.match(_NAME, name):
                raise ValueError(f"template name {name!r} is not a plain identifier")
        for name, dataset in self.datasets.items():
            for kind in dataset.aggregates:
                limits = self.epsilon_limits(name, (kind,))
                if limits.min > limits.max:
                    raise ValueError(f"datasets.{name}.aggregates.{kind}.epsilon: with the dataset's limits the "
                                     f"minimum {float(limits.min):g} is above the maximum {float(limits.max):g}")
        return self

    def epsilon_limits(self, dataset: str, kinds: Iterable[str] = ()) -> EpsilonLimits:
        """Per-query epsilon default, min and max for ``dataset``, for a query with the aggregate ``kinds``.

        The strictest of the dataset's limits and each kind's own: the smallest max, the largest
        min, and the smallest default, raised to that min. With kinds whose limits exclude each
        other, min is above max (the caller refuses such a query): not validated here.
        """
        limits = self.datasets[dataset].epsilon or self.epsilon
        rules = self.datasets[dataset].aggregates
        own = [rule.epsilon for kind in kinds if (rule := rules.get(kind)) is not None and rule.epsilon is not None]
        if not own:
            return limits
        top = min([limits.max, *(e.max for e in own if e.max is not None)])
        bottom = max([limits.min, *(e.min for e in own if e.min is not None)])
        default = min([limits.default, top, *(e.default for e in own if e.default is not None)])
        return EpsilonLimits.model_construct(default=max(default, bottom), max=top, min=bottom)

    def populations(self) -> dict[str, tuple[str, ...]]:
        """Each population and its datasets (in policy order)."""
        found: dict[str, list[str]] = {}
        for name, dataset in self.datasets.items():
            found.setdefault(dataset.population_name, []).append(name)
        return {population: tuple(names) for population, names in found.items()}

    def population_cap(self, population: str) -> DatasetCap | None:
        """The cap over all projects on ``population``: the strictest of its population and dataset caps."""
        caps = [self.population_caps[population]] if population in self.population_caps else []
        caps += [self.dataset_caps[d] for d in self.populations().get(population, ()) if d in self.dataset_caps]
        return min(caps, key=lambda cap: cap.epsilon) if caps else None

    def budget_rule(self, project: str, dataset: str) -> BudgetRule | None:
        """The first budget rule covering ``project`` on ``dataset`` (None: no access)."""
        return next((r for r in self.budgets if r.matches(project, dataset)), None)


SCHEMA_ID = "policy.schema.json"


def json_schema() -> dict[str, Any]:
    """The JSON Schema of a policy file (``gateway policy schema``; editors validate with it)."""
    model = {k: v for k, v in Policy.model_json_schema().items() if k not in ("title", "description")}
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": SCHEMA_ID,
            "title": "Gateway site policy",
            "description": "A site's privacy policy: its datasets, what each project may ask and spend. "
                           "Reference: docs/policy.md.", **model}


@dataclass(frozen=True)
class LoadedPolicy:
    """A validated policy with the file it came from (data paths resolve against its folder)."""

    policy: Policy
    path: Path
    text_hash: str

    def resolve(self, relative: str) -> Path:
        """A data path from the policy, relative to the policy file's folder."""
        return (self.path.parent / relative).resolve()


class PolicyFileError(ConfigFileError):
    """A policy file failed to load; ``problems`` holds one ``file:line: field: reason`` each."""

    noun = "policy"


def load_policy(path: Path) -> LoadedPolicy:
    """Parse and validate one policy file, or raise :class:`PolicyFileError`."""
    policy, text = load_model(path, Policy, PolicyFileError)
    return LoadedPolicy(policy, path.resolve(), hashlib.sha256(text.encode()).hexdigest())


def window_bounds(period: str, start: datetime, now: datetime) -> tuple[int, int | None]:
    """The budget window the policy puts ``now`` in, as [start, end) in epoch seconds (end None: never)."""
    return window_of_index(period, start, period_window(period, start, now)[0])


def window_of_index(period: str, start: datetime, index: int) -> tuple[int, int | None]:
    """Window number ``index`` of ``period`` from ``start``, as [start, end) in epoch seconds."""
    if period == "never":
        return 0, None
    length = timedelta(days=int(period.removesuffix("d")))
    return int((start + index * length).timestamp()), int((start + (index + 1) * length).timestamp())


def period_window(period: str, start: datetime, now: datetime) -> tuple[int, str]:
    """The index of the budget period containing ``now`` and when it ends (RFC 3339, '' if never)."""
    if period == "never":
        return 0, ""
    length = timedelta(days=int(period.removesuffix("d")))
    index = max(0, (now - start) // length)
    return index, (start + (index + 1) * length).isoformat().replace("+00:00", "Z")
