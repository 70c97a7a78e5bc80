"""Unit tests for gateway.policy (loading, error lines, budgets, periods) and gateway.templates."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta, timezone
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.errors import InvalidQuery, NotFound, PermissionDenied
from gateway.policy import BudgetRule, LoadedPolicy, PolicyFileError, load_policy, period_window, to_fraction
from gateway.query import Aggregate, Filter, Query
from gateway.templates import resolve_template, validate_templates
from tests.helpers.policies import dump_policy

ROOT = Path(__file__).resolve().parent.parent
POLICY_FILES = sorted((ROOT / "policies").glob("*.yaml"))
NORTH = load_policy(ROOT / "policies" / "north.yaml")

# line numbers in the comments are relied on by the tests below
BASE = """\
site: t
epsilon:
  default: 0.5
  max: 1.0
datasets:
  patients:
    source:
      database: data/x.duckdb
      table: patients
    privacy_unit: patient_id
    max_rows_per_unit: 1
    columns:
      sex:
        type: string
        roles: [filter, group_by]
        keys: [F, M]
      age:
        type: integer
        roles: [filter, group_by, aggregate]
        bounds: [18, 99]
        keys: {range: [18, 99]}
"""
#      line 13: "      sex:", line 17: "      age:", line 21: "keys: {range...}", BASE has 21 lines


def write(tmp_path: Path, text: str, name: str = "policy.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def problems(path: Path) -> list[str]:
    with pytest.raises(PolicyFileError) as info:
        load_policy(path)
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


def test_base_fixture_is_valid(tmp_path: Path) -> None:
    assert BASE.count("\n") == 21
    loaded = load_policy(write(tmp_path, BASE))
    assert loaded.policy.site == "t"
    assert loaded.policy.datasets["patients"].columns["age"].public_keys == tuple(range(18, 100))


# --- the shipped policies -------------------------------------------------------------------------


@pytest.mark.parametrize("path", POLICY_FILES, ids=[p.stem for p in POLICY_FILES])
def test_example_policies_load_and_their_templates_check(path: Path) -> None:
    loaded = load_policy(path)
    assert loaded.policy.site == path.stem
    assert set(loaded.policy.datasets) == {"patients", "treatments"}
    assert validate_templates(loaded) == []
    assert loaded.path == path.resolve()
    assert loaded.text_hash == hashlib.sha256(path.read_text(encoding="utf-8").encode()).hexdigest()


@pytest.mark.parametrize("path", POLICY_FILES, ids=[p.stem for p in POLICY_FILES])
def test_example_policies_survive_being_written_back(tmp_path: Path, path: Path) -> None:
    # tests edit loaded policies and write them back as YAML (tests/helpers/policies.py): nothing may change
    policy = load_policy(path).policy
    assert load_policy(dump_policy(policy, tmp_path / path.name)).policy == policy


def test_there_are_example_policies() -> None:
    assert [p.stem for p in POLICY_FILES] == ["east", "north", "south", "west"]


def test_north_values_are_read_exactly() -> None:
    policy = NORTH.policy
    assert policy.epsilon.default == Fraction(1, 2) and policy.epsilon.max == Fraction(1)
    assert policy.period_start == datetime(2026, 1, 1, tzinfo=UTC)
    assert policy.suppression.min_count == 5
    assert policy.epsilon_limits("treatments").default == Fraction(1, 2)
    assert policy.epsilon_limits("patients") is policy.epsilon
    assert policy.datasets["treatments"].max_rows_per_unit == 5
    bmi = policy.datasets["patients"].columns["bmi"]
    assert (bmi.bounds, bmi.scale_digits) == ((15.0, 50.0), 1)
    assert policy.datasets["patients"].columns["age_at_diagnosis"].scale_digits == 0
    assert policy.population_caps["patients"].epsilon == 100  # the examples cap each population


def test_data_paths_resolve_against_the_policy_folder() -> None:
    assert NORTH.resolve("data/north.duckdb") == (ROOT / "policies" / "data" / "north.duckdb").resolve()


@pytest.mark.parametrize(("value", "expected"), [
    (0.1, Fraction(1, 10)), (0.5, Fraction(1, 2)), (3, Fraction(3)), ("1/3", Fraction(1, 3)),
    ("0.25", Fraction(1, 4)), (Fraction(2, 7), Fraction(2, 7)), (1e-3, Fraction(1, 1000)),
])
def test_to_fraction_is_exact(value: object, expected: Fraction) -> None:
    assert to_fraction(value) == expected


@pytest.mark.parametrize("value", [True, "abc", "1/0", None, [1]])
def test_to_fraction_rejects_non_numbers(value: object) -> None:
    with pytest.raises(ValueError, match="must be a number"):
        to_fraction(value)


# --- broken policies: exact `file:line: field: reason` lines --------------------------------------


@pytest.mark.parametrize(("name", "text", "expected"), [
    ("extra_top", BASE + "bogus: 1\n",
     ["22: bogus: unknown key 'bogus'; known keys here: accounting, budgets, dataset_caps, "
      "datasets, epsilon, officer_roles, period_start, population_caps, site, suppression, templates"]),
    ("extra_column", BASE.replace("        keys: [F, M]\n", "        keys: [F, M]\n        colour: red\n"),
     ["17: datasets.patients.columns.sex.colour: unknown key 'colour'; known keys here: bins, bounds, description, "
      "keys, other_groups, precision, roles, type"]),
    ("extra_source", BASE.replace("      table: patients\n", "      table: patients\n      schema: main\n"),
     ["10: datasets.patients.source.schema: unknown key 'schema'; known keys here: database, parquet, table"]),
    ("extra_dataset", BASE.replace("    max_rows_per_unit: 1\n", "    max_rows_per_unit: 1\n    owner: bob\n"),
     ["12: datasets.patients.owner: unknown key 'owner'; known keys here: aggregates, columns, description, "
      "epsilon, max_rows_per_unit, population, privacy_unit, source, templates_only"]),
    ("epsilon_default_over_max", BASE.replace("default: 0.5", "default: 2"), ["2: epsilon: need 0 < default <= max"]),
    ("epsilon_zero", BASE.replace("default: 0.5", "default: 0"), ["2: epsilon: need 0 < default <= max"]),
    ("epsilon_not_a_number", BASE.replace("default: 0.5", "default: abc"), ["3: epsilon.default: must be a number"]),
    ("epsilon_bool", BASE.replace("default: 0.5", "default: true"),
     ["3: epsilon.default: should be a number, not the boolean true"]),
    ("aggregate_without_bounds", BASE.replace("        bounds: [18, 99]\n", ""),
     ["17: datasets.patients.columns.age: an aggregate column needs bounds: [lower, upper]"]),
    ("group_by_without_keys", BASE.replace("        keys: [F, M]\n", ""),
     ["13: datasets.patients.columns.sex: a group_by column needs its public keys "
      "(keys: [...] or keys: {range: [a, b]})"]),
    ("bounds_reversed", BASE.replace("bounds: [18, 99]", "bounds: [99, 18]"),
     ["17: datasets.patients.columns.age: bounds must be [lower, upper] with lower < upper"]),
    ("bounds_equal", BASE.replace("bounds: [18, 99]", "bounds: [5, 5]"),
     ["17: datasets.patients.columns.age: bounds must be [lower, upper] with lower < upper"]),
    ("bounds_infinite", BASE.replace("bounds: [18, 99]", "bounds: [0, .inf]"),
     ["17: datasets.patients.columns.age: bounds must be finite numbers"]),
    ("bounds_overflow", BASE.replace("bounds: [18, 99]", "bounds: [0, 1e12]"),
     ["17: datasets.patients.columns.age: bounds [0, 1e+12] at precision 0 are too large: sums over a table of "
      "up to 2^31 rows could overflow 64-bit integers; narrow the bounds or lower precision "
      "(|bound| x 10^precision must be at most 2^31)"]),
    ("string_keys_are_ints", BASE.replace("keys: [F, M]", "keys: [1, 2]"),
     ["13: datasets.patients.columns.sex: key 1 is not a string"]),
    ("integer_keys_are_strings", BASE.replace("keys: {range: [18, 99]}", "keys: [a, b]"),
     ["17: datasets.patients.columns.age: key 'a' is not a integer"]),
    ("integer_keys_are_floats", BASE.replace("keys: {range: [18, 99]}", "keys: [1.5, 2]"),
     ["17: datasets.patients.columns.age: key 1.5 is not a integer"]),
    ("duplicate_keys", BASE.replace("keys: [F, M]", "keys: [F, M, F]"),
     ["13: datasets.patients.columns.sex: keys must be distinct"]),
    ("range_reversed", BASE.replace("range: [18, 99]", "range: [99, 18]"),
     ["21: datasets.patients.columns.age.keys: range must be [low, high] with low <= high and at most 10000 keys"]),
    ("string_aggregate", BASE.replace("roles: [filter, group_by]\n        keys: [F, M]",
                                      "roles: [filter, group_by, aggregate]\n        keys: [F, M]\n"
                                      "        bounds: [0, 1]"),
     ["13: datasets.patients.columns.sex: a string column cannot have the aggregate role"]),
    ("bad_role", BASE.replace("roles: [filter, group_by]", "roles: [filter, sort]"),
     ["15: datasets.patients.columns.sex.roles.1: should be 'filter', 'group_by', 'aggregate' or 'event'; "
      "got 'sort'"]),
    ("no_roles", BASE.replace("roles: [filter, group_by]", "roles: []"),
     ["15: datasets.patients.columns.sex.roles: should have at least 1 item(s)"]),
    ("privacy_unit_is_a_column", BASE.replace("privacy_unit: patient_id", "privacy_unit: sex"),
     ["6: datasets.patients: the privacy unit column must not be queryable (remove it from columns)"]),
    ("column_name", BASE.replace("      sex:", '      "bad name":'),
     ["6: datasets.patients: column name 'bad name' is not a plain identifier"]),
    ("dataset_name", BASE.replace("  patients:", '  "bad-ds":'),
     ["1: (top): dataset name 'bad-ds' is not a plain identifier"]),
    ("no_datasets", BASE.split("datasets:", maxsplit=1)[0] + "datasets: {}\n",
     ["5: datasets: should have at least 1 item(s)"]),
    ("missing_site", BASE.replace("site: t\n", ""), ["1: site: is required"]),
    ("bad_period", BASE + "budgets:\n  - project: x\n    epsilon: 1\n    period: 1y\n",
     ["25: budgets.0.period: should be never, or a number of days such as 365d; got '1y'"]),
    ("zero_period", BASE + "budgets:\n  - project: x\n    epsilon: 1\n    period: 0d\n",
     ["25: budgets.0.period: should be never, or a number of days such as 365d; got '0d'"]),
    ("period_without_unit", BASE + "budgets:\n  - project: x\n    epsilon: 1\n    period: '365'\n",
     ["25: budgets.0.period: should be never, or a number of days such as 365d; got '365'"]),
    ("cap_bad_period", BASE + "dataset_caps:\n  patients:\n    epsilon: 1\n    period: weekly\n",
     ["25: dataset_caps.patients.period: should be never, or a number of days such as 365d; got 'weekly'"]),
    ("budget_zero_epsilon", BASE + "budgets:\n  - project: x\n    epsilon: 0\n",
     ["23: budgets.0: epsilon must be > 0"]),
    ("caps_unknown_dataset", BASE + "dataset_caps:\n  nope:\n    epsilon: 1\n",
     ["1: (top): dataset_caps names unknown dataset 'nope'"]),
    ("yaml_syntax", BASE + "foo: [1, 2\nbar: 3\n", ["23: (yaml): expected ',' or ']', but got ':'"]),
    ("yaml_indent", "site: t\n  bad: indent\n", ["2: (yaml): mapping values are not allowed here"]),
    ("yaml_tab", "site: t\n\tepsilon: 1\n", ["2: (yaml): found character '\\t' that cannot start any token"]),
    ("two_documents", BASE + "---\nsite: u\n", ["22: (yaml): but found another document"]),
    ("list_document", "- a\n- b\n", ["1: (file): a policy must be a mapping of keys"]),
    ("scalar_document", "just text\n", ["1: (file): a policy must be a mapping of keys"]),
    ("empty_document", "", ["1: (file): a policy must be a mapping of keys"]),
    ("several_problems", BASE.replace("default: 0.5", "default: 2") + "bogus: 1\n",
     ["2: epsilon: need 0 < default <= max",
      "22: bogus: unknown key 'bogus'; known keys here: accounting, budgets, dataset_caps, datasets, "
      "epsilon, officer_roles, period_start, population_caps, site, suppression, templates"]),
])
def test_broken_policy_lines(tmp_path: Path, name: str, text: str, expected: list[str]) -> None:
    path = write(tmp_path, text, f"{name}.yaml")
    assert problems(path) == [f"{path}:{line}" for line in expected]


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    assert problems(path) == [f"{path}:0: (file): cannot read: No such file or directory"]


def test_a_directory_is_not_a_policy(tmp_path: Path) -> None:
    assert problems(tmp_path) == [f"{tmp_path}:0: (file): cannot read: Is a directory"]


# regression: _is_internal used to drop every loc part starting with 'int', 'float' or 'str'
@pytest.mark.parametrize(("column", "text_change", "expected"), [
    ("strength", ("        bounds: [18, 99]\n", "        bounds: [18, 99]\n        colour: x\n"),
     "21: datasets.patients.columns.strength.colour: unknown key 'colour'; known keys here: bins, bounds, description, "
     "keys, other_groups, precision, roles, type"),
    ("intervention", ("bounds: [18, 99]", "bounds: [99, 18]"),
     "17: datasets.patients.columns.intervention: bounds must be [lower, upper] with lower < upper"),
    ("float_rate", ("bounds: [18, 99]", "bounds: [99, 18]"),
     "17: datasets.patients.columns.float_rate: bounds must be [lower, upper] with lower < upper"),
])
def test_field_names_starting_with_type_names_are_kept(tmp_path: Path, column: str,
                                                           text_change: tuple[str, str], expected: str) -> None:
    path = write(tmp_path, BASE.replace("      age:", f"      {column}:").replace(*text_change))
    assert problems(path) == [f"{path}:{expected}"]


# regression: a naive period_start used to load, then period_window raised TypeError on every query
@pytest.mark.parametrize("start", ["2026-01-01T00:00:00", "2026-01-01"])
def test_naive_period_start_is_rejected_or_usable(tmp_path: Path, start: str) -> None:
    path = write(tmp_path, BASE + f"period_start: {start}\n")
    try:
        loaded = load_policy(path)
    except PolicyFileError as err:
        assert err.problems[0].startswith(f"{path}:22: period_start: ")
        return
    assert period_window("365d", loaded.policy.period_start, datetime(2026, 6, 1, tzinfo=UTC)) == \
        (0, "2027-01-01T00:00:00Z")


# --- budgets and periods --------------------------------------------------------------------------


@pytest.mark.parametrize(("project", "dataset", "expected"), [
    ("onc-lung", "patients", (Fraction(10), "365d")),
    ("onc-lung", "treatments", (Fraction(10), "365d")),
    ("onc-", "patients", (Fraction(10), "365d")),
    ("demo", "patients", (Fraction(3), "never")),
    ("onc", "patients", None),
    ("ONC-lung", "patients", None),
    ("xonc-lung", "patients", None),
    ("demo2", "patients", None),
    ("", "patients", None),
])
def test_north_budget_rules(project: str, dataset: str, expected: tuple[Fraction, str] | None) -> None:
    rule = NORTH.policy.budget_rule(project, dataset)
    assert (None if rule is None else (rule.epsilon, rule.period)) == expected


def test_north_budget_roles() -> None:
    onc = NORTH.policy.budget_rule("onc-x", "patients")
    demo = NORTH.policy.budget_rule("demo", "patients")
    assert onc is not None and demo is not None
    assert onc.roles == ("researcher", "analyst")
    assert [onc.allows_role(r) for r in ("researcher", "analyst", "admin", "Researcher", "")] == \
        [True, True, False, False, False]
    assert [demo.allows_role(r) for r in ("researcher", "anything", "")] == [True, True, True]


def test_budget_rule_shell_patterns() -> None:
    rule = BudgetRule(project="team-?", datasets=("pat*", "treat[a-z]ents"), epsilon=Fraction(1),
                      roles=("res*", "analyst"))
    assert rule.matches("team-a", "patients")
    assert rule.matches("team-b", "treatments")
    assert rule.matches("team-1", "pat")
    assert not rule.matches("team-ab", "patients")
    assert not rule.matches("team-", "patients")
    assert not rule.matches("team-a", "Patients")
    assert not rule.matches("team-a", "registry")
    assert rule.allows_role("researcher") and rule.allows_role("res") and rule.allows_role("analyst")
    assert not rule.allows_role("analyst2") and not rule.allows_role("admin")


def test_first_matching_budget_rule_wins(tmp_path: Path) -> None:
    text = BASE + ("budgets:\n  - project: 'onc-lung'\n    epsilon: 1\n    datasets: [treatments]\n"
                   "  - project: 'onc-*'\n    epsilon: 2\n  - project: '*'\n    epsilon: 3\n")
    policy = load_policy(write(tmp_path, text)).policy
    assert [r.epsilon for r in policy.budgets] == [1, 2, 3]
    assert policy.budget_rule("onc-lung", "treatments") is policy.budgets[0]
    assert policy.budget_rule("onc-lung", "patients") is policy.budgets[1]
    assert policy.budget_rule("other", "patients") is policy.budgets[2]
    assert policy.budgets[2].period == "365d" and policy.budgets[2].roles == ("*",)


START = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize(("period", "now", "expected"), [
    ("never", START, (0, "")),
    ("never", START + timedelta(days=10_000), (0, "")),
    ("365d", START, (0, "2027-01-01T00:00:00Z")),
    ("365d", START + timedelta(days=365) - timedelta(microseconds=1), (0, "2027-01-01T00:00:00Z")),
    ("365d", START + timedelta(days=365), (1, "2028-01-01T00:00:00Z")),
    ("365d", START + timedelta(days=730), (2, "2028-12-31T00:00:00Z")),  # 2028 is a leap year
    ("365d", START - timedelta(days=3), (0, "2027-01-01T00:00:00Z")),
    ("30d", datetime(2026, 3, 15, 12, tzinfo=UTC), (2, "2026-04-01T00:00:00Z")),
    ("30d", datetime(2026, 3, 2, tzinfo=UTC), (2, "2026-04-01T00:00:00Z")),
    ("30d", datetime(2026, 3, 1, 23, 59, 59, tzinfo=UTC), (1, "2026-03-02T00:00:00Z")),
    ("1d", datetime(2026, 1, 1, 23, 59, tzinfo=UTC), (0, "2026-01-02T00:00:00Z")),
    ("1d", datetime(2026, 1, 2, tzinfo=UTC), (1, "2026-01-03T00:00:00Z")),
    ("365d", datetime(2026, 12, 31, 23, 30, tzinfo=timezone(timedelta(hours=-2))), (1, "2028-01-01T00:00:00Z")),
])
def test_period_window(period: str, now: datetime, expected: tuple[int, str]) -> None:
    assert period_window(period, START, now) == expected


def test_period_window_keeps_a_non_utc_offset() -> None:
    start = datetime(2026, 1, 1, tzinfo=timezone(timedelta(hours=2)))
    assert period_window("10d", start, datetime(2026, 1, 5, tzinfo=UTC)) == (0, "2026-01-11T00:00:00+02:00")


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=1, max_value=99_999),
       st.datetimes(min_value=datetime(2026, 1, 1), max_value=datetime(2300, 1, 1), timezones=st.just(UTC)))
def test_property_period_window_contains_now(days: int, now: datetime) -> None:
    length = timedelta(days=days)
    index, resets = period_window(f"{days}d", START, now)
    assert START + index * length <= now < START + (index + 1) * length
    assert datetime.fromisoformat(resets) == START + (index + 1) * length
    assert resets.endswith("Z")


# --- templates -------------------------------------------------------------------------------------

TEMPLATES = BASE + """\
templates:
  by_sex:
    description: count per sex for an age range
    sql: SELECT count(*), sex FROM patients WHERE age >= :lo AND age <= :hi GROUP BY sex
    params:
      lo: {type: integer, default: 18}
      hi: {type: integer}
    projects: ["onc-*", demo]
  mean_age:
    sql: SELECT mean(age) FROM patients WHERE sex IN :sexes
    params:
      sexes: {type: "list[string]", default: [F, M]}
  no_params:
    sql: SELECT count(*) FROM patients
