"""Fuzzing a real site: hostile queries of every kind, sent raw over gRPC, never break it.

Hypothesis generates structured queries, SQL text (built from the grammar, and raw), template
calls, ε and δ values, ``dry_run`` both ways and ``query_id`` edge cases, and sends each as it is
(raw stubs: the client would refuse much of it) to one real site with a valid bound token and a
valid proof of possession for that very request. Each case must be answered within
:data:`DEADLINE` seconds, with a status a caller may legitimately get, with no traceback in the
message or in the site's log, and with the budget moved by exactly what the answer says it
charged: nothing on a rejection, a dry run or a stored answer.

Which refusals are legitimate here. The site is healthy and its data loaded; every token is
valid and bound, every proof fresh and signed for the request it travels with; calls are
sequential; every request is under gRPC's 4 MiB; and the fuzzing project's budget (a million,
never resetting, no population cap) is beyond what these cases can spend. So a refusal can only
be the caller's own mistake:

- ``INVALID_ARGUMENT``: malformed, unsupported or oversized;
- ``NOT_FOUND``: no such dataset or template;
- ``PERMISSION_DENIED``: the policy forbids it (a project or role without access, a column's
  role, an aggregate not allowed, ε outside the per-query limits);
- ``ALREADY_EXISTS``: a ``query_id`` reused for another query.

Every other code would be a bug in this setting: ``UNAUTHENTICATED`` (a valid proof refused),
``RESOURCE_EXHAUSTED`` (a budget that cannot run out, or an answer over the transport limit that
the site should have refused before charging), ``FAILED_PRECONDITION`` (the engine wraps DuckDB
failures in it, so it would hide a crash on the data), ``UNAVAILABLE`` or ``DEADLINE_EXCEEDED`` (a
hang), and ``INTERNAL`` or ``UNKNOWN`` (an exception nobody expected).

Cases per category: ``GATEWAY_FUZZ_EXAMPLES`` (default 200, so the whole suite stays quick);
``.ci/run`` runs the slower target ``pytest -m fuzz`` with enough for 10,000 cases in all, and the
session ends with a count of the cases run per category and outcome. Runs are derandomized: CI
sees the same cases every time.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import string
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import TypeVar

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from gateway import audit
from gateway._proto.gateway.v1 import gateway_pb2 as pb
from gateway._proto.gateway.v1 import gateway_pb2_grpc as pb_grpc
from gateway.aggregates import BY_SQL_NAME, KINDS
from gateway.auth import AuthConfig, Verifier
from gateway.metrics import SiteMetrics
from gateway.policy import to_fraction
from gateway.proof import ProofKey
from gateway.query import OPERATORS
from gateway.site import RunningSite, SiteOptions, build_site_server
from tests.helpers.policies import example_policy, with_policy, write_policy
from tests.helpers.servers import signed

EXAMPLES = int(os.environ.get("GATEWAY_FUZZ_EXAMPLES", "200"))
DEADLINE = 10.0  # seconds per call: a case that takes longer is a hang
TOKEN_REFRESH = 1800.0  # seconds: a fresh token well before the hour a development token lives
PROJECT = "stats"  # TEST_BUDGETS: a million epsilon that never resets
OUTSIDERS = ("nobody", "nurses")  # no budget rule at all; a rule for another role
ALLOWED = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED,
                     grpc.StatusCode.ALREADY_EXISTS})

pytestmark = pytest.mark.fuzz
T = TypeVar("T")

FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None, print_blob=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.large_base_example, HealthCheck.filter_too_much])


# -- the site under fuzz ----------------------------------------------------------------------------

class Tally:
    """Cases run per category and outcome, printed when the session ends (a pytest plugin)."""

    def __init__(self) -> None:
        self.cases: dict[str, Counter[str]] = {}
        self.seconds: dict[str, float] = {}

    def count(self, category: str, outcome: str, seconds: float) -> None:
        self.cases.setdefault(category, Counter())[outcome] += 1
        self.seconds[category] = self.seconds.get(category, 0.0) + seconds

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        total = sum(sum(c.values()) for c in self.cases.values())
        terminalreporter.write_sep("-", f"fuzz cases run: {total} (GATEWAY_FUZZ_EXAMPLES={EXAMPLES} per category)")
        for category, outcomes in self.cases.items():
            seconds = self.seconds[category]
            detail = ", ".join(f"{name} {n}" for name, n in outcomes.most_common())
            terminalreporter.write_line(f"{category:<14} {sum(outcomes.values()):>6} cases, {seconds:6.1f} s in calls: "
                                        f"{detail}")


class Tracebacks(logging.Handler):
    """Keeps every log record of the gateway that carries a traceback or is an error."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info or record.levelno >= logging.ERROR:
            self.records.append(record)


