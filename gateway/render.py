"""Human and machine renderings: query answers as tables and JSON, policy explain and diff."""

from __future__ import annotations

import math
from datetime import datetime
from fractions import Fraction
from typing import Any

from ._proto.gateway.v1 import gateway_pb2 as pb
from .aggregates import KINDS
from .guarantee import describe as describe_guarantee
from .logrank import LogRank, logrank_of
from .policy import Policy


def _num(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _key(value: pb.Value) -> Any:
    kind = value.WhichOneof("kind")
    return getattr(value, kind) if kind else None


def query_json(response: pb.QueryResponse) -> dict[str, Any]:
    """The ``--json`` shape of DESIGN §11."""
    rows = []
    for row in response.rows:
        names = response.names
        item: dict[str, Any] = {names.get(k.column, k.column): _key(k.value) for k in row.keys}
        for e in row.estimates:
            item[names.get(e.aggregate, e.aggregate)] = {"value": _num(e.value), "std_error": _num(e.std_error),
                                 "ci95": [_num(e.ci_low), _num(e.ci_high)], "noise_scale": _num(e.noise_scale),
                                 "suppressed": e.suppressed, "clamped": e.clamped}
            if e.rank_error_95 > 0:  # a single-site quantile's bound on its rank (no interval)
                item[names.get(e.aggregate, e.aggregate)]["rank_error_95"] = e.rank_error_95
            if e.shape:  # a vector estimate (a survival curve at the grid's times)
                item[names.get(e.aggregate, e.aggregate)]["vector"] = {
                    "edges": list(e.edges), "shape": list(e.shape), "values": [_num(v) for v in e.values],
                    "std_errors": [_num(v) for v in e.std_errors], "ci95_lows": [_num(v) for v in e.ci_lows],
                    "ci95_highs": [_num(v) for v in e.ci_highs]}
        rows.append(item)
    out: dict[str, Any] = {"query_id": response.query_id, "dataset": response.dataset,
                           "group_by": list(response.group_by), "aggregates": list(response.aggregates),
                           "rows": rows, "epsilon_charged": response.epsilon_charged,
                           "budget_remaining": response.budget_remaining, "cached": response.cached,
                           "dry_run": response.dry_run, "notes": list(response.notes)}
    if response.names:  # SQL aliases: the rows use them; "aggregates" keeps the labels
        out["names"] = dict(response.names)
    tests = {label: {"statistic": _num(t.statistic), "df": t.df, "p_value": _num(t.p_value), "draws": t.draws,
                     "method": t.method, "note": t.note} for label, t in _group_tests(response)}
    if tests:  # per survival aggregate: the log-rank test between the groups
        out["logrank"] = tests
    if response.sites or response.site_answers or response.missing_sites:
        out["sites"] = list(response.sites)
        out["missing_sites"] = [{"site": m.site, "reason": m.reason, "message": m.message}
                                for m in response.missing_sites]
    return out


def query_table(response: pb.QueryResponse) -> str:
    """A fixed-width table: group keys, then per aggregate estimate ± half-width [95% interval]."""
    header = [response.names.get(c, c) for c in (*response.group_by, *response.aggregates)]
    lines = []
    for row in response.rows:
        cells = [str(_key(k.value)) for k in row.keys]
        for e in row.estimates:
            cells.append(_cell(e, response.dry_run))
        lines.append(cells)
    widths = [max(len(h), *(len(c[i]) for c in lines)) if lines else len(h) for i, h in enumerate(header)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)),
           "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) for cells in lines]
    kind = "would charge" if response.dry_run else "charged"
    source = "  (stored answer, no charge)" if response.cached else ""
    out += [f"{label}: {test}" for label, test in _group_tests(response)]
    out.append(f"epsilon {kind}: {response.epsilon_charged:g}   budget remaining: "
               f"{response.budget_remaining:g}{source}")
    if response.sites:
        out.append(f"sites: {', '.join(response.sites)}")
    for m in response.missing_sites:
        out.append(f"missing site {m.site}: {m.reason} ({m.message})")
    out += [f"note: {note}" for note in response.notes]
    return "\n".join(out)


def _group_tests(response: pb.QueryResponse) -> list[tuple[str, LogRank]]:
    """The test between the groups of each aggregate that has one (survival's log-rank), with 2+ groups."""
    if response.dry_run or len(response.rows) < 2:
        return []
    head = response.rows[0].estimates
    return [(response.names.get(e.aggregate, e.aggregate), logrank_of(response, j)) for j, e in enumerate(head)
            if e.function in KINDS and KINDS[e.function].group_test]


