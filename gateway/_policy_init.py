"""``gateway policy init``: a commented policy skeleton from a table's schema, for the officer to complete.

It reads column names and types only: it proposes no bounds, keys or roles from data values (those
are the officer's declarations, and taking them from the data would leak it). Every choice left to
the officer is marked ``CHANGE-ME``, so the skeleton does not pass ``gateway policy check`` until
it is completed.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import duckdb

from .policy import SCHEMA_ID

_TYPES = {"TINYINT": "integer", "SMALLINT": "integer", "INTEGER": "integer", "BIGINT": "integer",
          "HUGEINT": "integer", "UTINYINT": "integer", "USMALLINT": "integer", "UINTEGER": "integer",
          "UBIGINT": "integer", "BOOLEAN": "integer", "FLOAT": "float", "DOUBLE": "float", "REAL": "float",
          "DECIMAL": "float", "VARCHAR": "string", "ENUM": "string"}


def skeleton(source: Path, table: str | None, policy_dir: Path, site: str = "CHANGE-ME") -> str:
    """The skeleton's YAML text; data paths are written relative to ``policy_dir`` (where the policy goes)."""
    relation, described = _describe(source, table)
    name = table or _dataset_name(source)
    where = os.path.relpath(source.resolve(), policy_dir.resolve())
    src = f"{{database: {where}, table: {table}}}" if table else f"{{parquet: '{where}'}}"
    ids = [c for c, _ in described if c.lower().endswith("id")]
    lines = [f"# yaml-language-server: $schema={SCHEMA_ID}",
             f"# Policy skeleton written by 'gateway policy init' from the schema of {relation}.",
             "# Complete every CHANGE-ME, remove the columns researchers must not use, then run",
             "#   gateway policy check --data THIS_FILE",
             "# Reference: docs/policy.md. Bounds and keys are yours to declare from domain knowledge:",
             "# never copy them from the data (the noise is sized from them, and they are public).",
             f"site: {site}",
             "epsilon: {default: 0.5, max: 1}   # per query",
             "datasets:",
             f"  {name}:",
             f"    source: {src}",
             f"    privacy_unit: CHANGE-ME          # the column identifying a patient{_candidates(ids)}",
             "    max_rows_per_unit: 1             # CHANGE-ME if a patient has several rows",
             "    aggregates: [count, sum, mean]",
             "    columns:"]
    for column, kind in described:
        declared = _TYPES.get(kind.split("(")[0])
        if declared is None:
            lines.append(f"      # {column}: source type {kind} is not supported; leave it out or cast it in a view")
            continue
        lines.append(f"      {column}:")
        lines.append(f"        type: {declared}")
        if declared == "string":
            lines.append("        roles: [filter]                # add group_by with its public keys: [...]")
        else:
            lines.append("        roles: [filter]                # add aggregate with bounds: [LOWER, UPPER]")
        lines.append("        description: CHANGE-ME")
    lines += ["budgets:                             # first matching rule wins; no rule: no access",
              "  - project: CHANGE-ME",
              "    epsilon: 1",
              "    period: 365d"]
    return "\n".join(lines) + "\n"


def _describe(source: Path, table: str | None) -> tuple[str, list[tuple[str, str]]]:
    if not source.exists() and table is not None:
        raise ValueError(f"{source} does not exist")
    with duckdb.connect() as con:
        if table is not None:
            con.execute(f"ATTACH '{str(source).replace(chr(39), chr(39) * 2)}' AS src (READ_ONLY)")
            relation = f'src."{table}"'
            label = f"{source}, table {table}"
        else:
            relation = f"read_parquet('{str(source).replace(chr(39), chr(39) * 2)}')"
            label = str(source)
        try:
            rows = con.execute(f"SELECT column_name, column_type FROM (DESCRIBE SELECT * FROM {relation})").fetchall()
        except duckdb.Error as err:
            raise ValueError(f"cannot read {label}: {str(err).splitlines()[0]}") from None
    return label, [(str(c), str(t)) for c, t in rows]


def _dataset_name(source: Path) -> str:
    """A dataset name from parquet file names: ``registry/patients-*.parquet`` gives ``patients``."""
    for part in (source.stem, source.parent.name):
        name = re.sub(r"[^A-Za-z0-9_]+", "_", re.sub(r"[*?\[\]]", "", part)).strip("_")
        if name and not name[0].isdigit():
            return name
    return "CHANGE_ME"


def _candidates(ids: list[str]) -> str:
    return f" (candidates: {', '.join(ids)})" if ids else ""