@dataclass(repr=False)
class Fuzzed:
    """The site under fuzz, a raw stub to it, tokens for each project and what the cases saw."""

    site: RunningSite
    channel: grpc.Channel
    mint: Callable[..., str]
    key: ProofKey
    tally: Tally
    logged: Tracebacks
    stub: pb_grpc.GatewayStub = field(init=False)
    tokens: dict[str, tuple[float, str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.stub = pb_grpc.GatewayStub(self.channel)

    def bearer(self, project: str) -> str:
        """A valid token of ``project``, bound to :attr:`key` (minted again when it gets old)."""
        minted, token = self.tokens.get(project, (-math.inf, ""))
        if time.monotonic() - minted > TOKEN_REFRESH:
            minted, token = time.monotonic(), self.mint(project=project)
            self.tokens[project] = minted, token
        return token

    def __repr__(self) -> str:  # hypothesis shows a failing case's arguments: keep this one short
        return f"<site {self.name} at {self.site.target}>"

    @property
    def name(self) -> str:
        return self.site.state.live.loaded.policy.site

    def spent(self) -> Fraction:
        return self.site.state.ledger.total_spent()


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory, keys: tuple[Path, Path], site_data: Path,
           token: Callable[..., str], proof_key: Path, pytestconfig: pytest.Config) -> Iterator[Fuzzed]:
    folder = tmp_path_factory.mktemp("fuzzed-site")
    # no population cap: the fuzzing project's million must be the only budget that could run out
    policy = write_policy(folder, site_data, policy=with_policy(example_policy(), population_caps={}))
    site = build_site_server(SiteOptions(policy, folder / "state", Verifier(AuthConfig.from_files([keys[1]]))),
                             SiteMetrics(CollectorRegistry()))
    tally = Tally()
    pytestconfig.pluginmanager.register(tally, "gateway-fuzz-tally")
    logged = Tracebacks()
    logging.getLogger("gateway").addHandler(logged)
    channel = grpc.insecure_channel(site.target, options=[("grpc.max_receive_message_length", 8 * 2**20)])
    try:
        yield Fuzzed(site, channel, token, ProofKey.load(proof_key), tally, logged)
    finally:
        channel.close()
        logging.getLogger("gateway").removeHandler(logged)
        site.stop(grace=0)


def ask(fuzzed: Fuzzed, category: str, request: pb.QueryRequest, project: str = PROJECT) -> None:
    """Send one case and hold its answer to the module's contract."""
    bearer = fuzzed.bearer(project)
    signed(request, bearer, [fuzzed.name], key=fuzzed.key)
    before, logged = fuzzed.spent(), len(fuzzed.logged.records)
    started = time.monotonic()
    try:
        response = fuzzed.stub.Query(request, metadata=[("authorization", f"Bearer {bearer}")], timeout=DEADLINE)
    except grpc.RpcError as err:
        code, details, elapsed = err.code(), err.details() or "", time.monotonic() - started
        fuzzed.tally.count(category, code.name, elapsed)
        assert code in ALLOWED, f"{code.name} after {elapsed:.1f} s: {details[:400]}\n{_shown(request)}"
        assert "Traceback" not in details and 'File "' not in details, details[:2000]
        assert fuzzed.spent() == before, f"a refused query ({code.name}) moved the budget\n{_shown(request)}"
    else:
        outcome = "OK(dry_run)" if response.dry_run else "OK(cached)" if response.cached else "OK"
        fuzzed.tally.count(category, outcome, time.monotonic() - started)
        charged = fuzzed.spent() - before
        price, shown = _price(request, response.dataset), _shown(request)
        if response.cached:
            assert (charged, response.epsilon_charged) == (0, 0), f"a stored answer charged {charged}\n{shown}"
        else:  # a dry run tells the price and charges nothing; a run charges exactly that price
            assert charged == (0 if response.dry_run else price), f"{outcome}: charged {charged}\n{shown}"
            assert response.epsilon_charged == float(price), f"{outcome}: says {response.epsilon_charged}\n{shown}"
    tracebacks = [r.getMessage() for r in fuzzed.logged.records[logged:]]
    assert not tracebacks, f"the site logged {tracebacks[:3]}\n{_shown(request)}"


def _price(request: pb.QueryRequest, dataset: str) -> Fraction:
    """What an answer to ``request`` costs: the ε asked for, exactly, or the dataset's default."""
    return to_fraction(request.epsilon) if request.epsilon else POLICY.epsilon_limits(dataset).default


def _shown(request: pb.QueryRequest) -> str:
    """The request as a failure message shows it: without its proofs, and cut short."""
    bare = pb.QueryRequest()
    bare.CopyFrom(request)
    bare.ClearField("proofs")
    text = str(bare)
    return text if len(text) < 3000 else text[:3000] + f"... ({len(text)} characters)"


# -- names and values -------------------------------------------------------------------------------

POLICY = example_policy()
DATASETS = tuple(POLICY.datasets)
COLUMNS = tuple(sorted({name for d in POLICY.datasets.values() for name in d.columns}))
KEYS = tuple(sorted({str(k) for d in POLICY.datasets.values() for c in d.columns.values() for k in c.public_keys}))
TEMPLATES = tuple(POLICY.templates)
TEMPLATE_PARAMS = tuple(sorted({p for t in POLICY.templates.values() for p in t.params}))
LIMITS = POLICY.epsilon
FUNCTIONS = (*KINDS, *BY_SQL_NAME)  # the real kinds and their SQL spellings (avg, var_samp, ...)
OPS = (*OPERATORS, "=", "==", "!=", "<>", "IN", "NOT IN", " Between ")
BOGUS_NAMES = ("", " ", "patient_id", "PATIENTS", "Sex", "*", "1", "sex;--", "\x00", "é", "a" * 300, '"sex"',
               "patients.sex", "(missing)", "🙂", "main.patients", "count(*)")
BOGUS_FUNCTIONS = ("", "median", "max", "min", "quantile", "histogram", "survival", "COUNT", " Sum ", "count(*)",
                   "sum;drop", "\uff43\uff4f\uff55\uff4e\uff54", "count\x00", "percentile_cont", "regression")
BOGUS_OPS = ("", "like", "is", "is not", "not  in", "=>", "===", "not", "<=>", ";", "\x00", "in ()", "~")


def mostly(usual: st.SearchStrategy[T], unusual: st.SearchStrategy[T], odds: int = 4) -> st.SearchStrategy[T]:
    """``usual`` about ``odds`` times in ``odds + 1``, otherwise ``unusual`` (one_of would pick each half the time)."""
    return st.integers(0, odds).flatmap(lambda i: unusual if i == 0 else usual)


INT64 = st.integers(-(2**63), 2**63 - 1)
EDGE_INTS = (0, -1, 1, 17, 18, 99, 100, 2009, 2010, 2024, 2025, 2**31, 2**53 + 1, 2**63 - 1, -(2**63))
EDGE_FLOATS = (0.0, -0.0, math.nan, -math.nan, math.inf, -math.inf, 5e-324, sys.float_info.min, sys.float_info.max,
               1e300, 2.0**63, 18.0, 18.5, 99.0, 1e-9, float(2**53))


def _int(v: int) -> pb.Value:
    return pb.Value(int_value=v)


def _double(v: float) -> pb.Value:
    return pb.Value(double_value=v)


def _text(v: str) -> pb.Value:
    return pb.Value(string_value=v)


short_values = mostly(st.one_of(
    INT64.map(_int), st.sampled_from(EDGE_INTS).map(_int), st.integers(-5, 3000).map(_int),
    st.floats().map(_double), st.sampled_from(EDGE_FLOATS).map(_double),
    st.sampled_from(KEYS).map(_text), st.text(max_size=20).map(_text),
), st.one_of(st.booleans().map(lambda b: pb.Value(bool_value=b)), st.just(pb.Value())), odds=20)  # fit no column
long_texts = st.builds(lambda char, n: char * n, st.characters(codec="utf-8"), st.sampled_from((999, 1000, 1001, 4000)))
value_lists = st.one_of(
    st.lists(short_values, max_size=4),
    st.lists(long_texts.map(_text), min_size=1, max_size=3),
    st.builds(lambda v, n: [v] * n, short_values, st.integers(990, 1010)),  # one value many times
    st.integers(990, 1010).map(lambda n: [_int(i) for i in range(n)]),  # as many distinct ones
)


def names(real: tuple[str, ...]) -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(real), st.sampled_from(BOGUS_NAMES), st.text(max_size=12))


