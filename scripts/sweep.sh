#!/usr/bin/env bash
# The main job in one command, on a fresh machine with only a Rust toolchain: install what the
# build needs (scripts/setup.sh: cmake, nasm), build the whole workspace once in release with
# cargo's progress shown (one cargo invocation, so every binary shares one feature resolution
# and nothing is built twice), then run the sweep with the worker just built.
# Usage: scripts/sweep.sh [sweep flags]     e.g. scripts/sweep.sh --crop-modes decode,lossless
#        (flags: target/release/cropfleet-aggregator sweep --help)
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
  echo "sweep: cargo not found; install a Rust toolchain (1.85+), e.g. from https://rustup.rs" >&2
  exit 1
fi
scripts/setup.sh
echo "sweep: building the workspace (release)"
cargo build --release --locked --bins
bin="${CARGO_TARGET_DIR:-target}/release"
exec "$bin/cropfleet-aggregator" sweep --worker-bin "$bin/cropfleet-worker" "$@"