"""

BROKEN_TEMPLATES = BASE + """\
templates:
  fine:
    sql: SELECT count(*) FROM patients
  unknown_column:
    sql: SELECT count(*) FROM patients WHERE zzz = 1
  uses_or:
    sql: SELECT count(*) FROM patients WHERE sex = 'F' OR sex = 'M'
  unknown_dataset:
    sql: SELECT count(*) FROM visits
  undeclared_param:
    sql: SELECT count(*) FROM patients WHERE age > :min_age
  unused_param:
    sql: SELECT count(*) FROM patients
    params:
      extra: {type: integer}
  list_with_equals:
    sql: SELECT count(*) FROM patients WHERE sex = :s
    params:
      s: {type: "list[string]"}
  bad_default:
    sql: SELECT count(*) FROM patients WHERE age > :a
    params:
      a: {type: integer, default: old}
  wrong_type:
    sql: SELECT count(*) FROM patients WHERE sex = :s
    params:
      s: {type: integer}
  sum_of_string:
    sql: SELECT sum(sex) FROM patients
"""


def test_validate_templates_reports_each_broken_template(tmp_path: Path) -> None:
    loaded = load_policy(write(tmp_path, BROKEN_TEMPLATES))
    p = loaded.path
    assert validate_templates(loaded) == [
        f"{p}:26: templates.unknown_column.sql: unknown column 'zzz' in dataset 'patients'; "
        "columns usable for filter: age, sex",
        f"{p}:28: templates.uses_or.sql: OR is not supported (use IN for alternatives); "
        "supported: SELECT <count(*) | sum(col) | avg(col) | mean(col) | variance(col) | var_samp(col) | "
        "stddev(col) | stddev_samp(col) | survival(time, event) | histogram(col) | quantile(col, q) | "
        "median(col) | regression(y, x1, x2), group-by columns> FROM <dataset> "
        "[WHERE <col> <op> <value> [AND ...]] [GROUP BY <col>, ...]; ops: =, !=, <, <=, >, >=, IN (...), "
        "NOT IN (...), BETWEEN a AND b; cohorts: <patient id> [NOT] IN (SELECT <patient id> FROM <dataset> "
        "[WHERE <conditions>])",
        f"{p}:30: templates.unknown_dataset.sql: unknown dataset 'visits'; this site offers: patients",
        f"{p}:32: templates.undeclared_param.sql: missing value for parameter :min_age",
        f"{p}:34: templates.unused_param.sql: parameters not used by the query: extra",
        f"{p}:38: templates.list_with_equals.sql: parameter 's' is a list; use it with IN",
        f"{p}:42: templates.bad_default.sql: parameter 'a' must be integer, got 'old'",
        f"{p}:46: templates.wrong_type.sql: value 0 does not fit column 'sex' of type string",
        f"{p}:50: templates.sum_of_string.sql: sex: column may not be used for aggregate (its roles: filter, group_by)",
    ]


def test_validate_templates_line_is_the_templates_sql_line(tmp_path: Path) -> None:
    loaded = load_policy(write(tmp_path, BROKEN_TEMPLATES))
    lines = BROKEN_TEMPLATES.splitlines()
    reported = validate_templates(loaded)
    assert len(reported) == 9
    for problem in reported:
        number, rest = problem.removeprefix(f"{loaded.path}:").split(":", 1)
        name = rest.split(".")[1]
        assert lines[int(number) - 2] == f"  {name}:"
        assert lines[int(number) - 1].startswith("    sql: SELECT")


def test_template_named_like_a_column_reports_its_own_line(tmp_path: Path) -> None:
    # regression: _line_of used to take the first line starting with '<name>:' (here the column 'sex', line 13)
    text = BASE + "templates:\n  sex:\n    sql: SELECT count(*) FROM patients WHERE sex = 'F' OR sex = 'M'\n"
    loaded = load_policy(write(tmp_path, text))
    [problem] = validate_templates(loaded)
    assert problem.startswith(f"{loaded.path}:24: templates.sex.sql: OR is not supported")


@pytest.fixture
def templated(tmp_path: Path) -> LoadedPolicy:
    loaded = load_policy(write(tmp_path, TEMPLATES))
    assert validate_templates(loaded) == []
    return loaded


@pytest.mark.parametrize("where", ["age BETWEEN 18 AND :hi", "age BETWEEN :lo AND :hi"])
def test_bug_valid_between_template_is_not_reported(tmp_path: Path, where: str) -> None:
    text = BASE + (f"templates:\n  t:\n    sql: SELECT count(*) FROM patients WHERE {where}\n"
                   "    params:\n      hi: {type: integer}\n")
    if ":lo" in where:
        text += "      lo: {type: integer, default: 18}\n"
    loaded = load_policy(write(tmp_path, text))
    assert resolve_template(loaded.policy, "t", {"hi": 65}, "p").filters == (Filter("age", "between", (18, 65)),)
    assert validate_templates(loaded) == []


def test_resolve_template_applies_defaults(templated: LoadedPolicy) -> None:
    policy = templated.policy
    assert resolve_template(policy, "by_sex", {"hi": 40}, "onc-lung") == \
        Query("patients", (Aggregate("count"),), ("sex",), (Filter("age", ">=", (18,)), Filter("age", "<=", (40,))))
    assert resolve_template(policy, "by_sex", {"lo": 30, "hi": 40}, "demo").filters == \
        (Filter("age", ">=", (30,)), Filter("age", "<=", (40,)))
    assert resolve_template(policy, "mean_age", {}, "anyone") == \
        Query("patients", (Aggregate("mean", "age"),), (), (Filter("sex", "in", ("F", "M")),))
    assert resolve_template(policy, "no_params", {}, "x") == Query("patients", (Aggregate("count"),))


def test_resolve_north_templates() -> None:
    policy = NORTH.policy
    assert resolve_template(policy, "stage_distribution", {}, "onc-1").filters == \
        (Filter("diagnosis_year", "between", (2010, 2024)),)
    assert resolve_template(policy, "stage_distribution", {"from_year": 2015}, "onc-1").filters == \
        (Filter("diagnosis_year", "between", (2015, 2024)),)
    assert resolve_template(policy, "mean_age_by_stage", {}, "onc-1").filters == \
        (Filter("primary_site", "in", ("breast", "lung", "colorectal")),)


@pytest.mark.parametrize(("params", "filters"), [
    ({"sexes": ["F"]}, (Filter("sex", "in", ("F",)),)),
    ({"sexes": ("M", "F")}, (Filter("sex", "in", ("M", "F")),)),
    ({"sexes": "F"}, (Filter("sex", "in", ("F",)),)),
])
def test_resolve_list_parameter(templated: LoadedPolicy, params: dict[str, object],
                                filters: tuple[Filter, ...]) -> None:
    assert resolve_template(templated.policy, "mean_age", params, "x").filters == filters


@pytest.mark.parametrize(("name", "params", "message"), [
    ("by_sex", {"hi": "40"}, "parameter 'hi' must be integer, got '40'"),
    ("by_sex", {"hi": 40.0}, "parameter 'hi' must be integer, got 40.0"),
    ("by_sex", {"hi": True}, "parameter 'hi' must be integer, got True"),
    ("by_sex", {"hi": None}, "parameter 'hi' must be integer, got None"),
    ("by_sex", {"hi": [40]}, "parameter 'hi' must be integer, got [40]"),
    ("mean_age", {"sexes": [1]}, "parameter 'sexes' must be string, got 1"),
    ("mean_age", {"sexes": []}, "parameter 'sexes' needs at least one value"),
    ("by_sex", {"hi": 40, "extra": 1, "another": 2},
     "template 'by_sex' has no parameter(s) another, extra; its parameters: lo, hi"),
    ("no_params", {"x": 1}, "template 'no_params' has no parameter(s) x; its parameters: none"),
    ("by_sex", {}, "template 'by_sex' needs parameter 'hi' (integer)"),
    ("by_sex", {"lo": 20}, "template 'by_sex' needs parameter 'hi' (integer)"),
])
def test_resolve_template_parameter_errors(templated: LoadedPolicy, name: str, params: dict[str, object],
                                           message: str) -> None:
    with pytest.raises(InvalidQuery) as info:
        resolve_template(templated.policy, name, params, "demo")
    assert info.value.message == message


def test_resolve_template_float_parameter(tmp_path: Path) -> None:
    text = BASE + ("templates:\n  t:\n    sql: SELECT count(*) FROM patients WHERE age > :x\n"
                   "    params:\n      x: {type: float}\n")
    policy = load_policy(write(tmp_path, text)).policy
    query = resolve_template(policy, "t", {"x": 40}, "p")
    assert query.filters == (Filter("age", ">", (40.0,)),)
    assert type(query.filters[0].values[0]) is float
    with pytest.raises(InvalidQuery, match="parameter 'x' must be float, got '40'"):
        resolve_template(policy, "t", {"x": "40"}, "p")


@pytest.mark.parametrize("project", ["other", "onc", "ONC-lung", "demo-2"])
def test_resolve_template_project_not_allowed(templated: LoadedPolicy, project: str) -> None:
    with pytest.raises(PermissionDenied) as info:
        resolve_template(templated.policy, "by_sex", {"hi": 40}, project)
    assert info.value.message == f"project {project!r} may not run template 'by_sex'"


def test_resolve_unknown_template() -> None:
    with pytest.raises(NotFound) as info:
        resolve_template(NORTH.policy, "nope", {}, "onc-1")
    assert info.value.message == "unknown template 'nope'; your templates here: mean_age_by_stage, stage_distribution"


def test_resolve_template_on_a_policy_without_templates(tmp_path: Path) -> None:
    policy = load_policy(write(tmp_path, BASE)).policy
    with pytest.raises(NotFound, match=r"^unknown template 'x'; your templates here: none$"):
        resolve_template(policy, "x", {}, "p")


def test_officer_roles_are_exact_names_never_patterns(tmp_path) -> None:
    from tests.helpers.policies import dump_policy, example_policy

    path = dump_policy(example_policy(), tmp_path / "p.yaml")
    assert load_policy(path).policy.officer_roles == ("officer",)  # the default
    for bad in ("['*']", "['off*']", "['']", "officer"):
        path.write_text(path.read_text() + f"officer_roles: {bad}\n")
        with pytest.raises(PolicyFileError, match="officer_roles"):
            load_policy(path)
        path = dump_policy(example_policy(), tmp_path / "p.yaml")
    path.write_text(path.read_text() + "officer_roles: []\n")
    assert load_policy(path).policy.officer_roles == ()


def test_a_copy_with_other_bins_derives_its_grid_from_its_own_bins() -> None:
    """Derived values are cached on a policy's models; a copy with changed fields must not keep them."""
    column = NORTH.policy.datasets["patients"].columns["survival_months"]
    assert column.grid and column.fixed_grid  # now cached on the original
    unbinned = column.model_copy(update={"bins": None})
    assert (unbinned.grid, unbinned.fixed_grid) == ((), ())
    wider = column.model_copy(update={"bounds": (0, 240)})
    assert wider.fixed_bounds == (0, 240) != column.fixed_bounds
