"""Burn-down charts drawn on the server: an inline SVG of what remains of a budget over its window.

The chart is a picture of the table next to it (every charge, what it cost, what remained), which
stays the accessible form of the same numbers; no script draws anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from fractions import Fraction

from ._readers import BudgetRow, utc

WIDTH, HEIGHT = 560, 180
LEFT, RIGHT, TOP, BOTTOM = 52, 12, 12, 28
MAX_STEPS = 400  # a long window's charges are drawn at most this finely (the table keeps every one)


@dataclass(frozen=True)
class Step:
    """One charge: when, how much, and what remained after it."""

    at: str
    charged: float
    remaining: float


@dataclass(frozen=True)
class Chart:
    """What the template draws: the remaining-budget line, its axes' ticks and the charges as rows."""

    width: int
    height: int
    path: str  # the SVG path of the remaining budget, a step down at each charge
    y_ticks: tuple[tuple[float, str], ...]  # (y, label)
    x_ticks: tuple[tuple[float, str], ...]  # (x, label)
    steps: tuple[Step, ...]
    summary: str


def burn_down(row: BudgetRow, now: float) -> Chart:
    """The chart of ``row``'s window in force, from its start (or first charge, for a lifetime budget) to now."""
    first = row.spending[0][0] if row.spending else now - 86400
    start = float(row.window_start) if row.window_start > 0 else min(first, now - 86400)
    end = max(now, start + 1)
    limit = float(row.limit) or 1.0

    def x(t: float) -> float:
        return LEFT + (WIDTH - LEFT - RIGHT) * (min(max(t, start), end) - start) / (end - start)

    def y(value: float) -> float:
        return TOP + (HEIGHT - TOP - BOTTOM) * (1 - max(0.0, min(value, limit)) / limit)

    steps, spent = [], Fraction(0)
    for at, epsilon in row.spending:
        spent += epsilon
        steps.append((at, float(epsilon), float(max(Fraction(0), row.limit - spent))))
    drawn = steps if len(steps) <= MAX_STEPS else steps[:: len(steps) // MAX_STEPS + 1] + steps[-1:]
    remaining = limit
    parts = [f"M{x(start):.1f},{y(limit):.1f}"]
    for at, _, after in drawn:
        parts.append(f"H{x(at):.1f}V{y(after):.1f}")
        remaining = after
    parts.append(f"H{x(end):.1f}")
    y_ticks = tuple((y(limit * f), f"{limit * f:.3g}") for f in (0.0, 0.5, 1.0))
    x_ticks = tuple((x(t), _day(t)) for t in (start, start + (end - start) / 2, end))
    summary = (f"{len(steps)} charge(s) since {utc(start)}: {remaining:.4g} of {limit:.4g} remaining"
               if steps else f"no charge since {utc(start)}: all {limit:.4g} remaining")
    return Chart(WIDTH, HEIGHT, "".join(parts), y_ticks, x_ticks,
                 tuple(Step(utc(at), charged, after) for at, charged, after in steps), summary)


def _day(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M")
