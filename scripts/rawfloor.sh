#!/usr/bin/env bash
# An independent measurement of this machine's codec limit, to check the sweep's
# `limit_tasks_per_s` against: scripts/rawfloor/rawfloor.c, a C program timing one task's
# decode + crop encodes straight through libjpeg-turbo (the static library cargo built for
# turbojpeg-sys, so the same code and SIMD), outside cropfleet.
# Usage: scripts/rawfloor.sh [IMAGE.jpg CROPS.csv [REPS [QUALITY]]]
#        (default: the sweep's sample workload in results/sweep/workload, 20 reps, quality 85)
set -euo pipefail
cd "$(dirname "$0")/.."

image=${1:-results/sweep/workload/sample-4000x3000.jpg}
crops=${2:-results/sweep/workload/crops-4000x3000-50.csv}
lib=$(find "${CARGO_TARGET_DIR:-target}"/release/build -path '*turbojpeg-sys-*/out/*' -name libturbojpeg.a 2>/dev/null | head -1)
if [ -z "$lib" ]; then
  echo "rawfloor: no libturbojpeg.a under target/release/build; run scripts/sweep.sh (or cargo build --release) first" >&2
  exit 1
fi
out=$(dirname "$(dirname "$lib")")
mkdir -p target/rawfloor
cc -O2 -o target/rawfloor/rawfloor scripts/rawfloor/rawfloor.c -I"$out/include" "$lib"
exec target/rawfloor/rawfloor "$image" "$crops" "${3:-20}" "${4:-85}"
