"""Latency of one query through the broker over 1, 2, 4 and 8 sites versus a direct site query.

Reproducible: ``uv run python bench/broker_fanout.py [--patients 2000] [--repeats 30]``. Every site
and the broker are real processes on loopback (``gateway.network``); site data is kept small so the
fan-out itself is what is measured. Every query is distinct, so no stored answer is reused.
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from gateway.client import Client
from gateway.demo.network import start_network

ROOT = Path(__file__).resolve().parent.parent
# same work, different canonical queries: the direct and the broker query must not share a stored answer
DIRECT_SQL = "SELECT stage, count(*) FROM patients WHERE age_at_diagnosis >= {a} GROUP BY stage"
BROKER_SQL = "SELECT stage, count(*) FROM patients WHERE age_at_diagnosis > {b} GROUP BY stage"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sites", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--patients", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=30, help="at most 75 (distinct filter values)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "broker_fanout.json")
    args = parser.parse_args()
    rows = []
    for n in args.sites:
        work = Path(tempfile.mkdtemp(prefix="fanout-"))
        net = start_network(work, n_sites=n, patients=args.patients)
        try:
            assert net.broker is not None
            token = net.token(project="onc-bench")
            direct_target = next(iter(net.sites.values())).target
            with Client(net.broker.target, token=token, proof_key=net.proof_key) as broker, \
                    Client(direct_target, token=token, proof_key=net.proof_key) as direct:
                b_times, d_times = [], []
                for i in range(args.repeats + 3):
                    start = time.perf_counter()
                    direct.query(DIRECT_SQL.format(a=18 + i), epsilon=0.01, query_id=f"d-{i}")
                    d = time.perf_counter() - start
                    start = time.perf_counter()
                    broker.query(BROKER_SQL.format(b=17 + i), epsilon=0.01, query_id=f"b-{i}")
                    b = time.perf_counter() - start
                    if i >= 3:
                        d_times.append(d)
                        b_times.append(b)
            row = {"sites": n, "broker_ms": statistics.median(b_times) * 1000,
                   "direct_ms": statistics.median(d_times) * 1000}
            row["ratio"] = row["broker_ms"] / row["direct_ms"]
            rows.append(row)
            print(f"{n} site(s): broker {row['broker_ms']:7.2f} ms   direct single site {row['direct_ms']:7.2f} ms"
                  f"   ratio {row['ratio']:5.2f}x", flush=True)
        finally:
            net.stop()
            shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": {"python": sys.version.split()[0], "cpus": os.cpu_count(),
                                                "platform": platform.platform()},
                                    "patients_per_site": args.patients, "repeats": args.repeats, "results": rows},
                                   indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
