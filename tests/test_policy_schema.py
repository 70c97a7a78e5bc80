"""The policy's JSON Schema and reference page come from the models, describe every field, and are current."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from pydantic import BaseModel

from gateway import policy
from gateway.policy import json_schema
from tests.helpers.cli import run_cli

ROOT = Path(__file__).resolve().parent.parent


def _models() -> list[type[BaseModel]]:
    return [obj for obj in vars(policy).values()
            if isinstance(obj, type) and issubclass(obj, policy._Model) and obj is not policy._Model]


def test_every_field_of_every_model_is_described() -> None:
    missing = [f"{model.__name__}.{name}" for model in _models()
               for name, field in model.model_fields.items() if not (field.description or "").strip()]
    assert missing == []
    undocumented = [model.__name__ for model in _models() if not (model.__doc__ or "").strip()]
    assert undocumented == []


def test_the_schema_command_prints_the_schema() -> None:
    printed = run_cli("policy", "schema")
    assert printed.returncode == 0, printed.stderr
    schema = json.loads(printed.stdout)
    assert schema == json.loads(json.dumps(json_schema()))
    assert schema["$schema"].startswith("https://json-schema.org/") and schema["additionalProperties"] is False
    assert set(schema["required"]) == {"site", "epsilon", "datasets"}


def test_the_reference_and_the_shipped_schema_are_current() -> None:
    check = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_policy_docs.py"), "--check"],
                           capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stderr
    page = (ROOT / "docs" / "policy.md").read_text()
    for model in _models():
        assert f"## {model.__name__}" in page


def test_the_example_policies_point_editors_at_the_schema() -> None:
    for example in sorted((ROOT / "policies").glob("*.yaml")):
        assert example.read_text().splitlines()[0] == "# yaml-language-server: $schema=policy.schema.json", example
    assert (ROOT / "policies" / "policy.schema.json").is_file()
