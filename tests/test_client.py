"""The researcher's client (gateway.client): typed errors when nothing answers, an import that stays
light enough for the client-only distribution, results a notebook can use (aliases, wide and long
frames with one schema, repr, pandas, typed datasets, datetimes), and honest warnings when sites
are missing."""

from __future__ import annotations

import subprocess
import sys
from datetime import datetime

import grpc
import polars as pl
import pytest
from prometheus_client import CollectorRegistry

from gateway.client import Client, Dataset
from gateway.errors import IncompleteAnswer, InvalidQuery, MissingSitesWarning, NotFound, Unavailable
from gateway.metrics import BrokerMetrics
from gateway.results import LONG_COLUMNS
from tests.helpers.cli import run_cli
from tests.helpers.policies import example_policy, write_policy
from tests.helpers.servers import ExactNoise, client


def test_unreachable_broker_is_typed(token):
    with Client("127.0.0.1:1", token=token(), retries=1, timeout=2) as c, pytest.raises(Unavailable):
        c.query("SELECT count(*) FROM patients")
    assert Unavailable.code == grpc.StatusCode.UNAVAILABLE


def test_the_client_loads_no_server_machinery() -> None:
    code = ("import sys, gateway.client, gateway.aio, gateway.results, gateway.aggregates, gateway.answers, "
            "gateway.survival, gateway.plot\n"
            "heavy = ['opendp', 'duckdb', 'sqlglot', 'pydantic', 'yaml', 'gateway.policy', 'gateway._mechanisms',\n"
            "         'matplotlib']  # matplotlib only when a picture is drawn\n"
            "print(','.join(m for m in heavy if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == ""


# -- results: aliases, frames with one schema, repr, pandas, typed datasets, datetimes ---------------

ALIASED = "SELECT stage AS s, count(*) AS n, mean(age_at_diagnosis) AS age FROM patients GROUP BY stage"
PLAIN = "SELECT stage, count(*), mean(age_at_diagnosis) FROM patients GROUP BY stage"


def test_aliases_name_the_columns_and_cost_nothing_more(start_site, token):
    site = start_site(noise=ExactNoise())
    with client(site, token) as c:
        aliased = c.query(ALIASED, epsilon=0.5)
        plain = c.query(PLAIN, epsilon=0.5)  # the same canonical query: the stored answer, free
        again = c.query(ALIASED, epsilon=0.5)
    assert aliased.to_polars().columns[:3] == ["s", "n", "n_std_error"]
    assert "age_ci_low" in aliased.to_polars().columns and aliased.aggregates == ["n", "age"]
    assert plain.cached and plain.epsilon_charged == 0 and "count" in plain.to_polars().columns
    assert plain.response.canonical_hash == aliased.response.canonical_hash
    assert again.cached and again.to_polars().columns[:2] == ["s", "n"]  # each answer carries its own names
    assert aliased.to_long()["aggregate"].unique(maintain_order=True).to_list() == ["n", "age"]
    assert aliased.to_polars()["n"].to_list() == plain.to_polars()["count"].to_list()


def test_an_alias_used_twice_is_refused(start_site, token):
    with client(start_site(), token) as c, pytest.raises(InvalidQuery, match="output name 'n' is used twice"):
        c.query("SELECT count(*) AS n, mean(age_at_diagnosis) AS n FROM patients", epsilon=0.1)


def test_aliases_through_a_broker_in_pooled_and_per_site_frames(start_site, start_broker, token):
    broker = start_broker({"a": start_site(name="a"), "b": start_site(name="b")})
    with client(broker, token) as c:
        result = c.query(ALIASED, epsilon=0.5)
    assert result.to_polars().columns[:2] == ["s", "n"]
    assert result.per_site().columns[:3] == ["site", "s", "n"]
    assert result.per_site(long=True).columns == ["site", "s", *LONG_COLUMNS]


def test_frames_keep_one_schema_whatever_is_suppressed(start_site, start_broker, token, tmp_path, site_data):
    # site b suppresses every cell (threshold above any count): the frames keep their columns and types
    policy = example_policy()
    strict = write_policy(tmp_path, site_data, policy=policy.model_copy(update={
        "suppression": policy.suppression.model_copy(update={"min_count": 10**9})}))
    broker = start_broker({"a": start_site(name="a"), "b": start_site(policy=strict, name="b")})
    sql = "SELECT sex, count(*), mean(age_at_diagnosis) FROM patients GROUP BY sex"
    with client(broker, token) as c:
        result = c.query(sql, epsilon=0.5, sites=["a"])
        both = c.query(sql, epsilon=0.5)
    wide = result.to_polars()
    assert wide.schema == both.to_polars().schema and wide["count_suppressed"].dtype == pl.Boolean
    per_site = both.per_site()
    assert per_site.filter(pl.col("site") == "b")["count_suppressed"].to_list() == [True] * 2
    assert per_site.schema == result.per_site().schema
    assert both.per_site(long=True).schema == result.per_site(long=True).schema
    long = both.to_long()
    assert long.columns == ["sex", *LONG_COLUMNS] and long.height == 2 * 2
    assert long.schema["estimate"] == pl.Float64 and long.schema["clamped"] == pl.Boolean


def test_repr_and_html_say_what_the_answer_is(start_site, token):
    with client(start_site(), token) as c:
        result = c.query("SELECT stage, count(*) AS n FROM patients GROUP BY stage", epsilon=0.5)
    text = repr(result)
    assert text.startswith("<QueryResult patients: 4 row(s) of n by stage; epsilon charged 0.5")
    assert "budget remaining" in text and "shape: (4, 6)" in text
    page = result._repr_html_()
    assert page.startswith("<div><p><b>QueryResult</b>") and "<table" in page


def test_to_pandas_and_a_clear_error_without_pandas(start_site, token, monkeypatch):
    with client(start_site(), token) as c:
        result = c.query("SELECT stage, count(*) FROM patients GROUP BY stage", epsilon=0.5)
    frame = result.to_pandas()
    assert list(frame.columns) == result.to_polars().columns and len(frame) == 4
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ImportError, match=r"pip install 'gateway\[pandas\]'"):
        result.to_pandas()


