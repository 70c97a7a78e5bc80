"""Our site against raw DuckDB, OpenDP's polars Context and SmartNoise SQL, on the same data and queries.

One command: ``uv run --group bench python bench/compare.py`` (1M and 10M patients; ``--quick`` for
a smoke run at 20,000; ``--rows 100000000`` for 100M, which needs about 20 GB). For each size, in one
process run, the systems answer the same queries round robin (so drift hits all alike), at the
same total epsilon per query:

- raw DuckDB: the query itself on the file, no privacy (the physical limit, and the exact answer);
- our site: a real ``gateway site serve`` process, end to end over gRPC from a :class:`Client`
  (token, proof of possession, policy checks, durable ledger charge, audit, OpenDP noise); each
  round asks as another project (``bench-<round>``), so every query is new to the site (answered
  and charged, never a stored answer) while its text and epsilon repeat, as a researcher's do;
- OpenDP's polars ``Context`` on the same rows loaded into polars;
- SmartNoise SQL in its own environment (``bench/work/smartnoise-venv``, made on first use) over
  the same DuckDB file (see ``bench/_smartnoise_worker.py``); reported unavailable if it cannot be
  installed, without stopping the others.

Per query and system: median and p95 latency, ratio to raw DuckDB, the one-off load time, peak
memory (each system's own process: the site's and SmartNoise's from ``/proc``, raw DuckDB's and
Context's from a probe process each), and accuracy: over the repeated runs at each epsilon, the
root-mean-square and the median of the relative error (|estimate - exact| / max(|exact|, 1), over
every number of the answer) against the exact answer, and our mean reported standard error.
Multi-row treatments are bounded to 5 rows per patient by every system; their exact answer is the
one at that bound.
Writes ``bench/results/compare.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import duckdb
import polars as pl

from bench._common import (
    RESULTS,
    WORK,
    bench_policy,
    dataset,
    keys,
    percentiles,
    quick,
    start_site,
    stop,
    write_json,
)

STAGES = ["I", "II", "III", "IV"]


@dataclass(frozen=True)
class Case:
    """One query in each system's words; ``keys``: the public group keys (answer order), if grouped."""

    name: str
    table: str
    gateway: str
    raw: str
    context: Callable[[Any, Any], Any] | None  # (query, dp module) -> OpenDP polars query; None: not offered
    smartnoise: str  # "": not offered
    keys: tuple[str, ...] = ()
    exact: str = ""  # the exact answer's SQL, where it is not ``raw``
    accuracy: bool = True  # False: latency only (accuracy measured elsewhere)
    single_site: bool = False  # our site answers by its single-site mechanism (what Client.quantiles picks there)


