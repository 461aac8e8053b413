#!/usr/bin/env bash
# Start the services the integration tests need, if they are not already running.
# RabbitMQ: 127.0.0.1:5672, guest/guest (Debian's rabbitmq-server).
# Usage: scripts/services.sh start
set -euo pipefail

start_rabbitmq() {
  if ! command -v rabbitmq-server >/dev/null 2>&1; then
    echo "services: installing rabbitmq-server"
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq rabbitmq-server >/dev/null
  fi
  if ! rabbitmqctl -q status >/dev/null 2>&1; then
    echo "services: starting RabbitMQ"
    rabbitmq-server -detached
  fi
  rabbitmqctl -q await_startup >/dev/null
  # A stop_app left over from an interrupted test run leaves the node up but the broker down.
  rabbitmqctl -q start_app >/dev/null 2>&1 || true
  echo "services: RabbitMQ ready on 127.0.0.1:5672"
}

case "${1:-start}" in
  start) start_rabbitmq ;;
  *) echo "usage: $0 start" >&2; exit 2 ;;
esac