def test_datasets_are_typed_and_resets_at_is_a_datetime(start_site, token):
    with client(start_site(), token) as c:
        datasets = {d.name: d for d in c.datasets()}
        budget = c.budget("patients")
    patients = datasets["patients"]
    assert isinstance(patients, Dataset) and patients.column("stage").public_keys == ("I", "II", "III", "IV")
    age = patients.column("age_at_diagnosis")
    assert age.bounds is not None and age.bounds[0] < age.bounds[1] and "aggregate" in age.roles
    assert budget.schema["resets_at"] == pl.Datetime("us", "UTC")
    resets = budget["resets_at"][0]
    assert resets is None or (isinstance(resets, datetime) and resets.tzinfo is not None)


# -- honest warnings ----------------------------------------------------------------------------------

def test_an_answer_lacking_a_site_warns_and_can_be_refused(start_site, start_broker, token):
    down = start_site(name="b")
    broker = start_broker({"a": start_site(name="a"), "b": down})
    down.stop(0)
    sql = "SELECT count(*) FROM patients"
    with client(broker, token) as c:
        c.retries = 0
        with pytest.warns(MissingSitesWarning, match="lacks site.*b .unavailable") as caught:
            result = c.query(sql, epsilon=0.5)
        assert caught[0].message.missing.keys() == {"b"} and result.sites == ["a"]
        with pytest.raises(IncompleteAnswer) as refused:
            c.query(sql, epsilon=0.5, require_all_sites=True, query_id=result.query_id)
    assert refused.value.missing.keys() == {"b"} and refused.value.query_id == result.query_id
    assert refused.value.result.cached  # the same query_id: nothing paid twice at the site that answered
    with client(broker, token) as strict:
        strict.require_all_sites = True
        with pytest.raises(IncompleteAnswer):
            strict.query(sql, epsilon=0.5)


def test_a_typo_stays_a_callers_mistake_when_another_site_is_down(start_site, start_broker, token):
    down = start_site(name="b")
    metrics = BrokerMetrics(CollectorRegistry())
    broker = start_broker({"a": start_site(name="a"), "b": down}, metrics=metrics)
    down.stop(0)
    with client(broker, token) as c, pytest.raises(NotFound, match=r"a: .*patiens.*; b did not answer"):
        c.query("SELECT count(*) FROM patiens", epsilon=0.5)
    # answered once: the client did not retry it
    assert metrics.registry.get_sample_value("gateway_broker_site_requests_total",
                                             {"site": "a", "outcome": "not_found"}) == 1


def test_the_cli_says_on_stderr_when_sites_are_missing(start_site, start_broker, token, proof_key):
    down = start_site(name="b")
    broker = start_broker({"a": start_site(name="a"), "b": down})
    down.stop(0)
    done = run_cli("query", "--target", broker.target, "--token", token(), "--proof-key", str(proof_key),
                   "--sql", "SELECT count(*) FROM patients", "--epsilon", "0.5")
    assert done.returncode == 0, done.stderr
    assert "warning: the answer lacks site(s) b: pooled from a only" in done.stderr
    refused = run_cli("query", "--target", broker.target, "--token", token(), "--proof-key", str(proof_key),
                      "--sql", "SELECT count(*) FROM patients", "--epsilon", "0.5", "--require-all-sites")
    assert refused.returncode == 1 and "lacks site(s) b" in refused.stderr


def test_a_long_wait_shows_a_line_on_stderr_and_erases_it(start_site, token, capfd) -> None:
    import time as clock

    from gateway import _mechanisms as mechanisms
    from gateway.client import Client

    class Slow(mechanisms.Noise):
        """TEST ONLY: real noise, drawn after a pause, so that the caller waits."""

        def apply(self, component, exact):
            clock.sleep(1.6)
            return super().apply(component, exact)

    site = start_site(noise=Slow())
    with Client(site.target, token=token(), retries=0, progress=True, sign_for=["north"]) as c:
        c.query("SELECT count(*) FROM patients", epsilon=0.1)
    shown = capfd.readouterr().err
    assert "waiting for the server... 1 s" in shown and shown.endswith("\r")
    with Client(site.target, token=token(), retries=0, progress=False, sign_for=["north"]) as c:
        c.query("SELECT count(*) FROM patients WHERE sex = 'F'", epsilon=0.1)
    assert "waiting" not in capfd.readouterr().err
