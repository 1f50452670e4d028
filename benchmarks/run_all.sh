#!/usr/bin/env bash
# The one command: regenerates every benchmark number and plot from scratch.
#
#   bash benchmarks/run_all.sh          # reuse the cached pairs if present (benchmarks/.cache/, git-ignored)
#   bash benchmarks/run_all.sh --fresh  # delete the cache first: pre-train, fine-tune, then measure
#
# Needs the bench extra (pip install -e ".[bench]") for the plots. Runs under `nice`, one torch thread by default
# (IMPART_BENCH_THREADS overrides). Writes benchmarks/results/{quality,speed}.json, docs/*.png and the generated
# part of docs/benchmarks.md, and prints the wall and CPU time it took.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
export IMPART_BENCH_THREADS="${IMPART_BENCH_THREADS:-1}"
if [[ "${1:-}" == "--fresh" ]]; then
    rm -rf benchmarks/.cache/pairs
fi
start=$(date +%s)
TIMEFORMAT='  %R s wall, %U s user CPU'
time nice -n 10 "$PY" benchmarks/pairs.py
time nice -n 10 "$PY" benchmarks/quality.py
time nice -n 10 "$PY" benchmarks/speed.py
nice -n 10 "$PY" benchmarks/report.py
echo "run_all: $(( $(date +%s) - start )) s wall in total" >&2