def _dry_cell(e: pb.Estimate) -> str:
    """A dry run's accuracy: the 95% half-width, or for a mean its sum's noise over the group's count."""
    if math.isfinite(e.ci_half_width):
        return f"± {e.ci_half_width:.4g} (95%)"
    if e.rank_error_95 > 0:  # a single-site quantile: a bound on its rank, not its value
        return f"rank error ≤ {e.rank_error_95:.0f} rows beyond the best edge's (95%)"
    noise = {c.name: c for c in e.components}
    kind = KINDS.get(e.function)
    if kind is not None and kind.per_count in noise:
        return f"± {noise[kind.per_count].ci_half_width:.4g} / n (95%, n the group's values)"
    return f"noise scale {e.noise_scale:.4g}" if math.isfinite(e.noise_scale) else "accuracy depends on the data"


def _cell(e: pb.Estimate, dry_run: bool) -> str:
    if dry_run:
        return _dry_cell(e)
    if e.suppressed:
        return "suppressed (small cell)"
    if e.rank_error_95 > 0:  # a single-site quantile: an edge, no interval; a bound on its rank
        return f"{e.value:g} [no interval; rank error ≤ {e.rank_error_95:.0f} rows beyond the best edge's, 95%]"
    kind = KINDS.get(e.function)
    if kind is not None and kind.bounds_of_every_column and e.values:  # a fit: its summary, then its coefficients
        coefficients = ", ".join(f"{v:.4g} [{low:.4g}, {high:.4g}]"
                                 for v, low, high in zip(e.values, e.ci_lows, e.ci_highs, strict=False))
        return f"{kind.summary} {e.value:.3g}; coefficients (intercept first): {coefficients}"
    if kind is not None and kind.summary:  # a vector kind whose value summarises it, e.g. a median
        low = "-" if math.isnan(e.ci_low) else f"{e.ci_low:g}"
        high = "not reached" if math.isnan(e.ci_high) else f"{e.ci_high:g}"
        value = "not reached" if math.isnan(e.value) else f"{e.value:g}"
        return f"{kind.summary} {value} [{low}, {high}]"
    digits = 0 if e.aggregate == "count" else 2
    return f"{e.value:.{digits}f} [{e.ci_low:.{digits}f}, {e.ci_high:.{digits}f}]"


def budget_table(frame: Any) -> str:
    """The budget frame from :meth:`gateway.client.Client.budget` as a fixed-width table."""
    header = ["site", "population", "datasets", "project", "limit", "spent", "remaining", "period", "resets_at"]
    rows = [[_fmt(r[h]) for h in header] for r in frame.iter_rows(named=True)]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def status_table(status: Any) -> str:
    """A :class:`~gateway.client.ServerStatus` for people: the server, then its sites (a broker's)."""
    lines = [f"{status.component} {status.served_by}, version {status.version}"]
    if status.sites.height:
        header = ["site", "health", "version", "latency_seconds", "last_ok_at", "last_error_at", "last_error"]
        rows = [[_fmt(r[h]) if r[h] not in (None, "") else "-" for h in header]
                for r in status.sites.with_columns(
                    last_error=_error_text()).iter_rows(named=True)]
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
        lines += ["", "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip(),
                  "  ".join("-" * w for w in widths)]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def _error_text() -> Any:
    """``reason: message`` of each site's last error (empty without one)."""
    import polars as pl

    return (pl.when(pl.col("last_error_reason") != "")
            .then(pl.col("last_error_reason") + ": " + pl.col("last_error").str.slice(0, 80))
            .otherwise(pl.lit("")))


