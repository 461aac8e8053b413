#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs prerequisites, starts the services the tests
# talk to (RabbitMQ), then formatting, lints, unit, integration and doc tests.
# Usage: scripts/test.sh [extra nextest args]
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
scripts/services.sh start
# Pub/Sub emulator + fake-gcs-server on free loopback ports; exports PUBSUB_EMULATOR_HOST, STORAGE_EMULATOR_HOST.
eval "$(scripts/emulators.sh start)"
trap 'scripts/emulators.sh stop >/dev/null 2>&1 || true' EXIT

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings
echo "== tests"
cargo build --workspace --bins --quiet
export CROPFLEET_TEST_BINS_BUILT=1
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast "$@"
else
  cargo test --workspace --no-fail-fast "$@"
fi
echo "== doc tests"
cargo test --workspace --doc --quiet
echo "== deployment files (offline)"
scripts/validate-deploy.sh
