"""``bench/RESULTS.md`` and its PNG plots from the JSON the benchmark scripts wrote.

``uv run --group bench python bench/report.py`` (``bench/run_all.sh`` runs it last). Reads
``bench/results/compare.json`` and ``fanout.json`` (and ``federated.json`` if present), checks each
target of the benchmark issue against the figures, and writes the tables, the targets and three
plots: latency against rows per system, error against epsilon per system, broker overhead against
sites.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

HERE = Path(__file__).resolve().parent
SYSTEMS = ["raw DuckDB", "our site", "OpenDP Context", "SmartNoise SQL"]


def _mb(value: float | None) -> str:
    return "—" if not value else f"{value / 2**20:,.0f} MB"


def compare_section(data: dict[str, Any]) -> list[str]:
    lines = ["## Against the alternatives (`bench/compare.py`)", ""]
    for size in data["sizes"]:
        lines += [f"### {size['rows']:,} patients", ""]
        for name, why in size["unavailable"].items():
            lines.append(f"- {name} unavailable: {why}")
        lines += ["| query | " + " | ".join(f"{s} median / p95 (ratio)" for s in SYSTEMS) + " |",
                  "|---|" + "---|" * len(SYSTEMS)]
        for q in size["queries"]:
            cells = []
            for s in SYSTEMS:
                m = q["systems"].get(s)
                cells.append("—" if m is None else
                             f"{m['median_ms']:.1f} / {m['p95_ms']:.1f} ms ({m['ratio_to_raw']:.2f}x)")
            lines.append(f"| {q['query']} | " + " | ".join(cells) + " |")
        lines += ["", "| | " + " | ".join(SYSTEMS) + " |", "|---|" + "---|" * len(SYSTEMS),
                  "| one-off load | " + " | ".join(f"{size['load_s'].get(s, 0):.2f} s" if s in size["load_s"] else "—"
                                                 for s in SYSTEMS) + " |",
                  "| peak memory | " + " | ".join(_mb(size["peak_memory_bytes"].get(s)) for s in SYSTEMS) + " |", ""]
        for name, restarts in size.get("worker_restarts", {}).items():
            if restarts:
                lines += [f"{name} ran in a worker process that was started afresh {restarts} times between queries "
                          "(its resident set had passed 6 GB: OpenDP's polars path keeps memory from query to "
                          "query); the peak memory above is a fresh process's over one run of every query.", ""]
        lines += ["Accuracy: relative RMSE over the runs (and median relative error), at each epsilon "
                  "(our mean reported standard error in brackets). \"Worse\" in the targets: an RMSE above "
                  "the other's by more than twice their combined standard error and by 10%.", "",
                  "| query | epsilon | " + " | ".join(SYSTEMS[1:]) + " |", "|---|---|" + "---|" * (len(SYSTEMS) - 1)]
        for q in size["queries"]:
            if not q["systems"]["our site"]["accuracy"]:
                continue  # latency only
            for eps in size["epsilons"]:
                cells = []
                for s in SYSTEMS[1:]:
                    a = q["systems"].get(s, {}).get("accuracy", {}).get(str(eps))
                    cell = "—" if a is None else f"{a['relative_rmse']:.2e} ({a['median_relative_error']:.1e})"
                    std = q["systems"].get(s, {}).get("reported_std_error")
                    cells.append(cell + (f" [{std:.3g}]" if std is not None else ""))
                lines.append(f"| {q['query']} | {eps:g} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def fanout_section(data: dict[str, Any]) -> list[str]:
    site, broker = data["site"], data["broker"]
    lines = ["## Throughput and fan-out (`bench/fanout.py`)", "",
             f"One site over {site['rows']:,} patients; a broker over {broker['sites']} real sites of "
             f"{broker['patients_per_site']:,} patients each (all on this machine).", "",
             "| target | clients | queries/s | median | p95 | p99 | errors | raw DuckDB queries/s |",
             "|---|---|---|---|---|---|---|---|"]
    for name, part in (("site", site), ("broker", broker)):
        for r in part["runs"]:
            raw = f"{r['raw_duckdb_qps']:.0f}" if "raw_duckdb_qps" in r else "—"
            lines.append(f"| {name} | {r['clients']} | {r['qps']:.1f} | {r['median_ms']:.1f} ms | {r['p95_ms']:.1f} ms "
                         f"| {r['p99_ms']:.1f} ms | {r['errors']} | {raw} |")
    lines += ["", "Broker overhead over stand-in sites (each answers after a fixed delay, using no CPU):", "",
              "| sites | delay | broker median | p95 | overhead | target | one stand-in direct | broker CPU/query "
              "| stand-ins CPU/query |", "|---|---|---|---|---|---|---|---|---|"]
    for r in data["broker_overhead"]:
        lines.append(f"| {r['sites']} | {r['delay_ms']:g} ms | {r['broker']['median_ms']:.2f} ms | "
                     f"{r['broker']['p95_ms']:.2f} ms | {r['overhead_ms']:.2f} ms | {r['target_ms']:.1f} ms | "
                     f"{r['direct_standin']['median_ms']:.2f} ms | {r.get('broker_cpu_ms_per_query', 0):.2f} ms | "
                     f"{r.get('standins_cpu_ms_per_query', 0):.2f} ms |")
    return [*lines, ""]


def federated_section(data: dict[str, Any]) -> list[str]:
    lines = ["## Federated accuracy (`bench/federated.py`)", "",
             "Pooled estimate over K sites (a split of the same union) against OpenDP Context on the union, same "
             "epsilon: relative RMSE.", "", "| query | K | epsilon | pooled (ours) | OpenDP Context on the union |",
             "|---|---|---|---|---|"]
    curves = [r for r in data["results"] if "pooled_curve_error" in r]
    for r in data["results"]:
        if r not in curves:
            lines.append(f"| {r['query']} | {r['sites']} | {r['epsilon']:g} | {r['pooled_relative_rmse']:.2e} | "
                         f"{r['context_relative_rmse']:.2e} |")
    if curves:
        lines += ["", "Survival by stage: the Kaplan-Meier curves' mean absolute error over the monthly grid (0-120 "
                  "months) against the union's exact curve, averaged over the stages; OpenDP Context releases the same "
                  "counts (per stage, outcome and month) on the union, and the same code draws its curves.", "",
                  "| K | epsilon | pooled (ours) | OpenDP Context on the union |", "|---|---|---|---|"]
        lines += [f"| {r['sites']} | {r['epsilon']:g} | {r['pooled_curve_error']:.2e} | "
                  f"{r['context_curve_error']:.2e} |" for r in curves]
    return [*lines, ""]


def _worse(ours: dict[str, float], theirs: dict[str, float]) -> bool:
    """Our RMSE above theirs by more than twice the two RMSEs' combined standard error, and by 10%.

    An RMSE over a few runs is itself uncertain (about 20% over 10 runs of Laplace noise); results
    without standard errors fall back to 25%.
    """
    if "relative_rmse_se" not in ours or "relative_rmse_se" not in theirs:
        return ours["relative_rmse"] > 1.25 * theirs["relative_rmse"]
    margin = 2 * math.hypot(ours["relative_rmse_se"], theirs["relative_rmse_se"])
    return ours["relative_rmse"] > max(theirs["relative_rmse"] + margin, 1.1 * theirs["relative_rmse"])


def targets(compare: dict[str, Any] | None, fanout: dict[str, Any] | None) -> list[str]:
    """Each target of the issue with the figure measured, and whether it is met."""
    rows: list[tuple[str, str, bool | None]] = []
    if compare:
        for size in compare["sizes"]:
            limit = 1.25 if size["rows"] >= 10_000_000 else 2.0
            at_size = size["rows"] >= 1_000_000  # the targets are for 1M and 10M rows
            worst = max(q["systems"]["our site"]["ratio_to_raw"] for q in size["queries"])
            rows.append((f"site ≤ {limit}x raw DuckDB at {size['rows']:,} rows (worst query)", f"{worst:.2f}x",
                         worst <= limit if at_size else None))
            for other in ("OpenDP Context", "SmartNoise SQL"):
                ratios = [q["systems"][other]["median_ms"] / q["systems"]["our site"]["median_ms"]
                          for q in size["queries"] if other in q["systems"]]
                if ratios:
                    rows.append((f"{other} / us ≥ 20x on every query at {size['rows']:,} rows (least)",
                                 f"{min(ratios):.1f}x", min(ratios) >= 20))
                    worse = [q["query"] for q in size["queries"] if other in q["systems"]
                             and q["systems"]["our site"]["accuracy"] and any(
                        _worse(q["systems"]["our site"]["accuracy"][e], q["systems"][other]["accuracy"][e])
                        for e in map(str, size["epsilons"]))]
                    rows.append((f"error no worse than {other} at {size['rows']:,} rows",
                                 "worse on: " + ", ".join(worse) if worse else "never worse", not worse))
            mem = size["peak_memory_bytes"]
            if "our site" in mem and "raw DuckDB" in mem:
                ratio = mem["our site"] / mem["raw DuckDB"]
                rows.append((f"peak memory ≤ 1.5x DuckDB's at {size['rows']:,} rows", f"{ratio:.2f}x",
                             ratio <= 1.5 if size["rows"] >= 10_000_000 else None))
    if fanout:
        eight = [r for r in fanout["site"]["runs"] if r["clients"] == 8]
        if eight:
            rows.append((f"≥ 300 queries/s with 8 clients at {fanout['site']['rows']:,} rows",
                         f"{eight[0]['qps']:.0f}/s", eight[0]["qps"] >= 300 if fanout["site"]["rows"] >= 1_000_000
                         else None))
        for r in fanout["broker_overhead"]:
            rows.append((f"broker overhead ≤ {r['target_ms']:.1f} ms at {r['sites']} sites",
                         f"{r['overhead_ms']:.2f} ms", r["overhead_ms"] <= r["target_ms"]))
    mark = {True: "met", False: "missed", None: "(not the target's size)"}
    return ["## Targets", "", "| target | measured | |", "|---|---|---|",
            *[f"| {t} | {m} | {mark[ok]} |" for t, m, ok in rows], ""]


def plots(compare: dict[str, Any] | None, fanout: dict[str, Any] | None, out: Path) -> list[str]:
    made = []
    if compare:
        fig, axes = plt.subplots(1, len(compare["sizes"][0]["queries"]), figsize=(18, 4), squeeze=False)
        for ax, q0 in zip(axes[0], compare["sizes"][0]["queries"], strict=True):
            for s in SYSTEMS:
                xs = [size["rows"] for size in compare["sizes"] for q in size["queries"]
                      if q["query"] == q0["query"] and s in q["systems"]]
                ys = [q["systems"][s]["median_ms"] for size in compare["sizes"] for q in size["queries"]
                      if q["query"] == q0["query"] and s in q["systems"]]
                ax.plot(xs, ys, marker="o", label=s)
            ax.set(xscale="log", yscale="log", title=q0["query"], xlabel="patients", ylabel="median latency (ms)")
        axes[0][0].legend()
        fig.tight_layout()
        fig.savefig(out / "latency_vs_rows.png", dpi=80)
        plt.close(fig)
        size = compare["sizes"][0]
        fig, axes = plt.subplots(1, len(size["queries"]), figsize=(18, 4), squeeze=False)
        for ax, q in zip(axes[0], size["queries"], strict=True):
            for s in SYSTEMS[1:]:
                if q["systems"].get(s, {}).get("accuracy"):
                    ax.plot(size["epsilons"], [q["systems"][s]["accuracy"][str(e)]["relative_rmse"]
                                               for e in size["epsilons"]], marker="o", label=s)
            exact_everywhere = not any(y > 0 for line in ax.get_lines() for y in line.get_ydata())
            ax.set(xscale="log", yscale="linear" if exact_everywhere else "log", xlabel="epsilon",
                   ylabel="relative RMSE", title=q["query"] + (" (no error)" if exact_everywhere else ""))
        axes[0][0].legend()
        fig.tight_layout()
        fig.savefig(out / "error_vs_epsilon.png", dpi=80)
        plt.close(fig)
        made += ["latency_vs_rows.png", "error_vs_epsilon.png"]
    if fanout:
        rows = fanout["broker_overhead"]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([r["sites"] for r in rows], [r["overhead_ms"] for r in rows], marker="o", label="measured")
        ax.plot([r["sites"] for r in rows], [r["target_ms"] for r in rows], linestyle="--", label="target")
        ax.set(xscale="log", xlabel="sites", ylabel="broker overhead (ms)", title="Broker overhead over stand-ins")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "broker_overhead.png", dpi=80)
        plt.close(fig)
        made.append("broker_overhead.png")
    return made


NOTES = [
    "## How to read these figures", "",
    "- Every system answers the same queries on the same file, interleaved round robin; latency is wall time "
    "per query as its caller sees it (SmartNoise's is timed inside its worker, so its process start is not "
    "counted). Our site is a real `gateway site serve` process reached over gRPC with a token, a proof of "
    "possession per request, policy checks, a durable ledger charge (SQLite, full sync), an audit record "
    "and OpenDP noise.",
    "- Each round asks as another project, so every query is new to the site (answered and charged, never "
    "a stored answer) while its text and epsilon repeat, as a researcher's do: a repeated text is parsed "
    "once (a new text costs a parse, about half a millisecond).",
    "- Accuracy is the relative error against the exact answer over the repeated runs at the same total "
    "epsilon per query; treatments are bounded to 5 rows per patient by every system and compared with "
    "the exact answer at that bound. With few runs an RMSE is itself uncertain by about 1/sqrt(2n).",
    "- A median at one site is OpenDP's quantile mechanism over the policy's bin edges (one per year of age): "
    "the site counts rows per edge, where raw DuckDB's exact median sorts every value, hence a ratio under 1; "
    "on whole-year ages both pick the exact median in every run.",
    "- The multi-row sum's exact answer keeps each patient's first 5 treatments by id; each system keeps 5 "
    "of its own choosing (our site by a keyed hash, SmartNoise through our adapter the first rows DuckDB "
    "reads, mostly the same as the reference's), so part of its error is which rows it keeps, the same at "
    "every epsilon (compare the median relative error across epsilons), not noise.",
    "- SmartNoise SQL runs on DuckDB through its PostgreSQL reader; DuckDB refuses `random()` in a window's "
    "ORDER BY, so its per-patient row selection orders by a constant (any k rows keep its sensitivity).",
    "- The broker's stand-in sites answer after a fixed delay without computing, but their gRPC handling "
    "in Python takes CPU on the same machine: compare the broker's own CPU per query with its latency.",
    "",
    "## Where a target is missed, and why", "",
    "Profiled with py-spy (`bench` group) on this machine; the figures are shares of the site's own time per "
    "query.",
    "",
    "- **Site against raw DuckDB.** A query at 1M patients takes DuckDB 1.5-4 ms; the site adds a "
    "fixed 3-7 ms whatever the data's size. In a mean at 1M, before its sum was rewritten: DuckDB's own "
    "work 53% of the site's time (the statement raw DuckDB runs, plus clamping where the loaded data is "
    "not known to lie within the bounds, and the fixed-point sum), the noise and its exact "
    "interval 24% (two OpenDP samplers; the interval's FFT convolution, which depends on the noisy count "
    "and so cannot be cached), the proof of possession 9%, the token 7%, the durable ledger charge and audit "
    "record 6%, gRPC the rest. None of these can go without giving up a guarantee (a charge on disk before "
    "the answer leaves, a signature per request). At 10M the scan dominates and the ratio falls.",
    "- **SmartNoise SQL / us.** SmartNoise runs its queries on the same DuckDB, so its own cost is a fixed "
    "70-200 ms of parsing and rewriting per query; the ratio is least on the cheapest queries.",
    "- **Peak memory.** 222 MB of the site's resident set is OpenDP's shared library (importing "
    "`opendp.prelude` alone reaches it), against 42 MB for `import duckdb`. At start the site checks "
    "whether each dataset's patient column is unique (an exact distinct count) and builds the bounded "
    "snapshot of a multi-row table (a window over every row); both are DuckDB's, once per load. The "
    "snapshot is built in passes of 8M rows over disjoint sets of patients (at 10M patients its peak fell "
    "from 4.7 GB to 1.5 GB; same rows kept). `engine_memory_limit` caps DuckDB for operators who need less.",
    "- **Queries/s with 8 clients.** The 8 client threads and the site share 2 cores; the site's Python work "
    "(token, proof, ledger, noise) runs under one interpreter lock, so about one core's worth of it runs "
    "at a time while DuckDB's work runs in parallel.",
    "- **Broker overhead.** The broker's CPU per query grows by about 0.3 ms per site: a gRPC call in "
    "Python per site, the check of each site's answer against the query (shapes, noise scales, "
    "declarations) and the pooling; with 64 sites that is about 20 ms of CPU. Its fan-out is concurrent, "
    "so the sites' own time overlaps.",
    "",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--results", type=Path, default=HERE / "results")
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args()

    def read(name: str) -> dict[str, Any] | None:
        path = args.results / name
        return json.loads(path.read_text()) if path.exists() else None

    compare, fanout, federated = read("compare.json"), read("fanout.json"), read("federated.json")
    found = [d for d in (compare, fanout, federated) if d]
    if not found:
        print("no results yet: run bench/run_all.sh first", file=sys.stderr)
        return 1
    m = found[0]["machine"]
    smoke = any(d.get("kind") == "smoke" for d in found)
    lines = ["# Benchmark results", ""]
    if smoke:
        lines += ["> **Smoke run** at small sizes on a busy shared machine: it shows the structure and checks the "
                  "scripts, not the figures. To be replaced by a full run (`bash bench/run_all.sh`) on a quiet "
                  "machine.", ""]
    lines += [f"Machine: {m['cpus']} CPUs, {m['processor']}, {m['platform']}, Python {m['python']}; "
              + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + f"; run {m['date']}.", ""]
    lines += targets(compare, fanout)
    if compare:
        lines += compare_section(compare)
    if fanout:
        lines += fanout_section(fanout)
    if federated:
        lines += federated_section(federated)
    lines += NOTES
    images = plots(compare, fanout, args.results)
    lines += ["## Plots", "", *[f"![{p}](results/{p})" for p in images], ""]
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