# -- structured queries -----------------------------------------------------------------------------

wild_aggregates = st.builds(
    lambda function, column, more, params: pb.Aggregate(function=function, column=column, more_columns=more,
                                                        params=params),
    st.one_of(st.sampled_from(FUNCTIONS), st.sampled_from(BOGUS_FUNCTIONS), st.text(max_size=8)),
    st.one_of(st.just(""), names(COLUMNS)),
    st.lists(names(COLUMNS), max_size=2),
    st.dictionaries(st.one_of(st.sampled_from(("q", "bins", "")), st.text(max_size=5)), short_values, max_size=2),
)
wild_filters = st.builds(lambda column, op, values: pb.Filter(column=column, op=op, values=values),
                         names(COLUMNS), st.one_of(st.sampled_from(OPS), st.sampled_from(BOGUS_OPS),
                                                   st.text(max_size=5)), value_lists)


def _column_values(dataset: str, column: str) -> st.SearchStrategy[pb.Value]:
    """Values that fit the column's type (within or just outside its keys and bounds), and some that do not."""
    spec = POLICY.datasets[dataset].columns[column]
    fitting: st.SearchStrategy[pb.Value]
    if spec.type == "string":
        fitting = st.one_of(st.sampled_from(spec.public_keys or ("x",)).map(str).map(_text),
                            st.text(max_size=10).map(_text))
    else:
        keys = [float(k) for k in spec.public_keys if not isinstance(k, str)]
        low, high = spec.bounds or (min(keys, default=0.0), max(keys, default=100.0))
        numbers = st.integers(int(low) - 5, int(high) + 5)
        fitting = numbers.map(_int) if spec.type == "integer" else st.one_of(
            numbers.map(_int), st.floats(low - 5, high + 5).map(_double))
    return mostly(fitting, short_values, odds=8)


