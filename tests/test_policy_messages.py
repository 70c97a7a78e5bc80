"""A privacy officer's mistakes, each with a message in plain words that says what to do: every
error at once in line order, "did you mean" for unknown keys and names, YAML's boolean trap, and
warnings for rules that grant nothing; `gateway broker check` the same way."""

from __future__ import annotations

from pathlib import Path

from tests.helpers.cli import run_cli

POLICY = """\
site: north
epsilon: {default: 0.5, max: 1}
datasets:
  patients:
    source: {database: x.duckdb, table: patients}
    privacy_unit: patient_id
    max_rows_per_unit: 1
    columns:
      sex: {type: string, roles: [filter, group_by], keys: [F, M]}
      age: {type: integer, roles: [aggregate], bounds: [0, 120]}
budgets:
  - project: "onc-*"
    epsilon: 10
"""
INTERNALS = ("Input should", "Extra inputs", "String should match", "instance of", "pattern", "Field required")


def check(tmp_path: Path, text: str, *flags: str) -> tuple[int, list[str]]:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    result = run_cli("policy", "check", str(path), *flags)
    lines = [line.removeprefix(f"{path}:") for line in result.stderr.splitlines()]
    for line in lines:
        assert not any(word in line for word in INTERNALS), line  # plain words, no pydantic internals
        assert "Traceback" not in line
    return result.returncode, lines


def test_the_example_is_clean(tmp_path: Path) -> None:
    assert check(tmp_path, POLICY, "--strict") == (0, [])


def test_every_mistake_at_once_in_line_order_in_plain_words(tmp_path: Path) -> None:
    text = (POLICY.replace("keys: [F, M]", "keys: [F, M, no]")
            .replace("bounds: [0, 120]", "bound: [0, 120]")
            .replace("    max_rows_per_unit: 1\n", "    max_rows_per_unit: 1\n    agregates: [count]\n")
            .replace("    epsilon: 10\n", "    epsilon: 10\n    period: 30 days\n")
            .replace("roles: [filter, group_by]", "roles: filter"))
    code, lines = check(tmp_path, text)
    assert code == 1
    assert lines == [
        "8: datasets.patients.agregates: unknown key 'agregates'; did you mean 'aggregates'? known keys here: "
        "aggregates, columns, description, epsilon, max_rows_per_unit, population, privacy_unit, source, "
        "templates_only",
        "10: datasets.patients.columns.sex.roles: should be a list, e.g. [a, b]",
        "10: datasets.patients.columns.sex.keys: key false is a boolean: YAML reads unquoted yes, no, on, off, true "
        "and false as booleans; quote the keys you mean as words (e.g. \"no\")",
        "11: datasets.patients.columns.age.bound: unknown key 'bound'; did you mean 'bounds'? known keys here: "
        "bins, bounds, description, keys, other_groups, precision, roles, type",
        "15: budgets.0.period: should be never, or a number of days such as 365d; got '30 days'",
    ]


def test_a_word_read_as_a_boolean_says_so(tmp_path: Path) -> None:
    code, lines = check(tmp_path, POLICY.replace("project: \"onc-*\"", "project: no"))
    assert code == 1
    assert lines == ["12: budgets.0.project: got false, a boolean: YAML reads unquoted yes, no, on, off, true and "
                     "false as booleans: quote the value (e.g. \"no\") if you mean the word"]


def test_rules_that_grant_nothing_are_warnings_and_strict_fails_on_them(tmp_path: Path) -> None:
    text = POLICY.replace("    epsilon: 10\n", "    epsilon: 10\n    datasets: [patient]\n    roles: [reseacher]\n")
    text += "  - project: \"*\"\n    epsilon: 1\n  - project: late\n    epsilon: 1\n"
    code, lines = check(tmp_path, text)
    assert code == 0
    assert lines == [
        "14: budgets.0.datasets.0: warning: 'patient' matches no dataset, so this rule grants nothing on it "
        "(did you mean 'patients'?); datasets: patients",
        "15: budgets.0.roles.0: warning: role 'reseacher' looks like a misspelling of 'researcher'; a rule applies "
        "only to tokens whose role claim matches it exactly",
        "18: budgets.2.project: warning: never applies: rule 1 (project '*' on every dataset and role) matches first",
    ]
    assert check(tmp_path, text, "--strict")[0] == 1


def test_a_kind_limit_that_changes_nothing_and_a_binned_kind_without_bins_are_warnings(tmp_path: Path) -> None:
    text = POLICY.replace("    columns:\n", "    aggregates:\n      count: {}\n      median: {epsilon: {max: 5}}\n"
                                             "    columns:\n", 1)
    code, lines = check(tmp_path, text)
    assert code == 0
    assert [line.split(": ", 1)[1] for line in lines] == [
        "datasets.patients.aggregates.median.epsilon.max: warning: median's max 5 is not below the dataset's 1: it "
        "changes nothing (a kind's limits only tighten the dataset's)",
        "datasets.patients.aggregates.median: warning: median is allowed, but no column of 'patients' declares "
        "bins, so every median query is refused; declare bins on a column with the aggregate role",
    ]


def test_broker_check_names_file_line_and_field(tmp_path: Path) -> None:
    path = tmp_path / "broker.yaml"
    path.write_text("name: b\nsites:\n  - name: north\n    adress: north:1\n")
    result = run_cli("broker", "check", str(path))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"{path}:3: sites.0.address: is required",
        f"{path}:4: sites.0.adress: unknown key 'adress'; did you mean 'address'? known keys here: address, name, tls"]
    path.write_text("name: b\nsites:\n  - {name: north, address: '127.0.0.1:5000'}\n")
    ok = run_cli("broker", "check", str(path))
    assert ok.returncode == 0 and "1 site(s): north" in ok.stdout
