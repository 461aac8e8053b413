#!/usr/bin/env bash
# The chaos suite (issue 7) at full size: for each queue backend (spool, RabbitMQ, Pub/Sub
# emulator) x storage (local disk, Cloud Storage emulator), N valid tasks plus every kind of
# poison message, 3 workers SIGKILLed and restarted, a broker restart, a storage outage and a
# SIGTERM, then the checker (see aggregator/tests/chaos.rs). Release build, one test at a time
# so the machine's load does not distort the runs. Prints the summary lines as a table.
#
# Usage: scripts/chaos.sh [extra cargo test filter args]
#   N=200            valid tasks per test (default 200)
# Starts RabbitMQ and the emulators if they are not running; stops only the emulators it started.
set -euo pipefail
cd "$(dirname "$0")/.."

N="${N:-200}"

scripts/services.sh start
started_emulators=0
if env_lines="$(scripts/emulators.sh env 2>/dev/null)"; then
  eval "$env_lines"
else
  eval "$(scripts/emulators.sh start)"
  started_emulators=1
fi
summary="$(mktemp)"
trap 'rm -f "$summary"; if [ "$started_emulators" = 1 ]; then scripts/emulators.sh stop >/dev/null 2>&1 || true; fi' EXIT

echo "== building (release)"
cargo build --release --bins --quiet
cargo test --release -p cropfleet-aggregator --test chaos --no-run --quiet
export CROPFLEET_TEST_BINS_BUILT=1
export CROPFLEET_CHAOS_TASKS="$N"
export CROPFLEET_CHAOS_SUMMARY="$summary"

echo "== machine: $(nproc) cores, load $(uptime | sed 's/.*load average: //')"
status=0
echo "== chaos: $N tasks per test, 6 tests, one at a time"
cargo test --release -p cropfleet-aggregator --test chaos -- --nocapture --test-threads=1 "$@" || status=$?

echo
echo "== summary ($N valid tasks per test; load after: $(uptime | sed 's/.*load average: //'))"
sed 's/^chaos //' "$summary" | column -t -s ',' || cat "$summary"
exit "$status"
