"""Cohorts across tables: patients who have (or have not) a matching row in another dataset of the
same population, as SQL and as a structured filter, answered exactly (checked against DuckDB on
the same file), priced exactly like the query without the cohort, and refused in every other form.
"""

from __future__ import annotations

import pytest

from gateway._proto.gateway.v1 import gateway_pb2 as pb
from gateway._sqlfront import parse_sql
from gateway._wire import from_structured, to_structured
from gateway.client import Client
from gateway.errors import InvalidQuery, NotFound, PermissionDenied, PolicyViolation
from tests.helpers.data import exact
from tests.helpers.policies import example_policy, with_dataset, write_policy
from tests.helpers.servers import ExactNoise

IMMUNO = "SELECT patient_id FROM treatments WHERE treatment_type = 'immunotherapy'"
STAGE_III_IMMUNO = f"SELECT count(*) FROM patients WHERE stage = 'III' AND patient_id IN ({IMMUNO})"


def test_a_cohort_counts_exactly_the_patients_with_a_matching_row(start_site, token, site_data) -> None:
    site = start_site(noise=ExactNoise())
    with Client(site.target, token=token(), retries=0) as c:
        has = c.query(STAGE_III_IMMUNO, epsilon=0.5).response.rows[0].estimates[0].value
        has_not = c.query(STAGE_III_IMMUNO.replace(" IN (", " NOT IN ("), epsilon=0.5).response.rows[0].estimates[0]
        everyone = c.query("SELECT count(*) FROM patients WHERE stage = 'III'", epsilon=0.5).response.rows[0]
    truth = exact(site_data, "SELECT count(*) FROM patients WHERE stage = 'III' AND patient_id IN "
                             "(SELECT patient_id FROM treatments WHERE treatment_type = 'immunotherapy')")[0][0]
    assert truth > 0 and has == truth
    assert has + has_not.value == everyone.estimates[0].value  # the cohort and its complement split the stage


def test_a_cohort_with_several_conditions_and_a_grouped_mean(start_site, token, site_data) -> None:
    site = start_site(noise=ExactNoise())
    sql = ("SELECT sex, count(*) FROM patients WHERE patient_id IN (SELECT patient_id FROM treatments WHERE "
           "treatment_type IN ('chemotherapy', 'radiotherapy') AND cycles >= 4) GROUP BY sex")
    with Client(site.target, token=token(), retries=0) as c:
        frame = c.query(sql, epsilon=0.5).to_polars()
    truth = dict(exact(site_data, "SELECT sex, count(*) FROM patients WHERE patient_id IN (SELECT patient_id FROM "
                                  "treatments WHERE treatment_type IN ('chemotherapy', 'radiotherapy') AND cycles >= 4)"
                                  " GROUP BY sex"))
    got = dict(zip(frame["sex"], frame["count"], strict=True))
    assert {k: v for k, v in got.items() if k in truth} == {k: float(v) for k, v in truth.items()}


def test_the_client_builds_the_structured_cohort(start_site, token) -> None:
    site = start_site(noise=ExactNoise())
    structured = {"dataset": "patients", "aggregates": ["count"], "filters": [
        ("stage", "=", "III"),
        ("patient_id", "in", {"dataset": "treatments", "filters": [("treatment_type", "=", "immunotherapy")]})]}
    with Client(site.target, token=token(), retries=0) as c:
        by_sql = c.query(STAGE_III_IMMUNO, epsilon=0.5)
        by_structure = c.query(structured=structured, epsilon=0.5)
    assert by_structure.cached and by_structure.response.canonical_hash == by_sql.response.canonical_hash


def test_the_structured_form_is_the_same_query() -> None:
    sql = parse_sql(STAGE_III_IMMUNO)
    message = to_structured(sql)
    assert message.filters[1].cohort.dataset == "treatments" or message.filters[0].cohort.dataset == "treatments"
    back = from_structured(message)
    policy = example_policy()
    from fractions import Fraction

    from gateway.query import check_query
    assert check_query(back, policy).canonical_hash(Fraction(1)) == check_query(sql, policy).canonical_hash(Fraction(1))
    reordered = parse_sql("SELECT count(*) FROM patients WHERE patient_id IN (SELECT patient_id FROM treatments "
                          "WHERE treatment_type = 'immunotherapy') AND stage = 'III'")
    assert check_query(reordered, policy).canonical_hash(Fraction(1)) == \
        check_query(sql, policy).canonical_hash(Fraction(1))
    negated = parse_sql(STAGE_III_IMMUNO.replace(" IN (", " NOT IN ("))
    assert check_query(negated, policy).canonical_hash(Fraction(1)) != \
        check_query(sql, policy).canonical_hash(Fraction(1))


def test_a_cohort_costs_what_the_query_without_it_costs(start_site, token) -> None:
    site = start_site()
    with Client(site.target, token=token(), retries=0) as c:
        plain = c.query("SELECT count(*), mean(age_at_diagnosis) FROM patients WHERE stage = 'III'", epsilon=0.5,
                        dry_run=True)
        cohort = c.query(STAGE_III_IMMUNO.replace("count(*)", "count(*), mean(age_at_diagnosis)"), epsilon=0.5,
                         dry_run=True)
    for a, b in zip(plain.response.rows[0].estimates, cohort.response.rows[0].estimates, strict=True):
        assert a.noise_scale == b.noise_scale and a.epsilon == b.epsilon  # (a mean's half-width is not known ahead)
        assert [c.noise_scale for c in a.components] == [c.noise_scale for c in b.components]


