#!/usr/bin/env bash
# Property-based fuzzing at scale: the proptest target shared/tests/fuzz.rs (task JSON, crop CSVs,
# image headers / decode / lossless inspect) in a release build with many more cases than the
# default test run. cargo-fuzz would need a nightly toolchain; this runs on stable.
# Usage: scripts/fuzz.sh [CASES]    (default 100000 per property; image properties run CASES/4)
# Failures are shrunk and saved to shared/proptest-regressions/fuzz.txt (commit that file, and add
# the input to shared/tests/fuzz-corpus/ when it is worth keeping as a file).
set -euo pipefail
cd "$(dirname "$0")/.."

cases="${1:-${CROPFLEET_FUZZ_CASES:-100000}}"
echo "== fuzz: CROPFLEET_FUZZ_CASES=$cases cargo test --release -p cropfleet --test fuzz"
echo "   (task and crops properties: $cases cases each; image properties: $((cases / 4)) cases each)"
cargo test --release -p cropfleet --test fuzz --no-run --quiet
start=$(date +%s)
CROPFLEET_FUZZ_CASES="$cases" cargo test --release -p cropfleet --test fuzz --quiet -- --test-threads 2
end=$(date +%s)
echo "== fuzz: $cases cases per property passed in $((end - start)) s (load: $(cut -d' ' -f1-3 /proc/loadavg))"
