"""Pooling the sites' noisy answers: pure functions of released values (no I/O, no OpenDP).

Counts and sums add, and so do their noise variances; a mean is the ratio of the pooled noisy
sums and counts with a delta-method interval. Dataset descriptions from several sites are merged
with a line for every declaration on which they differ.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

from .._proto.gateway.v1 import gateway_pb2 as pb
from ..accuracy import Z95, ratio_estimate


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
        if col.public_keys:
            keys = [getattr(k, k.WhichOneof("kind") or "string_value") for k in col.public_keys]
            digest = hashlib.sha256(repr(keys).encode()).hexdigest()[:8]
            out[f"column {col.name} keys"] = f"{len(keys)} keys ({keys[0]}..{keys[-1]}, #{digest})"
    return out


def pool(answered: Sequence[tuple[str, pb.QueryResponse]], served_by: str) -> pb.QueryResponse:
    """Pool the sites' answers, given as (site, response), group by group (each site's own answer is kept)."""
    first = answered[0][1]
    out = pb.QueryResponse(dataset=first.dataset, group_by=first.group_by, aggregates=first.aggregates,
                           canonical_hash=first.canonical_hash, canonical_query=first.canonical_query,
                           served_by=served_by, dry_run=first.dry_run)
    out.sites.extend(site for site, _ in answered)
    out.epsilon_charged = max(r.epsilon_charged for _, r in answered)
    out.budget_remaining = min(r.budget_remaining for _, r in answered)
    out.cached = all(r.cached for _, r in answered)
    for site, r in answered:
        out.site_answers.add(site=site, rows=r.rows, epsilon_charged=r.epsilon_charged, cached=r.cached,
                             budget_remaining=r.budget_remaining)
    by_site = [{_key(row): row for row in r.rows} for _, r in answered]
    for row in first.rows:
        # a group is pooled over the sites that have it as a public key (policies may differ)
        cells = [rows[_key(row)] for rows in by_site if _key(row) in rows]
        pooled = out.rows.add(keys=row.keys)
        for j in range(len(row.estimates)):
            pooled.estimates.append(_pool_estimate([c.estimates[j] for c in cells], first.dry_run))
    return out


def _key(row: pb.ResultRow) -> tuple[bytes, ...]:
    return tuple(k.SerializeToString(deterministic=True) for k in row.keys)


def _pool_estimate(parts: list[pb.Estimate], dry_run: bool) -> pb.Estimate:
    head = parts[0]
    out = pb.Estimate(aggregate=head.aggregate, mechanism=f"pooled({head.mechanism})", epsilon=head.epsilon,
                      noise_scale=math.nan)
    if dry_run:
        out.value = out.ci_low = out.ci_high = math.nan
        out.std_error = math.sqrt(sum(p.std_error ** 2 for p in parts))
        out.ci_half_width = Z95 * out.std_error
        return out
    if any(p.suppressed for p in parts):
        out.value = out.ci_low = out.ci_high = out.std_error = out.ci_half_width = math.nan
        out.suppressed = True
        return out
    if math.isnan(head.numerator):  # counts and sums: values add, variances add
        out.value = sum(p.value for p in parts)
        out.std_error = math.sqrt(sum(p.std_error ** 2 for p in parts))
    else:  # means: ratio of pooled noisy sums and counts, bounds from the sites' clamping range
        total, count = sum(p.numerator for p in parts), sum(p.denominator for p in parts)
        total_se = math.sqrt(sum(p.numerator_std_error ** 2 for p in parts))
        count_se = math.sqrt(sum(p.denominator_std_error ** 2 for p in parts))
        # the broker does not clamp (it does not know the bounds); with no count left, the sites' range
        low, high = (min(p.ci_low for p in parts), max(p.ci_high for p in parts)) if count < 1 else (-math.inf,
                                                                                                      math.inf)
        out.value, out.std_error, out.clamped = ratio_estimate(total, count, total_se, count_se, low, high)
        out.numerator, out.denominator = total, count
        out.numerator_std_error, out.denominator_std_error = total_se, count_se
    out.ci_half_width = Z95 * out.std_error
    out.ci_low, out.ci_high = out.value - out.ci_half_width, out.value + out.ci_half_width
    return out
