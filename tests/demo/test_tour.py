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
    # survival by stage, pooled: a row of medians and 1- and 5-year survival per stage, and the picture
    survival = out[out.index("5. Survival by stage"):out.index("6. Survival months on age")]
    assert [line.split()[0] for line in survival.splitlines()[3:7]] == ["I", "II", "III", "IV"]
    assert "gateway-demo-survival-by-stage.png" in survival
    # and whether the stages differ: the log-rank test on 3 df, its p-value calibrated for the noise
    assert "do the stages differ? log-rank chi-square" in survival and "on 3 df, p-value" in survival
    # a regression pooled over the sites: the intercept and two slopes with intervals, n and R^2
    regression = out[out.index("6. Survival months on age"):out.index("7. Question 2")]
    assert [line.split()[0] for line in regression.splitlines()[3:6]] == ["(intercept)", "age_at_diagnosis", "bmi"]
    assert "R^2 = " in regression
    assert "charged 1 at every site" in out