@st.composite
def well_formed_structured(draw: st.DrawFn) -> pb.StructuredQuery:
    """A query over a real dataset, built from its policy: most pass, the rest fail one check."""
    dataset = draw(st.sampled_from(DATASETS))
    spec = POLICY.datasets[dataset]
    by_role = {role: [c for c, col in spec.columns.items() if role in col.roles]
               for role in ("filter", "group_by", "aggregate")}
    aggregates = []
    for function in draw(st.lists(st.sampled_from(list(spec.aggregates)), min_size=1, max_size=4, unique=True)):
        column = "" if KINDS[function].columns == 0 else draw(st.sampled_from(by_role["aggregate"]))
        params = {name: pb.Value(double_value=draw(st.floats(0.01, 0.99))) for name in KINDS[function].parameters}
        aggregates.append(pb.Aggregate(function=function, column=column, params=params))
    group_by = draw(st.lists(st.sampled_from(by_role["group_by"]), max_size=3, unique=True))
    filters = []
    for column in draw(st.lists(st.sampled_from(by_role["filter"]), max_size=4)):
        op = draw(st.sampled_from(OPS))
        folded = op.strip().lower()
        count = 2 if folded == "between" else draw(st.integers(1, 5)) if folded in ("in", "not in") else 1
        filters.append(pb.Filter(column=column, op=op,
                                 values=draw(st.lists(_column_values(dataset, column), min_size=count,
                                                      max_size=count))))
    return pb.StructuredQuery(dataset=dataset, aggregates=aggregates, group_by=group_by, filters=filters)


wild_structured = st.builds(
    lambda dataset, aggregates, group_by, filters: pb.StructuredQuery(dataset=dataset, aggregates=aggregates,
                                                                      group_by=group_by, filters=filters),
    names(DATASETS),
    st.one_of(st.lists(wild_aggregates, max_size=4), st.builds(lambda a, n: [a] * n, wild_aggregates,
                                                                st.integers(30, 40))),
    st.lists(names(COLUMNS), max_size=4),
    st.one_of(st.lists(wild_filters, max_size=6), st.builds(lambda f, n: [f] * n, wild_filters, st.integers(60, 70))),
)
structured = mostly(well_formed_structured(), wild_structured, odds=2)


# -- SQL text ---------------------------------------------------------------------------------------

