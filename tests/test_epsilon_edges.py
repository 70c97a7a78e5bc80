"""The edges of epsilon: every epsilon a policy allows is served, a policy minimum is enforced, noise
that could not fit 64 bits is refused before anything is charged, and no answer or refusal tells
one project what the others have spent."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest

from gateway.answers import discrete_laplace_half_width, discrete_laplace_std
from gateway.client import Client
from gateway.errors import BudgetExhausted, InvalidQuery, PolicyViolation
from gateway.policy import DatasetCap, EpsilonLimits, Policy, Suppression
from tests.helpers.policies import example_policy, with_dataset, with_epsilon, with_policy, write_policy


def _wide() -> Policy:
    """Per-query epsilon from 1e-12 to 1000 everywhere, no population cap, no small-cell suppression."""
    limits = {"min": Fraction(1, 10**12), "max": Fraction(1000)}
    policy = with_epsilon(example_policy(), **limits)
    policy = with_dataset(policy, "treatments", epsilon=EpsilonLimits(default=Fraction(1, 2), **limits))
    return with_policy(policy, population_caps={}, suppression=Suppression(min_count=0))


@pytest.mark.parametrize("scale", [1e-300, 1e-3, 0.0013, 1.0, 2.0, 1e9, 1e17, 1e300])
def test_accuracy_is_finite_and_exact_at_both_ends(scale: float) -> None:
    std, half = discrete_laplace_std(scale), discrete_laplace_half_width(scale)
    assert math.isfinite(std) and math.isfinite(half) and std >= 0 and half >= 0
    if scale <= 1e-3:
        assert std < 1e-100 and half == 0  # noise that is almost surely 0
    if scale >= 1e9:
        assert std == pytest.approx(math.sqrt(2) * scale, rel=1e-9)  # the continuous limit
        assert half == pytest.approx(scale * math.log(20), rel=1e-6)


def _site(start_site, site_data, tmp_path, policy: Policy):
    folder = tmp_path / "edited"
    folder.mkdir()
    return start_site(policy=write_policy(folder, site_data, policy=policy))


@pytest.mark.parametrize("epsilon", [746, 1000, 1e-12, 1e-9])
def test_every_epsilon_the_policy_allows_is_served(start_site, token, site_data, tmp_path, epsilon) -> None:
    site = _site(start_site, site_data, tmp_path, _wide())
    with Client(f"127.0.0.1:{site.port}", token=token(project="stats"), retries=0) as c:
        result = c.query("SELECT count(*) FROM patients", epsilon=epsilon)
    estimate = result.response.rows[0].estimates[0]
    assert result.epsilon_charged == pytest.approx(epsilon)
    assert math.isfinite(estimate.std_error) and math.isfinite(estimate.ci_low) and math.isfinite(estimate.ci_high)
    assert estimate.ci_low <= estimate.value <= estimate.ci_high


def test_noise_that_would_not_fit_64_bits_is_refused_before_charging(start_site, token, site_data,
                                                                     tmp_path) -> None:
    site = _site(start_site, site_data, tmp_path, _wide())
    with Client(f"127.0.0.1:{site.port}", token=token(project="stats"), retries=0) as c:
        # sum(cost_usd): k = 5 rows of up to 100000 each; at epsilon 1e-12 the noise scale is ~5e17
        with pytest.raises(InvalidQuery, match=r"epsilon 1e-12 is too small for sum\(cost_usd\): .* at least"):
            c.query("SELECT sum(cost_usd) FROM treatments", epsilon=1e-12)
        assert c.budget("treatments")["spent"][0] == 0


def test_epsilon_below_the_policy_minimum_is_refused(start_site, token) -> None:
    site = start_site()  # the example policy has the default minimum, 0.001
    with Client(f"127.0.0.1:{site.port}", token=token(project="stats"), retries=0) as c:
        with pytest.raises(PolicyViolation, match=r"below the per-query minimum 0\.001") as refused:
            c.query("SELECT count(*) FROM patients", epsilon=0.0005)
        assert refused.value.field == "epsilon"
        assert c.budget("patients")["spent"][0] == 0
        c.query("SELECT count(*) FROM patients", epsilon=0.001)


def test_no_answer_or_refusal_tells_a_project_what_others_spent(start_site, token, site_data, tmp_path) -> None:
    cap = {"patients": DatasetCap(epsilon=Fraction(10))}  # a cap of 10 on patients, over all projects
    site = _site(start_site, site_data, tmp_path, with_policy(example_policy(), population_caps=cap))
    with Client(f"127.0.0.1:{site.port}", token=token(project="stats"), retries=0) as big:
        for year in range(2010, 2019):
            big.query(f"SELECT count(*) FROM patients WHERE diagnosis_year = {year}", epsilon=1)
        # 9 of the cap's 10 are spent, by "stats" alone
    with Client(f"127.0.0.1:{site.port}", token=token(project="onc-new"), retries=0) as newcomer:
        first = newcomer.query("SELECT count(*) FROM patients", epsilon=1)
        assert first.budget_remaining == 9  # its own budget of 10, not the cap's 1 left
        with pytest.raises(BudgetExhausted) as refused:
            newcomer.query("SELECT sex, count(*) FROM patients GROUP BY sex", epsilon=1)
    assert refused.value.remaining is None and refused.value.requested == 1
    assert "all projects" in refused.value.message and "is more than it has left" in refused.value.message
    assert "remaining" not in refused.value.message and "short by" not in refused.value.message


def test_a_projects_own_refusal_still_says_what_remains(start_site, token) -> None:
    site = start_site()
    with Client(f"127.0.0.1:{site.port}", token=token(project="tight"), retries=0) as c:
        c.query("SELECT count(*) FROM patients", epsilon=0.75)
        with pytest.raises(BudgetExhausted) as refused:
            c.query("SELECT sex, count(*) FROM patients GROUP BY sex", epsilon=0.5)
    assert (refused.value.requested, refused.value.remaining) == (Fraction(1, 2), Fraction(1, 4))
