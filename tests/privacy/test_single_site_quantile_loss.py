"""The single-site quantile (the exponential mechanism over the declared edges) loses no more than it is charged.

An audit of ``median(m)`` and ``quantile(p, 0.9)`` asked of one site directly (``single_site``), as
the site wires them: SQL text, :func:`~gateway.query.check_query`, :func:`plan_query`, the real
engine's exact counts per cell on real DuckDB files, and :func:`release`, whose selection is
recorded and then drawn by OpenDP through the site's own noise source.

The neighbours are built for this mechanism, whose worst case is not the Laplace's: D has two
edges tied for best (the quantile falls between them), every other edge far behind, and D' adds
one patient whose rows are all above every edge, which moves the two tied scores apart by twice
the sensitivity (the edge below the quantile gets worse, the one above it better). The edge below
then loses exactly the charged epsilon: its probability drops from 1/2 to e^-epsilon / 2. Forms:
a table of one row per patient and one the engine bounds to k = 3 rows per patient (the extra
patient has 5), ungrouped and grouped over public keys (one draw per group, each at the whole
share of epsilon; the extra patient's rows spread over the groups).

Claims:

- ungrouped, the extra patient moves the scores by exactly the sensitivity (in L-infinity);
- the exact privacy loss of these neighbours, from the mechanism's exact output probabilities
  (report noisy max with exponential noise), is at most the charge, and ungrouped reaches it;
- the empirical lower bound from OpenDP's draws (Clopper-Pearson over likelihood-ratio events,
  Bonferroni) stays under the charge at the 1e-6 level, and its 95% bound sees most of the exact
  loss;
- planted bugs are caught: half the noise, or a sensitivity that forgets the k rows per patient.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterator
from fractions import Fraction

import duckdb
import numpy as np
import pytest

from gateway import _mechanisms as mechanisms
from gateway._engine import Engine
from gateway._mechanisms import Component, Noise, plan_query, release
from gateway._sqlfront import parse_sql
from gateway.policy import Policy, load_policy
from gateway.query import check_query
from tests.privacy.audit import FAIL_ALPHA, REPORT_ALPHA, log_ratio_bound, noisy_max_probabilities
from tests.privacy.neighbours import audit_policy

EPSILON = Fraction(1)
N = 20_000
K = 3
EXTRA = 1_000_000
COLUMNS = """\
    columns:
      g: {type: integer, roles: [group_by, filter], keys: [1, 2, 3]}
      m: {type: float, roles: [aggregate], bounds: [-3, 3], precision: 0, bins: {edges: [-2, -1, 0, 1]}}
      p: {type: float, roles: [aggregate], bounds: [-3, 3], precision: 0, bins: {edges: [-2, -1, 0, 1]}}
"""
POLICY = audit_policy(COLUMNS, ["median", "quantile"], K)
# Per group, values of m: 40 at each of -1, 0, 1, 2: edges 0 and 1 both score |lt - gt| = 40, edge -1 120.
# Values of p: 60 at -1, 15 at 0, 5 at 1, 5 at 2: at q = 0.9 edges 0 and 1 both score |lt - 9 gt| = 30 (in
# tenths of a rank), edge -1 225; the other 75 rows have no p.
M_VALUES = [-1.0] * 40 + [0.0] * 40 + [1.0] * 40 + [2.0] * 40
P_VALUES = [-1.0] * 60 + [0.0] * 15 + [1.0] * 5 + [2.0] * 5 + [None] * 75
AGGREGATES = {"median": "median(m)", "quantile-0.9": "quantile(p, 0.9)"}
FORMS = {
    "per-patient": "SELECT {} FROM patients",
    "per-patient-grouped": "SELECT g, {} FROM patients GROUP BY g",
    f"bounded-k{K}": "SELECT {} FROM visits",
    f"bounded-k{K}-grouped": "SELECT g, {} FROM visits GROUP BY g",
}
CASES = [pytest.param(a, f, id=f"{a}-{f}") for f in FORMS for a in AGGREGATES]


def _tables(with_extra: bool) -> dict[str, list[tuple[int, int, float | None, float | None]]]:
    """Each group holds the whole design once: ``patients`` one row per patient, ``visits`` K identical rows."""
    patients, visits, pid = [], [], itertools.count(1)
    for g in (1, 2, 3):
        for m, p in zip(M_VALUES, P_VALUES, strict=True):
            unit = next(pid)
            patients.append((unit, g, m, p))
            visits += [(unit, g, m, p)] * K
    if with_extra:  # above every edge, at the bound and past it; the bounded table keeps K of the 5 rows
        values = [3.0, 3.25, 3.5, 1e12, math.inf]
        patients.append((EXTRA, 3, 3.0, 3.0))
        visits += [(EXTRA, g, v, v) for g, v in zip((3, 1, 2, 3, 1), values, strict=True)]
    return {"patients": patients, "visits": visits}


class _Recorder(Noise):
    """Hands back what :func:`release` would select from: (component, exact counts per cell)."""

    def __init__(self) -> None:
        self.calls: list[tuple[Component, tuple[int, ...]]] = []

    def select(self, component: Component, exact: tuple[int, ...]) -> list[int]:
        self.calls.append((component, tuple(exact)))
        return [0] * (len(exact) // component.size)


@dataclasses.dataclass(frozen=True)
class Selected:
    """One selecting component: its plan, and each group's scores on D and on D'."""

    component: Component
    base: list[list[int]]
    neighbour: list[list[int]]

    def log_ratios(self, scale: float | None = None) -> list[np.ndarray]:
        """Per group, log P[i | D'] - log P[i | D] for every edge i, under the planned (or given) scale."""
        s = scale or self.component.scale
        return [np.log(noisy_max_probabilities(b2, s)) - np.log(noisy_max_probabilities(b, s))
                for b, b2 in zip(self.base, self.neighbour, strict=True)]

    def exact_loss(self) -> float:
        """The largest privacy loss over all outcomes (every group's selection), in either direction."""
        ratios = self.log_ratios()
        return max(sum(float(r.max()) for r in ratios), -sum(float(r.min()) for r in ratios))


@pytest.fixture(scope="module")
def databases(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Policy, dict[str, Engine]]]:
    root = tmp_path_factory.mktemp("selection")
    engines, policy = {}, None
    for name, extra in (("base", False), ("neighbour", True)):
        folder = root / name
        folder.mkdir()
        (folder / "policy.yaml").write_text(POLICY)
        with duckdb.connect(str(folder / "data.duckdb")) as con:
            for table, rows in _tables(extra).items():
                con.execute(f"CREATE TABLE {table} (pid BIGINT, g BIGINT, m DOUBLE, p DOUBLE)")
                con.executemany(f"INSERT INTO {table} VALUES (?, ?, ?, ?)", rows)
        loaded = load_policy(folder / "policy.yaml")
        policy = loaded.policy
        engines[name] = Engine(loaded, seed=b"audit-17")
    assert policy is not None
    yield policy, engines
    for engine in engines.values():
        engine.close()


