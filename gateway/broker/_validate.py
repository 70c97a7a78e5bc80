"""What the broker checks in the sites' answers before it pools them.

Pooling (:mod:`.pooling`) trusts what it is given: the first answer's dataset, groups and
aggregates, each estimate's kind, the released components it adds, their standard errors. A
faulty or compromised site could make it fail (an estimate short of a component, a kind it does
not know) or make every pooled value NaN, infinite or absurd. So each answer is held here against
what was asked, against the other answers and against what any site can compute; an answer that
fails is not pooled, and its site is listed as missing with reason ``invalid_answer`` and what
was wrong. Pure functions of the messages, like pooling.

A site that lies plausibly (a well-formed answer with wrong but finite numbers) cannot be told
from an honest one here; its own answer is labelled with its name in ``site_answers``.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from .._proto.gateway.v1 import gateway_pb2 as pb
from .._wire import from_structured
from ..aggregates import KINDS, Kind
from ..errors import GatewayError, InvalidAnswer
from ..query import MAX_AGGREGATES, MAX_CELLS

# Larger than any number a site releases (exact components stay below 2^62, see _engine, and
# policy bounds below 2^31), and small enough that pooling's sums and squares stay finite.
MAX_MAGNITUDE = 2.0**64


@dataclass(frozen=True)
class Shape:
    """What an answer is about: its dataset, group-by columns, aggregates and their kinds."""

    dataset: str
    group_by: tuple[str, ...]
    aggregates: tuple[str, ...]
    kinds: tuple[str, ...]

    def differs(self, other: Shape) -> str | None:
        """How ``other`` (an answer's shape) differs from this one (the expected), or None."""
        if other.dataset != self.dataset:
            return f"it answers about dataset {other.dataset!r}, not {self.dataset!r}"
        if other.group_by != self.group_by:
            return f"its groups are by {list(other.group_by)}, not {list(self.group_by)}"
        if other.aggregates != self.aggregates:
            return f"its aggregates are {list(other.aggregates)}, not {list(self.aggregates)}"
        if other.kinds != self.kinds:
            return f"its aggregate kinds are {list(other.kinds)}, not {list(self.kinds)}"
        return None


def invalid_answers(answers: Sequence[tuple[str, pb.QueryResponse]], request: pb.QueryRequest) -> dict[str, str]:
    """Why each answer that must not be pooled fails, by site; the answers not named may be pooled.

    Each answer must be well formed (:func:`check_answer`) and of the shape the request fixes; for
    a template call, whose shape only the sites know, of the shape most answers have (a tie: the
    first site's in the broker's configuration).
    """
    problems: dict[str, str] = {}
    shapes: dict[str, Shape] = {}
    for site, response in answers:
        try:
            check_answer(response, request.dry_run)
        except InvalidAnswer as err:
            problems[site] = err.message
        else:
            shapes[site] = shape_of(response)
    expected = requested_shape(request)
    if expected is None and shapes:
        expected = Counter(shapes.values()).most_common(1)[0][0]
    for site, shape in shapes.items():
        differs = expected.differs(shape) if expected is not None else None
        if differs is not None:
            problems[site] = differs
    return problems


def requested_shape(request: pb.QueryRequest) -> Shape | None:
    """The shape of the answers a structured request asks for (None for a template call)."""
    if request.WhichOneof("body") != "structured":
        return None
    try:
        query = from_structured(request.structured)
    except GatewayError:  # the sites refuse it: there is no answer to check
        return None
    return Shape(query.dataset, query.group_by, tuple(a.label for a in query.aggregates),
                 tuple(a.function for a in query.aggregates))


def shape_of(response: pb.QueryResponse) -> Shape:
    """An answer's shape (its first row's kinds: :func:`check_answer` checks that every row has them)."""
    kinds = tuple(e.function for e in response.rows[0].estimates) if response.rows else ()
    return Shape(response.dataset, tuple(response.group_by), tuple(response.aggregates), kinds)


def check_answer(response: pb.QueryResponse, dry_run: bool) -> None:
    """Raise :class:`InvalidAnswer`, saying what is wrong, unless one site's answer is fit for pooling."""
    if response.dry_run != dry_run:
        raise InvalidAnswer("it answers a dry run" if response.dry_run else "it is not the dry run asked for")
    if not 1 <= len(response.aggregates) <= MAX_AGGREGATES:
        raise InvalidAnswer(f"it has {len(response.aggregates)} aggregates (1 to {MAX_AGGREGATES} are possible)")
    rows = len(response.rows)
    if (not response.group_by and rows != 1) or not 1 <= rows <= MAX_CELLS:
        raise InvalidAnswer(f"it has {rows} rows for {len(response.group_by)} group-by columns "
                            f"(at most {MAX_CELLS} groups)")
    _number("its epsilon_charged", response.epsilon_charged, nonnegative=True)
    _number("its budget_remaining", response.budget_remaining)
    kinds = [e.function for e in response.rows[0].estimates]
    seen: set[tuple[bytes, ...]] = set()
    for number, row in enumerate(response.rows, start=1):
        try:
            _check_row(row, response, kinds, seen, dry_run)
        except InvalidAnswer as err:
            raise InvalidAnswer(f"row {number}: {err.message}") from None


def _check_row(row: pb.ResultRow, response: pb.QueryResponse, kinds: list[str], seen: set[tuple[bytes, ...]],
               dry_run: bool) -> None:
    if [k.column for k in row.keys] != list(response.group_by):
        raise InvalidAnswer(f"its keys are for {[k.column for k in row.keys]}, not {list(response.group_by)}")
    if any(k.value.WhichOneof("kind") is None for k in row.keys):
        raise InvalidAnswer("a group key has no value")
    key = tuple(k.SerializeToString(deterministic=True) for k in row.keys)
    if key in seen:
        raise InvalidAnswer("its group appears twice")
    seen.add(key)
    if [e.aggregate for e in row.estimates] != list(response.aggregates):
        raise InvalidAnswer(f"its estimates are {[e.aggregate for e in row.estimates]}, "
                            f"not {list(response.aggregates)}")
    if [e.function for e in row.estimates] != kinds:
        raise InvalidAnswer("its aggregate kinds differ from the first row's")
    for estimate in row.estimates:
        try:
            _check_estimate(estimate, dry_run)
        except InvalidAnswer as err:
            raise InvalidAnswer(f"{estimate.aggregate}: {err.message}") from None


def _check_estimate(e: pb.Estimate, dry_run: bool) -> None:
    kind = KINDS.get(e.function)
    if kind is None:
        raise InvalidAnswer(f"unknown aggregate kind {e.function!r}")
    _number("its epsilon", e.epsilon, nonnegative=True)
    if kind.columns and not e.has_bounds:
        raise InvalidAnswer("its column bounds are missing")
    if e.has_bounds and not (_finite(e.lower) and _finite(e.upper) and e.lower <= e.upper):
        raise InvalidAnswer(f"its column bounds are [{e.lower!r}, {e.upper!r}]")
    # the site's own estimate is shown as it is: unknown (NaN) is possible, infinite or absurd is not
    for name in ("value", "ci_low", "ci_high"):
        _number(f"its {name}", getattr(e, name), unknown=True)
    for name in ("std_error", "ci_half_width"):
        _number(f"its {name}", getattr(e, name), nonnegative=True, unknown=True)
    if not 0 <= e.level < 1:  # a quantile's level q, post-processing the broker repeats (0: no quantile)
        raise InvalidAnswer(f"its quantile level is {e.level!r}, not in [0, 1)")
    names, wanted = sorted(c.name for c in e.components), sorted(spec.name for spec in kind.components)
    if dry_run and not names:
        return  # a dry run's components (their noise, no values) are optional
    if names != wanted:
        raise InvalidAnswer(f"it releases components {names}, not {wanted}")
    _check_edges(e)
    arity = _check_column_bounds(e, kind)
    specs = {spec.name: spec for spec in kind.components}
    for c in e.components:
        # a scalar, or a vector over the estimate's grid (survival's events and censorings: 2 x edges,
        # a histogram's counts: edges - 1), or a regression's statistics over its columns
        shape = list(specs[c.name].shape_over(len(e.edges), arity))
        if list(c.shape) != shape:
            raise InvalidAnswer(f"component {c.name} has the shape {list(c.shape)}, not {shape}")
        expected = math.prod(c.shape) if c.shape else 1
        if not 1 <= expected <= MAX_VECTOR or len(c.values) != expected:
            raise InvalidAnswer(f"component {c.name} has {len(c.values)} values for its shape {list(c.shape)}")
        for value in c.values:
            _number(f"component {c.name}", value, unknown=dry_run)  # a dry run has only the noise
        _number(f"component {c.name}'s std_error", c.std_error, nonnegative=True)
        _number(f"component {c.name}'s ci_half_width", c.ci_half_width, nonnegative=True)
        _number(f"component {c.name}'s noise_scale", c.noise_scale, nonnegative=True, unknown=True)
        _number(f"component {c.name}'s lattice", c.lattice, nonnegative=True)
    _check_vector(e)


def _check_edges(e: pb.Estimate) -> None:
    """A grid (survival's times): finite, strictly increasing, and of a size a policy can declare."""
    if len(e.edges) > MAX_VECTOR // 2 or any(not _finite(x) for x in e.edges) or any(
            b <= a for a, b in zip(e.edges, e.edges[1:], strict=False)):
        raise InvalidAnswer(f"its grid ({len(e.edges)} edges) is not finite and strictly increasing")