def _fmt(value: Any) -> str:
    if value is None:
        return "never"
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def explain(policy: Policy, project: str, role: str) -> str:
    """What ``project`` (with ``role``) may do at this site and what it costs."""
    lines = [*describe_guarantee(policy), "",
             f"site {policy.site}: what project {project!r} (role {role!r}) may do", ""]
    for name, dataset in policy.datasets.items():
        rule = policy.budget_rule(project, name)
        if rule is None or not rule.allows_role(role):
            lines.append(f"dataset {name}: no access")
            continue
        limits = policy.epsilon_limits(name)
        population = dataset.population_name
        cap = policy.population_cap(population)
        lines.append(f"dataset {name} (population {population}): budget epsilon {float(rule.epsilon):g} per "
                     f"{'period that never resets' if rule.period == 'never' else rule.period}, shared with "
                     f"{', '.join(policy.populations()[population])}"
                     + (f" (population cap {float(cap.epsilon):g} per {cap.period} over all projects)" if cap else ""))
        lines.append(f"  per query: default epsilon {float(limits.default):g}, max {float(limits.max):g}; "
                     f"at most {int(rule.epsilon / limits.default)} default-cost queries per period")
        kinds = [kind + (f" (max epsilon {float(policy.epsilon_limits(name, (kind,)).max):g})"
                         if rule.epsilon is not None else "") for kind, rule in dataset.aggregates.items()]
        lines.append(f"  aggregates: {', '.join(kinds)}; each patient counts at most "
                     f"{dataset.max_rows_per_unit} row(s)" + ("; templates only" if dataset.templates_only else ""))
        for cname, col in dataset.columns.items():
            extra = f" bounds [{col.bounds[0]:g}, {col.bounds[1]:g}]" if col.bounds else ""
            extra += f" grid {col.grid[0]:g}..{col.grid[-1]:g} ({len(col.grid)} times)" if col.grid else ""
            keys = f" {len(col.public_keys)} public keys" if col.public_keys else ""
            lines.append(f"  - {cname} ({col.type}): {', '.join(col.roles)}{extra}{keys}")
        count_scale = dataset.max_rows_per_unit / float(limits.default)
        lines.append(f"  a count at the default epsilon has noise std error ~{math.sqrt(2) * count_scale:.3g}")
    templates = [t for t in policy.templates]
    if templates:
        lines += ["", f"templates: {', '.join(templates)}"]
    if policy.suppression.min_count:
        lines.append(f"groups with a noisy count under {policy.suppression.min_count} are suppressed")
    return "\n".join(lines)


def diff(old: Policy, new: Policy) -> list[str]:
    """Human-readable changes between two policies (by key path).

    Every edit that changes what can be spent is flagged ``BUDGET``, saying whether it loosens or
    tightens and when it takes effect; a closing line counts them.
    """
    changes = _diff(old.model_dump(mode="json"), new.model_dump(mode="json"), "")
    lines, flagged = [], 0
    for path, a, b in changes:
        if path.startswith("datasets.") and path.endswith(".population"):
            continue  # said below, with what it means
        why = _budget_effect(path, a, b)
        flagged += why is not None
        lines.append(f"{path}: {a!r} -> {b!r}" + (f"  [BUDGET: {why}]" if why else ""))
    moved = [name for name in new.datasets if name in old.datasets
             and new.datasets[name].population_name != old.datasets[name].population_name]
    for name in moved:
        flagged += 1
        lines.append(f"datasets.{name}: population {old.datasets[name].population_name!r} -> "
                     f"{new.datasets[name].population_name!r}  [BUDGET: the dataset draws on another budget from "
                     "now on; what was spent under the old population stays there]")
    if flagged:
        lines.append(f"{flagged} edit(s) change what can be spent")
    return lines


def _budget_effect(path: str, old: Any, new: Any) -> str | None:
    """Why an edit at ``path`` changes what can be spent (None: it does not)."""
    parts = path.replace("[", ".").replace("]", "").split(".")
    field = parts[-1]
    if parts[0] == "datasets" and len(parts) in (4, 5) and parts[2] == "aggregates":
        return _kind_effect(parts[3], old, new)
    if parts[0] in ("budgets", "population_caps", "dataset_caps") or (parts[0] == "datasets" and "epsilon" in parts):
        if field == "period":
            return "takes effect when the window in force ends; spend made in it is never freed"
        if field == "epsilon" or parts[0] == "datasets":
            return _direction(old, new)
        return "changes who may spend, or on which datasets"
    if parts[0] == "epsilon":
        return _direction(old, new) + " (per query)"
    return "moves the windows; takes effect when the window in force ends" if path == "period_start" else None


def _kind_effect(kind: str, old: Any, new: Any) -> str:
    """An aggregate kind allowed or refused, or its own epsilon limits added or dropped."""
    if old == "(absent)":
        return f"loosens: allows {kind}"
    if new == "(removed)":
        return f"tightens: refuses {kind}"
    if old is None:
        return f"tightens: {kind} gets its own per-query limits"
    if new is None:
        return f"loosens: {kind} drops its own per-query limits"
    return f"changes {kind}'s per-query limits"


def _direction(old: Any, new: Any) -> str:
    try:
        return "loosens" if Fraction(str(new)) > Fraction(str(old)) else "tightens"
    except (ValueError, TypeError, ZeroDivisionError):
        return "changes a budget"


def _diff(a: Any, b: Any, path: str) -> list[tuple[str, Any, Any]]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in list(a) + [k for k in b if k not in a]:
            sub = f"{path}.{key}" if path else str(key)
            if key not in a:
                out.append((sub, "(absent)", b[key]))
            elif key not in b:
                out.append((sub, a[key], "(removed)"))
            else:
                out += _diff(a[key], b[key], sub)
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in _diff(x, y, f"{path}[{i}]")]
    return [] if a == b else [(path, a, b)]
