"""Site gateway latency versus raw DuckDB on the same data, and throughput with 8 clients.

Reproducible: ``uv run python bench/site_latency.py [--sizes 1000000 10000000] [--repeats 25]``.
Synthetic data is cached under ``--workdir``. The site runs as a real ``gateway site serve``
process with its ledger on (SQLite, WAL, full sync); every gateway query is distinct (different
filter value) so none is served from the answer store. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import duckdb

from gateway.auth import generate_dev_key, mint_dev_token
from gateway.client import Client
from gateway.demo.synth import synthesize
from gateway.proof import ProofKey

ROOT = Path(__file__).resolve().parent.parent
BUDGET = 'budgets:\n  - project: "bench"\n    epsilon: 100000000\n    period: never\n'

# (name, dataset, gateway SQL, raw DuckDB SQL); {a} varies per repeat so no answer is reused
CASES = [
    ("count", "patients", "SELECT count(*) FROM patients WHERE age_at_diagnosis >= {a}",
     "SELECT count(*) FROM patients WHERE age_at_diagnosis >= {a}"),
    ("group-by count", "patients", "SELECT stage, count(*) FROM patients WHERE age_at_diagnosis >= {a} GROUP BY stage",
     "SELECT stage, count(*) FROM patients WHERE age_at_diagnosis >= {a} GROUP BY stage"),
    ("mean", "patients", "SELECT mean(survival_months) FROM patients WHERE age_at_diagnosis >= {a}",
     "SELECT avg(survival_months) FROM patients WHERE age_at_diagnosis >= {a}"),
    ("bounded multi-row mean", "treatments",
     "SELECT treatment_type, mean(cycles) FROM treatments WHERE days_from_diagnosis >= {a} GROUP BY treatment_type",
     "SELECT treatment_type, avg(cycles) FROM treatments WHERE days_from_diagnosis >= {a} GROUP BY treatment_type"),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--repeats", type=int, default=25, help="at most 77 (distinct filter values)")
    parser.add_argument("--throughput-seconds", type=float, default=10.0)
    parser.add_argument("--workdir", type=Path, default=ROOT / "bench" / "work")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "site_latency.json")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    private, public = generate_dev_key(args.workdir / "keys")
    proof_key = ProofKey.generate()
    token = mint_dev_token(private.read_bytes(), "bench", "bench", proof_jkt=proof_key.jkt)
    results = {"machine": {"python": sys.version.split()[0], "cpus": os.cpu_count(), "platform": platform.platform()},
               "repeats": args.repeats, "latency": [], "throughput": None}
    for size in args.sizes:
        data = args.workdir / f"north-{size}.duckdb"
        if not data.exists():
            synthesize("north", size, data, seed=1)
        policy = args.workdir / f"north-{size}.yaml"
        text = (ROOT / "policies" / "north.yaml").read_text().replace("data/north.duckdb", str(data))
        policy.write_text(text.replace("budgets:", BUDGET, 1))
        state = args.workdir / f"state-{size}"
        shutil.rmtree(state, ignore_errors=True)  # a fresh ledger: no stored answer from an earlier run
        server, port = _start(policy, public, state)
        try:
            with Client(f"127.0.0.1:{port}", token=token, proof_key=proof_key) as client, \
                    duckdb.connect(str(data), read_only=True) as raw:
                for name, _dataset, gw_sql, raw_sql in CASES:
                    gw, direct = _measure(client, raw, gw_sql, raw_sql, args.repeats, size)
                    results["latency"].append({"rows": size, "query": name, "gateway_ms": gw, "raw_duckdb_ms": direct,
                                               "ratio": gw / direct})
                    print(f"{size:>10,} {name:<24} gateway {gw:8.2f} ms   raw DuckDB {direct:8.2f} ms   "
                          f"ratio {gw / direct:5.2f}x", flush=True)
            if size == min(args.sizes):
                results["throughput"] = _throughput(port, token, proof_key, args.throughput_seconds, size)
                results["throughput"]["raw_duckdb_qps"] = _raw_throughput(data, args.throughput_seconds)
                print(f"{size:>10,} throughput, 8 concurrent clients: {results['throughput']['qps']:.0f} queries/s "
                      f"(raw DuckDB, 8 threads, same queries: {results['throughput']['raw_duckdb_qps']:.0f}/s)",
                      flush=True)
        finally:
            server.terminate()
            server.wait(timeout=60)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")
    return 0


def _start(policy: Path, public: Path, state: Path) -> tuple[subprocess.Popen[bytes], int]:
    port_file = state.parent / f"{state.name}.port"
    port_file.unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "site", "serve", "--policy", str(policy), "--port",
                             "0", "--state-dir", str(state), "--trusted-key", str(public), "--port-file",
                             str(port_file)], stdout=subprocess.DEVNULL)
    while not port_file.exists() or not port_file.read_text():
        if proc.poll() is not None:
            raise SystemExit("site failed to start")
        time.sleep(0.1)
    return proc, int(port_file.read_text())


def _measure(client: Client, raw: duckdb.DuckDBPyConnection, gw_sql: str, raw_sql: str, repeats: int,
             size: int) -> tuple[float, float]:
    gw_times, raw_times = [], []
    for i in range(repeats + 3):
        a = 18 + i % 80  # distinct filter per repeat, so no stored answer is reused
        start = time.perf_counter()
        raw.execute(raw_sql.format(a=a)).fetchall()
        raw_t = time.perf_counter() - start
        start = time.perf_counter()
        client.query(gw_sql.format(a=a), epsilon=1e-3, query_id=f"bench-{time.time_ns()}-{i}")
        gw_t = time.perf_counter() - start
        if i >= 3:  # warm-up
            raw_times.append(raw_t)
            gw_times.append(gw_t)
    return statistics.median(gw_times) * 1000, statistics.median(raw_times) * 1000


CLIENTS = 8


def _run_clients(seconds: float, step: Callable[[int, int], None]) -> tuple[list[int], list[int], float]:
    """Run ``step(worker, i)`` in CLIENTS threads for ``seconds``: (ok counts, error counts, elapsed)."""
    done, counts, errors = threading.Event(), [0] * CLIENTS, [0] * CLIENTS

    def worker(w: int) -> None:
        i = 0
        while not done.is_set():
            i += 1
            try:
                step(w, i)
                counts[w] += 1
            except Exception:  # count, do not hide
                errors[w] += 1

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(CLIENTS)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(seconds)
    done.set()
    for t in threads:
        t.join()
    return counts, errors, time.perf_counter() - start


def _throughput(port: int, token: str, proof_key: ProofKey, seconds: float, size: int) -> dict[str, float]:
    clients = [Client(f"127.0.0.1:{port}", token=token, proof_key=proof_key) for _ in range(CLIENTS)]

    def step(w: int, i: int) -> None:
        # the same work as the latency "count" case; a distinct epsilon per request makes every
        # canonical query distinct, so no stored answer is reused
        clients[w].query(f"SELECT count(*) FROM patients WHERE age_at_diagnosis >= {18 + i % 80}",
                         epsilon=1e-4 + w * 1e-6 + i * 1e-11, query_id=f"tp-{w}-{i}-{time.time_ns()}")

    counts, errors, elapsed = _run_clients(seconds, step)
    for client in clients:
        client.close()
    return {"rows": size, "clients": CLIENTS, "seconds": elapsed, "queries": sum(counts), "errors": sum(errors),
            "qps": sum(counts) / elapsed, "distinct": True}


def _raw_throughput(data: Path, seconds: float) -> float:
    """The same count queries straight on DuckDB from 8 threads: the machine's ceiling for this work."""
    con = duckdb.connect(str(data), read_only=True)
    cursors = [con.cursor() for _ in range(CLIENTS)]

    def step(w: int, i: int) -> None:
        cursors[w].execute(f"SELECT count(*) FROM patients WHERE age_at_diagnosis >= {18 + i % 80}").fetchall()

    counts, _errors, elapsed = _run_clients(seconds, step)
    con.close()
    return sum(counts) / elapsed


if __name__ == "__main__":
    sys.exit(main())
