"""Answers over declared bins as frames: histograms, and quantiles derived from one histogram.

Shared by :mod:`gateway.client` and :mod:`gateway.aio` (re-exported from :mod:`gateway.results`'s
neighbours through :mod:`gateway.client`); imports no server library. Quantiles are computed here,
from the released (for a broker: pooled) histogram counts, by :mod:`gateway.quantiles`: any number
of them cost the one histogram's epsilon.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import polars as pl

from ._proto.gateway.v1 import gateway_pb2 as pb
from ._wire import parts_from_wire
from .quantiles import quantiles_of
from .results import QueryResult

MAX_QUANTILES = 99


def check_levels(qs: Sequence[float]) -> tuple[float, ...]:
    """The levels asked for, or ValueError before any call (nothing is charged)."""
    levels = tuple(qs)
    if not 1 <= len(levels) <= MAX_QUANTILES:
        raise ValueError(f"give 1 to {MAX_QUANTILES} quantile levels, got {len(levels)}")
    for q in levels:
        if isinstance(q, bool) or not isinstance(q, int | float) or not 0 < q < 1:
            raise ValueError(f"each quantile level must be a number strictly between 0 and 1, got {q!r}")
    return levels


class HistogramResult(QueryResult):
    """A histogram answer: per group, the noisy rows in each of the policy's bins.

    :attr:`frame` (also :meth:`to_polars`) has the group columns, then ``bin_low``, ``bin_high``,
    ``count`` (the noisy count, clipped at 0) and the noise's 95% interval ``ci_low``/``ci_high``.
    :meth:`quantiles` derives quantiles from it at no further cost. A suppressed group's values
    are None.
    """

    def __init__(self, response: pb.QueryResponse, column: str = "value") -> None:
        super().__init__(response)
        self.column = column

    @property
    def frame(self) -> pl.DataFrame:
        """One row per group and bin (see the class docstring)."""
        return self._bins()

    def _bins(self) -> pl.DataFrame:
        records = []
        for row in self.response.rows:
            keys, e = self._keys(row), row.estimates[0]
            edges = list(e.edges)
            bins = len(edges) - 1
            nothing: list[float | None] = [None] * bins
            values = [[_finite(v) for v in vector] if len(vector) == bins else nothing
                      for vector in (e.values, e.ci_lows, e.ci_highs)]
            records += [{**keys, "bin_low": edges[i], "bin_high": edges[i + 1], "count": values[0][i],
                         "ci_low": values[1][i], "ci_high": values[2][i]} for i in range(bins)]
        schema = self._key_schema() | dict.fromkeys(("bin_low", "bin_high", "count", "ci_low", "ci_high"),
                                                    pl.Float64)
        return pl.DataFrame(records, schema=schema, strict=False)  # mixed keys become text

    def quantiles(self, qs: Sequence[float] = (0.25, 0.5, 0.75)) -> pl.DataFrame:
        """Per group and level q: ``q``, ``value`` and its 95% interval (sampling and noise), from the counts.

        Post-processing of the released counts: it costs nothing. None where the group is
        suppressed or the answer is a dry run.
        """
        levels = check_levels(qs)
        records = []
        for row in self.response.rows:
            keys, e = self._keys(row), row.estimates[0]
            counts = parts_from_wire(e).get("counts")
            if counts is None or e.suppressed or self.response.dry_run or len(counts.values) != len(e.edges) - 1:
                records += [{**keys, "q": q, "value": None, "ci_low": None, "ci_high": None} for q in levels]
                continue
            found = quantiles_of(tuple(e.edges), counts.values, counts.std_error ** 2, levels)
            records += [{**keys, "q": f.q, "value": f.value, "ci_low": f.ci_low, "ci_high": f.ci_high}
                        for f in found]
        schema = self._key_schema() | dict.fromkeys(("q", "value", "ci_low", "ci_high"), pl.Float64)
        return pl.DataFrame(records, schema=schema, strict=False)

    def to_polars(self) -> pl.DataFrame:
        """:attr:`frame`."""
        return self.frame

    def plot(self, path: str | Path, title: str | None = None) -> Path:
        """Write the histogram as a PNG (bars per bin with the noise's 95% interval, one panel per group).

        Needs matplotlib: ``pip install 'gateway[plot]'``.
        """
        from .plot import histogram_plot

        if not self.response.rows or not self.response.rows[0].estimates[0].edges:
            raise ValueError("this answer holds no histogram to plot (a dry run?)")
        head = self.response.rows[0].estimates[0]
        return histogram_plot(self._bins(), self.group_by, Path(path), title or head.aggregate, self.column)


class QuantilesResult(HistogramResult):
    """Quantiles of one noisy histogram, all its levels for one epsilon.

    :attr:`frame` has the group columns, ``q``, ``value``, ``ci_low`` and ``ci_high``;
    :attr:`histogram` the bins they come from.
    """

    def __init__(self, response: pb.QueryResponse, column: str = "value", qs: Sequence[float] = (0.5,)) -> None:
        super().__init__(response, column)
        self.qs = check_levels(qs)

    @property
    def histogram(self) -> pl.DataFrame:
        """The bins the quantiles come from (see :class:`HistogramResult`)."""
        return self._bins()

    @property
    def frame(self) -> pl.DataFrame:
        """One row per group and level (see the class docstring)."""
        return self.quantiles(self.qs)


class SiteQuantilesResult(QueryResult):
    """Quantiles one site selected by OpenDP's quantile mechanism (``method="exponential"``).

    :attr:`frame` has the group columns, ``q``, ``value`` (the declared bin edge the exponential
    mechanism selected), ``ci_low`` and ``ci_high`` (always empty: the mechanism gives no interval
    on the value, and none is made up from the data) and ``rank_error_95``: with 95% probability the
    value's rank misses the target rank q x rows by at most that many rows more than the best of the
    edges does (public: it depends on epsilon, the rows per patient, q and the number of edges).
    """

    def __init__(self, response: pb.QueryResponse, column: str = "value", qs: Sequence[float] = (0.5,)) -> None:
        super().__init__(response)
        self.column = column
        self.qs = check_levels(qs)

    @property
    def frame(self) -> pl.DataFrame:
        """One row per group and level (see the class docstring)."""
        records = []
        for row in self.response.rows:
            keys = self._keys(row)
            found = {e.level: e for e in row.estimates}
            for q in self.qs:
                e = found.get(q)
                value = None if e is None or e.suppressed or self.response.dry_run else _finite(e.value)
                rank = e.rank_error_95 if e is not None and e.rank_error_95 > 0 else None
                records.append({**keys, "q": q, "value": value, "ci_low": None, "ci_high": None,
                                "rank_error_95": rank})
        schema = self._key_schema() | dict.fromkeys(("q", "value", "ci_low", "ci_high", "rank_error_95"), pl.Float64)
        return pl.DataFrame(records, schema=schema, strict=False)

    def to_polars(self) -> pl.DataFrame:
        """:attr:`frame`."""
        return self.frame


def _finite(value: float) -> Any:
    return value if math.isfinite(value) else None
