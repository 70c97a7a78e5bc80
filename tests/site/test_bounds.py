"""Every dimension of a query is bounded, refused with INVALID_ARGUMENT before anything is charged,
and nothing is charged for an answer the caller can no longer receive."""

from __future__ import annotations

import time

import pytest

from gateway import _mechanisms as mechanisms
from gateway.client import Client
from gateway.errors import DeadlineExceeded, InvalidQuery

NESTED = "SELECT count(*) FROM patients WHERE " + "(" * 400 + "age_at_diagnosis > 1" + ")" * 400
NOTS = "SELECT count(*) FROM patients WHERE " + "NOT " * 400 + "age_at_diagnosis IN (1)"
FILTERS = "SELECT count(*) FROM patients WHERE " + " AND ".join(f"age_at_diagnosis != {i}" for i in range(65))
SUBSCRIPTS = "SELECT count(*) FROM patients WHERE age_at_diagnosis > 1" + "[1]" * 3000  # found by the fuzzer
CHAIN = "SELECT count(*) FROM patients WHERE " + " AND ".join(["a=1"] * 1200)  # found by the fuzzer
HUGE = ("SELECT diagnosis_year, age_at_diagnosis, primary_site, count(*), sum(bmi), mean(bmi), variance(bmi), "
        "stddev(bmi) FROM patients GROUP BY diagnosis_year, age_at_diagnosis, primary_site")


@pytest.mark.parametrize(("sql", "phrase"), [
    (NESTED, "nested too deeply"), (NOTS, "nested too deeply"), (FILTERS, "65 filters; at most 64"),
    (CHAIN, "nested too deeply"), (SUBSCRIPTS, "brackets and braces"), (HUGE, "the answer would be about"),
])
def test_oversized_queries_are_refused_and_charge_nothing(start_site, token, sql, phrase, caplog) -> None:
    site = start_site()
    with Client(site.target, token=token(), retries=0) as c:
        with pytest.raises(InvalidQuery, match=phrase):
            c.query(sql, epsilon=0.1)
        assert c.budget()["spent"][0] == 0
    assert "Traceback" not in caplog.text  # a caller's mistake is no bug


@pytest.mark.parametrize("sql", [NESTED, CHAIN], ids=["parentheses", "chain"])
def test_the_broker_refuses_deep_nesting_too(start_site, start_broker, token, sql) -> None:
    broker = start_broker({"s0": start_site(name="s0")})
    with Client(broker.target, token=token(), retries=0) as c, pytest.raises(InvalidQuery, match="nested too deeply"):
        c.query(sql, epsilon=0.1)


class SlowNoise(mechanisms.Noise):
    """TEST ONLY: real noise, drawn slowly, so that the caller's deadline passes first."""

    def apply(self, component: mechanisms.Component, exact: tuple[int, ...]) -> list[int]:
        time.sleep(0.6)
        return super().apply(component, exact)


def test_an_answer_the_caller_gave_up_on_is_not_charged(start_site, token) -> None:
    site = start_site(noise=SlowNoise())
    with Client(site.target, token=token(), retries=0, timeout=0.3) as c, pytest.raises(DeadlineExceeded):
        c.query("SELECT count(*) FROM patients", epsilon=0.1)
    time.sleep(1.0)  # the site finishes its work after the caller left
    assert site.state.ledger.total_spent() == 0
    with Client(site.target, token=token(), retries=0) as c:
        assert c.query("SELECT count(*) FROM patients", epsilon=0.1).epsilon_charged == pytest.approx(0.1)