def _cases() -> list[Case]:
    age, months, cycles = pl.col("age_at_diagnosis"), pl.col("survival_months"), pl.col("cycles")
    return [
        Case("count, filtered", "patients", "SELECT count(*) FROM patients WHERE age_at_diagnosis >= 50",
             "SELECT count(*) FROM patients WHERE age_at_diagnosis >= 50",
             lambda q, dp: q.filter(age >= 50).select(dp.len(signed=True)),
             "SELECT COUNT(*) FROM bench.patients WHERE age_at_diagnosis >= 50"),
        Case("group-by count", "patients", "SELECT stage, count(*) FROM patients GROUP BY stage",
             "SELECT stage, count(*) FROM patients GROUP BY stage",
             lambda q, dp: q.group_by("stage").agg(dp.len(signed=True)).with_keys(pl.DataFrame({"stage": STAGES})),
             "SELECT stage, COUNT(*) FROM bench.patients GROUP BY stage", tuple(STAGES)),
        Case("mean", "patients", "SELECT mean(survival_months) FROM patients",
             "SELECT avg(survival_months) FROM patients",
             lambda q, dp: q.select(months.fill_null(0).dp.mean((0, 180))),
             "SELECT AVG(survival_months) FROM bench.patients"),
        Case("sum, multi-row (5 per patient)", "treatments", "SELECT sum(cycles) FROM treatments",
             "SELECT sum(cycles) FROM treatments",
             lambda q, dp: q.truncate_per_group(5).select(cycles.fill_null(0).dp.sum((1, 12))),
             "SELECT SUM(cycles) FROM bench.treatments",
             # the answer at the bounds: 5 rows per patient (every system keeps some 5; the choice moves it little)
             exact="SELECT sum(cycles) FROM (SELECT cycles, row_number() OVER (PARTITION BY patient_id ORDER BY "
                   "treatment_id) AS r FROM treatments) WHERE r <= 5"),
        Case("three aggregates", "patients",
             "SELECT count(*), mean(age_at_diagnosis), sum(survival_months) FROM patients WHERE stage = 'III'",
             "SELECT count(*), avg(age_at_diagnosis), sum(survival_months) FROM patients WHERE stage = 'III'",
             lambda q, dp: q.filter(pl.col("stage") == "III").select(
                 dp.len(signed=True), age.fill_null(0).dp.mean((18, 99)), months.fill_null(0).dp.sum((0, 180))),
             "SELECT COUNT(*), AVG(age_at_diagnosis), SUM(survival_months) FROM bench.patients WHERE stage = 'III'"),
        # the median at one site by OpenDP's quantile mechanism over the policy's bin edges (one per
        # year of age), as Client.quantiles asks a site for one level; OpenDP Context's over the same
        # candidates; SmartNoise SQL offers no median
        Case("median", "patients", "SELECT median(age_at_diagnosis) FROM patients",
             "SELECT median(age_at_diagnosis) FROM patients",
             lambda q, dp: q.select(age.fill_null(18).dp.median(list(range(18, 101)))), "", single_site=True),
        # neither alternative offers it; its accuracy is bench/survival_accuracy.py's subject. Raw DuckDB
        # computes what a Kaplan-Meier curve needs: events and censorings per stage and month
        Case("survival by stage", "patients",
             "SELECT stage, survival(survival_months, death) FROM patients GROUP BY stage",
             "SELECT stage, least(survival_months, 120) AS m, death, count(*) FROM patients GROUP BY ALL",
             None, "", accuracy=False),
    ]


SMARTNOISE_METADATA = {"bench": {"bench": {
    "patients": {"max_ids": 1, "row_privacy": False, "censor_dims": False,
                 "patient_id": {"type": "int", "private_id": True},
                 "age_at_diagnosis": {"type": "int", "lower": 18, "upper": 99},
                 "survival_months": {"type": "int", "lower": 0, "upper": 180},
                 "stage": {"type": "string"}},
    "treatments": {"max_ids": 5, "row_privacy": False, "censor_dims": False,
                   "patient_id": {"type": "int", "private_id": True},
                   "cycles": {"type": "int", "lower": 1, "upper": 12}},
}}}


def _vector(rows: list[list[Any]], keys: tuple[str, ...]) -> list[float]:
    """An answer as numbers in a fixed order: its one row, or its groups' counts in ``keys`` order."""
    if not keys:
        return [float(v) for v in rows[0]]
    found = {str(r[0]): float(r[1]) for r in rows}
    return [found.get(k, 0.0) for k in keys]


# -- the systems ------------------------------------------------------------------------------------

class Raw:
    name = "raw DuckDB"

    def __init__(self, data: Path) -> None:
        start = time.perf_counter()
        self.con = duckdb.connect(str(data), read_only=True)
        self.load_s = time.perf_counter() - start

    def run(self, case: Case, epsilon: float, i: int) -> tuple[list[float], float, float | None]:
        start = time.perf_counter()
        rows = self.con.execute(case.raw).fetchall()
        seconds = time.perf_counter() - start
        return (_vector([list(r) for r in rows], case.keys) if case.accuracy else []), seconds, None

    def close(self) -> None:
        self.con.close()


