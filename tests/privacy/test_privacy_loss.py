"""No release loses more privacy than the ledger charges for it, and this audit would notice if one did.

An empirical privacy audit of every aggregate kind as the site wires it, from SQL text to OpenDP's
noise: ungrouped and grouped over public keys (a vector release), on a table with one row per
patient and on one the engine must bound to k = 3 rows per patient.

Neighbouring relation: add or remove one patient (DESIGN §6). D is a table of ordinary patients;
D' is D plus one patient whose every row is at or past the declared bound that lets it move the
aggregate most (ties at half a unit included, so the engine's rounding and clamping are
exercised), with more rows than the policy allows in the bounded table. Both are real DuckDB files
behind a real policy file, read by the real engine (:mod:`tests.privacy.neighbours`).

Per release, each noisy component is drawn N times on D and N times on D' by the site's own noise
source, and :mod:`tests.privacy.audit` turns the counts of a fixed family of threshold and
likelihood-ratio events into Clopper-Pearson lower bounds on epsilon (Bonferroni over the events),
for each component at its share of epsilon and for the whole release (a product event over
components: the composed loss). The claims tested:

- the extra patient moves every component by exactly its sensitivity (the worst case is reached:
  otherwise a passing audit would say little);
- no lower bound exceeds what is charged (at a 1e-6 error level: the discrete Laplace meets its
  charge exactly, so a 95% bound would fail a correct release in up to 5% of runs);
- the audit is powerful: its 95% lower bound reaches most of the charge;
- and it fails when it should: with the rounding rule this project once had, or with half the
  noise, the lower bound exceeds the charge.

The table of bounds is printed at the end of the run. The single-site quantile, a selection rather
than noise, has its own audit at its own worst case (:mod:`tests.privacy.test_single_site_quantile_loss`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from fractions import Fraction

import pytest

from gateway.aggregates import KINDS
from tests.privacy.audit import HEADER, LowerBound, Released, audit, noise_scaled_by
from tests.privacy.neighbours import X_COLUMN, K, Neighbours

EPSILON = Fraction(1)
N = 20_000
FORMS = {  # one row per patient, or bounded by the engine to K rows per patient; scalar, or grouped
    "per-patient": "SELECT {} FROM patients",
    "per-patient-grouped": "SELECT g, {} FROM patients GROUP BY g",
    f"bounded-k{K}": "SELECT {} FROM visits",
    f"bounded-k{K}-grouped": "SELECT g, {} FROM visits GROUP BY g",
    # cohort filters decide per patient from the patient's own rows elsewhere: no change in sensitivity
    f"bounded-k{K}-cohort": "SELECT {} FROM visits WHERE pid IN (SELECT pid FROM patients WHERE g IN (1, 2, 3))",
    f"bounded-k{K}-not-in-cohort": "SELECT g, {} FROM visits WHERE pid NOT IN (SELECT pid FROM patients WHERE g = 4) "
                                   "GROUP BY g",
}
CASES = [pytest.param(kind, form, id=f"{kind}-{form}") for form in FORMS for kind in KINDS]


def slow(kind: str, form: str = "") -> list[pytest.MarkDecorator]:
    """Releases of several components sample the most (up to 3 groups x 3 components): 1-4 s each;
    a vector over a grid (survival: 2 x 5 counts per group) 2 s ungrouped, 6 s grouped.

    The inner loop (``-m "not slow"``) keeps count and sum in every form, survival on the table of
    one row per patient, and both planted bugs on count and sum; CI runs them all.
    """
    several = len(KINDS[kind].components) > 1
    vector = any(spec.shape(X_COLUMN) for spec in KINDS[kind].components)
    return [pytest.mark.slow] if several or (vector and form != "per-patient") else []


AUDITED = [pytest.param(kind, form, id=f"{kind}-{form}", marks=slow(kind, form)) for form in FORMS for kind in KINDS]
Audited = Callable[[str, str], list[LowerBound]]


# the audit tables' columns for each role a kind needs, taken in turn (a regression of x on z)
AUDIT_COLUMNS = {"aggregate": ("x", "z"), "event": ("e",)}


def aggregate_sql(kind: str) -> str:
    """The kind over the audit columns its roles need (``x``, then ``z``; the event ``e``), or its own example."""
    spec = KINDS[kind]
    if spec.columns == 0:
        return spec.example
    columns = [AUDIT_COLUMNS[role][spec.roles[:i].count(role)] for i, role in enumerate(spec.roles)]
    levels = ["0.9"] * len(spec.parameters)  # a quantile's q: post-processing, it changes no release
    return f"{kind}({', '.join([*columns, *levels])})"


def single_component(kind: str) -> bool:
    return len(KINDS[kind].components) == 1


@pytest.fixture(scope="session")
def table(request: pytest.FixtureRequest) -> list[LowerBound]:
    """Every bound measured in this run, printed as a table at the end."""
    rows: list[LowerBound] = []

    class Summary:
        @staticmethod
        def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
            if rows:
                terminalreporter.write_sep("-", "privacy audit: epsilon charged vs measured lower bounds")
                terminalreporter.write_line(HEADER)
                for row in rows:
                    terminalreporter.write_line(row.row())

    request.config.pluginmanager.register(Summary(), "privacy-audit-table")
    return rows


@pytest.fixture(scope="module")
def neighbours(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Neighbours]:
    built = Neighbours(tmp_path_factory.mktemp("neighbours"))
    yield built
    built.close()


def released(neighbours: Neighbours, kind: str, form: str) -> tuple[str, Fraction, list[Released]]:
    sql = FORMS[form].format(aggregate_sql(kind))
    plan, components = neighbours.worst(sql, EPSILON)
    return sql, plan.epsilon, components


@pytest.fixture(scope="module")
def audited(neighbours: Neighbours, table: list[LowerBound]) -> Audited:
    """The audit of (kind, form), run once per module and shared by the tests that read it."""
    done: dict[tuple[str, str], list[LowerBound]] = {}

    def run(kind: str, form: str) -> list[LowerBound]:
        if (kind, form) not in done:
            sql, charged, components = released(neighbours, kind, form)
            done[kind, form] = audit(sql, components, charged, N)
            table.extend(done[kind, form])
        return done[kind, form]
    return run


@pytest.mark.parametrize(("kind", "form"), CASES)
def test_the_extra_patient_moves_every_component_by_exactly_its_sensitivity(neighbours, kind, form):
    _, charged, components = released(neighbours, kind, form)
    assert charged == EPSILON
    assert [c.component.name for c in components] == [spec.name for spec in KINDS[kind].components]
    for c in components:
        assert c.distance == c.component.sensitivity, c
    assert sum(c.component.epsilon for c in components) == charged


@pytest.mark.parametrize(("kind", "form"), AUDITED)
def test_no_release_loses_more_privacy_than_it_is_charged(audited, kind, form):
    for bound in audited(kind, form):
        assert bound.strict <= bound.charged, bound.row()


@pytest.mark.parametrize(("kind", "form"), AUDITED)
def test_the_audit_sees_most_of_the_charged_loss(neighbours, audited, kind, form):
    """At the worst case the true loss is the charge; a weak audit would let a planted bug hide.

    Over 300 simulated runs (the same discrete Laplace, drawn outside OpenDP for speed) the bound of a
    one-component release averaged 0.92-0.96 of its charge (sd 0.01-0.02); in the weakest case, a
    grouped stddev on the bounded table, each component 0.80 of its share (sd 0.05) and the whole
    release, a product event over 3 components and their groups, 0.70 (sd 0.05). Each threshold is
    about 6 sd below.

    A release whose extra patient moves many coordinates by a little each (a regression moves every
    entry of ZᵀZ, 6 per group for regression(x, z), by a sixth of the sensitivity) is harder to see
    with these events: measured 0.64-0.81 ungrouped on the table of one row per patient, down to 0.39
    grouped on the bounded table; there the bound must reach 0.2, and the planted half noise must
    still be caught (:func:`test_half_the_noise_is_caught`).
    """
    *components, whole = audited(kind, form)
    _, _, releases = released(neighbours, kind, form)
    spread = max(sum(a != b for a, b in zip(r.base, r.neighbour, strict=True)) for r in releases) > 4
    least = 0.2 if spread else 0.8 if single_component(kind) else 0.4
    assert whole.lower95 >= least * whole.charged, whole.row()
    for bound in components:
        assert bound.lower95 >= 0.5 * bound.charged, bound.row()


# -- the audit can fail -------------------------------------------------------------------------

def test_the_old_rounding_rule_is_caught(neighbours, table):
    """Bounds [0, 2.5] at precision 0: the old engine clamped 2.5 to 2.5 and rounded it to 3 (half away
    from zero) while the noise was sized for round(2.5) = 2 (half to even): 1.5x the charge, and a
    bound of 1.37-1.40x at the 1e-6 level. Today's engine, on the same patient, passes."""
    sql = "SELECT sum(z) FROM patients"
    plan, (today,) = neighbours.released(sql, EPSILON, "high")
    assert today.distance == today.component.sensitivity == 2
    old = Released(today.component, *neighbours.old_rule_sums())
    assert old.distance == 3
    today_bound, = audit(f"{sql} (today's engine)", [today], plan.epsilon, N)
    old_bound, = audit(f"{sql} (old rounding rule, planted)", [old], plan.epsilon, N)
    table.extend([today_bound, old_bound])
    assert today_bound.strict <= plan.epsilon, today_bound.row()
    assert old_bound.strict > plan.epsilon, old_bound.row()


@pytest.mark.parametrize("kind", [pytest.param(kind, marks=slow(kind)) for kind in KINDS])
def test_half_the_noise_is_caught(neighbours, table, kind):
    """Twice the loss charged, on every component: the bound is 1.65-1.9x the charge at the 1e-6 level."""
    sql, charged, components = released(neighbours, kind, "per-patient")
    *_, whole = audit(f"{sql} (half the noise, planted)", components, charged, N, noise_scaled_by(0.5))
    table.append(whole)
    assert whole.strict > charged, whole.row()
