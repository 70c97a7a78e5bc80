"""The synthetic DuckDB files read directly: the exact answers that the gateway's are checked against."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import duckdb


def exact(data: Path, sql: str) -> list[tuple[Any, ...]]:
    """All rows of ``sql`` run read-only on the DuckDB file ``data``."""
    with duckdb.connect(str(data), read_only=True) as con:
        return con.execute(sql).fetchall()


def copy_data(src: Path, dst: Path) -> Path:
    """A private copy of a DuckDB file (tests that change data must not touch the shared one)."""
    shutil.copy(src, dst)
    return dst


def slow_copy(src: Path, dst: Path, copies: int, work: int) -> Path:
    """A copy of a synthetic DuckDB file with a view ``slow_patients``: ``copies`` renumbered copies of each
    patient, whose ``age_at_diagnosis`` costs about ``work`` hash computations per row.

    The patient ids stay unique (no bounded snapshot to build at start), and only a query that
    aggregates ``age_at_diagnosis`` pays the work: long enough DuckDB statements without a large file.
    """
    copy_data(src, dst)
    with duckdb.connect(str(dst)) as con:
        con.execute(  # a view cannot be prepared: the numbers are formatted in
            f"CREATE VIEW slow_patients AS SELECT p.patient_id * {copies:d} + r.i AS patient_id, "
            "p.* EXCLUDE (patient_id, age_at_diagnosis), "
            f"least(p.age_at_diagnosis, 99 + list_sum(list_transform(range({work:d}), "
            "lambda x: hash(p.patient_id, r.i, x) % 2)))::INTEGER AS age_at_diagnosis "
            f"FROM patients p, range({copies:d}) r(i)")
    return dst
