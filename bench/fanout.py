"""Throughput of one site and of a broker, and the broker's own overhead over 1 to 64 stand-in sites.

One command: ``uv run --group bench python bench/fanout.py`` (``--quick`` for a smoke run).

1. Throughput: 1, 8 and 32 concurrent clients (threads, one :class:`Client` each) for
   ``--seconds`` against one real site over ``--rows`` patients (1M), and against a real broker
   over 4 real sites (``--broker-patients`` each); queries per second and latency percentiles.
   Each client is a project of its own whose every query is new (a filter value and epsilon it has
   not asked before), so none is a stored answer. Raw DuckDB with the same threads and queries
   gives the machine's ceiling.
2. Broker overhead: stand-in sites, small asyncio gRPC servers in one separate process that
   answer after a fixed ``--delay-ms`` without using CPU (as remote machines would), each with a
   real site's answer to the same query (so the broker's validation and pooling do their full
   work); a real ``gateway broker serve`` over 1, 2, 4 ... 64 of them. Overhead = the broker's
   median latency - the delay; also shown: one stand-in called directly (the client's own cost),
   and the CPU time per query of the broker and of the stand-ins (on a small machine the
   stand-ins' own gRPC work in Python competes with the broker's and is part of its latency).

Writes ``bench/results/fanout.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import duckdb
import yaml

from bench._common import RESULTS, WORK, bench_policy, dataset, keys, percentiles, quick, start_site, stop, write_json
from gateway.client import Client

SQL = "SELECT stage, count(*) FROM patients WHERE age_at_diagnosis >= {a} GROUP BY stage"
STANDIN_SQL = "SELECT stage, count(*) FROM patients GROUP BY stage"


def load(make_client: Callable[[str], Client], clients: int, seconds: float, run: int) -> dict[str, Any]:
    """``clients`` threads querying for ``seconds``: queries/s, errors, latency percentiles.

    ``make_client(suffix)`` gives a client of its own project (``...-<run>-<worker>``): each
    worker is a researcher whose every query is new to the sites (a filter value and an epsilon
    not asked before by that project), so each is answered and charged.
    """
    pool = [make_client(f"{run}-{w}") for w in range(clients)]
    for client in pool:
        client.budget()  # connected and the token verified before the clock starts
    done = threading.Event()
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients

    def worker(w: int) -> None:
        i = 0
        while not done.is_set():
            i += 1
            start = time.perf_counter()
            try:
                pool[w].query(SQL.format(a=18 + i % 80), epsilon=1e-3 * (1 + i // 80))
                latencies[w].append(time.perf_counter() - start)
            except Exception:  # counted, not hidden
                errors[w] += 1

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(seconds)
    done.set()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    for client in pool:
        client.close()
    every = [x for per in latencies for x in per]
    return {"clients": clients, "qps": len(every) / elapsed, "errors": sum(errors), **percentiles(every or [0.0])}


def raw_load(data: Path, clients: int, seconds: float) -> float:
    """The same queries straight on DuckDB from ``clients`` threads: queries per second."""
    con = duckdb.connect(str(data), read_only=True)
    cursors = [con.cursor() for _ in range(clients)]
    done, counts = threading.Event(), [0] * clients

    def worker(w: int) -> None:
        while not done.is_set():
            counts[w] += 1
            cursors[w].execute(SQL.format(a=18 + counts[w] % 80)).fetchall()

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(seconds)
    done.set()
    for t in threads:
        t.join()
    con.close()
    return sum(counts) / (time.perf_counter() - start)


def site_throughput(args: argparse.Namespace) -> dict[str, Any]:
    data = dataset(args.rows, args.workdir)
    k = keys(args.workdir)
    proc, port = start_site(bench_policy(data, args.workdir / "policies" / f"fanout-{data.stem}.yaml"), k.public,
                            args.workdir / "state" / f"fanout-{data.stem}")
    try:
        runs = [load(lambda p: Client(f"127.0.0.1:{port}", token=k.token(f"bench-{p}"), proof_key=k.proof), n,
                     args.seconds, i) for i, n in enumerate(args.clients)]
    finally:
        stop(proc)
    for run in runs:
        run["raw_duckdb_qps"] = raw_load(data, run["clients"], args.seconds)
        print(f"site, {args.rows:,} rows, {run['clients']:>2} clients: {run['qps']:7.1f} queries/s, median "
              f"{run['median_ms']:.1f} ms, p95 {run['p95_ms']:.1f} ms (raw DuckDB {run['raw_duckdb_qps']:.0f}/s)",
              flush=True)
    return {"rows": args.rows, "runs": runs}


def broker_throughput(args: argparse.Namespace) -> dict[str, Any]:
    from gateway.demo.network import start_network
    from gateway.proof import ProofKey

    work = args.workdir / "network"
    shutil.rmtree(work / "state", ignore_errors=True)
    net = start_network(work, n_sites=4, patients=args.broker_patients)
    try:
        assert net.broker is not None
        token, proof = net.token(project="onc-bench"), ProofKey.load(net.proof_key)
        names, target = list(net.sites), net.broker.target
        runs = [load(lambda p: Client(target, token=net.token(project=f"onc-bench-{p}"), proof_key=proof,
                                      sign_for=names), n, args.seconds, i) for i, n in enumerate(args.clients)]
        with Client(next(iter(net.sites.values())).target, token=token, proof_key=proof) as direct:
            captured = direct.query(STANDIN_SQL, epsilon=0.5).response
    finally:
        net.stop()
    (args.workdir / "standin-answer.bin").write_bytes(captured.SerializeToString())
    for run in runs:
        print(f"broker over 4 sites ({args.broker_patients:,} patients each), {run['clients']:>2} clients: "
              f"{run['qps']:7.1f} queries/s, median {run['median_ms']:.1f} ms, p95 {run['p95_ms']:.1f} ms", flush=True)
    return {"sites": 4, "patients_per_site": args.broker_patients, "runs": runs}


# -- the broker's own overhead, over stand-in sites ------------------------------------------------

def serve_standins(count: int, delay: float, answer: Path, port_file: Path) -> None:
    """``count`` stand-in sites on loopback, in this process: each answers Query after ``delay`` seconds."""
    import grpc

    from gateway._proto.gateway.v1 import gateway_pb2 as pb
    from gateway._proto.gateway.v1 import gateway_pb2_grpc as pb_grpc

    template = pb.QueryResponse.FromString(answer.read_bytes())

    class StandIn(pb_grpc.GatewayServicer):  # type: ignore[misc]
        def __init__(self, name: str) -> None:
            self.name = name

        async def Query(self, request: pb.QueryRequest, context: Any) -> pb.QueryResponse:
            await asyncio.sleep(delay)  # a remote site's time: no CPU here
            response = pb.QueryResponse()
            response.CopyFrom(template)
            response.query_id, response.served_by = request.query_id, self.name
            return response

    async def run() -> None:
        servers, ports = [], []
        for i in range(count):
            server = grpc.aio.server()
            pb_grpc.add_GatewayServicer_to_server(StandIn(f"standin{i}"), server)
            ports.append(server.add_insecure_port("127.0.0.1:0"))
            await server.start()
            servers.append(server)
        port_file.write_text(json.dumps(ports))
        await asyncio.gather(*(s.wait_for_termination() for s in servers))

    asyncio.run(run())


def _cpu_seconds(pid: int) -> float:
    """User and system CPU time a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _spawn(args: list[str], port_file: Path) -> subprocess.Popen[bytes]:
    port_file.unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (port_file.exists() and port_file.read_text().strip()):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"{args[:3]} failed to start")
        time.sleep(0.05)
    return proc


