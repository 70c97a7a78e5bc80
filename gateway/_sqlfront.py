"""SQL front-end: one ``SELECT <aggregates> FROM <dataset> [WHERE ...] [GROUP BY ...]``.

The text is parsed with sqlglot and turned into a :class:`~gateway.query.Query`; no SQL text
from a caller is ever executed. Anything outside that shape (joins, subqueries, window functions,
OR, DDL, several statements, comments) is rejected with a message saying what is supported.
Template SQL uses ``:name`` placeholders, filled from typed parameters.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import sqlglot
from sqlglot import TokenType, exp
from sqlglot.tokenizer_core import Token

from .aggregates import BY_SQL_NAME, sql_forms
from .answers import Scalar
from .errors import InvalidQuery
from .query import MAX_FILTERS, Aggregate, Cohort, Filter, Query

SUPPORTED = (f"supported: SELECT <{' | '.join(sql_forms())}, group-by columns> "
             "FROM <dataset> [WHERE <col> <op> <value> [AND ...]] [GROUP BY <col>, ...]; "
             "ops: =, !=, <, <=, >, >=, IN (...), NOT IN (...), BETWEEN a AND b; cohorts: "
             "<patient id> [NOT] IN (SELECT <patient id> FROM <dataset> [WHERE <conditions>])")
_COMPARISONS: dict[type[exp.Expression], str] = {
    exp.EQ: "=", exp.NEQ: "!=", exp.LT: "<", exp.LTE: "<=", exp.GT: ">", exp.GTE: ">=",
}
_FLIPPED = {"<": ">", "<=": ">=", ">": "<", ">=": "<=", "=": "=", "!=": "!="}
_FORBIDDEN = (exp.Join, exp.Subquery, exp.Window, exp.Union, exp.Having, exp.Order, exp.Limit,
              exp.Distinct, exp.With, exp.Lateral, exp.Offset, exp.Qualify)
MAX_SQL = 10_000
MAX_NESTING = 16
# The deepest tree the supported shape makes: SELECT > WHERE > one AND per filter > parentheses > NOTs >
# a condition > its column. Deeper trees (a chain of 1,000 ANDs, casts or additions) would exhaust the
# recursion of the converter and of sqlglot's SQL generator: refused before either walks them.
MAX_DEPTH = MAX_FILTERS + MAX_NESTING + 16
_SELECT_PARTS = {"expressions", "from", "from_", "where", "group"}

ParamValue = Scalar | tuple[Scalar, ...]


@functools.lru_cache(maxsize=1024)
def parse_sql_cached(sql: str) -> Query:
    """:func:`parse_sql` of a request's SQL (no parameters), remembered for the next request with the same text.

    Parsing takes about as long as DuckDB's whole filtered count over a million rows, and
    researchers and benchmarks repeat their SQL. Keyed by the text alone: parsing reads no policy
    (every check against the policy still runs on each request). A :class:`Query` is immutable, so
    sharing one is safe; a refusal is not remembered (it raises again). Bounded: at most 1024
    texts of at most ``MAX_SQL`` characters each.
    """
    return parse_sql(sql)


def parse_sql(sql: str, params: Mapping[str, ParamValue] | None = None) -> Query:
    """Parse one supported SELECT into a :class:`Query`, or raise :class:`InvalidQuery`."""
    if len(sql) > MAX_SQL:
        raise InvalidQuery(f"SQL longer than {MAX_SQL} characters")
    try:
        tokens = sqlglot.tokenize(sql, read="duckdb")
    except sqlglot.errors.SqlglotError as err:
        raise InvalidQuery(f"cannot parse SQL ({_first_line(err)}); {SUPPORTED}") from None
    if any(token.comments for token in tokens):
        raise InvalidQuery(f"SQL comments are not allowed; {SUPPORTED}")
    _check_tokens(tokens)  # the parser recurses: refuse deep nesting before it sees the text
    try:
        statements = [s for s in sqlglot.parse(sql, dialect="duckdb") if s is not None]
    except sqlglot.errors.SqlglotError as err:
        raise InvalidQuery(f"cannot parse SQL ({_first_line(err)}); {SUPPORTED}") from None
    except RecursionError:
        raise InvalidQuery(f"the SQL is nested too deeply; {SUPPORTED}") from None
    if len(statements) != 1:
        raise InvalidQuery(f"exactly one statement is allowed, got {len(statements)}; {SUPPORTED}")
    select = statements[0]
    if not isinstance(select, exp.Select):
        raise InvalidQuery(f"only SELECT is allowed, got {select.key.upper()}; {SUPPORTED}")
    _check_depth(select)
    _reject_unsupported(select)
    return _Converter(params or {}).convert(select)


def _check_tokens(tokens: list[Token]) -> None:
    """Refuse what the parser would recurse on and the shape never needs.

    That is, more than MAX_NESTING open parentheses or two NOTs in a row, and any bracket or brace: a
    chain of subscripts (``x[1][1]...``) is no nesting in the text, yet the parser recurses once per
    subscript and takes quadratic time (seconds for a few thousand).
    """
    depth = deepest = nots = most_nots = 0
    for token in tokens:
        kind = token.token_type
        if kind in (TokenType.L_BRACKET, TokenType.R_BRACKET, TokenType.L_BRACE, TokenType.R_BRACE):
            raise InvalidQuery(f"brackets and braces are not supported (a list of values is written (a, b)); "
                               f"{SUPPORTED}")
        if kind == TokenType.L_PAREN:
            depth += 1
            deepest = max(deepest, depth)
        elif kind == TokenType.R_PAREN:
            depth -= 1
        nots = nots + 1 if kind == TokenType.NOT and token.text.upper() == "NOT" else 0
        most_nots = max(most_nots, nots)
    if deepest > MAX_NESTING or most_nots > 2:
        raise InvalidQuery(f"the SQL is nested too deeply (at most {MAX_NESTING} parentheses and 2 NOTs in a "
                           f"row); {SUPPORTED}")


def _check_depth(root: exp.Expression) -> None:
    """Refuse a tree deeper than MAX_DEPTH (measured without recursing: the point is not to recurse)."""
    stack = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise InvalidQuery(f"the SQL is nested too deeply (an expression more than {MAX_DEPTH} levels deep; "
                               f"at most {MAX_FILTERS} filters joined by AND); {SUPPORTED}")
        stack.extend((child, depth + 1) for child in node.iter_expressions())


def _first_line(err: Exception) -> str:
    return str(err).splitlines()[0][:200]


def _is_cohort(node: exp.Expr) -> bool:
    """A subquery that is the list of an IN: a cohort, checked on its own (:meth:`_Converter._cohort`)."""
    return isinstance(node, exp.Subquery) and isinstance(node.parent, exp.In) and node.arg_key == "query"


def _reject_unsupported(select: exp.Select, cohort: bool = False) -> None:
    for node in select.walk(prune=lambda n: _is_cohort(n) and not cohort):
        if _is_cohort(node):
            if cohort:
                raise InvalidQuery(f"a cohort's conditions cannot hold another cohort; {SUPPORTED}")
            inner = node.this
            if not isinstance(inner, exp.Select) or any(inner.args.get(k) for k in ("group",)):
                raise InvalidQuery(f"a cohort is SELECT <patient id> FROM <dataset> [WHERE ...]; {SUPPORTED}")
            _reject_unsupported(inner, cohort=True)
            continue
        if node.comments:
            raise InvalidQuery(f"SQL comments are not allowed; {SUPPORTED}")
        for kind in _FORBIDDEN:
            if isinstance(node, kind):
                raise InvalidQuery(f"{kind.__name__.upper()} is not supported; {SUPPORTED}")
        if isinstance(node, exp.Select) and node is not select:
            raise InvalidQuery(f"subqueries are not supported (except a cohort: <patient id> IN (SELECT ...)); "
                               f"{SUPPORTED}")
    if select.args.get("joins"):
        raise InvalidQuery(f"joins are not supported; {SUPPORTED}")
    extra = sorted(k for k, v in select.args.items() if v and k not in _SELECT_PARTS)
    if extra:
        raise InvalidQuery(f"{extra[0].upper()} is not supported; {SUPPORTED}")
    source = select.args.get("from_") or select.args.get("from")
    table = source.this if source is not None else None
    if isinstance(table, exp.Table):
        modifiers = sorted(k for k, v in table.args.items() if v and k != "this")
        if modifiers:
            raise InvalidQuery(f"table modifiers ({', '.join(modifiers)}) are not supported; {SUPPORTED}")


class _Converter:
    def __init__(self, params: Mapping[str, ParamValue]) -> None:
        self.params = params
        self.used: set[str] = set()

    def convert(self, select: exp.Select) -> Query:
        dataset = self._dataset(select)
        group_by = tuple(self._column(e) for e in (select.args.get("group") or exp.Group()).expressions)
        aggregates, names, shown = [], [], []
        for selected in select.expressions:
            item = selected.this if isinstance(selected, exp.Alias) else selected
            if isinstance(item, exp.Column):
                name = self._column(item)
                if name not in group_by:
                    raise InvalidQuery(f"column {item.sql()!r} in SELECT must be in GROUP BY; {SUPPORTED}")
            else:
                aggregates.append(self._aggregate(item))
                name = aggregates[-1].label
            alias = str(selected.alias) if isinstance(selected, exp.Alias) else ""
            if alias and alias != name:
                names.append((name, alias))
            shown.append(alias or name)
        shown += [c for c in group_by if c not in {n for n, _ in names} | set(shown)]
        aliases = {alias for _, alias in names}  # a repeat without aliases is check_query's to refuse
        twice = sorted({n for n in shown if shown.count(n) > 1 and n in aliases})
        if twice:
            raise InvalidQuery(f"the output name {twice[0]!r} is used twice; give each column its own AS name")
        where = select.args.get("where")
        filters = self._filters(where.this) if where is not None else []
        unused = set(self.params) - self.used
        if unused:
            raise InvalidQuery(f"parameters not used by the query: {', '.join(sorted(unused))}")
        return Query(dataset, tuple(aggregates), group_by, tuple(filters), tuple(names))

    def _dataset(self, select: exp.Select) -> str:
        source = select.args.get("from_") or select.args.get("from")
        table = source.this if source is not None else None
        if not isinstance(table, exp.Table) or table.args.get("db") or table.args.get("catalog"):
            raise InvalidQuery(f"FROM must name one dataset; {SUPPORTED}")
        if not isinstance(table.this, exp.Identifier):
            raise InvalidQuery(f"FROM must name one dataset, not a function; {SUPPORTED}")
        return str(table.name)

    def _column(self, node: exp.Expression) -> str:
        if not isinstance(node, exp.Column) or node.table or not isinstance(node.this, exp.Identifier):
            raise InvalidQuery(f"expected a plain column name, got {node.sql()!r}; {SUPPORTED}")
        return str(node.name)

    def _aggregate(self, node: exp.Expression) -> Aggregate:
        if isinstance(node, exp.Count):
            arg = node.this
            if isinstance(arg, exp.Star) or (isinstance(arg, exp.Literal) and arg.this == "1"):
                return Aggregate("count")
            raise InvalidQuery(f"only count(*) is supported, got {node.sql()!r}; {SUPPORTED}")
        if isinstance(node, exp.Anonymous):
            name, args = str(node.this).lower(), list(node.expressions)
        elif isinstance(node, exp.AggFunc):
            # the arguments in order: sqlglot names some (a quantile's level is "quantile" or "expression")
            args = [a for key, a in node.args.items() if key != "expressions" and isinstance(a, exp.Expression)]
            name, args = node.sql_name().lower(), [*args, *node.expressions]
        else:
            raise InvalidQuery(f"unsupported select item {node.sql()!r}; {SUPPORTED}")
        kind = BY_SQL_NAME.get(name)
        if kind is None:
            raise InvalidQuery(f"unsupported select item {node.sql()!r}; {SUPPORTED}")
        given = len(args) - len(kind.parameters)  # the columns, then the kind's parameters
        if given < 1 or not kind.takes(given):
            columns = f"{kind.columns} to {kind.max_columns}" if kind.max_columns else str(kind.columns)
            takes = f" and {', '.join(kind.parameters)}" if kind.parameters else ""
            raise InvalidQuery(f"unsupported select item {node.sql()!r}: {kind.name} takes {columns} "
                               f"column(s){takes}, e.g. {kind.example}; {SUPPORTED}")
        columns_given = [self._column(a) for a in args[:given]]
        params = tuple((p, self._parameter(kind.name, p, a)) for p, a in zip(kind.parameters, args[given:],
                                                                                 strict=True))
        return Aggregate(kind.name, columns_given[0], tuple(columns_given[1:]), params)

    def _parameter(self, kind: str, name: str, node: exp.Expression) -> Scalar:
        """A kind's parameter: a number written in the query (or a template's :parameter), never a column."""
        if isinstance(node, exp.Literal | exp.Neg | exp.Placeholder):
            value = self._scalar(node)
            if isinstance(value, int | float):
                return value
        raise InvalidQuery(f"the {name} of {kind} must be a number written in the query (e.g. 0.9), "
                           f"got {node.sql()!r}; {SUPPORTED}")

    def _filters(self, node: exp.Expression) -> list[Filter]:
        if isinstance(node, exp.Paren):
            return self._filters(node.this)
        if isinstance(node, exp.And):
            return self._filters(node.this) + self._filters(node.expression)
        if isinstance(node, exp.Or):
            raise InvalidQuery(f"OR is not supported (use IN for alternatives); {SUPPORTED}")
        if isinstance(node, exp.Not) and isinstance(node.this, exp.In):
            return [self._in(node.this, "not in")]
        if isinstance(node, exp.In):
            return [self._in(node, "in")]
        if isinstance(node, exp.Between):
            return [Filter(self._column(node.this), "between",
                           (self._scalar(node.args["low"]), self._scalar(node.args["high"])))]
        op = _COMPARISONS.get(type(node))
        if op is None:
            raise InvalidQuery(f"unsupported condition {node.sql()!r}; {SUPPORTED}")
        left, right = node.this, node.expression
        if isinstance(right, exp.Column) and not isinstance(left, exp.Column):
            left, right, op = right, left, _FLIPPED[op]
        return [Filter(self._column(left), op, (self._scalar(right),))]

    def _in(self, node: exp.In, op: str) -> Filter:
        if node.args.get("query") is not None:
            return Filter(self._column(node.this), op, (), self._cohort(node.args["query"].this))
        field = node.args.get("field")
        if field is not None and not isinstance(field, exp.Placeholder):
            raise InvalidQuery(f"IN needs a parenthesised list of values or a :list parameter; {SUPPORTED}")
        if field is None and not node.expressions:
            raise InvalidQuery(f"IN needs at least one value; {SUPPORTED}")
        if isinstance(field, exp.Placeholder):
            values = self._param(field)
            values = values if isinstance(values, tuple) else (values,)
        else:
            values = tuple(self._scalar(v) for v in node.expressions)
        return Filter(self._column(node.this), op, values)

    def _cohort(self, select: exp.Select) -> Cohort:
        """``SELECT <patient id> FROM <dataset> [WHERE ...]``: the unit is checked against the policy later."""
        if len(select.expressions) != 1 or not isinstance(select.expressions[0], exp.Column):
            raise InvalidQuery(f"a cohort selects one column, the patient id: SELECT <patient id> FROM <dataset>; "
                               f"{SUPPORTED}")
        selected = self._column(select.expressions[0])
        where = select.args.get("where")
        cohort = Cohort(self._dataset(select), tuple(self._filters(where.this)) if where is not None else ())
        return Cohort(cohort.dataset, cohort.filters, selected)

    def _scalar(self, node: exp.Expression) -> Scalar:
        if isinstance(node, exp.Placeholder):
            value = self._param(node)
            if isinstance(value, tuple):
                raise InvalidQuery(f"parameter {node.name!r} is a list; use it with IN")
            return value
        if isinstance(node, exp.Neg) and isinstance(node.this, exp.Literal) and not node.this.is_string:
            return -_number(node.this.this)
        if isinstance(node, exp.Literal):
            return str(node.this) if node.is_string else _number(node.this)
        raise InvalidQuery(f"expected a literal value or :parameter, got {node.sql()!r}; {SUPPORTED}")

    def _param(self, node: exp.Placeholder) -> ParamValue:
        name = str(node.name)
        if name not in self.params:
            raise InvalidQuery(f"missing value for parameter :{name}")
        self.used.add(name)
        return self.params[name]


def _number(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise InvalidQuery(f"not a number: {text!r}") from None
