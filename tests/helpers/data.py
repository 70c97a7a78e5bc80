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
