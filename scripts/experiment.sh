#!/usr/bin/env bash
# A scaling experiment on docker compose or Kubernetes: for every configuration of a
# processes x threads grid, scale the workers and set their threads, enqueue the workload, wait
# until every task's result event arrived, stop the workers, and record the run — the same
# runs.csv, runs.json and throughput.svg/png as the local sweep, because it *is* the local
# sweep (`cropfleet-aggregator sweep`) with `--launcher command`: instead of spawning worker
# processes it runs the scale/stop commands below. The sweep is the producer and the aggregator
# of the experiment; it runs on this machine and reaches the broker through a published port
# (compose) or `kubectl port-forward` (Kubernetes with in-cluster RabbitMQ).
#
# Usage:
#   scripts/experiment.sh compose [options] [-- extra sweep flags]
#   scripts/experiment.sh k8s --image URI --crops URI --output PREFIX [options] [-- extra sweep flags]
#
# Options:
#   --processes LIST   worker processes (containers / pods) to try, e.g. 1,2,4   [1,2,4]
#   --threads LIST     CPU threads per worker to try, e.g. 1,2                   [1,2]
#   --tasks N          tasks (source images) per configuration                   [200]
#   --backend NAME     rabbitmq or pubsub                                        [rabbitmq]
#   --label TEXT       label of the runs in the table and picture        [compose|k8s-BACKEND]
#   --results DIR      where runs.csv/json and the pictures are copied   [results/experiment-LABEL]
#   --image URI --crops URI
#                      the workload; compose: default the generated 12 MP sample with 50 boxes;
#                      k8s: required, a URI the pods can read (gs://…)
#   --output PREFIX    where workers write crops (PREFIX/p2t4/…); compose: default a folder in
#                      FLEET_DATA; k8s: required (gs://…)
#   --namespace NS     Kubernetes namespace                                      [cropfleet]
#   --no-build         compose: use the image CROPFLEET_IMAGE_TAG (default cropfleet:dev) as it is,
#                      prebuilt or `docker load`ed, instead of `docker compose build`
#   --compare-local    compose: then run the same grid as local processes (the image's own
#                      binaries, the same broker and workload) and draw both in one table and
#                      picture, with the CPU per task of each: what containers cost
#   --dry-run          print the sweep command instead of running it
#
# Compose: installs and starts a Docker engine with Compose when missing and builds stand-ins for
# images no registry gives (scripts/docker-engine.sh); the workers' CPU is read from their
# containers' counters (scripts/docker-cpu.sh, the sweep's --cpu-cmd). The sweep itself runs the
# image's cropfleet-aggregator, copied out of it, so host and containers run the same build.
#
# Environment: FLEET_DATA (compose: the folder shared with the containers, absolute;
# default $PWD/cropfleet-data), RABBITMQ_PORT (compose: 5672; the machine's own RabbitMQ may hold
# it: set another), PUBSUB_PORT (compose: 8085), CROPFLEET_NO_BUILD=1 (as --no-build),
# CROPFLEET_AGGREGATOR_BIN (default: compose, the image's; k8s, target/release/cropfleet-aggregator,
# built if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

die() { echo "experiment: $*" >&2; exit 2; }
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit "${1:-0}"; }

[ $# -ge 1 ] || usage 2
target=$1
shift
case "$target" in compose | k8s) ;; -h | --help) usage 0 ;; *) die "first argument: compose or k8s" ;; esac

processes=1,2,4 threads=1,2 tasks=200 backend=rabbitmq label="" results="" image="" crops=""
output="" namespace=cropfleet dry_run=0 extra=() build=1 compare_local=0
[ "${CROPFLEET_NO_BUILD:-0}" = 1 ] && build=0
while (($#)); do
  case "$1" in
    --processes) processes=${2:?}; shift 2 ;;
    --threads) threads=${2:?}; shift 2 ;;
    --tasks) tasks=${2:?}; shift 2 ;;
    --backend) backend=${2:?}; shift 2 ;;
    --label) label=${2:?}; shift 2 ;;
    --results) results=${2:?}; shift 2 ;;
    --image) image=${2:?}; shift 2 ;;
    --crops) crops=${2:?}; shift 2 ;;
    --output) output=${2:?}; shift 2 ;;
    --namespace) namespace=${2:?}; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --no-build) build=0; shift ;;
    --compare-local) compare_local=1; shift ;;
    --) shift; extra=("$@"); break ;;
    -h | --help) usage 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
