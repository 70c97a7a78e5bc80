"""Pooling the sites' noisy answers: pure functions of released values (no I/O, no OpenDP).

Each estimate's released parts add over the sites (and so do their noise variances), vectors
element by element; the kind's own post-processing, from the table of aggregate kinds, turns the
pooled parts into the estimate (a mean: the ratio of pooled sums and counts with a delta-method
interval; survival: the Kaplan-Meier curve of the pooled counts; a quantile: the quantile of the
pooled histogram, at the level q the sites' answers carry; regression: the least-squares fit of the
pooled ZᵀZ), with intervals from the pooled noise's exact distribution. Vectors over a grid pool
only when every site declares the same grid, a regression's statistics (standardised by each
column's bounds) only when every site declares the same bounds, and means (sums about the bounds'
midpoint) likewise; otherwise the pooled cell is withheld with a note and each site's answer
stands. Dataset descriptions from several sites are merged with a line for every declaration on
which they differ.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

from .._proto.gateway.v1 import gateway_pb2 as pb
from .._wire import bounds_from_wire, column_bounds_from_wire, part_to_wire, parts_from_wire
from ..aggregates import KINDS, Declared, kind_of
from ..answers import Z95


def dataset_differences(by_site: dict[str, pb.Dataset]) -> list[str]:
    """Where the sites' declarations of one dataset differ: columns, roles, bounds, keys, aggregates, costs."""
    described = {site: _describe(ds) for site, ds in by_site.items()}
    aspects = sorted({aspect for d in described.values() for aspect in d})
    lines = []
    for aspect in aspects:
        values = {site: d.get(aspect, "absent") for site, d in described.items()}
        if len(set(values.values())) > 1:
            lines.append(f"{aspect}: " + "; ".join(f"{site} {value}" for site, value in values.items()))
    return lines


def _describe(ds: pb.Dataset) -> dict[str, str]:
    out = {"aggregates": ", ".join(ds.aggregates), "max rows per patient": str(ds.max_rows_per_unit),
           "epsilon per query": f"default {ds.epsilon_default:g}, max {ds.epsilon_max:g}"}
    for col in ds.columns:
        out[f"column {col.name}"] = f"{col.type} ({', '.join(col.roles)})"
        if col.has_bounds:
            out[f"column {col.name} bounds"] = f"[{col.lower:g}, {col.upper:g}]"
        if col.bins:
            out[f"column {col.name} bins"] = _grid(col.bins)
        if col.public_keys:
            keys = [getattr(k, k.WhichOneof("kind") or "string_value") for k in col.public_keys]
            out[f"column {col.name} keys"] = f"{len(keys)} keys ({keys[0]}..{keys[-1]}, #{_digest(keys)})"
    return out


def pool(answered: Sequence[tuple[str, pb.QueryResponse]], served_by: str) -> pb.QueryResponse:
    """Pool the sites' answers, given as (site, response), group by group (each site's own answer is kept)."""
    first = answered[0][1]
    out = pb.QueryResponse(dataset=first.dataset, group_by=first.group_by, aggregates=first.aggregates,
                           canonical_hash=first.canonical_hash, canonical_query=first.canonical_query,
                           served_by=served_by, dry_run=first.dry_run, notes=first.notes)
    out.sites.extend(site for site, _ in answered)
    out.epsilon_charged = max(r.epsilon_charged for _, r in answered)
    out.budget_remaining = min(r.budget_remaining for _, r in answered)
    out.cached = all(r.cached for _, r in answered)
    # the pooled cell is judged by its pooled noisy count against the strictest site's threshold
    out.suppression_min_count = max(r.suppression_min_count for _, r in answered)
    for site, r in answered:
        out.site_answers.add(site=site, rows=[_as_shown(row) for row in r.rows], epsilon_charged=r.epsilon_charged,
                             cached=r.cached, budget_remaining=r.budget_remaining)
    by_site = [{_key(row): row for row in r.rows} for _, r in answered]
    differing = _differing_declarations(answered)
    for row in first.rows:
        # a group is pooled over the sites that have it as a public key (policies may differ)
        cells = [rows[_key(row)] for rows in by_site if _key(row) in rows]
        estimates = [_suppressed(cells[0].estimates[j]) if j in differing else
                     _pool_estimate([c.estimates[j] for c in cells], first.dry_run) for j in range(len(row.estimates))]
        if not first.dry_run and _small(estimates, out.suppression_min_count):
            estimates = [_suppressed(e) for e in estimates]
        out.rows.add(keys=row.keys, estimates=estimates)
    out.notes.extend(f"{label}: the sites declare different {what} ({'; '.join(each)}), so their {released} "
                     "cannot be added: the pooled values are withheld; see each site's answer"
                     for label, what, released, each in differing.values())
    return out