def _check_column_bounds(e: pb.Estimate, kind: Kind) -> int:
    """Each column's bounds (a regression's): as many pairs as the kind can take, each finite and ordered.

    Returns the number of columns they are for (1 for a kind without them).
    """
    flat = list(e.column_bounds)
    if not kind.bounds_of_every_column:
        if flat:
            raise InvalidAnswer(f"it carries column bounds, which {kind.name} does not have")
        return 1
    pairs = len(flat) // 2
    if len(flat) % 2 or not kind.takes(pairs):
        raise InvalidAnswer(f"its column bounds hold {len(flat)} numbers, not two for each of its columns")
    for low, high in zip(flat[0::2], flat[1::2], strict=True):
        if not (_finite(low) and _finite(high) and low < high):
            raise InvalidAnswer(f"its column bounds include [{low!r}, {high!r}]")
    return pairs


def _check_vector(e: pb.Estimate) -> None:
    """A vector estimate's values, standard errors and intervals: as many as its shape says, each a number."""
    values = math.prod(e.shape) if e.shape else 0
    for name in ("values", "std_errors", "ci_lows", "ci_highs"):
        items = getattr(e, name)
        if len(items) not in (0, values) or len(items) > MAX_VECTOR:
            raise InvalidAnswer(f"its {name} hold {len(items)} numbers for its shape {list(e.shape)}")
        for value in items:
            _number(f"one of its {name}", value, nonnegative=name == "std_errors", unknown=True)


MAX_VECTOR = 4096  # a vector estimate's values: a grid of at most 1000 bins, two vectors of it, with room


def _number(what: str, value: float, nonnegative: bool = False, unknown: bool = False) -> None:
    """Refuse a number no site releases: infinite, absurdly large, negative where it cannot be, or NaN.

    ``unknown`` allows NaN (a value the site withheld or does not know).
    """
    if not ((unknown and math.isnan(value)) or _finite(value, nonnegative)):
        raise InvalidAnswer(f"{what} is {value!r}")


def _finite(value: float, nonnegative: bool = False) -> bool:
    return math.isfinite(value) and abs(value) <= MAX_MAGNITUDE and (value >= 0 or not nonnegative)