@pytest.mark.parametrize(("sql", "error", "phrase"), [
    ("SELECT count(*) FROM patients WHERE stage IN (SELECT stage FROM treatments)", InvalidQuery, "privacy unit"),
    ("SELECT count(*) FROM patients WHERE patient_id IN (SELECT cycles FROM treatments)", InvalidQuery,
     "selects the patient id"),
    ("SELECT count(*) FROM patients WHERE patient_id IN (SELECT patient_id FROM treatments WHERE patient_id IN "
     "(SELECT patient_id FROM patients))", InvalidQuery, "cannot hold another cohort"),
    ("SELECT count(*) FROM patients WHERE patient_id IN (SELECT patient_id FROM treatments WHERE cost_usd > 5)",
     PolicyViolation, "filter"),
    ("SELECT count(*) FROM patients WHERE patient_id IN (SELECT patient_id FROM nope)", NotFound, "unknown dataset"),
    ("SELECT count(*) FROM patients WHERE patient_id IN (SELECT patient_id FROM treatments GROUP BY patient_id)",
     InvalidQuery, "a cohort is"),
    ("SELECT count(*) FROM patients WHERE patient_id = (SELECT patient_id FROM treatments)", InvalidQuery,
     "not supported"),
    ("SELECT count(*) FROM patients WHERE EXISTS (SELECT patient_id FROM treatments)", InvalidQuery,
     "subqueries are not supported"),
])
def test_every_other_subquery_is_refused_and_charges_nothing(start_site, token, sql, error, phrase) -> None:
    site = start_site()
    with Client(site.target, token=token(), retries=0) as c, pytest.raises(error, match=phrase):
        c.query(sql, epsilon=0.5)
    assert site.state.ledger.total_spent() == 0


def test_a_cohort_from_another_population_is_refused(start_site, token, tmp_path, site_data) -> None:
    policy = with_dataset(example_policy(), "treatments", population="episodes")
    site = start_site(policy=write_policy(tmp_path, site_data, policy=policy))
    with Client(site.target, token=token(), retries=0) as c, pytest.raises(PolicyViolation, match="other patients"):
        c.query(STAGE_III_IMMUNO, epsilon=0.5)


def test_a_cohort_needs_access_to_its_dataset_and_names_nothing_else(start_site, token) -> None:
    site = start_site()
    with Client(site.target, token=token(project="patients-only"), retries=0) as c:
        with pytest.raises(PermissionDenied, match="no access to dataset 'treatments'") as denied:
            c.query(STAGE_III_IMMUNO, epsilon=0.5)
        assert "immunotherapy" not in denied.value.message and "cycles" not in denied.value.message
    assert site.state.ledger.total_spent() == 0


def test_the_structured_cohort_message_is_checked(start_site, stub_for, token) -> None:
    from tests.helpers.servers import signed
    site = start_site()
    bearer = token()
    nested = pb.Filter(column="patient_id", op="in", cohort=pb.Cohort(dataset="treatments", filters=[
        pb.Filter(column="patient_id", op="in", cohort=pb.Cohort(dataset="patients"))]))
    request = pb.QueryRequest(query_id="nested", epsilon=0.5, structured=pb.StructuredQuery(
        dataset="patients", aggregates=[pb.Aggregate(function="count")], filters=[nested]))
    import grpc
    with pytest.raises(grpc.RpcError) as err:
        stub_for(site).Query(signed(request, bearer, ["north"]), metadata=[("authorization", f"Bearer {bearer}")],
                             timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "another cohort" in err.value.details()


def test_a_cohort_cannot_read_a_templates_only_dataset_with_free_sql(start_site, token, tmp_path, site_data) -> None:
    policy = with_dataset(example_policy(), "treatments", templates_only=True)
    site = start_site(policy=write_policy(tmp_path, site_data, policy=policy))
    with Client(site.target, token=token(), retries=0) as c, \
            pytest.raises(PolicyViolation, match="'treatments' may only be queried through approved templates"):
        c.query(STAGE_III_IMMUNO, epsilon=0.5)
    assert site.state.ledger.total_spent() == 0


def test_a_cohort_keeps_to_its_datasets_epsilon_limits(start_site, token, tmp_path, site_data) -> None:
    from fractions import Fraction

    from gateway.policy import EpsilonLimits

    policy = with_dataset(example_policy(), "treatments",
                          epsilon=EpsilonLimits(default=Fraction(1, 10), max=Fraction(1, 5)))
    site = start_site(policy=write_policy(tmp_path, site_data, policy=policy))
    with Client(site.target, token=token(), retries=0) as c, pytest.raises(PolicyViolation, match="treatments"):
        c.query(STAGE_III_IMMUNO, epsilon=0.5)
    assert site.state.ledger.total_spent() == 0