[[ "$processes" =~ ^[1-9][0-9]*(,[1-9][0-9]*)*$ ]] || die "--processes: a list like 1,2,4"
[[ "$threads" =~ ^[1-9][0-9]*(,[1-9][0-9]*)*$ ]] || die "--threads: a list like 1,2"
[[ "$tasks" =~ ^[1-9][0-9]*$ ]] || die "--tasks: a positive number"
case "$backend" in rabbitmq | pubsub) ;; *) die "--backend: rabbitmq or pubsub" ;; esac
[ -n "$image" ] && [ -z "$crops" ] && die "--image needs --crops"
[ -n "$crops" ] && [ -z "$image" ] && die "--crops needs --image"
if [ -z "$label" ]; then
  if [ "$target" = compose ]; then label="compose-$backend"; else label="k8s-$backend"; fi
fi
results=${results:-results/experiment-$label}
((compare_local)) && [ "$target" != compose ] && die "--compare-local belongs to compose"

max_of() { tr ',' '\n' <<<"$1" | sort -n | tail -1; }

# `sh -c` templates are rendered by the sweep; quote fixed values for them once here.
q() { printf '%q' "$1"; }

sweep=(sweep --launcher command --processes "$processes" --threads "$threads" --tasks "$tasks" --label "$label")
[ -n "$image" ] && sweep+=(--image "$image" --crops "$crops")
cleanup=()
on_exit() {
  local c
  for c in "${cleanup[@]}"; do eval "$c" || true; done
}
trap on_exit EXIT