def selected(databases: tuple[Policy, dict[str, Engine]], aggregate: str, form: str) -> Selected:
    policy, engines = databases
    query = check_query(dataclasses.replace(parse_sql(FORMS[form].format(AGGREGATES[aggregate])), single_site=True),
                        policy)
    plan = plan_query(query, policy.datasets[query.dataset], EPSILON)
    recorded = []
    for name in ("base", "neighbour"):
        exact = engines[name].run(query)
        recorder = _Recorder()
        release(plan, exact.groups, exact.components, recorder)
        ((component, cells),) = recorder.calls
        recorded.append((component, component.scores(cells)))
    (component, base), (_, neighbour) = recorded
    return Selected(component, base, neighbour)


def _draws(component: Component, scores: list[list[int]], scale: float) -> np.ndarray:
    """N selections per group by OpenDP (one call per group draws N independent releases)."""
    chosen = mechanisms.selection(scale)
    return np.array([[chosen(s) for _ in range(N)] for s in scores]).T  # (N, groups)


def lower_bounds(found: Selected, scale_factor: float = 1.0) -> tuple[float, float]:
    """(95% lower bound, 1e-6 lower bound) on the loss, from N draws on D and on D' at the planned scale x factor.

    The events are fixed by the exact scores and the plan, never by the draws: every group's
    selection is drawn independently, and an event is a set of joint outcomes whose log-likelihood
    ratio under the plan is at least (towards D') or at most (towards D) a fraction of its extreme.
    """
    scale = found.component.scale * scale_factor
    on_base, on_neighbour = _draws(found.component, found.base, scale), _draws(found.component, found.neighbour, scale)
    ratios = found.log_ratios()
    top, bottom = sum(float(r.max()) for r in ratios), sum(float(r.min()) for r in ratios)

    def joint(draws: np.ndarray) -> np.ndarray:
        return sum(r[draws[:, g]] for g, r in enumerate(ratios))

    base_llr, neighbour_llr = joint(on_base), joint(on_neighbour)
    bounds = []
    for alpha in (REPORT_ALPHA, FAIL_ALPHA):
        best = 0.0
        for f in (0.25, 0.5, 0.75, 0.999):
            towards_neighbour = int((neighbour_llr >= f * top).sum()), int((base_llr >= f * top).sum())
            towards_base = int((base_llr <= f * bottom).sum()), int((neighbour_llr <= f * bottom).sum())
            for p, q in (towards_neighbour, towards_base):
                best = max(best, log_ratio_bound(p, q, N, alpha))
        bounds.append(best)
    return bounds[0], bounds[1]


@pytest.mark.parametrize(("aggregate", "form"), CASES)
def test_the_extra_patient_moves_the_scores_by_at_most_the_sensitivity(databases, aggregate, form):
    found = selected(databases, aggregate, form)
    moved = max(abs(a - b) for s, s2 in zip(found.base, found.neighbour, strict=True)
                for a, b in zip(s, s2, strict=True))
    k = 1 if form.startswith("per-patient") else K
    assert found.component.sensitivity == k * (1 if aggregate == "median" else 9)
    if "grouped" in form:
        assert 0 < moved <= found.component.sensitivity
    else:
        assert moved == found.component.sensitivity


@pytest.mark.parametrize(("aggregate", "form"), CASES)
def test_the_exact_loss_is_at_most_the_charge_and_ungrouped_reaches_it(databases, aggregate, form):
    found = selected(databases, aggregate, form)
    loss = found.exact_loss()
    assert loss <= float(EPSILON) + 1e-6
    if "grouped" not in form:
        assert loss == pytest.approx(float(EPSILON), abs=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize(("aggregate", "form"), CASES)
def test_no_selection_loses_more_than_it_is_charged_and_the_audit_sees_most_of_it(databases, aggregate, form):
    found = selected(databases, aggregate, form)
    lower95, strict = lower_bounds(found)
    assert strict <= float(EPSILON), (lower95, strict)
    assert lower95 >= 0.6 * found.exact_loss(), (lower95, found.exact_loss())


@pytest.mark.parametrize(("aggregate", "form", "factor"), [
    pytest.param("median", "per-patient", 0.5, id="half-the-noise"),
    pytest.param("quantile-0.9", f"bounded-k{K}", 1 / K, id="sensitivity-forgets-k"),
])
def test_planted_bugs_are_caught(databases, aggregate, form, factor):
    found = selected(databases, aggregate, form)
    _, strict = lower_bounds(found, factor)
    assert strict > float(EPSILON), strict
