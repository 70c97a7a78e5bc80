"""SmartNoise SQL on a DuckDB file, driven over JSON lines (runs in SmartNoise's own environment).

SmartNoise SQL needs ``opendp<0.15``, which the project cannot share, so ``bench/compare.py`` runs
this file with a separate interpreter (``bench/work/smartnoise-venv``) and talks to it over
stdin/stdout, one JSON object per line; every figure is timed here, so process start-up is never
counted. Requests: ``{"op": "load", "path": ..., "metadata": {...}}``, ``{"op": "query", "sql": ...,
"epsilon": ...}`` (``epsilon`` is the query's total: SmartNoise charges each aggregate, and a mean
twice, so the per-aggregate epsilon is scaled to make the query's cost exactly that), and
``{"op": "memory"}`` (this process's peak resident set, bytes).

SmartNoise reads through its PostgreSQL reader on a DuckDB connection (DuckDB speaks that
dialect) so the engine under it is as fast as ours. DuckDB refuses ``random()`` in a window's
ORDER BY, which SmartNoise uses to pick each patient's ``max_ids`` rows; the adapter orders by a
constant instead, so DuckDB keeps whichever rows it reads first: any ``max_ids`` rows per patient
keep SmartNoise's sensitivity, so the privacy and the work are unchanged.
"""

import json
import re
import sys
import time

import duckdb
import snsql
from snsql import Privacy

_RANDOM_ORDER = re.compile(r"ORDER BY RANDOM \( \)")


class _Cursor:
    def __init__(self, cursor):
        self._cursor = cursor
        self.description = None

    def execute(self, sql):
        self._cursor.execute(_RANDOM_ORDER.sub("ORDER BY 1", sql))
        self.description = self._cursor.description

    def __iter__(self):
        return iter(self._cursor.fetchall())


class _Connection:
    """A DuckDB connection as SmartNoise's PostgreSQL reader drives one (no transactions)."""

    def __init__(self, con):
        self._con = con

    def cursor(self):
        return _Cursor(self._con.cursor())

    def commit(self):
        pass

    def rollback(self):
        pass


def main():
    con = reader = meta = None
    for line in sys.stdin:
        request = json.loads(line)
        op = request["op"]
        if op == "load":
            start = time.perf_counter()
            con = duckdb.connect()
            path = request["path"].replace("'", "''")
            con.execute(f"ATTACH '{path}' AS src (READ_ONLY)")
            con.execute("CREATE SCHEMA bench")
            for table in request["metadata"]["bench"]["bench"]:
                con.execute(f"CREATE VIEW bench.{table} AS SELECT * FROM src.{table}")
            meta = request["metadata"]
            reader = snsql.from_connection(_Connection(con), engine="postgres", privacy=Privacy(epsilon=1.0),
                                           metadata=meta)
            reply = {"load_s": time.perf_counter() - start}
        elif op == "query":
            start = time.perf_counter()
            unit_cost = reader.get_privacy_cost(request["sql"])[0]  # per 1.0 of per-aggregate epsilon
            reader.privacy = Privacy(epsilon=request["epsilon"] / unit_cost)
            rows = reader.execute(request["sql"])
            reply = {"rows": [list(r) for r in rows[1:]], "seconds": time.perf_counter() - start}
        elif op == "memory":
            # VmHWM, not ru_maxrss: that keeps the parent's high-water mark across exec
            with open("/proc/self/status") as f:
                status = dict(line.split(":", 1) for line in f.read().splitlines())
            reply = {"peak_bytes": int(status["VmHWM"].split()[0]) * 1024}
        else:
            reply = {"error": f"unknown op {op!r}"}
        print(json.dumps(reply, default=float), flush=True)


if __name__ == "__main__":
    main()
