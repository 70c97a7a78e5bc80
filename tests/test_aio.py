"""The asyncio client (gateway.aio): the same calls, proofs, retries, errors and results as the
synchronous client, against a real site and a real broker."""

from __future__ import annotations

import asyncio

import polars as pl
import pytest

from gateway.aio import Client
from gateway.client import Dataset
from gateway.errors import BudgetExhausted, IncompleteAnswer, MissingSitesWarning, NotFound, Unavailable
from gateway.results import SurvivalResult
from tests.helpers.servers import ExactNoise


def test_every_call_against_a_site_learning_whom_to_sign_for(start_site, token):
    site = start_site(noise=ExactNoise(), name="north")

    async def session() -> tuple:
        async with Client(site.target, token=token()) as gw:  # no sign_for: the first call learns "north"
            datasets = await gw.datasets()
            counts, again = await asyncio.gather(
                gw.query("SELECT stage, count(*) AS n FROM patients GROUP BY stage", epsilon=0.5),
                gw.query(structured={"dataset": "patients", "aggregates": ["count"], "group_by": ["stage"]},
                         epsilon=0.5))
            curves = await gw.survival("patients", time="survival_months", event="death", by="stage", epsilon=0.5)
            budget = await gw.budget("patients")
            return datasets, counts, again, curves, budget

    datasets, counts, again, curves, budget = asyncio.run(session())
    assert all(isinstance(d, Dataset) for d in datasets) and {d.name for d in datasets} >= {"patients"}
    assert counts.to_polars().columns[:2] == ["stage", "n"]
    assert counts.to_polars()["n"].to_list() == again.to_polars()["count"].to_list()  # exact noise: same counts
    assert isinstance(curves, SurvivalResult) and curves.frame.height > 0
    assert curves.logrank.df == 3 and 0 < curves.logrank.p_value <= 1  # the same call gives the test
    charged = counts.epsilon_charged + again.epsilon_charged + curves.epsilon_charged
    assert charged > 0 and budget["spent"][0] == pytest.approx(charged)
    assert budget.schema["resets_at"] == pl.Datetime("us", "UTC")


def test_typed_errors_and_retries(start_site, token):
    site = start_site()

    async def overspend() -> None:
        async with Client(site.target, token=token(project="tight")) as gw:
            for year in (2010, 2011):
                await gw.query(f"SELECT count(*) FROM patients WHERE diagnosis_year = {year}", epsilon=0.5)
            await gw.query("SELECT count(*) FROM patients WHERE diagnosis_year = 2012", epsilon=0.1)

    with pytest.raises(BudgetExhausted) as err:
        asyncio.run(overspend())
    assert (err.value.requested, err.value.remaining) == (pytest.approx(0.1), 0)

    async def unreachable() -> None:
        async with Client("127.0.0.1:1", token=token(), retries=1, timeout=2) as gw:
            await gw.query("SELECT count(*) FROM patients")

    with pytest.raises(Unavailable):
        asyncio.run(unreachable())


def test_through_a_broker_missing_sites_warn_or_refuse_and_a_typo_is_not_retried(start_site, start_broker, token):
    down = start_site(name="b")
    broker = start_broker({"a": start_site(name="a"), "b": down})
    down.stop(0)

    async def session() -> None:
        async with Client(broker.target, token=token(), retries=0) as gw:
            with pytest.warns(MissingSitesWarning, match="lacks site"):
                result = await gw.query("SELECT count(*) FROM patients", epsilon=0.5)
            assert result.sites == ["a"]
            with pytest.raises(IncompleteAnswer):
                await gw.query("SELECT count(*) FROM patients", epsilon=0.5, require_all_sites=True)
        async with Client(broker.target, token=token()) as gw:
            with pytest.raises(NotFound, match="b did not answer"):
                await gw.query("SELECT count(*) FROM patiens", epsilon=0.5)

    asyncio.run(session())
