"""What the client hands a researcher for a regression: coefficients as a frame, n and R^2.

Shared by :mod:`gateway.client` and :mod:`gateway.aio`; imports no server library and no numpy
(the fit arrives in the answer: the site or broker computed it).
"""

from __future__ import annotations

import math

import polars as pl

from ._wire import parts_from_wire
from .results import QueryResult, _finite


class RegressionResult(QueryResult):
    """A regression answer: per group, the coefficients of a least-squares fit, pooled over sites.

    :attr:`frame` (also :meth:`to_polars`) has the group columns, then ``term`` (``(intercept)``,
    then each feature), ``estimate``, ``std_error`` (the sampling variance and the noise's) and the
    95% interval ``ci_low``/``ci_high``. :attr:`summary` has the group columns, ``n`` (the noisy
    number of rows with every variable present) and ``r_squared``. A withheld group's values, and
    a dry run's, are None.
    """

    @property
    def terms(self) -> list[str]:
        """The coefficients' names: ``(intercept)``, then each feature (from the aggregate's label)."""
        label = self.response.aggregates[0] if self.response.aggregates else "regression(y)"
        _y, *features = label[label.index("(") + 1:label.rindex(")")].split(", ")
        return ["(intercept)", *features]

    @property
    def frame(self) -> pl.DataFrame:
        """One row per group and term (see the class docstring)."""
        terms, records = self.terms, []
        for row in self.response.rows:
            keys, e = self._keys(row), row.estimates[0]
            vectors = [[_finite(v) for v in vector] if len(vector) == len(terms) else [None] * len(terms)
                       for vector in (e.values, e.std_errors, e.ci_lows, e.ci_highs)]
            records += [{**keys, "term": term, "estimate": vectors[0][i], "std_error": vectors[1][i],
                         "ci_low": vectors[2][i], "ci_high": vectors[3][i]} for i, term in enumerate(terms)]
        schema = self._key_schema() | {"term": pl.Utf8} | dict.fromkeys(
            ("estimate", "std_error", "ci_low", "ci_high"), pl.Float64)
        return pl.DataFrame(records, schema=schema, strict=False)  # mixed keys become text

    @property
    def summary(self) -> pl.DataFrame:
        """Per group: ``n`` (noisy rows with every variable present) and ``r_squared``."""
        records = []
        for row in self.response.rows:
            e = row.estimates[0]
            products = parts_from_wire(e).get("products")
            n = products.values[0] if products is not None and products.values and not e.suppressed else math.nan
            records.append({**self._keys(row), "n": _finite(n), "r_squared": _finite(e.value)})
        schema = self._key_schema() | {"n": pl.Float64, "r_squared": pl.Float64}
        return pl.DataFrame(records, schema=schema, strict=False)

    @property
    def n(self) -> float | None:
        """The noisy number of rows the fit used (the first group's, when grouped)."""
        return self.summary["n"][0] if self.response.rows else None

    @property
    def r_squared(self) -> float | None:
        """R^2 of the fit (the first group's, when grouped)."""
        return self.summary["r_squared"][0] if self.response.rows else None

    def to_polars(self) -> pl.DataFrame:
        """The coefficients: :attr:`frame`."""
        return self.frame