def _quoted(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


sql_literals = st.one_of(
    st.integers(-(10**30), 10**30).map(str), st.sampled_from(EDGE_INTS).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.sampled_from(("1e999", "-1e999", "-0.0", ".5", "1.", "0x1F", "1_000", "NULL", "TRUE", "nan", "'nan'",
                     "DATE '2020-01-01'", "INTERVAL 1 DAY", "?", "$1", ":p", "[1, 2]", "{'a': 1}", "(SELECT 1)",
                     "CAST(1 AS INTEGER)", "1::INTEGER", "- - 1", "+1", "18", "'F'", "'III'", "'lung'", "E'\\x00'",
                     "x'00'", "'it''s'", "'unterminated", '"F"', "1 + 1", "abs(-1)", "'a' || 'b'")),
    st.sampled_from(KEYS).map(_quoted), st.text(max_size=12).map(_quoted),
)
BOGUS_COLUMNS = ("patient_id", "*", '"sex"', "patients.sex", "p.sex", "Sex", "1", "NULL", "rowid", "é", "`stage`",
                 "[stage]")
sql_columns = mostly(st.sampled_from(COLUMNS), st.sampled_from(BOGUS_COLUMNS), odds=2)
supported_comparisons = st.sampled_from(("=", "==", "!=", "<>", "<", "<=", ">", ">="))
comparisons = st.one_of(supported_comparisons, st.sampled_from(("IS", "IS NOT", "LIKE", "~", "<=>", "=>", "!")))


@st.composite
def sql_condition(draw: st.DrawFn) -> str:
    column = draw(sql_columns)
    form = draw(st.sampled_from(("cmp", "flip", "in", "not in", "not in prefix", "between", "null", "subquery",
                                 "cast", "param")))
    if form == "cmp":
        text = f"{column} {draw(comparisons)} {draw(sql_literals)}"
    elif form == "flip":
        text = f"{draw(sql_literals)} {draw(comparisons)} {column}"
    elif form in ("in", "not in", "not in prefix"):
        values = ", ".join(draw(st.lists(sql_literals, max_size=6)))
        listed = draw(st.sampled_from((f"({values})", f"[{values}]", values, ":list")))
        text = {"in": f"{column} IN {listed}", "not in": f"{column} NOT IN {listed}",
                "not in prefix": f"NOT {column} IN {listed}"}[form]
    elif form == "between":
        text = f"{column} {draw(st.sampled_from(('BETWEEN', 'NOT BETWEEN')))} {draw(sql_literals)} AND " \
               f"{draw(sql_literals)}"
    elif form == "null":
        text = f"{column} IS {draw(st.sampled_from(('NULL', 'NOT NULL', 'TRUE')))}"
    elif form == "subquery":
        text = f"patient_id IN (SELECT patient_id FROM {draw(names(DATASETS))} WHERE {column} = {draw(sql_literals)})"
    elif form == "cast":
        text = f"CAST({column} AS {draw(st.sampled_from(('INTEGER', 'VARCHAR', 'DOUBLE')))}) = {draw(sql_literals)}"
    else:
        text = f"{column} = :{draw(st.sampled_from(('p', 'from_year', '1', 'x y')))}"
    nots, parens = draw(st.integers(0, 3)), draw(st.sampled_from((0, 0, 0, 1, 2, 16, 17)))
    return "NOT " * nots + "(" * parens + text + ")" * parens


@st.composite
def sql_select_item(draw: st.DrawFn) -> str:
    form = draw(st.sampled_from(("agg", "agg", "agg", "count", "column", "star", "expression", "window", "cast")))
    column = draw(sql_columns)
    function = draw(st.one_of(st.sampled_from(FUNCTIONS), st.sampled_from(("median", "max", "MEAN", "Avg", "sum "))))
    if form == "agg":
        text = f"{function}({column})"
    elif form == "count":
        text = draw(st.sampled_from(("count(*)", "COUNT(*)", "count(1)", "count(2)", "count(DISTINCT sex)",
                                     "count()", "count(*, *)", "count(*) FILTER (WHERE sex = 'F')")))
    elif form == "column":
        text = column
    elif form == "star":
        text = "*"
    elif form == "expression":
        text = f"{function}({column}) {draw(st.sampled_from(('+', '*', '/', '||')))} {draw(sql_literals)}"
    elif form == "window":
        text = f"{function}({column}) OVER (PARTITION BY sex)"
    else:
        text = f"{function}({column})::{draw(st.sampled_from(('DOUBLE', 'INTEGER', 'VARCHAR')))}"
    return text + draw(st.sampled_from(("", "", " AS x", " x", ' AS "é"')))


SOURCES = ("patients p", "patients AS p", "patients JOIN treatments USING (patient_id)", "patients, treatments",
           "(SELECT * FROM patients)", "read_csv('/etc/passwd')", "main.patients", "patients TABLESAMPLE 10%",
           "'patients'", '"patients"', "patients FINAL", "patients AT (VERSION => 1)", "")
TAILS = ("", "", "", ";", "; DROP TABLE patients", "; SELECT count(*) FROM patients", " HAVING count(*) > 1",
         " ORDER BY 1", " LIMIT 5", " OFFSET 1", " UNION SELECT count(*) FROM treatments", " UNION ALL SELECT 1",
         " EXCEPT SELECT 1", " -- a comment", " /* a comment */", " QUALIFY 1", " WINDOW w AS ()", " FOR UPDATE")
PREFIXES = ("", "", "", "EXPLAIN ", "WITH x AS (SELECT 1) ", "/* hi */ ", "PRAGMA version; ", "SELECT 1; ",
            "COPY patients TO 'x'; ", "DESCRIBE ", "(", "\ufeff")


def _literal(dataset: str, column: str) -> st.SearchStrategy[str]:
    """A literal for ``column`` as SQL text: mostly one that fits it."""
    spec = POLICY.datasets[dataset].columns[column]
    fitting: st.SearchStrategy[str]
    if spec.type == "string":
        fitting = st.sampled_from(spec.public_keys).map(str).map(_quoted)
    else:
        # a column with neither bounds nor keys (e.g. survival's 0/1 event): small integers
        low, high = spec.bounds or ((min(map(float, spec.public_keys)), max(map(float, spec.public_keys)))
                                    if spec.public_keys else (0.0, 1.0))
        fitting = st.integers(int(low) - 3, int(high) + 3).map(str)
        if spec.type == "float":
            fitting = st.one_of(fitting, st.floats(low - 3, high + 3).map(repr))
    return mostly(fitting, sql_literals, odds=3)


@st.composite
def well_formed_sql(draw: st.DrawFn) -> str:
    """A SELECT over a real dataset built from its policy, the way a researcher writes one."""
    dataset = draw(st.sampled_from(DATASETS))
    spec = POLICY.datasets[dataset]
    by_role = {role: [c for c, col in spec.columns.items() if role in col.roles]
               for role in ("filter", "group_by", "aggregate")}
    items = []
    for function in draw(st.lists(st.sampled_from(list(spec.aggregates)), min_size=1, max_size=3, unique=True)):
        kind = KINDS[function]
        if kind.columns == 0:
            items.append(draw(st.sampled_from(("count(*)", "COUNT(*)", "count(1)"))))
        else:
            levels = "".join(f", {draw(st.sampled_from(('0.5', '0.1', '0.99')))}" for _ in kind.parameters)
            items.append(f"{draw(st.sampled_from(kind.sql_names))}({draw(st.sampled_from(by_role['aggregate']))}"
                         f"{levels})")
    group = draw(st.lists(st.sampled_from(by_role["group_by"]), max_size=2, unique=True))
    items += [c for c in group if draw(st.booleans())]
    conditions = []
    for column in draw(st.lists(st.sampled_from(by_role["filter"]), max_size=3)):
        literal = _literal(dataset, column)
        form = draw(st.sampled_from(("cmp", "flip", "in", "not in", "between")))
        if form == "cmp":
            conditions.append(f"{column} {draw(supported_comparisons)} {draw(literal)}")
        elif form == "flip":
            conditions.append(f"{draw(literal)} {draw(supported_comparisons)} {column}")
        elif form == "between":
            conditions.append(f"{column} BETWEEN {draw(literal)} AND {draw(literal)}")
        else:
            listed = ", ".join(draw(st.lists(literal, min_size=1, max_size=5)))
            prefix = draw(st.sampled_from(("", "NOT ", "(", "NOT (")))
            condition = f"{column} {form.upper()} ({listed})"
            conditions.append(prefix + condition + ")" * prefix.count("("))
    sql = f"SELECT {', '.join(items)} FROM {dataset}"
    if conditions:
        sql += " WHERE " + " AND ".join(conditions)
    if group:
        sql += " GROUP BY " + ", ".join(group)
    return sql


@st.composite
def wild_sql(draw: st.DrawFn) -> str:
    """A SELECT assembled from the grammar's pieces, good and bad, then perhaps mangled."""
    items = draw(st.lists(sql_select_item(), max_size=4))
    source = draw(st.one_of(names(DATASETS), st.sampled_from(SOURCES)))
    sql = f"{draw(st.sampled_from(PREFIXES))}{draw(st.sampled_from(('SELECT', 'select', 'SeLeCt')))} " \
          f"{', '.join(items)} FROM {source}"
    conditions = draw(st.lists(sql_condition(), max_size=5))
    if conditions:
        sql += " WHERE " + draw(st.sampled_from((" AND ", " and ", " OR ", " AND NOT "))).join(conditions)
    group = draw(st.lists(sql_columns, max_size=3))
    if group:
        sql += " GROUP BY " + ", ".join(group)
    elif draw(st.booleans()):
        sql += draw(st.sampled_from((" GROUP BY ALL", " GROUP BY 1", " GROUP BY ROLLUP (stage)", " GROUP BY ()")))
    sql += draw(st.sampled_from(TAILS))
    return draw(_mangled(sql))


FULLWIDTH_SELECT = "\uff53\uff45\uff4c\uff45\uff43\uff54"
NON_ASCII = ("é", "ß", "İ", "\u200b", "🙂", "\u202e", FULLWIDTH_SELECT, "\ufffd")


@st.composite
def _mangled(draw: st.DrawFn, sql: str) -> str:
    how = draw(st.sampled_from(("none", "none", "insert", "delete", "nul", "long", "non-ascii")))
    at = draw(st.integers(0, len(sql)))
    if how == "insert":
        return sql[:at] + draw(st.text(min_size=1, max_size=8)) + sql[at:]
    if how == "delete":
        return sql[:at] + sql[at + draw(st.integers(1, 8)):]
    if how == "nul":
        return sql[:at] + "\x00" + sql[at:]
    if how == "non-ascii":
        return sql[:at] + draw(st.sampled_from(NON_ASCII)) + sql[at:]
    if how == "long":  # around the 10,000-character limit
        filler = draw(st.sampled_from((" ", "\n", " AND diagnosis_year > 2010")))
        target = draw(st.sampled_from((9_999, 10_000, 10_001, 20_000)))
        return (sql + filler * (target // len(filler) + 1))[:target]
    return sql


@st.composite
def chained_sql(draw: st.DrawFn) -> str:
    """A long chain of one operator or subscript, up to the length limit (trees deeper than any the shape has)."""
    base = draw(st.sampled_from(("SELECT count(*) FROM patients WHERE a=1",
                                 "SELECT count(*) FROM patients WHERE age_at_diagnosis > 1",
                                 "SELECT sum(bmi) FROM patients WHERE sex = 'F'",
                                 "SELECT count(*) FROM patients WHERE sex IN ('F'")))
    link = draw(st.sampled_from((" AND a=1", " AND sex = 'F'", " AND NOT a IN (1)", " + 1", " * 1", "::INTEGER",
                                 " || 'x'", " - 1", ", 1", ", 'F'", " AND (a=1)", " OR a=1", "[1]", ".x")))
    times = draw(st.one_of(st.integers(1, 1500), st.sampled_from((60, 64, 65, 500, 999, 1000, 1200, 1250))))
    return (base + link * times)[:9_999] + (")" if "IN (" in base else "")


grammar_sql = mostly(mostly(well_formed_sql(), wild_sql(), odds=2), chained_sql(), odds=4)


TOKENS = ("SELECT", "FROM", "WHERE", "GROUP", "BY", "AND", "OR", "NOT", "IN", "BETWEEN", "IS", "NULL", "count",
          "(*)", "(", ")", "*", ",", ";", "'", '"', "--", "/*", "*/", "=", "<", ">", "!", "::", "[", "]", "{", "}",
          "$1", "?", ":x", "@", "patients", "treatments", "sex", "age_at_diagnosis", "'F'", "1", "1e999", "-", "+",
          ".", "\\", "\x00", "\n", "CASE", "WHEN", "THEN", "END", "UNION", "JOIN", "ON", "AS", "avg", "sum", "mean")
raw_sql = st.one_of(
    st.text(max_size=300),
    st.binary(max_size=300).map(lambda b: b.decode("latin-1")),
    st.lists(st.sampled_from(TOKENS), max_size=40).map(" ".join),
    st.lists(st.sampled_from(TOKENS), max_size=40).map("".join),
    st.builds(lambda token, n: token * n, st.sampled_from(TOKENS), st.integers(1, 3000)),
)


# -- template calls ---------------------------------------------------------------------------------

template_values = st.one_of(
    short_values,
    st.lists(st.sampled_from(KEYS), max_size=6).map(lambda keys: _text(",".join(keys))),
    st.sampled_from((",", ",,,", " , ", "breast,,lung", ",breast", "breast, lung ,colorectal")).map(_text),
    st.builds(lambda n: _text("," * n), st.integers(999, 2000)),
    long_texts.map(_text),
)


def _fitting_param(kind: str) -> st.SearchStrategy[pb.Value]:
    """A value of a template parameter's type (lists travel as comma-separated text), or any value."""
    if kind.startswith("list["):
        fitting = st.lists(st.sampled_from(KEYS), min_size=1, max_size=6).map(lambda keys: _text(",".join(keys)))
    elif kind == "integer":
        fitting = st.integers(2000, 2030).map(_int)
    elif kind == "float":
        fitting = st.floats(-10, 3000).map(_double)
    else:
        fitting = st.sampled_from(KEYS).map(_text)
    return mostly(fitting, template_values, odds=3)


@st.composite
def template_calls(draw: st.DrawFn) -> pb.TemplateCall:
    """A call of a real template with its own parameters (mostly fitting), or of a bogus one with any."""
    name = draw(mostly(st.sampled_from(TEMPLATES), st.one_of(
        st.sampled_from(("", "STAGE_DISTRIBUTION", "stage_distribution ", "../north", "*")), st.text(max_size=12))))
    template = POLICY.templates.get(name)
    params = {}
    for pname, spec in (template.params.items() if template is not None else ()):
        if draw(st.booleans()):
            params[pname] = draw(_fitting_param(spec.type))
    params |= draw(mostly(st.just({}), st.dictionaries(st.one_of(st.sampled_from(TEMPLATE_PARAMS), st.text(max_size=6)),
                                                       template_values, max_size=3)))
    return pb.TemplateCall(name=name, params=params)


# -- epsilon, delta, query ids ----------------------------------------------------------------------

EPSILON_EDGES = (0.0, -0.0, -1.0, -5e-324, math.nan, -math.nan, math.inf, -math.inf, 5e-324, sys.float_info.min,
                 1e-300, 1e-10, float(LIMITS.min), math.nextafter(float(LIMITS.min), 0),
                 math.nextafter(float(LIMITS.min), 1), float(LIMITS.default), math.nextafter(float(LIMITS.max), 0),
                 float(LIMITS.max), math.nextafter(float(LIMITS.max), math.inf), float(LIMITS.max) + 1e-9, 1.1,
                 2.0, 1e308, sys.float_info.max, 0.1, 0.2, 0.3, 1 / 3)
usable_epsilons = st.floats(float(LIMITS.min), float(LIMITS.max))
odd_epsilons = st.one_of(st.sampled_from(EPSILON_EDGES), st.floats())
epsilons = mostly(st.one_of(st.just(0.0), usable_epsilons), odd_epsilons, odds=3)
deltas = mostly(st.just(0.0), st.one_of(st.sampled_from((-0.0, 1e-9, 5e-324, -1e-9, math.nan, math.inf, 1.0)),
                                        st.floats()), odds=8)
PRINTABLE = string.printable.strip() + " "
query_ids = st.one_of(
    st.just(""), st.text(alphabet=PRINTABLE, min_size=1, max_size=128), st.sampled_from(("dup", "x", "q-1")),
    st.builds(lambda char, n: char * n, st.sampled_from(("a", " ", "~")), st.sampled_from((127, 128, 129, 10_000))),
    st.sampled_from(("\x00", "\t", "\n", "a\x7f", "é", "🙂", "\u200b", "id\x00id", "\ufeff")),
    st.text(max_size=20),
)
VALID_BODIES = (
    {"sql": "SELECT count(*) FROM patients"},
    {"sql": "SELECT count(*), mean(age_at_diagnosis) FROM patients WHERE sex = 'F' GROUP BY stage"},
    {"structured": pb.StructuredQuery(dataset="treatments", aggregates=[pb.Aggregate(function="sum",
                                                                                     column="cost_usd")])},
    {"template": pb.TemplateCall(name="stage_distribution", params={"from_year": _int(2015)})},
)
valid_bodies = st.sampled_from(range(len(VALID_BODIES))).map(lambda i: VALID_BODIES[i])
callers = mostly(st.just(PROJECT), st.sampled_from(OUTSIDERS), odds=8)


FRESH = None  # a query_id no case has used
_fresh_ids = itertools.count()


def _request(query_id: str | None, epsilon: float, delta: float, dry_run: bool, **body: object) -> pb.QueryRequest:
    query_id = f"fuzz-{next(_fresh_ids)}" if query_id is FRESH else query_id
    return pb.QueryRequest(query_id=query_id, epsilon=epsilon, delta=delta, dry_run=dry_run, **body)


common = {"query_id": mostly(st.just(FRESH), query_ids), "epsilon": epsilons, "delta": deltas,
          "dry_run": st.booleans(), "project": callers}


# -- the cases --------------------------------------------------------------------------------------

@pytest.mark.timeout(120 + 2 * EXAMPLES)
@FUZZ
@given(body=structured, **common)
def test_fuzz_structured(fuzzed: Fuzzed, body: pb.StructuredQuery, project: str, query_id: str | None, epsilon: float,
                         delta: float, dry_run: bool) -> None:
    ask(fuzzed, "structured", _request(query_id, epsilon, delta, dry_run, structured=body), project)


@pytest.mark.timeout(120 + 2 * EXAMPLES)
@FUZZ
@given(sql=grammar_sql, **common)
def test_fuzz_sql_grammar(fuzzed: Fuzzed, sql: str, project: str, query_id: str | None, epsilon: float, delta: float,
                          dry_run: bool) -> None:
    ask(fuzzed, "sql_grammar", _request(query_id, epsilon, delta, dry_run, sql=sql), project)


@pytest.mark.timeout(120 + 2 * EXAMPLES)
@FUZZ
@given(sql=raw_sql, **common)
def test_fuzz_sql_raw(fuzzed: Fuzzed, sql: str, project: str, query_id: str | None, epsilon: float, delta: float,
                      dry_run: bool) -> None:
    ask(fuzzed, "sql_raw", _request(query_id, epsilon, delta, dry_run, sql=sql), project)


@pytest.mark.timeout(120 + 2 * EXAMPLES)
@FUZZ
@given(call=template_calls(), **common)
def test_fuzz_template(fuzzed: Fuzzed, call: pb.TemplateCall, project: str, query_id: str | None, epsilon: float,
                       delta: float, dry_run: bool) -> None:
    ask(fuzzed, "template", _request(query_id, epsilon, delta, dry_run, template=call), project)


@pytest.mark.timeout(120 + 2 * EXAMPLES)
@FUZZ
@given(body=valid_bodies, epsilon=mostly(st.one_of(st.sampled_from(EPSILON_EDGES), usable_epsilons), st.floats()),
       delta=deltas, dry_run=st.booleans(), query_id=st.just(FRESH))
def test_fuzz_epsilon_delta(fuzzed: Fuzzed, body: dict[str, object], epsilon: float, delta: float, dry_run: bool,
                            query_id: str | None) -> None:
    ask(fuzzed, "epsilon_delta", _request(query_id, epsilon, delta, dry_run, **body))


@pytest.mark.timeout(120 + 2 * EXAMPLES)
@FUZZ
@given(body=valid_bodies, query_id=query_ids, epsilon=st.sampled_from((0.0, 0.1, 0.25, float(LIMITS.max))),
       dry_run=st.booleans(), project=callers)
def test_fuzz_query_id(fuzzed: Fuzzed, body: dict[str, object], query_id: str | None, epsilon: float, dry_run: bool,
                       project: str) -> None:
    ask(fuzzed, "query_id", _request(query_id, epsilon, 0.0, dry_run, **body), project)


def test_the_site_serves_on_after_the_fuzz(fuzzed: Fuzzed) -> None:
    """No case crashed or wedged it: healthy and answering; every case ran, and is in its intact audit chain."""
    with grpc.insecure_channel(fuzzed.site.target) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="gateway.v1.Gateway"),
                                                             timeout=DEADLINE)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    ask(fuzzed, "final", pb.QueryRequest(query_id="after-the-fuzz", sql="SELECT count(*) FROM patients", epsilon=0.5))
    ran = {category: sum(outcomes.values()) for category, outcomes in fuzzed.tally.cases.items()}
    assert all(n >= EXAMPLES for category, n in ran.items() if category != "final"), ran
    trail = audit.verify(fuzzed.site.state.audit.path)
    assert trail.ok and trail.records == sum(ran.values()), (trail, ran)