if [ "$target" = compose ]; then
  export FLEET_DATA=${FLEET_DATA:-$repo/cropfleet-data}
  case "$FLEET_DATA" in /*) ;; *) die "FLEET_DATA must be an absolute path" ;; esac
  FLEET_UID=$(id -u)
  FLEET_GID=$(id -g)
  export FLEET_UID FLEET_GID
  dc=(docker compose -f "$repo/docker-compose.yml" --env-file "$repo/deploy/compose/$backend.env")
  dcs="docker compose -f $(q "$repo/docker-compose.yml") --env-file $(q "$repo/deploy/compose/$backend.env")"
  if [ "$backend" = rabbitmq ]; then
    # The queues the compose workers use (TASKS_URI / RESULTS_URI, as docker-compose.yml
    # defaults them), reached through the published port.
    # The account as compose sees it: the shell's, else the env file's (the file is not sourced:
    # it is compose's, not bash's).
    from_env_file() { sed -n "s/^$1=//p" "$repo/deploy/compose/$backend.env" | tail -n 1; }
    creds="${RABBITMQ_USER:-$(from_env_file RABBITMQ_USER)}:${RABBITMQ_PASSWORD:-$(from_env_file RABBITMQ_PASSWORD)}"
    fleet_q=${TASKS_URI:-amqp://$creds@rabbitmq:5672/%2f?queue=crops}
    fleet_r=${RESULTS_URI:-amqp://$creds@rabbitmq:5672/%2f?queue=crops.results}
    to_host() { sed -E "s#@rabbitmq:5672/#@127.0.0.1:${RABBITMQ_PORT:-5672}/#" <<<"$1"; }
    sweep+=(--queue "$(to_host "$fleet_q")" --results "$(to_host "$fleet_r")")
  else
    export PUBSUB_EMULATOR_HOST=127.0.0.1:${PUBSUB_PORT:-8085}
    sweep+=(--queue pubsub://cropfleet-local/crops --results pubsub://cropfleet-local/crops-results)
  fi
  stamp=$(date +%Y%m%d-%H%M%S)
  sweep_out="$FLEET_DATA/experiments/$label-$stamp"
  sweep+=(--out "$sweep_out" --work-dir "$FLEET_DATA/work")
  [ -n "$output" ] && sweep+=(--output "$output")
  # The launcher exports CROPFLEET_THREADS/_PREFETCH/_UPLOAD_CONCURRENCY, which
  # docker-compose.yml interpolates into the worker's environment; a changed value recreates
  # the containers. `--wait` returns once every worker answers its health check.
  sweep+=(--scale-cmd "$dcs up -d --no-deps --wait --wait-timeout 300 --scale worker={processes} worker")
  sweep+=(--stop-cmd "$dcs stop --timeout 35 worker")
  # Stopped containers restart with fresh counters, so this is the CPU of this configuration.
  sweep+=(--cpu-cmd "$dcs ps -q worker | $(q "$repo/scripts/docker-cpu.sh")")
  prepare() {
    echo "experiment: starting the broker, the GCS emulator and the shared folder ($FLEET_DATA)"
    mkdir -p "$FLEET_DATA"
    scripts/docker-engine.sh
    if ((build)); then
      CROPFLEET_GIT_COMMIT=$(git rev-parse HEAD 2>/dev/null || echo unknown) "${dc[@]}" build worker
    else
      docker image inspect "${CROPFLEET_IMAGE_TAG:-cropfleet:dev}" >/dev/null ||
        die "--no-build: no image ${CROPFLEET_IMAGE_TAG:-cropfleet:dev} (build it, or docker load it)"
    fi
    "${dc[@]}" up -d --wait --wait-timeout 300 "$backend" gcs
    "${dc[@]}" up --no-deps data-init
    # The compose aggregator would take the result events the sweep is waiting for.
    "${dc[@]}" stop aggregator worker >/dev/null 2>&1 || true
    if [ -z "${CROPFLEET_AGGREGATOR_BIN:-}" ]; then
      # The image's binaries (sweep and, with --compare-local, the local workers): the very
      # build the containers run.
      local bins=$FLEET_DATA/bin id
      mkdir -p "$bins"
      id=$(docker create "${CROPFLEET_IMAGE_TAG:-cropfleet:dev}")
      docker cp "$id:/usr/local/bin/cropfleet-aggregator" "$bins/" >/dev/null &&
        docker cp "$id:/usr/local/bin/cropfleet-worker" "$bins/" >/dev/null
      docker rm "$id" >/dev/null
      aggregator=$bins/cropfleet-aggregator
    fi
    # One workload for the whole experiment (and the local comparison).
    if [ -z "$image" ]; then
      "$aggregator" sample --dir "$FLEET_DATA/in" >/dev/null
      image=$FLEET_DATA/in/sample.jpg crops=$FLEET_DATA/in/crops.csv
      sweep+=(--image "$image" --crops "$crops")
    fi
  }
else
  command -v kubectl >/dev/null || die "kubectl not found"
  [ -n "$image" ] || die "k8s needs --image and --crops URIs the pods can read (e.g. gs://bucket/in/sample.jpg)"
  [ -n "$output" ] || die "k8s needs --output, a prefix the pods can write (e.g. gs://bucket/experiment)"
  k=(kubectl -n "$namespace")
  ks="kubectl -n $(q "$namespace")"
  dep=deployment/cropfleet-worker
  sweep+=(--output "$output" --out "$results" --fleet-cores "$(($(max_of "$processes") * $(max_of "$threads")))")
  secret() { "${k[@]}" get secret cropfleet-queues -o "jsonpath={.data.$1}" | base64 -d; }
  # KEDA would fight the sweep: pause it at the configuration's replica count; resumed at exit.
  keda_pause=""
  scale="$ks set env $dep CROPFLEET_THREADS={threads} CROPFLEET_PREFETCH={prefetch} CROPFLEET_UPLOAD_CONCURRENCY={upload_concurrency}"
  scale+=" && $ks set resources $dep -c worker --requests=cpu={threads} --limits=cpu={threads}"
  prepare() {
    "${k[@]}" get "$dep" >/dev/null || die "no $dep in namespace $namespace: kubectl apply -k k8s/overlays/$backend"
    if "${k[@]}" get hpa -o name 2>/dev/null | grep -v '/keda-hpa-' | grep -q .; then
      die "a HorizontalPodAutoscaler scales the workers; delete it for the experiment (kubectl -n $namespace delete hpa cropfleet-worker) and re-apply the overlay afterwards"
    fi
    if "${k[@]}" get scaledobject cropfleet-worker >/dev/null 2>&1; then
      keda_pause="yes"
      cleanup+=("${ks} annotate scaledobject cropfleet-worker autoscaling.keda.sh/paused-replicas- >/dev/null")
    fi
    "${k[@]}" delete job cropfleet-aggregator --ignore-not-found
    local tasks_uri results_uri
    tasks_uri=$(secret tasks-uri)
    results_uri=$(secret results-uri)
    if [ "$backend" = rabbitmq ]; then
      local port=${RABBITMQ_LOCAL_PORT:-15672}
      "${k[@]}" port-forward svc/rabbitmq "$port:5672" >/dev/null &
      cleanup+=("kill $! 2>/dev/null")
      sleep 3
      tasks_uri=$(sed -E "s#@[^/@]+/#@127.0.0.1:$port/#" <<<"$tasks_uri")
      results_uri=$(sed -E "s#@[^/@]+/#@127.0.0.1:$port/#" <<<"$results_uri")
    fi
    sweep+=(--queue "$tasks_uri" --results "$results_uri")
    if [ -n "$keda_pause" ]; then
      scale="$ks annotate --overwrite scaledobject cropfleet-worker autoscaling.keda.sh/paused-replicas={processes} && $scale"
    fi
    sweep+=(--scale-cmd "$scale && $ks scale $dep --replicas={processes} && $ks rollout status $dep --timeout=600s")
    local stop="$ks scale $dep --replicas=0"
    [ -n "$keda_pause" ] && stop="$ks annotate --overwrite scaledobject cropfleet-worker autoscaling.keda.sh/paused-replicas=0 && $stop"
    sweep+=(--stop-cmd "$stop && $ks wait --for=delete pod -l app.kubernetes.io/name=cropfleet-worker --timeout=120s")
  }
fi

aggregator=${CROPFLEET_AGGREGATOR_BIN:-}
if [ -z "$aggregator" ] && [ "$target" = compose ] && ((!dry_run)); then
  aggregator="(from the image)" # copied out of it by prepare
elif [ -z "$aggregator" ]; then
  aggregator=target/release/cropfleet-aggregator
  if [ ! -x "$aggregator" ] && ((!dry_run)); then
    echo "experiment: building cropfleet-aggregator (release)"
    cargo build --release --quiet -p cropfleet-aggregator
  fi
fi

if ((dry_run)); then
  if [ "$target" = k8s ]; then
    sweep+=(--queue '<from Secret cropfleet-queues>' --results '<from Secret cropfleet-queues>')
    sweep+=(--scale-cmd "$scale && $ks scale $dep --replicas={processes} && $ks rollout status $dep --timeout=600s")
    sweep+=(--stop-cmd "$ks scale $dep --replicas=0 && $ks wait --for=delete pod -l app.kubernetes.io/name=cropfleet-worker --timeout=120s")
  fi
  printf '%s' "$aggregator"
  for a in "${sweep[@]}" "${extra[@]}"; do printf ' %s' "${a@Q}"; done
  echo
  exit 0
fi

prepare
"$aggregator" "${sweep[@]}" "${extra[@]}"
if [ "$target" = compose ]; then
  mkdir -p "$results"
  if ((compare_local)); then
    # The same grid, workload and broker, the workers as processes on this machine.
    local_out="$FLEET_DATA/experiments/local-$backend-$stamp"
    if [ "$backend" = rabbitmq ]; then
      local_q=$(to_host "amqp://$creds@rabbitmq:5672/%2f?queue=local")
    else
      local_q=pubsub://cropfleet-local/local
    fi
    local_sweep=(sweep --processes "$processes" --threads "$threads" --tasks "$tasks" --label "local-$backend"
      --queue "$local_q" --out "$local_out" --work-dir "$FLEET_DATA/work-local" --image "$image" --crops "$crops")
    if [ -n "$output" ]; then
      local_sweep+=(--output "$output-local")
      export STORAGE_EMULATOR_HOST=${STORAGE_EMULATOR_HOST:-http://127.0.0.1:${GCS_PORT:-4443}}
    fi
    "$aggregator" "${local_sweep[@]}" "${extra[@]}"
    "$aggregator" report "$sweep_out/runs.json" "$local_out/runs.json" --out "$results"
  else
    cp "$sweep_out"/runs.csv "$sweep_out"/runs.json "$sweep_out"/throughput.svg "$sweep_out"/throughput.png "$results"/
  fi
fi
echo "experiment: records and picture in $results (runs.csv, runs.json, throughput.svg, throughput.png)"