def _differing_declarations(answered: Sequence[tuple[str, pb.QueryResponse]]
                            ) -> dict[int, tuple[str, str, str, list[str]]]:
    """Aggregates (by position) that cannot pool because the sites declare them differently.

    Per aggregate: its label, what differs, what therefore cannot be added, and each site's
    declaration. Vectors over a grid add only over the same grid; a regression's statistics,
    standardised by each column's bounds, only under the same bounds; a mean's sums of distances
    from the bounds' midpoint only about the same midpoint.
    """
    grids: dict[int, dict[str, tuple[float, ...]]] = {}
    every: dict[int, dict[str, tuple[float, ...]]] = {}
    bounds: dict[int, dict[str, tuple[float, float]]] = {}
    labels: dict[int, tuple[str, bool]] = {}
    for site, response in answered:
        for row in response.rows[:1]:
            for j, e in enumerate(row.estimates):
                grids.setdefault(j, {})[site] = tuple(e.edges)
                every.setdefault(j, {})[site] = tuple(e.column_bounds)
                bounds.setdefault(j, {})[site] = (e.lower, e.upper)
                labels[j] = e.aggregate, e.function in KINDS and KINDS[e.function].midpoint
    out = {}
    for j, by_site in grids.items():
        label, midpoint = labels[j]
        if len(set(by_site.values())) > 1:
            out[j] = label, "grids", "counts", [f"{site} {_grid(edges)}" for site, edges in by_site.items()]
        elif len(set(every[j].values())) > 1:
            out[j] = label, "column bounds", "statistics", [f"{site} {_bounds(flat)}"
                                                            for site, flat in every[j].items()]
        elif midpoint and len(set(bounds[j].values())) > 1:
            out[j] = label, "bounds", "sums (of distances from the bounds' midpoint)", [
                f"{site} [{low:g}, {high:g}]" for site, (low, high) in bounds[j].items()]
    return out


def _grid(edges: Sequence[float]) -> str:
    """A grid as a reader compares it: '0..120 (121 times, #digest)', or '(none)'."""
    return f"{edges[0]:g}..{edges[-1]:g} ({len(edges)} times, #{_digest(list(edges))})" if edges else "(none)"


def _bounds(flat: Sequence[float]) -> str:
    """Several columns' bounds as a reader compares them: '[0, 180] [18, 99]'."""
    return " ".join(f"[{low:g}, {high:g}]" for low, high in zip(flat[0::2], flat[1::2], strict=True)) or "(none)"


def _digest(values: object) -> str:
    return hashlib.sha256(repr(values).encode()).hexdigest()[:8]


def _small(estimates: list[pb.Estimate], threshold: int) -> bool:
    """The site's rule, on pooled values: the row's first noisy count is under the threshold."""
    for e in estimates:
        for component in e.components:
            if component.name == "count":
                return threshold > 0 and component.values[0] < threshold
    return False


def _suppressed(e: pb.Estimate) -> pb.Estimate:
    out = pb.Estimate()
    out.CopyFrom(e)
    out.value = out.ci_low = out.ci_high = math.nan
    out.suppressed, out.clamped = True, False
    del out.components[:]
    nan = [math.nan] * len(out.values)
    out.values[:], out.ci_lows[:], out.ci_highs[:] = nan, nan, nan
    return out


def _as_shown(row: pb.ResultRow) -> pb.ResultRow:
    """A site's row as the researcher sees it: a cell the site suppressed carries no released parts."""
    shown = pb.ResultRow()
    shown.CopyFrom(row)
    for e in shown.estimates:
        if e.suppressed:
            del e.components[:]
    return shown


def _key(row: pb.ResultRow) -> tuple[bytes, ...]:
    return tuple(k.SerializeToString(deterministic=True) for k in row.keys)


def _pool_estimate(parts: list[pb.Estimate], dry_run: bool) -> pb.Estimate:
    head = parts[0]
    kind = kind_of(head.function)
    out = pb.Estimate(aggregate=head.aggregate, function=head.function, mechanism=f"pooled({head.mechanism})",
                      epsilon=head.epsilon, noise_scale=math.nan, has_bounds=head.has_bounds, lower=head.lower,
                      upper=head.upper, edges=head.edges, level=head.level, column_bounds=head.column_bounds)
    if dry_run:  # the pooled noise's accuracy, from the sites' components (noise only, no values)
        out.value = out.ci_low = out.ci_high = math.nan
        out.std_error = math.sqrt(sum(p.std_error ** 2 for p in parts))
        out.ci_half_width = Z95 * out.std_error
        if all(p.components for p in parts):
            noise = kind.pool([parts_from_wire(p) for p in parts])
            out.std_error, out.ci_half_width = kind.predict(noise)
            out.components.extend(part_to_wire(p) for p in noise.values())
        return out
    if any(not p.components for p in parts):  # a site that sent no parts (an older version) cannot be pooled
        out.value = out.ci_low = out.ci_high = out.std_error = out.ci_half_width = math.nan
        out.suppressed = True
        return out
    pooled = kind.pool([parts_from_wire(p) for p in parts])
    # like each site, the broker clamps into the column's bounds, where the true value lies, and
    # intersects the interval with them (post-processing: it costs no privacy and no coverage)
    declared = Declared(bounds_from_wire(head), tuple(head.edges), head.level or 0.5, column_bounds_from_wire(head))
    value = kind.estimate(pooled, declared, clamp=True)
    out.value, out.std_error, out.clamped = value.value, value.std_error, value.clamped
    out.ci_half_width, out.ci_low, out.ci_high = value.half_width, value.ci_low, value.ci_high
    if value.vector is not None:
        vector = value.vector
        out.values[:], out.shape[:], out.std_errors[:] = vector.values, vector.shape, vector.std_errors
        out.ci_lows[:], out.ci_highs[:] = vector.ci_lows, vector.ci_highs
    out.components.extend(part_to_wire(p) for p in pooled.values())
    return out
