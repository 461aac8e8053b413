#!/usr/bin/env bash
# Latency hiding, measured: the sweep writes its crops to the Cloud Storage emulator through a
# proxy that adds a fixed delay to every request, once with 0 ms and once with 50 ms, using the
# workers' default --prefetch and --upload-concurrency; prints tasks/s of both and the ratio.
# Usage: scripts/latency.sh   (knobs: CROPFLEET_LATENCY_TASKS=200 CROPFLEET_LATENCY_MS=50
#        CROPFLEET_LATENCY_GRID=1,2x1,2 CROPFLEET_LATENCY_ARGS="--crop-modes lossless")
# Results (runs.csv/json, pictures) go to results/latency/{0ms,50ms}/.
set -euo pipefail
cd "$(dirname "$0")/.."

started=""
if ! scripts/emulators.sh env >/dev/null 2>&1; then started=1; fi
eval "$(scripts/emulators.sh start)"
if [ -n "$started" ]; then trap 'scripts/emulators.sh stop >/dev/null 2>&1 || true' EXIT; fi
export CROPFLEET_LATENCY_OUT="$PWD/results/latency"
cargo build --release --bins --quiet
CROPFLEET_TEST_BINS_BUILT=1 cargo test --release --quiet -p cropfleet-aggregator --test latency \
  -- --ignored --exact measure_latency_hiding --nocapture