class Site:
    name = "our site"

    def __init__(self, data: Path, workdir: Path, rounds: int) -> None:
        from gateway.client import Client

        k = keys(workdir)
        policy = bench_policy(data, workdir / "policies" / f"{data.stem}.yaml")
        start = time.perf_counter()
        self.proc, port = start_site(policy, k.public, workdir / "state" / data.stem)
        self.load_s = time.perf_counter() - start
        # one researcher (project) per round: each round's query is new to the site, so it is answered
        # and charged, never a stored answer, while text and epsilon repeat as a researcher's do
        self.clients = [Client(f"127.0.0.1:{port}", token=k.token(f"bench-{r}"), proof_key=k.proof)
                        for r in range(rounds)]
        for client in self.clients:
            client.budget()  # connected, and the token verified once, as for a researcher at work

    def run(self, case: Case, epsilon: float, r: int) -> tuple[list[float], float, float | None]:
        start = time.perf_counter()
        result = self.clients[r].query(case.gateway, epsilon=epsilon, single_site=case.single_site)
        seconds = time.perf_counter() - start
        rows = result.response.rows
        if not case.accuracy:
            return [], seconds, None
        if case.keys:
            values = {r.keys[0].value.string_value: r.estimates[0].value for r in rows}
            vector = [values.get(k, 0.0) for k in case.keys]
            errors = [r.estimates[0].std_error for r in rows]
        else:
            vector = [e.value for e in rows[0].estimates]
            errors = [e.std_error for e in rows[0].estimates]
        return vector, seconds, statistics.fmean(errors)

    def peak_bytes(self) -> int:
        return _vm_hwm(self.proc.pid)

    def close(self) -> None:
        for client in self.clients:
            client.close()
        stop(self.proc)


class ContextEngine:
    """OpenDP's polars ``Context`` on the rows loaded into polars, in this process."""

    name = "OpenDP Context"

    def __init__(self, data: Path) -> None:
        import opendp.prelude as dp

        dp.enable_features("contrib")
        self.dp = dp
        start = time.perf_counter()
        with duckdb.connect(str(data), read_only=True) as con:
            self.frames = {
                "patients": con.sql("SELECT patient_id, stage, CAST(age_at_diagnosis AS BIGINT) AS age_at_diagnosis,"
                                    " CAST(survival_months AS BIGINT) AS survival_months FROM patients").pl(),
                "treatments": con.sql("SELECT patient_id, CAST(cycles AS BIGINT) AS cycles FROM treatments").pl(),
            }
        self.load_s = time.perf_counter() - start

    def run(self, case: Case, epsilon: float, i: int) -> tuple[list[float], float, float | None]:
        dp = self.dp
        start = time.perf_counter()
        frame = self.frames[case.table]
        # one row per patient in patients (unique ids); treatments: by patient id, truncated in the query
        unit = dp.unit_of(contributions=1) if case.table == "patients" else dp.unit_of(contributions=1,
                                                                                         identifier="patient_id")
        context = dp.Context.compositor(
            data=frame.lazy(), privacy_unit=unit,
            privacy_loss=dp.loss_of(epsilon=epsilon), split_evenly_over=1,
            margins=[dp.polars.Margin(by=[], max_length=len(frame))])
        assert case.context is not None
        out = case.context(context.query(), dp).release().collect()
        seconds = time.perf_counter() - start
        rows = [list(r) for r in out.sort(out.columns[0]).rows()] if case.keys else [list(out.row(0))]
        return _vector(rows, case.keys), seconds, None

    def close(self) -> None:
        self.frames.clear()


