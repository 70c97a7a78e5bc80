"""Planning: what an epsilon buys, and what a target accuracy costs, without spending anything."""

from __future__ import annotations

import pytest

from tests.helpers.servers import client

COUNTS = "SELECT stage, count(*) FROM patients GROUP BY stage"


def test_what_an_epsilon_buys_and_how_often_the_budget_pays_for_it(start_site, token) -> None:
    site = start_site()
    with client(site, token, project="tight") as c:  # a budget of 1
        plan = c.plan(COUNTS, epsilon=0.1)
        assert plan.epsilon == pytest.approx(0.1) and plan.remaining == pytest.approx(1.0) and plan.queries == 10
        wider = c.plan(COUNTS, epsilon=0.05).half_widths["count"]
        assert wider is not None and plan.half_widths["count"] is not None
        assert wider > 1.8 * plan.half_widths["count"]  # half the epsilon, about twice the noise
        assert c.plan("SELECT mean(age_at_diagnosis) FROM patients", epsilon=0.1).half_widths == {
            "mean(age_at_diagnosis)": None}  # a mean's accuracy depends on the answer
        assert c.budget()["spent"][0] == 0  # planning charged nothing


def test_the_smallest_epsilon_for_a_target_accuracy(start_site, token) -> None:
    site = start_site()
    with client(site, token, project="stats") as c:
        plan = c.plan(COUNTS, half_width=30)
        assert plan.feasible and plan.half_widths["count"] is not None and plan.half_widths["count"] <= 30
        a_bit_less = c.plan(COUNTS, epsilon=plan.epsilon * 0.97).half_widths["count"]
        assert a_bit_less is not None and a_bit_less > 30  # it is the smallest, to about 3 digits
        hopeless = c.plan(COUNTS, half_width=0.01)
        assert not hopeless.feasible and hopeless.epsilon == pytest.approx(1.0)  # the per-query maximum
        with pytest.raises(ValueError, match="plan it by epsilon"):
            c.plan("SELECT mean(age_at_diagnosis) FROM patients", half_width=1)
        with pytest.raises(ValueError, match="give epsilon"):
            c.plan(COUNTS)
        assert c.budget()["spent"][0] == 0


def test_the_asyncio_client_plans_the_same(start_site, token) -> None:
    import asyncio

    from gateway import aio

    site = start_site()

    async def plan() -> tuple[float, float]:
        async with aio.Client(site.target, token=token(project="stats"), retries=0) as a:
            return (await a.plan(COUNTS, half_width=30)).epsilon, (await a.plan(COUNTS, epsilon=0.2)).queries

    with client(site, token, project="stats") as c:
        assert asyncio.run(plan()) == (c.plan(COUNTS, half_width=30).epsilon, c.plan(COUNTS, epsilon=0.2).queries)
