"""Pictures of released answers, as PNG files: survival curves and histograms.

Survival curves with their bands and numbers at risk; histograms with the noise's interval on
each bin.

matplotlib is an optional extra (``pip install 'gateway[plot]'``), imported only when a picture is
drawn. Figures are drawn on their own canvas (no pyplot), so drawing changes no global state of the
caller's session.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import polars as pl

TICKS = 7  # at most this many times in the numbers-at-risk table


class PlotUnavailable(ImportError):
    """matplotlib is not installed."""


def _figure(width: float, height: float) -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise PlotUnavailable("plots need matplotlib: pip install 'gateway[plot]' (or uv add matplotlib)") from err
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def survival_plot(frame: pl.DataFrame, medians: pl.DataFrame, group_by: Sequence[str], start: float, path: Path,
                  title: str, time: str = "time") -> Path:
    """Write the Kaplan-Meier curves of ``frame`` (see ``SurvivalResult.frame``) to ``path`` as PNG.

    One step curve per group from 1 at ``start`` (the grid's first time), its 95% band shaded,
    median survival in the legend, and below the axes the numbers at risk at a few grid times.
    Groups whose values are withheld are left out.
    """
    groups = _groups(frame, group_by)
    figure = _figure(8.0, 5.0 + 0.25 * len(groups))
    grid = figure.add_gridspec(2, 1, height_ratios=[5, 0.6 + 0.3 * len(groups)])
    axes, table = figure.add_subplot(grid[0]), figure.add_subplot(grid[1])
    times = frame["time"].unique(maintain_order=True).to_list()
    ticks = _ticks(times)
    rows = []
    for label, curve in groups:
        if curve["survival"].null_count() == curve.height:
            continue
        x = [start, *curve["time"].to_list()]
        line = axes.step(x, [1.0, *_filled(curve["survival"])], where="post",
                         label=f"{label}: median {_median(medians, group_by, label)}")[0]
        axes.fill_between(x, [1.0, *_filled(curve["ci_low"])], [1.0, *_filled(curve["ci_high"])], step="post",
                          alpha=0.2, color=line.get_color(), linewidth=0)
        rows.append((label, line.get_color(), [_at_risk(curve, tick) for tick in ticks]))
    axes.set(ylim=(0, 1.02), xlim=(start, times[-1]), xlabel=time, ylabel="survival", title=title, xticks=ticks)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower left", fontsize="small", title="95% bands shaded")
    _table(table, ticks, rows, (start, times[-1]))
    figure.savefig(path, dpi=120)
    return path


def histogram_plot(frame: pl.DataFrame, group_by: Sequence[str], path: Path, title: str,
                   column: str = "value") -> Path:
    """Write the histograms of ``frame`` (see ``HistogramResult.frame``) to ``path`` as PNG.

    One panel per group (withheld groups left out): a bar per bin, from ``bin_low`` to ``bin_high``,
    with the noise's 95% interval as an error bar.
    """
    groups = [(label, part) for label, part in _groups(frame, group_by) if part["count"].null_count() < part.height]
    figure = _figure(8.0, 1.0 + 2.4 * max(1, len(groups)))
    for i, (label, bins) in enumerate(groups):
        axes = figure.add_subplot(len(groups), 1, i + 1)
        low, high = bins["bin_low"].to_list(), bins["bin_high"].to_list()
        counts = _filled(bins["count"])
        below = [c - (lo if lo is not None else c) for c, lo in zip(counts, bins["ci_low"].to_list(), strict=True)]
        above = [(hi if hi is not None else c) - c for c, hi in zip(counts, bins["ci_high"].to_list(), strict=True)]
        axes.bar(low, counts, width=[b - a for a, b in zip(low, high, strict=True)], align="edge", alpha=0.7,
                 yerr=[below, above], ecolor="black", error_kw={"elinewidth": 0.6, "capsize": 0})
        axes.set(ylabel="rows (noisy)", title=label if group_by else title)
        axes.grid(alpha=0.3)
    if groups:
        figure.axes[-1].set_xlabel(f"{column} (bars: 95% noise intervals)")
        if group_by:
            figure.suptitle(title)
    figure.savefig(path, dpi=120)
    return path


def _groups(frame: pl.DataFrame, group_by: Sequence[str]) -> list[tuple[str, pl.DataFrame]]:
    if not group_by:
        return [("all", frame)]
    return [(", ".join(str(k) for k in keys), part)
            for keys, part in frame.group_by(list(group_by), maintain_order=True)]


def _filled(series: pl.Series) -> list[float]:
    return [math.nan if v is None else float(v) for v in series.to_list()]


def _median(medians: pl.DataFrame, group_by: Sequence[str], label: str) -> str:
    for row in medians.iter_rows(named=True):
        if not group_by or ", ".join(str(row[c]) for c in group_by) == label:
            if row["median"] is None:
                return "not reached"
            low = "-" if row["ci_low"] is None else f"{row['ci_low']:g}"
            high = "not reached" if row["ci_high"] is None else f"{row['ci_high']:g}"
            return f"{row['median']:g} [{low}, {high}]"
    return "?"


def _ticks(times: list[float]) -> list[float]:
    """About :data:`TICKS` grid times from the first to the last, evenly spaced."""
    step = max(1, math.ceil((len(times) - 1) / (TICKS - 1)))
    return times[::step]


def _at_risk(curve: pl.DataFrame, tick: float) -> str:
    """The noisy number at risk at ``tick`` (a grid time): the frame's for that time."""
    later = curve.filter(pl.col("time") >= tick)
    if later.is_empty() or later["at_risk"][0] is None:
        return ""
    return f"{later['at_risk'][0]:.0f}"


def _table(axes: Any, ticks: list[float], rows: list[tuple[str, str, list[str]]], span: tuple[float, float]) -> None:
    """The numbers at risk under the curves: one row per group, labelled like its curve."""
    axes.set(xlim=span, ylim=(-0.5, len(rows) - 0.5), xticks=[], title="number at risk (noisy)")
    axes.title.set_fontsize("small")
    axes.set_yticks(range(len(rows)), [label for label, _, _ in reversed(rows)], fontsize="small")
    for tick_label, (_, color, _) in zip(axes.get_yticklabels(), reversed(rows), strict=True):
        tick_label.set_color(color)
    axes.tick_params(left=False, pad=24)  # room for the first column of numbers, centred on t0
    for spine in axes.spines.values():
        spine.set_visible(False)
    for y, (_, _, counts) in enumerate(reversed(rows)):
        for tick, count in zip(ticks, counts, strict=True):
            axes.text(tick, y, count, ha="center", va="center", fontsize="small")
