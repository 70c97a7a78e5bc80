"""Nothing is charged for an answer the caller can no longer receive, and a broker refuses what a site
would (each bound on a query's size is an attack in tests/security/test_attacks.py)."""

from __future__ import annotations

import time

import pytest

from gateway import _mechanisms as mechanisms
from gateway.client import Client
from gateway.errors import DeadlineExceeded, InvalidQuery

NESTED = "SELECT count(*) FROM patients WHERE " + "(" * 400 + "age_at_diagnosis > 1" + ")" * 400


def test_the_broker_refuses_deep_nesting_too(start_site, start_broker, token) -> None:
    broker = start_broker({"s0": start_site(name="s0")})
    with Client(broker.target, token=token(), retries=0) as c, pytest.raises(InvalidQuery, match="nested too deeply"):
        c.query(NESTED, epsilon=0.1)


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
