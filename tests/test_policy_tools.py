"""An operator's tools for bringing their own data: `gateway policy init` writes a skeleton from a
table's schema (names and types only, no values), and `gateway policy check --data` reads the real
source and says, naming the path, what does not match."""

from __future__ import annotations

import os
import re
from pathlib import Path

import duckdb

from tests.helpers.cli import run_cli
from tests.helpers.policies import example_policy, with_column, write_policy


def test_init_writes_a_skeleton_that_checks_once_completed(tmp_path: Path, site_data: Path) -> None:
    out = tmp_path / "policies" / "mine.yaml"
    out.parent.mkdir()
    made = run_cli("policy", "init", "--source", str(site_data), "--table", "patients", "--out", str(out))
    assert made.returncode == 0, made.stderr
    text = out.read_text()
    assert text.startswith("# yaml-language-server: $schema=policy.schema.json\n")
    assert "(candidates: patient_id)" in text
    assert f"database: {os.path.relpath(site_data, out.parent)}," in text  # resolved from the policy's folder
    assert not re.search(r"^\s+(bounds|keys):", text, re.M)  # nothing proposed from the data's values
    with duckdb.connect(str(site_data), read_only=True) as con:
        stages = [row[0] for row in con.execute("SELECT DISTINCT stage FROM patients").fetchall()]
    assert not any(f"'{s}'" in text or f" {s}," in text for s in stages)
    assert run_cli("policy", "check", str(out)).returncode == 1  # CHANGE-ME is not a policy yet
    completed = (text.replace("site: CHANGE-ME", "site: mine")
                 .replace("privacy_unit: CHANGE-ME", "privacy_unit: patient_id")
                 .replace("project: CHANGE-ME", "project: onc-*"))
    completed = re.sub(r"      patient_id:\n(        .*\n)+?(?=      \w)", "", completed)
    out.write_text(completed)
    checked = run_cli("policy", "check", "--data", str(out))
    assert checked.returncode == 0, checked.stderr
    assert run_cli("policy", "init", "--source", str(site_data), "--table", "patients",
                   "--out", str(out)).returncode == 2  # never overwrites


def test_check_data_names_the_path_it_tried_and_the_rule(tmp_path: Path, site_data: Path) -> None:
    policy = write_policy(tmp_path, tmp_path / "nowhere" / "north.duckdb")
    result = run_cli("policy", "check", "--data", str(policy))
    assert result.returncode == 1
    assert f"{tmp_path / 'nowhere' / 'north.duckdb'} does not exist" in result.stderr
    assert "resolved from the policy file's folder" in result.stderr and "Traceback" not in result.stderr
    assert run_cli("policy", "check", str(policy)).returncode == 0  # without --data the file alone is fine


def test_check_data_finds_a_declared_type_the_data_does_not_have(tmp_path: Path, site_data: Path) -> None:
    wrong = with_column(example_policy(), "patients", "sex", type="integer", keys=(1, 2))
    policy = write_policy(tmp_path, site_data, policy=wrong)
    result = run_cli("policy", "check", "--data", str(policy))
    assert result.returncode == 1
    assert "declared integer, but column 'sex' of dataset 'patients' is VARCHAR" in result.stderr


def test_init_names_a_dataset_of_parquet_files_after_the_files_never_a_glob(tmp_path: Path) -> None:
    from gateway._policy_init import skeleton

    folder = tmp_path / "registry"
    folder.mkdir()
    with duckdb.connect() as con:
        con.execute(f"COPY (SELECT 'P1' AS patient_id, 61 AS age) TO '{folder / 'patients-2021.parquet'}'")
    assert "\n  patients:\n    source: {parquet: 'registry/patients-*.parquet'}" in skeleton(
        folder / "patients-*.parquet", None, tmp_path)
    assert "\n  registry:\n" in skeleton(folder / "*.parquet", None, tmp_path)  # the folder's name


def test_init_refuses_what_it_cannot_read(tmp_path: Path) -> None:
    missing = run_cli("policy", "init", "--source", str(tmp_path / "none.duckdb"), "--table", "t")
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    no_table = run_cli("policy", "init", "--source", str(tmp_path / "x.duckdb"))
    assert no_table.returncode == 2 and "--table is needed" in no_table.stderr


def test_the_readme_operator_steps_find_their_data(tmp_path: Path) -> None:
    """cp policies/north.yaml north.yaml; data synth --out data/north.duckdb; policy check --data north.yaml."""
    root = Path(__file__).resolve().parent.parent
    policy = tmp_path / "north.yaml"
    policy.write_text((root / "policies" / "north.yaml").read_text())
    assert run_cli("data", "synth", "--site", "north", "--patients", "300",
                   "--out", str(tmp_path / "data" / "north.duckdb")).returncode == 0
    checked = run_cli("policy", "check", "--data", str(policy))
    assert checked.returncode == 0, checked.stderr


def test_check_against_a_state_dir_warns_where_a_budget_falls_below_what_is_spent(start_site, token, tmp_path,
                                                                                   site_data) -> None:
    from fractions import Fraction

    from gateway.policy import BudgetRule
    from tests.helpers.policies import dump_policy, for_tests, with_policy
    from tests.helpers.servers import client

    site = start_site()
    with client(site, token, project="tight") as c:  # tight: a budget of 1, never resetting
        c.query("SELECT count(*) FROM patients", epsilon=0.6)
    state = str(site.state.state_dir)
    base = for_tests(example_policy(), site_data)
    rules = [r for r in base.budgets if r.project != "tight"]

    def check(budgets: list[BudgetRule]) -> list[str]:
        folder = tmp_path / f"edit{len(list(tmp_path.iterdir()))}"
        folder.mkdir()
        path = dump_policy(with_policy(base, budgets=tuple(budgets)), folder / "north.yaml")
        result = run_cli("policy", "check", "--state-dir", state, "--strict", str(path))
        return [line.split(": warning: ", 1)[1] for line in result.stderr.splitlines() if ": warning: " in line]

    lowered = BudgetRule(project="tight", epsilon=Fraction(1, 2), period="never")
    assert check([lowered, *rules]) == [
        "project 'tight' on population 'patients': the new limit 0.5 is below the 0.6 already spent in the window "
        "in force: nothing more can be spent until it ends (never)"]
    assert check([BudgetRule(project="tight", epsilon=Fraction(2), period="never"), *rules]) == []
    assert check(rules) == ["project 'tight' on population 'patients' has spent 0.6 in the window in force but no "
                            "budget rule grants it anything now: it can spend nothing more (the spend stays until "
                            "never)"]
    missing = run_cli("policy", "check", "--state-dir", str(tmp_path / "nowhere"), "policies/north.yaml")
    assert missing.returncode == 2 and "no ledger at" in missing.stderr
