#!/usr/bin/env bash
# Start the services the integration tests need, if they are not already running.
# RabbitMQ: 127.0.0.1:5672, guest/guest (Debian's rabbitmq-server).
# Every wait is bounded: a broker that does not come up is an error after at most
# CROPFLEET_SERVICES_TIMEOUT seconds (default 180), never a hang.
# Usage: scripts/services.sh start
set -euo pipefail

deadline_s=${CROPFLEET_SERVICES_TIMEOUT:-180}
log() { echo "services: $*"; }
# rabbitmqctl can block on an unreachable or half-started node: never wait on it unbounded.
ctl() { timeout -k 5 30 rabbitmqctl "$@" </dev/null; }
port_open() { timeout 2 bash -c 'exec 3<>/dev/tcp/127.0.0.1/5672' 2>/dev/null; }
ready() { port_open && ctl -q status >/dev/null 2>&1; }
node_running() { pgrep -u rabbitmq -f 'beam.*-s rabbit boot' >/dev/null 2>&1; }

start_rabbitmq() {
  if ! command -v rabbitmq-server >/dev/null 2>&1; then
    log "installing rabbitmq-server"
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq rabbitmq-server >/dev/null
  fi
  local t0=$SECONDS
  if ! ready; then
    if node_running; then
      # A node that is still booting (the machine starts it just before us) or one left stopped
      # by an interrupted test (`stop_app`): give it its chance before starting another.
      log "RabbitMQ node present but not answering yet: waiting"
      for _ in $(seq 30); do ready && break; ctl -q start_app >/dev/null 2>&1 || true; sleep 2; done
    fi
    if ! ready && ! node_running; then
      log "starting RabbitMQ (rabbitmq-server -detached, log /var/log/rabbitmq)"
      # Its output must not hold the caller's pipes open.
      rabbitmq-server -detached </dev/null >/dev/null 2>&1 || true
    fi
    # The node registers with epmd a few seconds after -detached returns; `await_startup`
    # fails at once on a node it cannot reach, so poll with a deadline first.
    until ready; do
      if ((SECONDS - t0 > deadline_s)); then
        log "RabbitMQ did not answer on 127.0.0.1:5672 within ${deadline_s} s; last lines of its log:"
        tail -n 20 /var/log/rabbitmq/rabbit@*.log 2>/dev/null | grep -v '^$' | tail -n 20 || true
        ctl status 2>&1 | tail -n 15 || true
        exit 1
      fi
      # A node left with its app stopped answers `status` but not AMQP.
      node_running && ctl -q start_app >/dev/null 2>&1 || true
      sleep 2
    done
  fi
  ctl -q await_startup --timeout 60 >/dev/null
  log "RabbitMQ ready on 127.0.0.1:5672 ($((SECONDS - t0)) s)"
}

case "${1:-start}" in
  start) start_rabbitmq ;;
  *) echo "usage: $0 start" >&2; exit 2 ;;
esac