class OpenDPContext:
    """:class:`ContextEngine` in a worker process of its own, driven over JSON lines.

    OpenDP's polars path keeps memory it does not give back: at 10M patients the resident set grew
    by about 1 GB per round of the queries (3.2 GB after the first query, 12 GB after four rounds
    of two), which stopped a run of every system in one process. In its own process the other
    systems never share its memory, and the worker is started afresh, between queries and outside
    any timing, when its resident set passes ``recycle_bytes``; each restart's load is not counted
    as a query's time (the one-off load is the first one's).
    """

    name = "OpenDP Context"

    def __init__(self, data: Path, recycle_bytes: int = 6 << 30) -> None:
        self.data = data
        self.recycle_bytes = recycle_bytes
        self.restarts = 0
        self.proc: subprocess.Popen[str] | None = None
        self.load_s = self._start()

    def _start(self) -> float:
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", "context", "--probe-data", str(self.data)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        return float(self._ask({"op": "load"})["load_s"])

    def _ask(self, request: dict[str, Any]) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the OpenDP Context worker exited")
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise RuntimeError(reply["error"])
        return reply

    def run(self, case: Case, epsilon: float, i: int) -> tuple[list[float], float, float | None]:
        reply = self._ask({"op": "query", "case": case.name, "epsilon": epsilon})
        if reply["rss_bytes"] > self.recycle_bytes:
            self.close()
            self.restarts += 1
            self._start()
        return reply["vector"], reply["seconds"], None

    def close(self) -> None:
        if self.proc is not None and self.proc.stdin is not None:
            self.proc.stdin.close()
            self.proc.wait(timeout=120)
        self.proc = None


def _worker(data: Path) -> None:
    """The OpenDP Context worker's loop (see :class:`OpenDPContext`)."""
    engine: ContextEngine | None = None
    cases = {c.name: c for c in _cases()}
    for line in sys.stdin:
        request = json.loads(line)
        try:
            if request["op"] == "load":
                engine = ContextEngine(data)
                reply: dict[str, Any] = {"load_s": engine.load_s}
            else:
                assert engine is not None
                vector, seconds, _ = engine.run(cases[request["case"]], request["epsilon"], 0)
                reply = {"vector": vector, "seconds": seconds, "rss_bytes": _vm_rss(os.getpid())}
        except Exception as err:  # reported to the driver, which stops this system's run
            reply = {"error": f"{type(err).__name__}: {err}"}
        print(json.dumps(reply, default=float), flush=True)


