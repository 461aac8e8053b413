#!/usr/bin/env bash
# Print the CPU-seconds the given containers have used since they were (re)started, summed
# (the engine's cumulative cgroup counter, cpu_stats.cpu_usage.total_usage, through the Docker
# API on its local socket). Containers are named as arguments, or read one per line from stdin:
#   docker compose ps -q worker | scripts/docker-cpu.sh
# Used by scripts/experiment.sh compose as the sweep's --cpu-cmd (CPU per task of containers).
# Environment: DOCKER_SOCKET (default /var/run/docker.sock).
set -euo pipefail
sock=${DOCKER_SOCKET:-/var/run/docker.sock}
ids=("$@")
if ((${#ids[@]} == 0)); then
  while read -r id; do [ -n "$id" ] && ids+=("$id"); done
fi
total=0
for id in "${ids[@]}"; do
  ns=$(curl -sf --unix-socket "$sock" "http://localhost/containers/$id/stats?stream=false&one-shot=true" |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["cpu_stats"]["cpu_usage"]["total_usage"])') ||
    { echo "docker-cpu: no CPU counter for container $id" >&2; exit 1; }
  total=$((total + ns))
done
python3 -c "print(f'{$total / 1e9:.3f}')"
