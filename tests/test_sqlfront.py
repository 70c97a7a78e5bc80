"""Unit tests for gateway._sqlfront.parse_sql: the one supported SELECT shape, and everything it rejects."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway._sqlfront import MAX_SQL, parse_sql, parse_sql_cached
from gateway.errors import InvalidQuery
from gateway.query import Aggregate, Filter, Query

COUNT = Aggregate("count")


def q(dataset: str = "patients", aggregates: tuple[Aggregate, ...] = (COUNT,), group_by: tuple[str, ...] = (),
      filters: tuple[Filter, ...] = ()) -> Query:
    return Query(dataset, aggregates, group_by, filters)


def typed(query: Query) -> tuple[Any, ...]:
    """The query with every filter value tagged by its type and repr (1 == 1.0 == True would hide differences)."""
    return (query.dataset, query.aggregates, query.group_by,
            tuple((f.column, f.op, tuple((type(v).__name__, repr(v)) for v in f.values)) for f in query.filters))


def rejected(sql: str, params: dict[str, Any] | None = None) -> str:
    with pytest.raises(InvalidQuery) as info:
        parse_sql(sql, params)
    return info.value.message


# --- accepted shapes -----------------------------------------------------------------------------


@pytest.mark.parametrize(("sql", "expected"), [
    ("SELECT count(*) FROM patients", q()),
    ("SELECT count(1) FROM patients", q()),
    ("SELECT sum(bmi) FROM patients", q(aggregates=(Aggregate("sum", "bmi"),))),
    ("SELECT avg(bmi) FROM patients", q(aggregates=(Aggregate("mean", "bmi"),))),
    ("SELECT mean(bmi) FROM patients", q(aggregates=(Aggregate("mean", "bmi"),))),
    ("SELECT count(*), sum(cycles), avg(cost_usd) FROM treatments",
     q("treatments", (COUNT, Aggregate("sum", "cycles"), Aggregate("mean", "cost_usd")))),
    ("SELECT stage, count(*) FROM patients GROUP BY stage", q(group_by=("stage",))),
    ("SELECT count(*), stage, sex FROM patients GROUP BY sex, stage", q(group_by=("sex", "stage"))),
    ("SELECT count(*) FROM patients GROUP BY stage", q(group_by=("stage",))),
    ("SELECT count(*) AS n, sum(bmi) total, stage AS s FROM patients GROUP BY stage",
     q(aggregates=(COUNT, Aggregate("sum", "bmi")), group_by=("stage",))),
    ('SELECT sum("bmi") FROM "patients"', q(aggregates=(Aggregate("sum", "bmi"),))),
    ("select COUNT(*), Stage from PATIENTS where SEX = 'F' group BY Stage",
     q("PATIENTS", group_by=("Stage",), filters=(Filter("SEX", "=", ("F",)),))),
    ("SELECT count(*) FROM patients;", q()),
])
def test_accepted_shapes(sql: str, expected: Query) -> None:
    assert typed(parse_sql(sql)) == typed(expected)


@pytest.mark.parametrize(("where", "expected"), [
    ("age = 50", Filter("age", "=", (50,))),
    ("age == 50", Filter("age", "=", (50,))),
    ("age != 50", Filter("age", "!=", (50,))),
    ("age <> 50", Filter("age", "!=", (50,))),
    ("age < 50", Filter("age", "<", (50,))),
    ("age <= 50", Filter("age", "<=", (50,))),
    ("age > 50", Filter("age", ">", (50,))),
    ("age >= 50", Filter("age", ">=", (50,))),
    ("5 < age", Filter("age", ">", (5,))),
    ("5 <= age", Filter("age", ">=", (5,))),
    ("5 > age", Filter("age", "<", (5,))),
    ("5 >= age", Filter("age", "<=", (5,))),
    ("'F' = sex", Filter("sex", "=", ("F",))),
    ("'F' <> sex", Filter("sex", "!=", ("F",))),
    ("-3 < age", Filter("age", ">", (-3,))),
    ("age = -3", Filter("age", "=", (-3,))),
    ("bmi > -2.5", Filter("bmi", ">", (-2.5,))),
    ("bmi = 1e3", Filter("bmi", "=", (1000.0,))),
    ("bmi = .5", Filter("bmi", "=", (0.5,))),
    ("age IN (1, -2, 3)", Filter("age", "in", (1, -2, 3))),
    ("sex IN ('F')", Filter("sex", "in", ("F",))),
    ("stage NOT IN ('I', 'II')", Filter("stage", "not in", ("I", "II"))),
    ("NOT stage IN ('I', 'II')", Filter("stage", "not in", ("I", "II"))),
    ("age BETWEEN -1 AND 5", Filter("age", "between", (-1, 5))),
    ("age between 18 and 65", Filter("age", "between", (18, 65))),
    ("sex = 'it''s'", Filter("sex", "=", ("it's",))),
    ("sex = ''", Filter("sex", "=", ("",))),
    ("((age = 1))", Filter("age", "=", (1,))),
])
def test_single_filter(where: str, expected: Filter) -> None:
    assert typed(parse_sql(f"SELECT count(*) FROM patients WHERE {where}")) == typed(q(filters=(expected,)))


def test_integer_and_float_literals_keep_their_type() -> None:
    query = parse_sql("SELECT count(*) FROM patients WHERE a = 2 AND b = 2.0 AND c = 2.50 AND d = -0")
    assert [(type(f.values[0]), f.values[0]) for f in query.filters] == [(int, 2), (float, 2.0), (float, 2.5),
                                                                          (int, 0)]


def test_anded_filters_keep_order_through_parentheses() -> None:
    query = parse_sql("SELECT count(*) FROM patients WHERE (a = 1 AND (b = 2 AND c = 3)) AND d IN (4) "
                      "AND (e BETWEEN 5 AND 6)")
    assert query.filters == (Filter("a", "=", (1,)), Filter("b", "=", (2,)), Filter("c", "=", (3,)),
                             Filter("d", "in", (4,)), Filter("e", "between", (5, 6)))


def test_case_insensitive_keywords() -> None:
    lower = parse_sql("select count(*), avg(bmi), stage from patients where sex in ('F') and age between 1 and 2 "
                      "and stage not in ('IV') group by stage")
    upper = parse_sql("SELECT COUNT(*), AVG(bmi), stage FROM patients WHERE sex IN ('F') AND age BETWEEN 1 AND 2 "
                      "AND stage NOT IN ('IV') GROUP BY stage")
    mixed = parse_sql("SeLeCt CoUnT(*), MeAn(bmi), stage FrOm patients WhErE sex In ('F') AnD age BeTwEeN 1 aNd 2 "
                      "AnD stage NoT iN ('IV') GrOuP bY stage")
    expected = q(aggregates=(COUNT, Aggregate("mean", "bmi")), group_by=("stage",),
                 filters=(Filter("sex", "in", ("F",)), Filter("age", "between", (1, 2)),
                          Filter("stage", "not in", ("IV",))))
    assert typed(lower) == typed(upper) == typed(mixed) == typed(expected)


# --- template placeholders ------------------------------------------------------------------------


def test_scalar_placeholders() -> None:
    query = parse_sql("SELECT count(*) FROM patients WHERE diagnosis_year BETWEEN :lo AND :hi AND sex = :s "
                      "AND :lo < age", {"lo": 2010, "hi": 2020, "s": "F"})
    assert query.filters == (Filter("diagnosis_year", "between", (2010, 2020)), Filter("sex", "=", ("F",)),
                             Filter("age", ">", (2010,)))


def test_list_placeholder_with_in_and_not_in() -> None:
    query = parse_sql("SELECT count(*) FROM patients WHERE primary_site IN :sites AND stage NOT IN :stages",
                      {"sites": ("lung", "breast"), "stages": ("IV",)})
    assert query.filters == (Filter("primary_site", "in", ("lung", "breast")), Filter("stage", "not in", ("IV",)))


def test_scalar_placeholder_with_in_becomes_one_value_list() -> None:
    query = parse_sql("SELECT count(*) FROM patients WHERE primary_site IN :site", {"site": "lung"})
    assert query.filters == (Filter("primary_site", "in", ("lung",)),)


def test_placeholders_inside_an_in_list() -> None:
    query = parse_sql("SELECT count(*) FROM patients WHERE stage IN (:a, 'II', :b)", {"a": "I", "b": "III"})
    assert query.filters == (Filter("stage", "in", ("I", "II", "III")),)


def test_placeholder_value_is_bound_verbatim_even_if_it_looks_like_sql() -> None:
    evil = "x'; DROP TABLE patients; --"
    query = parse_sql("SELECT count(*) FROM patients WHERE sex = :s", {"s": evil})
    assert query.filters == (Filter("sex", "=", (evil,)),)


def test_missing_template_parameter() -> None:
    assert rejected("SELECT count(*) FROM patients WHERE sex = :s", {}) == "missing value for parameter :s"
    assert rejected("SELECT count(*) FROM patients WHERE sex = :s") == "missing value for parameter :s"


def test_unused_template_parameters_are_listed() -> None:
    message = rejected("SELECT count(*) FROM patients WHERE sex = :s", {"s": "F", "zeta": 1, "alpha": 2})
    assert message == "parameters not used by the query: alpha, zeta"


def test_list_parameter_outside_in_is_rejected() -> None:
    assert rejected("SELECT count(*) FROM patients WHERE sex = :s", {"s": ("F", "M")}) == \
        "parameter 's' is a list; use it with IN"


# --- rejected shapes -------------------------------------------------------------------------------

REJECTED = [
    # joins of every kind
    ("SELECT count(*) FROM patients JOIN treatments ON a = b", "JOIN is not supported"),
    ("SELECT count(*) FROM patients INNER JOIN treatments USING (patient_id)", "JOIN is not supported"),
    ("SELECT count(*) FROM patients LEFT JOIN treatments ON a = b", "JOIN is not supported"),
    ("SELECT count(*) FROM patients RIGHT OUTER JOIN treatments ON a = b", "JOIN is not supported"),
    ("SELECT count(*) FROM patients FULL JOIN treatments ON a = b", "JOIN is not supported"),
    ("SELECT count(*) FROM patients CROSS JOIN treatments", "JOIN is not supported"),
    ("SELECT count(*) FROM patients NATURAL JOIN treatments", "JOIN is not supported"),
    ("SELECT count(*) FROM patients POSITIONAL JOIN treatments", "JOIN is not supported"),
    ("SELECT count(*) FROM patients ASOF JOIN treatments ON a >= b", "JOIN is not supported"),
    ("SELECT count(*) FROM patients, treatments", "JOIN is not supported"),
    ("SELECT count(*) FROM patients p1, patients p2", "JOIN is not supported"),
    # subqueries
    ("SELECT count(*) FROM (SELECT * FROM patients)", "SUBQUERY is not supported"),
    ("SELECT count(*) FROM (patients)", "SUBQUERY is not supported"),
    ("SELECT count(*) FROM patients WHERE age > (SELECT age FROM treatments)", "SUBQUERY is not supported"),
    ("SELECT count(*) FROM patients WHERE age IN (SELECT age FROM t WHERE x IN (SELECT y FROM u))",
     "cannot hold another cohort"),
    ("SELECT count(*) FROM patients WHERE age = ANY (SELECT 1)", "SUBQUERY is not supported"),
    ("SELECT count(*) FROM patients WHERE EXISTS (SELECT 1 FROM treatments)", "subqueries are not supported"),
    # set operations
    ("SELECT count(*) FROM patients UNION SELECT count(*) FROM treatments", "only SELECT is allowed, got UNION"),
    ("SELECT count(*) FROM patients UNION ALL SELECT count(*) FROM patients", "only SELECT is allowed, got UNION"),
    ("SELECT count(*) FROM patients INTERSECT SELECT count(*) FROM patients",
     "only SELECT is allowed, got INTERSECT"),
    ("SELECT count(*) FROM patients EXCEPT SELECT count(*) FROM patients", "only SELECT is allowed, got EXCEPT"),
    # windows
    ("SELECT count(*) OVER () FROM patients", "WINDOW is not supported"),
    ("SELECT sum(bmi) OVER (PARTITION BY sex) FROM patients", "WINDOW is not supported"),
    ("SELECT count(*) FROM patients WINDOW w AS (PARTITION BY sex)", "WINDOW is not supported"),
    # other clauses
    ("SELECT count(*) FROM patients WHERE sex = 'F' OR sex = 'M'", "OR is not supported"),
    ("SELECT count(*) FROM patients WHERE age = 1 AND (sex = 'F' OR stage = 'I')", "OR is not supported"),
    ("SELECT count(*) FROM patients WHERE sex = 'F' OR '1' = '1'", "OR is not supported"),
    ("SELECT count(*), stage FROM patients GROUP BY stage HAVING count(*) > 5", "HAVING is not supported"),
    ("SELECT count(*) FROM patients ORDER BY 1", "ORDER is not supported"),
    ("SELECT count(*) FROM patients LIMIT 1", "LIMIT is not supported"),
    ("SELECT count(*) FROM patients OFFSET 1", "OFFSET is not supported"),
    ("SELECT count(*) FROM patients QUALIFY 1", "QUALIFY is not supported"),
    ("SELECT DISTINCT stage FROM patients GROUP BY stage", "DISTINCT is not supported"),
    ("SELECT count(DISTINCT sex) FROM patients", "DISTINCT is not supported"),
    ("WITH t AS (SELECT 1) SELECT count(*) FROM patients", "WITH is not supported"),
    ("SELECT count(*) FROM patients LATERAL VIEW explode(x) t AS y", "LATERAL is not supported"),
    # statement stacking
    ("SELECT count(*) FROM patients; SELECT count(*) FROM patients", "exactly one statement is allowed, got 2"),
    ("SELECT count(*) FROM patients; DROP TABLE x", "exactly one statement is allowed, got 2"),
    ("SELECT count(*) FROM patients WHERE sex = 'x'; DROP TABLE patients; --'",
     ("exactly one statement is allowed, got 3", "SQL comments are not allowed")),
    ("SELECT count(*) FROM patients; -- trailing",
     ("exactly one statement is allowed, got 2", "SQL comments are not allowed")),
    # comments
    ("SELECT count(*) FROM patients -- hi", "SQL comments are not allowed"),
    ("SELECT count(*) FROM patients WHERE sex = 'F' --", "SQL comments are not allowed"),
    ("SELECT count(*) FROM patients /* hi */", "SQL comments are not allowed"),
    ("SELECT /* hi */ count(*) FROM patients", "SQL comments are not allowed"),
    ("/* hi */ SELECT count(*) FROM patients", "SQL comments are not allowed"),
    ("-- hi\nSELECT count(*) FROM patients", "SQL comments are not allowed"),
    ("SELECT count(*) FROM patients WHERE sex = '' OR 1=1 --'", "SQL comments are not allowed"),
    # DDL / DML / other statements
    ("DROP TABLE patients", "only SELECT is allowed, got DROP"),
    ("DELETE FROM patients", "only SELECT is allowed, got DELETE"),
    ("INSERT INTO patients VALUES (1)", "only SELECT is allowed, got INSERT"),
    ("UPDATE patients SET sex = 'F'", "only SELECT is allowed, got UPDATE"),
    ("CREATE TABLE t (a INT)", "only SELECT is allowed, got CREATE"),
    ("ATTACH 'other.duckdb'", "only SELECT is allowed, got ATTACH"),
    ("COPY patients TO 'out.csv'", "only SELECT is allowed, got COPY"),
    ("PRAGMA table_info('patients')", "only SELECT is allowed, got PRAGMA"),
    ("SET threads = 1", "only SELECT is allowed, got SET"),
    ("INSTALL httpfs", "only SELECT is allowed, got INSTALL"),
    ("DESCRIBE patients", "only SELECT is allowed, got DESCRIBE"),
    ("SHOW TABLES", "only SELECT is allowed, got SHOW"),
    ("LOAD httpfs", "only SELECT is allowed, got COMMAND"),
    ("CALL pragma_version()", "only SELECT is allowed, got COMMAND"),
    ("VACUUM", "only SELECT is allowed, got COMMAND"),
    # FROM must name one plain dataset
    ("SELECT count(*) FROM read_csv('/etc/passwd')", "FROM must name one dataset, not a function"),
    ("SELECT count(*) FROM read_parquet('s3://bucket/x.parquet')", "FROM must name one dataset, not a function"),
    ("SELECT count(*) FROM main.patients", ("FROM must name one dataset", "table modifiers (db) are not supported")),
    ("SELECT count(*) FROM db.main.patients",
     ("FROM must name one dataset", "table modifiers (catalog, db) are not supported")),
    ("SELECT count(*)", "FROM must name one dataset"),
    ("SELECT 1", "FROM must name one dataset"),
    # conditions
    ("SELECT count(*) FROM patients WHERE age = survival_months", "expected a literal value or :parameter, got"),
    ("SELECT count(*) FROM patients WHERE age BETWEEN survival_months AND 5",
     "expected a literal value or :parameter, got 'survival_months'"),
    ("SELECT count(*) FROM patients WHERE 1 = 1", "expected a plain column name, got '1'"),
    ("SELECT count(*) FROM patients WHERE p.age = 1", "expected a plain column name, got 'p.age'"),
    ("SELECT count(*) FROM patients WHERE -age = 1", "expected a plain column name, got '-age'"),
    ("SELECT count(*) FROM patients WHERE age = 1 + 1", "expected a literal value or :parameter"),
    ("SELECT count(*) FROM patients WHERE age = CAST(1 AS INT)", "expected a literal value or :parameter"),
    ("SELECT count(*) FROM patients WHERE age = NULL", "expected a literal value or :parameter, got 'NULL'"),
    ("SELECT count(*) FROM patients WHERE age = TRUE", "expected a literal value or :parameter, got 'TRUE'"),
    ("SELECT count(*) FROM patients WHERE sex = getenv('HOME')", "expected a literal value or :parameter"),
    ("SELECT count(*) FROM patients WHERE age IN (1, 1 + 1)", "expected a literal value or :parameter"),
    ("SELECT count(*) FROM patients WHERE age IS NULL", "unsupported condition 'age IS NULL'"),
    ("SELECT count(*) FROM patients WHERE sex LIKE 'F%'", "unsupported condition"),
    ("SELECT count(*) FROM patients WHERE age NOT BETWEEN 1 AND 5", "unsupported condition"),
    ("SELECT count(*) FROM patients WHERE NOT age = 5", "unsupported condition 'NOT age = 5'"),
    ("SELECT count(*) FROM patients WHERE TRUE", "unsupported condition 'TRUE'"),
    ("SELECT count(*) FROM patients WHERE age", "unsupported condition 'age'"),
    # select items
    ("SELECT sum(a + b) FROM patients", "expected a plain column name, got 'a + b'"),
    ("SELECT sum(bmi * 2) FROM patients", "expected a plain column name, got 'bmi * 2'"),
    ("SELECT sum(1) FROM patients", "expected a plain column name, got '1'"),
    ("SELECT avg(p.bmi) FROM patients", "expected a plain column name, got 'p.bmi'"),
    ("SELECT count(sex) FROM patients", "only count(*) is supported, got 'COUNT(sex)'"),
    ("SELECT count(2) FROM patients", "only count(*) is supported"),
    ("SELECT min(age) FROM patients", "unsupported select item 'MIN(age)'"),
    ("SELECT max(age) FROM patients", "unsupported select item 'MAX(age)'"),
    ("SELECT mean(age, bmi) FROM patients", "unsupported select item"),
    ("SELECT * FROM patients", "unsupported select item '*'"),
    ("SELECT age + 1 FROM patients", "unsupported select item"),
    ("SELECT count(*) FILTER (WHERE age > 1) FROM patients", "unsupported select item"),
    ("SELECT stage FROM patients", "column 'stage' in SELECT must be in GROUP BY"),
    ("SELECT count(*), stage FROM patients", "column 'stage' in SELECT must be in GROUP BY"),
    ("SELECT count(*), sex FROM patients GROUP BY stage", "column 'sex' in SELECT must be in GROUP BY"),
    ("SELECT count(*) FROM patients GROUP BY 1", "expected a plain column name, got '1'"),
    ("SELECT count(*) FROM patients GROUP BY stage + 1", "expected a plain column name"),
    ("SELECT count(*) FROM patients GROUP BY ROLLUP (stage)", "expected a plain column name"),
    ("SELECT count(*) FROM patients GROUP BY CUBE (stage)", "expected a plain column name"),
    # nothing / garbage
    ("", "exactly one statement is allowed, got 0"),
    ("   \n\t ", "exactly one statement is allowed, got 0"),
    (";", "exactly one statement is allowed, got 0"),
    ("garbage !!! ((", "cannot parse SQL"),
    ("SELECT count(*) FROM", "cannot parse SQL"),
    ("SELECT count(*) FROM patients WHERE", "cannot parse SQL"),
    ("SELECT count(*) FROM patients WHERE sex = 'unterminated", "cannot parse SQL"),
    ("EXPORT DATABASE 'x'", "cannot parse SQL"),
]


@pytest.mark.parametrize(("sql", "phrase"), REJECTED, ids=[s[:60] for s, _ in REJECTED])
def test_rejected(sql: str, phrase: str | tuple[str, ...]) -> None:
    message = rejected(sql)
    phrases = (phrase,) if isinstance(phrase, str) else phrase
    assert any(p in message for p in phrases), message
    assert "supported: SELECT <count(*)" in message


def test_too_long_sql_is_rejected_before_parsing() -> None:
    base = "SELECT count(*) FROM patients WHERE age IN (1)"
    exact = base + " " * (MAX_SQL - len(base))
    assert len(exact) == MAX_SQL == 10_000
    assert parse_sql(exact).filters == (Filter("age", "in", (1,)),)
    assert rejected(exact + " ") == "SQL longer than 10000 characters"
    huge = "SELECT count(*) FROM patients WHERE sex IN (" + ", ".join(["'F'"] * 4000) + ")"
    assert rejected(huge) == "SQL longer than 10000 characters"


@pytest.mark.parametrize("chain", [
    " AND ".join(["a=1"] * 1200),  # a left-deep tree of 1,200 ANDs: the converter recursed
    "age_at_diagnosis = 1" + "::INTEGER" * 1000,  # 1,000 nested casts: the message quoting them recursed
    "age_at_diagnosis = 1" + " + 1" * 2000,
], ids=["and", "cast", "plus"])
def test_long_operator_chains_are_refused_without_recursing(chain: str) -> None:
    """Found by the fuzzer (tests/security/test_fuzz.py): these raised RecursionError, INTERNAL at a site."""
    assert "nested too deeply" in rejected(f"SELECT count(*) FROM patients WHERE {chain}")


@pytest.mark.parametrize("sql", [
    "SELECT count(*) FROM patients WHERE age_at_diagnosis > 1" + "[1]" * 3000,  # took the parser seconds
    "SELECT count(*) FROM patients WHERE sex IN ['F', 'M']",
    "SELECT count(*) FROM patients WHERE sex = {'a': 1}",
    "SELECT count(*) FROM patients WHERE sex = ']'[1]",
], ids=["subscripts", "list", "struct", "after a string"])
def test_brackets_and_braces_are_refused_before_parsing(sql: str) -> None:
    """Found by the fuzzer: a chain of subscripts kept a site's worker past the caller's 10 s deadline."""
    assert "brackets and braces are not supported" in rejected(sql[:MAX_SQL])


def test_brackets_inside_a_string_are_just_characters() -> None:
    assert parse_sql("SELECT count(*) FROM patients WHERE sex = '[F]{x}'").filters == (Filter("sex", "=", ("[F]{x}",)),)


def test_the_deepest_supported_where_still_parses() -> None:
    """64 filters (the most a query may have), 16 parentheses deep, each with the NOT it may carry."""
    where = "NOT age_at_diagnosis IN (1)"
    for _ in range(14):
        where = f"({where} AND NOT age_at_diagnosis IN (1))"
    where = f"({where})" + " AND NOT age_at_diagnosis IN (1)" * 49
    assert len(parse_sql(f"SELECT count(*) FROM patients WHERE {where}").filters) == 64


def test_no_select_item_is_no_aggregate() -> None:
    # a group-by column alone parses; check_query rejects the empty aggregate list later
    assert parse_sql("SELECT stage FROM patients GROUP BY stage") == q(aggregates=(), group_by=("stage",))


# --- injection attempts inside literals ------------------------------------------------------------

PAYLOADS = [
    "x'; DROP TABLE patients; --",
    "' OR 1=1 --",
    "' OR '1'='1",
    "'); DELETE FROM patients; --",
    "/* comment */",
    "-- comment",
    "; ATTACH 'evil.db'",
    "ünïcödé ✓ 🚀",
    "\u202eevil\u202c",
    "a\x00b",
    "line\nbreak\r\n",
    "back\\slash\\",
    "\\'",
    "''''",
    ":param",
    "$$dollar$$",
    '"double"',
]


@pytest.mark.parametrize("payload", PAYLOADS)
def test_quoted_payload_is_exactly_one_literal(payload: str) -> None:
    literal = "'" + payload.replace("'", "''") + "'"
    query = parse_sql(f"SELECT count(*), stage FROM patients WHERE sex = {literal} AND stage IN ({literal}, 'I') "
                      f"GROUP BY stage")
    assert query == q(group_by=("stage",), filters=(Filter("sex", "=", (payload,)),
                                                     Filter("stage", "in", (payload, "I"))))


@pytest.mark.parametrize("payload", PAYLOADS)
def test_parameter_payload_is_exactly_one_value(payload: str) -> None:
    query = parse_sql("SELECT count(*) FROM patients WHERE sex = :s AND stage IN :l", {"s": payload, "l": (payload,)})
    assert query.filters == (Filter("sex", "=", (payload,)), Filter("stage", "in", (payload,)))


@pytest.mark.parametrize("raw", [
    "x'; DROP TABLE patients; --",
    "' OR 1=1 --",
    "' OR '1'='1",
    "'); DELETE FROM patients; --",
    "' UNION SELECT count(*) FROM treatments --",
    "'; ATTACH 'evil.db' AS e; SELECT '",
])
def test_unescaped_payload_never_yields_extra_filters(raw: str) -> None:
    sql = f"SELECT count(*) FROM patients WHERE sex = '{raw}'"
    try:
        query = parse_sql(sql)
    except InvalidQuery:
        return
    # if it parses at all, the whole thing must be one equality on sex with one literal value
    assert query.dataset == "patients"
    assert len(query.filters) == 1
    assert query.filters[0].column == "sex"
    assert len(query.filters[0].values) == 1


# --- regressions for bugs found while writing these tests (fixed in the working tree) -------------
# Comments that sqlglot does not attach to an AST node (next to IN, NOT, BETWEEN, AS, inside count(...))
# used to be dropped silently, so the query was accepted.


@pytest.mark.parametrize("sql", [
    "SELECT count(*) FROM patients WHERE age IN /* c */ (1, 2)",
    "SELECT count(*) FROM patients WHERE age IN -- c\n (1, 2)",
    "SELECT count(*) FROM patients WHERE age IN (/* c */ 1, 2)",
    "SELECT count(*) FROM patients WHERE age NOT /* c */ IN (1, 2)",
    "SELECT count(*) FROM patients WHERE age BETWEEN /* c */ 1 AND 2",
    "SELECT count( /* c */ *) FROM patients",
    "SELECT sum( -- c\n bmi) FROM patients",
    "SELECT count(*) FROM patients AS /* c */ p",
])
def test_comments_anywhere_are_rejected(sql: str) -> None:
    assert "SQL comments are not allowed" in rejected(sql)


# `x IN 5` / `x IN y` used to parse into a filter with no values (the operand was dropped).
@pytest.mark.parametrize("where", ["age IN 5", "sex IN 'F'", "age IN survival_months", "age NOT IN 5", "age IN ()"])
def test_in_without_a_value_list_is_rejected(where: str) -> None:
    assert "supported: SELECT" in rejected(f"SELECT count(*) FROM patients WHERE {where}")


# Modifiers that change which rows or columns are read, and SELECT ... INTO, used to be dropped silently.
@pytest.mark.parametrize("sql", [
    "SELECT count(*) FROM patients TABLESAMPLE 10%",
    "SELECT count(*) FROM patients USING SAMPLE 10",
    "SELECT count(*) FROM patients PIVOT (sum(bmi) FOR sex IN ('F'))",
    "SELECT count(*) FROM patients UNPIVOT (v FOR k IN (age, bmi))",
    "SELECT count(*) FROM patients AT (VERSION => 1)",
    "SELECT count(*) FROM patients AS p(a, b)",
    "SELECT count(*) INTO t FROM patients",
])
def test_row_changing_modifiers_are_rejected(sql: str) -> None:
    assert "supported: SELECT" in rejected(sql)


# --- properties ------------------------------------------------------------------------------------

DATASETS = ("patients", "treatments", "registry_2024")
COLUMNS = ("sex", "age_at_diagnosis", "stage", "bmi", "primary_site", "cycles", "cost_usd")
COMPARISONS = ("=", "!=", "<", "<=", ">", ">=")
FLIP = {"<": ">", "<=": ">=", ">": "<", ">=": "<=", "=": "=", "!=": "!="}

scalars = st.one_of(
    st.integers(min_value=-(10 ** 20), max_value=10 ** 20),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=12),
    st.sampled_from(["'", "''", "x'; DROP TABLE patients; --", "' OR 1=1 --", "/* c */", "-- c", ";", "\\", ":p"]),
)


def render(value: Any) -> str:
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    return repr(value)


@st.composite
def keyword(draw: st.DrawFn, word: str) -> str:
    return draw(st.sampled_from([word.upper(), word.lower(), word.title()]))


@st.composite
def filter_and_sql(draw: st.DrawFn) -> tuple[Filter, str]:
    column = draw(st.sampled_from(COLUMNS))
    kind = draw(st.sampled_from(("cmp", "in", "not in", "between")))
    if kind == "cmp":
        op = draw(st.sampled_from(COMPARISONS))
        value = draw(scalars)
        spelled = draw(st.sampled_from(["!=", "<>"])) if op == "!=" else draw(st.sampled_from(["=", "=="])) \
            if op == "=" else op
        if draw(st.booleans()):
            flipped = FLIP[op] if op not in ("=", "!=") else spelled
            return Filter(column, op, (value,)), f"{render(value)} {flipped} {column}"
        return Filter(column, op, (value,)), f"{column} {spelled} {render(value)}"
    if kind == "between":
        low, high = draw(scalars), draw(scalars)
        return (Filter(column, "between", (low, high)),
                f"{column} {draw(keyword('between'))} {render(low)} {draw(keyword('and'))} {render(high)}")
    values = tuple(draw(st.lists(scalars, min_size=1, max_size=5)))
    listed = "(" + ", ".join(render(v) for v in values) + ")"
    if kind == "in":
        return Filter(column, "in", values), f"{column} {draw(keyword('in'))} {listed}"
    if draw(st.booleans()):
        return Filter(column, "not in", values), f"{column} {draw(keyword('not'))} {draw(keyword('in'))} {listed}"
    return Filter(column, "not in", values), f"{draw(keyword('not'))} {column} {draw(keyword('in'))} {listed}"


@st.composite
def query_and_sql(draw: st.DrawFn) -> tuple[Query, str]:
    dataset = draw(st.sampled_from(DATASETS))
    aggregates = []
    items = []
    for i in range(draw(st.integers(min_value=1, max_value=3))):
        function = draw(st.sampled_from(("count", "sum", "mean")))
        if function == "count":
            agg, text = Aggregate("count"), draw(st.sampled_from(["count(*)", "COUNT(*)", "count(1)", "Count(1)"]))
        else:
            column = draw(st.sampled_from(COLUMNS))
            spelled = draw(st.sampled_from(["sum", "SUM"] if function == "sum" else ["avg", "AVG", "mean", "MEAN"]))
            agg, text = Aggregate(function, column), f"{spelled}({column})"
        alias = draw(st.sampled_from(["", f" AS a{i}", f" a{i}"]))
        aggregates.append(agg)
        items.append(text + alias)
    group_by = draw(st.lists(st.sampled_from(COLUMNS), unique=True, max_size=3))
    for column in group_by:
        if draw(st.booleans()):
            alias = draw(st.sampled_from(["", f" AS g_{column}"]))
            items.insert(draw(st.integers(min_value=0, max_value=len(items))), column + alias)
    pairs = draw(st.lists(filter_and_sql(), max_size=4))
    sql = f"{draw(keyword('select'))} {', '.join(items)} {draw(keyword('from'))} {dataset}"
    if pairs:
        where = pairs[0][1]
        for _, text in pairs[1:]:
            where = f"{where} {draw(keyword('and'))} {text}"
            if draw(st.booleans()):
                where = f"({where})"
        sql += f" {draw(keyword('where'))} {where}"
    if group_by:
        sql += f" {draw(keyword('group'))} {draw(keyword('by'))} {', '.join(group_by)}"
    return Query(dataset, tuple(aggregates), tuple(group_by), tuple(f for f, _ in pairs)), sql


@settings(max_examples=200, deadline=None)
@given(query_and_sql())
def test_property_rendered_sql_parses_back_to_the_same_query(case: tuple[Query, str]) -> None:
    expected, sql = case
    assert typed(parse_sql(sql)) == typed(expected), sql


FRAGMENTS = [
    ";", "; DROP TABLE patients", "; DELETE FROM patients", "--", "-- x\n", "/*", "*/", "/* x */", "OR",
    "OR 1 = 1", "UNION", "UNION SELECT count(*) FROM patients", "UNION ALL", "JOIN", "LEFT JOIN patients ON 1 = 1",
    "CROSS JOIN", "LIMIT 1", "ORDER BY 1", "DISTINCT", "HAVING", "HAVING count(*) > 0", "WITH", "DROP", "DELETE",
    "INSERT", "UPDATE", "CREATE", "ATTACH", "COPY", "PRAGMA", "OVER ()", "(SELECT 1)", "EXISTS", "IN (SELECT 1)",
    "read_csv('/etc/passwd')", "LATERAL", "QUALIFY", "WINDOW", "INTERSECT", "EXCEPT", "VALUES (1)",
]
BASE_TOKENS = ["SELECT", "count(*),", "stage,", "sum(bmi)", "FROM", "patients", "WHERE", "sex", "=", "'F'", "AND",
               "age_at_diagnosis", "IN", "(1,", "2)", "AND", "diagnosis_year", "BETWEEN", "2010", "AND", "2020",
               "GROUP", "BY", "stage"]
ALLOWED_COLUMNS = {"stage", "bmi", "sex", "age_at_diagnosis", "diagnosis_year"}


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(min_value=0, max_value=len(BASE_TOKENS)), st.sampled_from(FRAGMENTS)),
                min_size=1, max_size=3))
def test_property_inserted_forbidden_text_never_escapes_the_allowed_names(
        inserts: list[tuple[int, str]]) -> None:
    tokens = list(BASE_TOKENS)
    for position, fragment in sorted(inserts, reverse=True):
        tokens.insert(position, fragment)
    sql = " ".join(tokens)
    try:
        query = parse_sql(sql)
    except InvalidQuery:
        return
    assert query.dataset == "patients", sql
    names = set(query.group_by) | {f.column for f in query.filters} | {a.column for a in query.aggregates if a.column}
    assert names <= ALLOWED_COLUMNS, sql
    assert {a.function for a in query.aggregates} <= {"count", "sum"}, sql
    for f in query.filters:
        assert all(isinstance(v, int | float | str) for v in f.values), sql


def test_cached_parse_gives_the_same_query_and_refuses_bad_sql_every_time() -> None:
    sql = "SELECT stage, count(*) FROM patients WHERE age_at_diagnosis >= 40 GROUP BY stage"
    first = parse_sql_cached(sql)
    assert first == parse_sql(sql)
    assert parse_sql_cached(sql) is first  # remembered, not parsed again
    for _ in range(2):  # a refusal is never remembered as an answer
        with pytest.raises(InvalidQuery):
            parse_sql_cached("SELECT * FROM patients")