class SmartNoise:
    name = "SmartNoise SQL"

    def __init__(self, data: Path, workdir: Path) -> None:
        python = smartnoise_python(workdir)
        self.proc = subprocess.Popen([str(python), str(Path(__file__).with_name("_smartnoise_worker.py"))],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.load_s = self._ask({"op": "load", "path": str(data), "metadata": SMARTNOISE_METADATA})["load_s"]

    def _ask(self, request: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the SmartNoise worker exited")
        return json.loads(line)  # type: ignore[no-any-return]

    def run(self, case: Case, epsilon: float, i: int) -> tuple[list[float], float, float | None]:
        reply = self._ask({"op": "query", "sql": case.smartnoise, "epsilon": epsilon})
        return _vector(reply["rows"], case.keys), reply["seconds"], None

    def peak_bytes(self) -> int:
        return int(self._ask({"op": "memory"})["peak_bytes"])

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def smartnoise_python(workdir: Path) -> Path:
    """SmartNoise SQL's interpreter, its environment made on first use (it needs opendp<0.15)."""
    venv = workdir / "smartnoise-venv"
    python = venv / "bin" / "python"
    if not python.exists():
        env = {**os.environ, "UV_PYTHON_DOWNLOADS": os.environ.get("UV_PYTHON_DOWNLOADS", "never")}
        subprocess.run(["uv", "venv", "--python", "3.11", str(venv)], check=True, env=env, capture_output=True)
        subprocess.run(["uv", "pip", "install", "--python", str(python), "smartnoise-sql", "opendp<0.15", "duckdb"],
                       check=True, env=env, capture_output=True)
    return python


def _vm_hwm(pid: int) -> int:
    """A running process's peak resident set (bytes), from /proc (0 where there is none)."""
    return _proc_status(pid, "VmHWM")


def _vm_rss(pid: int) -> int:
    """A running process's resident set now (bytes), from /proc (0 where there is none)."""
    return _proc_status(pid, "VmRSS")


def _proc_status(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# -- the run ----------------------------------------------------------------------------------------

def measure(rows: int, args: argparse.Namespace) -> dict[str, Any]:
    """Every system on ``rows`` patients: latency, load, memory and accuracy per query."""
    data = dataset(rows, args.workdir)
    cases = _cases()
    systems: list[Any] = [Raw(data)]
    unavailable: dict[str, str] = {}
    makers: list[tuple[str, Callable[[], Any]]] = [("our site", lambda: Site(data, args.workdir, args.repeats + 1))]
    if rows > args.context_max_rows:
        # its resident set passed 9 GB for one run of the queries at 10M, and grows with the rows
        unavailable["OpenDP Context"] = (f"not run above {args.context_max_rows:,} patients: it needed 9.9 GB for "
                                         "one run of the queries at 10M, and holds the rows in memory")
    elif not args.no_context:
        makers.append(("OpenDP Context", lambda: OpenDPContext(data)))
    if not args.no_smartnoise:
        makers.append(("SmartNoise SQL", lambda: SmartNoise(data, args.workdir)))
    for name, make in makers:
        try:
            systems.append(make())
        except Exception as err:  # one system that cannot run must not stop the others
            unavailable[name] = f"{type(err).__name__}: {err}"
            print(f"{name} unavailable: {unavailable[name]}", flush=True)
    epsilons = args.epsilons if rows == min(args.rows) else [args.epsilon]
    exact = {c.name: _vector([list(r) for r in systems[0].con.execute(c.exact or c.raw).fetchall()], c.keys)
             if c.accuracy else [] for c in cases}
    times: dict[tuple[str, str], list[float]] = {}
    errors: dict[tuple[str, str, float], list[float]] = {}
    reported: dict[tuple[str, str], list[float]] = {}
    try:
        for epsilon in epsilons:
            for r in range(args.repeats + 1):  # the first round warms up and is not counted
                for case in cases:
                    for system in systems:  # round robin: drift hits every system alike
                        if not _offers(system, case):
                            continue
                        vector, seconds, std_error = system.run(case, epsilon, r)
                        if r == 0:
                            continue
                        times.setdefault((system.name, case.name), []).append(seconds)
                        errors.setdefault((system.name, case.name, epsilon), []).extend(
                            (v - e) / max(abs(e), 1.0) for v, e in zip(vector, exact[case.name], strict=True))
                        if std_error is not None and math.isfinite(std_error):  # a median: none
                            reported.setdefault((system.name, case.name), []).append(std_error)
        memory = {s.name: s.peak_bytes() for s in systems if hasattr(s, "peak_bytes")}
        restarts = {s.name: s.restarts for s in systems if hasattr(s, "restarts")}
    finally:
        for system in systems:
            system.close()
    for name, flag in (("raw DuckDB", "raw"), ("OpenDP Context", "context")):
        if name in {s.name for s in systems}:
            memory[name] = _probe_memory(flag, data)
    summary = _summary(rows, systems, cases, times, errors, reported, memory, unavailable, epsilons)
    summary["worker_restarts"] = restarts
    return summary


def _offers(system: Any, case: Case) -> bool:
    """Whether ``system`` can answer ``case`` at all."""
    return not ((isinstance(system, OpenDPContext | ContextEngine) and case.context is None)
                or (isinstance(system, SmartNoise) and not case.smartnoise))


def _summary(rows: int, systems: list[Any], cases: list[Case], times: dict[tuple[str, str], list[float]],
             errors: dict[tuple[str, str, float], list[float]], reported: dict[tuple[str, str], list[float]],
             memory: dict[str, int], unavailable: dict[str, str], epsilons: list[float]) -> dict[str, Any]:
    out: dict[str, Any] = {"rows": rows, "epsilons": epsilons, "unavailable": unavailable,
                           "load_s": {s.name: s.load_s for s in systems}, "peak_memory_bytes": memory, "queries": []}
    for case in cases:
        raw_median = percentiles(times[("raw DuckDB", case.name)])["median_ms"]
        entry: dict[str, Any] = {"query": case.name, "gateway_sql": case.gateway, "systems": {}}
        for system in systems:
            if (system.name, case.name) not in times:
                continue
            latency = percentiles(times[(system.name, case.name)])
            accuracy = {}
            if system.name != "raw DuckDB" and case.accuracy:
                for epsilon in epsilons:
                    e = errors[(system.name, case.name, epsilon)]
                    rmse = math.sqrt(statistics.fmean(x * x for x in e))
                    # the RMSE's own standard error (delta method): RMSEs of a few runs are uncertain
                    se = (statistics.stdev(x * x for x in e) / math.sqrt(len(e)) / (2 * rmse)
                          if rmse > 0 and len(e) > 1 else 0.0)
                    accuracy[str(epsilon)] = {"relative_rmse": rmse, "relative_rmse_se": se,
                                              "median_relative_error": statistics.median(abs(x) for x in e)}
            std = reported.get((system.name, case.name))
            entry["systems"][system.name] = {**latency, "ratio_to_raw": latency["median_ms"] / raw_median,
                                             "accuracy": accuracy,
                                             "reported_std_error": statistics.fmean(std) if std else None}
        out["queries"].append(entry)
        print(f"{rows:>11,} {case.name:<32} " + "  ".join(
            f"{n}: {s['median_ms']:8.2f} ms ({s['ratio_to_raw']:5.1f}x)" for n, s in entry["systems"].items()),
            flush=True)
    return out


def _probe_memory(flag: str, data: Path) -> int:
    """Peak resident set of a fresh process that loads ``data`` into one system and runs every query once."""
    result = subprocess.run([sys.executable, __file__, "--probe", flag, "--probe-data", str(data)],
                            check=True, capture_output=True, text=True)
    return int(result.stdout.split()[-1])


def _probe(flag: str, data: Path) -> None:
    system: Any = Raw(data) if flag == "raw" else ContextEngine(data)
    for case in _cases():
        if _offers(system, case):
            system.run(case, 1.0, 0)
    print(_vm_hwm(os.getpid()))  # not ru_maxrss: that keeps the parent's high-water mark across exec


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--repeats", type=int, default=10, help="runs per query, system and epsilon")
    parser.add_argument("--epsilon", type=float, default=1.0, help="the epsilon at every size")
    parser.add_argument("--epsilons", type=float, nargs="+", default=[0.1, 0.3, 1.0],
                        help="the epsilons of the smallest size (accuracy against epsilon)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 20,000 rows, 2 repeats")
    parser.add_argument("--no-context", action="store_true")
    parser.add_argument("--no-smartnoise", action="store_true")
    parser.add_argument("--context-max-rows", type=int, default=10_000_000,
                        help="run OpenDP Context up to this many patients (it holds them in memory)")
    parser.add_argument("--workdir", type=Path, default=WORK)
    parser.add_argument("--out", type=Path, default=RESULTS / "compare.json")
    parser.add_argument("--probe", choices=["raw", "context"], help=argparse.SUPPRESS)
    parser.add_argument("--probe-data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--worker", choices=["context"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args.probe_data)
        return 0
    if args.probe:
        _probe(args.probe, args.probe_data)
        return 0
    if args.quick:
        quick(args, parser, rows=[20_000], repeats=2, epsilons=[0.3, 1.0])
    args.workdir.mkdir(parents=True, exist_ok=True)
    sizes = [measure(rows, args) for rows in args.rows]
    write_json(args.out, {"kind": "smoke" if args.quick else "full", "repeats": args.repeats, "sizes": sizes})
    return 0


if __name__ == "__main__":
    sys.exit(main())
