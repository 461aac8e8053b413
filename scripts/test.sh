#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs prerequisites, starts the services the tests
# talk to (RabbitMQ, the Pub/Sub and GCS emulators), then formatting, lints + build, unit,
# integration and doc tests, the offline deployment checks, and the fleet in real containers
# (scripts/compose-test.sh: Docker engine, image build, both compose profiles, the compose
# experiment). Prints how long each part took.
# Usage: scripts/test.sh [extra nextest args]
# Environment: CROPFLEET_SKIP_CONTAINERS=1 skips the container part (machines without Docker).
set -euo pipefail
cd "$(dirname "$0")/.."

t_start=$SECONDS
parts=()
part() { # part NAME COMMAND...: run one part, remember how long it took
  local name=$1 t=$SECONDS
  shift
  echo "== $name ($(date -u +%H:%M:%S) UTC)"
  "$@"
  parts+=("$(printf '%-40s %5d s' "$name" $((SECONDS - t)))")
}
# limit SECONDS COMMAND...: no part may hang CI; one that overruns fails with its name and the
# time per part so far (CI's own limit is 90 min, and it prints nothing when it kills a run).
limit() {
  local s=$1
  shift
  timeout -k 30 "$s" "$@" || {
    local rc=$?
    [ $rc -eq 124 ] && echo "test.sh: '$*' did not finish within $s s" >&2
    return $rc
  }
}
report() {
  local status=$?
  scripts/emulators.sh stop >/dev/null 2>&1 || true
  echo "== time per part"
  printf '%s\n' "${parts[@]}"
  printf '%-40s %5d s (exit %d)\n' "total" $((SECONDS - t_start)) "$status"
}
trap report EXIT

part "setup (cmake, nasm)" limit 900 scripts/setup.sh
part "services (RabbitMQ)" limit 300 scripts/services.sh start
# Pub/Sub emulator + fake-gcs-server on free loopback ports; exports PUBSUB_EMULATOR_HOST, STORAGE_EMULATOR_HOST.
emulators() { eval "$(limit 300 scripts/emulators.sh start)"; }
part "emulators (Pub/Sub, fake-gcs-server)" emulators
part "cargo fmt --check" limit 300 cargo fmt --all -- --check

# Lints and the test build in one compilation: clippy's driver is the rustc of the workspace's
# own crates (as `cargo clippy` makes it), so the dependencies are compiled once, with code, for
# the tests too — not once more for `cargo check`. The same variables stay set for the test run
# below, so nothing is rebuilt there.
export RUSTC_WORKSPACE_WRAPPER
RUSTC_WORKSPACE_WRAPPER=$(rustc --print sysroot)/bin/clippy-driver
[ -x "$RUSTC_WORKSPACE_WRAPPER" ] || RUSTC_WORKSPACE_WRAPPER=$(command -v clippy-driver)
export CLIPPY_ARGS="-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__"
part "build + clippy -D warnings (all targets)" limit 3000 cargo build --workspace --all-targets --locked

export CROPFLEET_TEST_BINS_BUILT=1
tests() {
  if cargo nextest --version >/dev/null 2>&1; then
    limit 1800 cargo nextest run --workspace --no-fail-fast "$@"
  else
    limit 2400 cargo test --workspace --no-fail-fast "$@"
  fi
}
part "tests" tests "$@"
part "doc tests" limit 900 cargo test --workspace --doc --quiet
# The binaries the tests ran, not a second build.
part "deployment files (offline)" limit 900 env CROPFLEET_BIN_DIR=target/debug scripts/validate-deploy.sh

if [ "${CROPFLEET_SKIP_CONTAINERS:-0}" = 1 ]; then
  echo "== containers: skipped (CROPFLEET_SKIP_CONTAINERS=1)"
else
  # The emulators of the tests are not needed any more: their CPU goes to the image build.
  scripts/emulators.sh stop >/dev/null 2>&1 || true
  part "containers (scripts/compose-test.sh)" limit 3600 scripts/compose-test.sh --experiment
fi
