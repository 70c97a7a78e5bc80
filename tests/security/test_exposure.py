"""What a caller without access can learn: nothing about the schema. And a float literal on an
integer column is range-checked like any integer."""

from __future__ import annotations

import pytest

from gateway import audit
from gateway.cli import metrics_host
from gateway.client import Client
from gateway.errors import InvalidQuery, NotFound, PermissionDenied


@pytest.mark.parametrize("sql", [
    "SELECT sum(no_such_column) FROM patients",
    "SELECT mean(sex) FROM patients",
    "SELECT count(*) FROM patients WHERE secret_code = 1",
    "SELECT count(*) FROM patients GROUP BY nope",
])
def test_a_project_without_access_learns_no_column_names(start_site, token, sql) -> None:
    site = start_site()
    with Client(site.target, token=token(project="outsider"), retries=0) as c, \
            pytest.raises(PermissionDenied) as refused:
        c.query(sql, epsilon=0.1)
    message = refused.value.message
    assert message == "project 'outsider' has no access to dataset 'patients' at this site; ask its privacy officer"
    for name in ("age_at_diagnosis", "bmi", "stage", "survival_months", "primary_site"):
        assert name not in message
    assert site.state.ledger.total_spent() == 0
    assert audit.tail(site.state.audit.path, 1)[0]["status"] == "PERMISSION_DENIED"  # the refusal is recorded


def test_a_project_without_access_learns_no_dataset_or_template_names(start_site, token) -> None:
    site = start_site()
    with Client(site.target, token=token(project="outsider"), retries=0) as c:
        with pytest.raises(NotFound) as unknown:
            c.query("SELECT count(*) FROM nope", epsilon=0.1)
        assert unknown.value.message == "unknown dataset 'nope'; you may query: no dataset at this site"
        with pytest.raises(NotFound) as template:
            c.query(template="nope")
        assert "stage_distribution" not in template.value.message
    assert [r["status"] for r in audit.tail(site.state.audit.path, 2)] == ["NOT_FOUND", "NOT_FOUND"]
    assert site.state.ledger.total_spent() == 0
    with Client(site.target, token=token(project="patients-only"), retries=0) as c, \
            pytest.raises(NotFound, match=r"^unknown dataset 'nope'; you may query: patients$"):
        c.query("SELECT count(*) FROM nope", epsilon=0.1)


@pytest.mark.parametrize("value", ["1e300", "-1e300", "9.3e18"])
def test_a_float_literal_on_an_integer_column_is_range_checked(start_site, token, value) -> None:
    site = start_site()
    with Client(site.target, token=token(), retries=0) as c, \
            pytest.raises(InvalidQuery, match="outside the 64-bit integer range"):
        c.query(f"SELECT count(*) FROM patients WHERE diagnosis_year > {value}", epsilon=0.1)
    assert site.state.ledger.total_spent() == 0
    assert audit.tail(site.state.audit.path, 1)[0]["status"] == "INVALID_ARGUMENT"


@pytest.mark.parametrize(("host", "chosen", "bound"), [
    ("127.0.0.1", None, "127.0.0.1"), ("localhost", None, "127.0.0.1"), ("::1", None, "::1"),
    ("10.1.2.3", None, "10.1.2.3"), ("localhost", "0.0.0.0", "0.0.0.0"),
])
def test_metrics_listen_on_loopback_for_a_loopback_server_unless_told(host, chosen, bound) -> None:
    assert metrics_host(host, chosen) == bound
