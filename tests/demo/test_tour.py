"""The guided demo (gateway.demo.tour) as a user starts it: ``gateway demo``, in its own processes."""

from __future__ import annotations

import pytest

from tests.helpers.cli import run_cli


@pytest.mark.slow
def test_demo_runs_and_exits_zero():
    result = run_cli("demo", "--patients", "2000", timeout=300)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "Patients per stage" in out and "stored answer, no charge" in out
    assert "refused (RESOURCE_EXHAUSTED)" in out and "remaining budget" in out
