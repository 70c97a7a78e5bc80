#!/usr/bin/env bash
# The full benchmark run: every script at full size, then bench/RESULTS.md and its plots.
#   bash bench/run_all.sh            # 1M and 10M patients (about 20 minutes on 2 cores)
#   bash bench/run_all.sh --1m       # 1M patients only (about 12 minutes)
#   bash bench/run_all.sh --100m     # adds 100M patients, without OpenDP Context (not yet run)
#   bash bench/run_all.sh --quick    # a smoke run at small sizes (a few minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
export UV_PYTHON_DOWNLOADS="${UV_PYTHON_DOWNLOADS:-never}"
run() { uv run --group bench python "$@"; }
case "${1:-}" in
  --quick)
    echo "smoke run: about 5 minutes"
    run bench/compare.py --quick
    run bench/fanout.py --quick
    run bench/federated.py --quick ;;
  --100m)
    echo "full run with 100M patients: several hours"
    run bench/compare.py --rows 1000000 10000000 100000000
    run bench/fanout.py
    run bench/federated.py ;;
  --1m)
    echo "run at 1M patients: about 12 minutes on 2 cores"
    run bench/compare.py --rows 1000000
    run bench/fanout.py
    run bench/federated.py ;;
  "")
    echo "full run at 1M and 10M patients: about 20 minutes on 2 cores"
    run bench/compare.py --rows 1000000 10000000
    run bench/fanout.py
    run bench/federated.py ;;
  *) echo "usage: bash bench/run_all.sh [--quick | --1m | --100m]" >&2; exit 2 ;;
esac
run bench/report.py