def broker_overhead(args: argparse.Namespace) -> list[dict[str, Any]]:
    k = keys(args.workdir)
    token = k.token()
    answer = args.workdir / "standin-answer.bin"
    rows = []
    for count in args.standins:
        ports_file, broker_port = args.workdir / "standins.json", args.workdir / "broker.port"
        standins = _spawn([__file__, "--serve-standins", str(count), "--delay-ms", str(args.delay_ms),
                           "--answer", str(answer), "--port-file", str(ports_file)], ports_file)
        broker = None
        try:
            ports = json.loads(ports_file.read_text())
            names = [f"standin{i}" for i in range(count)]
            config = args.workdir / "standin-broker.yaml"
            config.write_text(yaml.safe_dump({"name": "broker", "deadline_seconds": 30, "sites": [
                {"name": n, "address": f"127.0.0.1:{p}"} for n, p in zip(names, ports, strict=True)]}))
            broker = _spawn(["-m", "gateway.cli", "broker", "serve", "--config", str(config), "--trusted-key",
                             str(k.public), "--port", "0", "--port-file", str(broker_port)], broker_port)
            target = f"127.0.0.1:{int(broker_port.read_text())}"
            with Client(target, token=token, proof_key=k.proof, sign_for=names) as via, \
                    Client(f"127.0.0.1:{ports[0]}", token=token, proof_key=k.proof, sign_for=names[:1]) as one:
                b_times, d_times = [], []
                cpu_before: dict[str, float] = {}
                for i in range(args.repeats + 3):
                    if i == 3:  # after the warm-up: connections made, lazy imports done
                        cpu_before = {"broker": _cpu_seconds(broker.pid), "standins": _cpu_seconds(standins.pid)}
                    start = time.perf_counter()
                    one.query(STANDIN_SQL, epsilon=0.5, query_id=f"d-{i}")
                    d = time.perf_counter() - start
                    start = time.perf_counter()
                    result = via.query(STANDIN_SQL, epsilon=0.5, query_id=f"b-{i}")
                    b = time.perf_counter() - start
                    if len(result.sites) != count:
                        raise SystemExit(f"the broker pooled {len(result.sites)} of {count} stand-ins: "
                                         f"{result.missing_sites}")
                    if i >= 3:
                        b_times.append(b)
                        d_times.append(d)
                queries = args.repeats
                cpu = {"broker_cpu_ms_per_query": (_cpu_seconds(broker.pid) - cpu_before["broker"]) / queries * 1000,
                       # the stand-ins' own CPU (gRPC in Python), which real remote sites would spend elsewhere;
                       # it includes the direct calls, one per query
                       "standins_cpu_ms_per_query": (_cpu_seconds(standins.pid) - cpu_before["standins"])
                       / queries * 1000}
        finally:
            for proc in (broker, standins):
                if proc is not None:
                    stop(proc)
        b_lat, d_lat = percentiles(b_times), percentiles(d_times)
        row = {"sites": count, "delay_ms": args.delay_ms, "broker": b_lat, "direct_standin": d_lat, **cpu,
               "overhead_ms": b_lat["median_ms"] - args.delay_ms,
               "overhead_over_direct_ms": b_lat["median_ms"] - d_lat["median_ms"],
               "target_ms": 2 + 0.1 * count}
        rows.append(row)
        print(f"broker over {count:>2} stand-ins ({args.delay_ms:g} ms each): {b_lat['median_ms']:7.2f} ms (p95 "
              f"{b_lat['p95_ms']:.2f}); overhead {row['overhead_ms']:.2f} ms (target {row['target_ms']:.1f} ms); "
              f"one stand-in called directly {d_lat['median_ms']:.2f} ms; CPU per query: broker "
              f"{row['broker_cpu_ms_per_query']:.2f} ms, stand-ins {row['standins_cpu_ms_per_query']:.2f} ms",
              flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--broker-patients", type=int, default=100_000)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--seconds", type=float, default=10.0, help="per throughput run")
    parser.add_argument("--standins", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--delay-ms", type=float, default=20.0)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="a smoke run: small data, 2 s runs, few stand-ins")
    parser.add_argument("--workdir", type=Path, default=WORK)
    parser.add_argument("--out", type=Path, default=RESULTS / "fanout.json")
    parser.add_argument("--serve-standins", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--answer", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_standins:
        serve_standins(args.serve_standins, args.delay_ms / 1000, args.answer, args.port_file)
        return 0
    if args.quick:
        quick(args, parser, rows=20_000, broker_patients=2_000, seconds=2.0, clients=[1, 8], standins=[1, 4],
              repeats=5)
    args.workdir.mkdir(parents=True, exist_ok=True)
    site = site_throughput(args)
    broker = broker_throughput(args)
    overhead = broker_overhead(args)
    write_json(args.out, {"kind": "smoke" if args.quick else "full", "site": site, "broker": broker,
                          "broker_overhead": overhead})
    return 0


if __name__ == "__main__":
    sys.exit(main())
