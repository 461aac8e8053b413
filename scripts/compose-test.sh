#!/usr/bin/env bash
# The fleet in real containers, end to end: builds the image from the Dockerfile, then for each
# broker profile of docker-compose.yml brings the stack up with 3 workers, enqueues the sample
# workload through scripts/enqueue.sh plus 3 poison messages, and while the work is pending
#   - kills one worker container (docker kill: SIGKILL, no drain) and starts it again,
#   - restarts the broker container (RabbitMQ profile) or the storage emulator (Pub/Sub profile:
#     the Pub/Sub emulator keeps everything in memory, so restarting it would lose the queue
#     itself — a fault the real service does not have),
#   - stops one worker with SIGTERM (docker stop, the signal and grace period `docker compose
#     stop` uses), which must drain its tasks and exit 0 within the grace period.
# Then it checks: every task's crops stored (local shared folder, or the GCS emulator), nothing
# stored that no task asked for, the aggregator counted each task once and wrote its runs, the 3
# poisons in the dead-letter destination with their reasons and no valid task there, and
# `docker compose down -v` left no container, network or volume. One summary line per profile.
#
# With --experiment it then runs `scripts/experiment.sh compose --compare-local` on the built
# image: worker replicas 1,2,3 x threads 1,2 in containers and the same grid as local processes,
# one table and picture with the CPU per task of both.
#
# Usage: scripts/compose-test.sh [--profiles rabbitmq,pubsub] [--tasks N] [--no-build] [--keep]
#                                [--experiment] [--experiment-tasks N] [--results DIR]
#   --profiles LIST   broker profiles to run ("" for none)                [rabbitmq,pubsub]
#   --tasks N         valid tasks per profile                             [100]
#   --experiment      also the compose experiment (RabbitMQ)
#   --experiment-tasks N   tasks per configuration of the experiment      [40]
#   --results DIR     where the experiment's runs.csv/json and picture go [results/compose-test]
#   --no-build        use the image CROPFLEET_IMAGE_TAG as it is (prebuilt or `docker load`ed)
#   --keep            leave the stacks up (and their folders) for a look; `docker compose -p
#                     cropfleet-test-PROFILE down -v` removes them
# Environment: CROPFLEET_IMAGE_TAG (default cropfleet:dev). Installs and starts a Docker engine
# and Compose, and builds stand-ins for the images no registry gives (scripts/docker-engine.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

profiles=rabbitmq,pubsub tasks=100 build=1 keep=0 experiment=0 exp_tasks=40 results=results/compose-test
while (($#)); do
  case "$1" in
    --experiment) experiment=1; shift ;;
    --experiment-tasks) exp_tasks=${2:?}; shift 2 ;;
    --results) results=${2:?}; shift 2 ;;
    --profiles) profiles=${2?--profiles needs a list}; shift 2 ;;
    --tasks) tasks=${2:?}; shift 2 ;;
    --no-build) build=0; shift ;;
    --keep) keep=1; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "compose-test: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
[[ "$tasks" =~ ^[1-9][0-9]*$ ]] || { echo "compose-test: --tasks: a positive number" >&2; exit 2; }

export CROPFLEET_IMAGE_TAG=${CROPFLEET_IMAGE_TAG:-cropfleet:dev}
t_all=$SECONDS
log() { printf 'compose-test: %s\n' "$*" >&2; }
elapsed() { echo "$((SECONDS - $1)) s"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

t=$SECONDS
scripts/docker-engine.sh
log "engine, Compose and base images ready ($(elapsed "$t"))"

if ((build)); then
  t=$SECONDS
  log "building $CROPFLEET_IMAGE_TAG from the Dockerfile (docker compose build)"
  CROPFLEET_GIT_COMMIT=$(git rev-parse HEAD 2>/dev/null || echo unknown) docker compose -f docker-compose.yml build worker
  log "image built ($(elapsed "$t"))"
fi
docker image inspect "$CROPFLEET_IMAGE_TAG" >/dev/null 2>&1 ||
  { log "no image $CROPFLEET_IMAGE_TAG (build it, or drop --no-build)"; exit 1; }
uid=$(docker run --rm --entrypoint id "$CROPFLEET_IMAGE_TAG" -u)
versions=$(for b in worker producer aggregator; do docker run --rm "$CROPFLEET_IMAGE_TAG" "cropfleet-$b" --version; done | paste -sd, -)
log "$CROPFLEET_IMAGE_TAG: $(docker image inspect -f '{{.Size}}' "$CROPFLEET_IMAGE_TAG" | awk '{printf "%d MB", $1/1e6}'), runs as uid $uid: $versions"
[ "$uid" = 10001 ] || { log "the image must run as uid 10001, not $uid"; exit 1; }

summaries=()
failed=0
tmp_summary=$(mktemp)
fail_reason=$(mktemp)
trap 'rm -f "$tmp_summary" "$fail_reason"' EXIT

# run_profile NAME: one whole scenario; returns non-zero on any failed check.
run_profile() (
  set -euo pipefail
  # Not `local`: the EXIT trap below runs after bash has left this function's scope.
  profile=$1 t0=$SECONDS
  project=cropfleet-test-$profile
  data=$(mktemp -d "/tmp/cropfleet-compose-$profile-XXXXXX")
  chmod 755 "$data"
  # The profile's env file (COMPOSE_PROFILES, queue URIs) as environment: `docker compose` run by
  # scripts/enqueue.sh then sees the same settings (variables beat the project's .env).
  set -a
  # shellcheck disable=SC1090
  . "deploy/compose/$profile.env"
  set +a
  export COMPOSE_PROJECT_NAME=$project COMPOSE_FILE=$repo/docker-compose.yml FLEET_DATA=$data
  # Free host ports: this machine may run its own RabbitMQ on 5672, emulators on 8085/4443.
  RABBITMQ_PORT=$(free_port) RABBITMQ_MANAGEMENT_PORT=$(free_port) PUBSUB_PORT=$(free_port) GCS_PORT=$(free_port)
  export RABBITMQ_PORT RABBITMQ_MANAGEMENT_PORT PUBSUB_PORT GCS_PORT
  # The aggregator stops once it has counted every task (or after 10 idle minutes).
  export CROPFLEET_EXPECT=$tasks CROPFLEET_IDLE_SECS=600 CROPFLEET_PROCESSES=3
  dc=(docker compose)
  logs=$data/logs
  mkdir -p "$logs"

  # shellcheck disable=SC2329 # run by the trap below
  down() {
    "${dc[@]}" logs --no-color --timestamps >"$logs/compose.log" 2>&1 || true
    if ((keep)); then
      log "$profile: kept the stack ($project) and $data"
    else
      "${dc[@]}" down -v --remove-orphans --timeout 40 >/dev/null 2>&1 || true
    fi
  }
  trap down EXIT
  fail() {
    log "$profile: FAILED: $*"
    # The reason goes into the summary line too: CI shows the end of the output.
    echo "compose-test $profile: FAILED: $*" >"$fail_reason"
    "${dc[@]}" ps -a >&2 || true
    "${dc[@]}" logs --no-color --timestamps --tail 40 2>&1 | grep -v '/_internal/healthcheck' >&2 || true
    exit 1
  }

  local t=$SECONDS
  log "$profile: up (broker, gcs, setup, aggregator), data in $data"
  "${dc[@]}" up -d --wait --wait-timeout 300 --scale worker=0 >"$logs/up.log" 2>&1 ||
    { cat "$logs/up.log" >&2; fail "docker compose up"; }
  log "$profile: stack healthy ($(elapsed "$t"))"

  # The workload: the sweep's sample, written by the image's aggregator into the shared folder;
  # on the Pub/Sub profile sources and crops live in the GCS emulator.
  "${dc[@]}" run --rm --no-deps -T aggregator sample --dir "$data/in" >/dev/null
  cp "$data/in/sample.jpg" "$data/corrupt.jpg"
  truncate -s 200000 "$data/corrupt.jpg"
  printf 'x,y,w,h\n10,10,100,100\n3950,2950,100,100\n' >"$data/past-edge.csv"
  local image crops output corrupt past_edge
  if [ "$profile" = pubsub ]; then
    local gcs=http://127.0.0.1:$GCS_PORT
    put() { curl -sf -o /dev/null -X POST --data-binary "@$2" "$gcs/upload/storage/v1/b/cropfleet/o?uploadType=media&name=$1"; }
    local f
    for f in in/sample.jpg:in/sample.jpg in/crops.csv:in/crops.csv in/corrupt.jpg:corrupt.jpg in/past-edge.csv:past-edge.csv; do
      put "${f%%:*}" "$data/${f#*:}" || fail "uploading $data/${f#*:} to the GCS emulator"
    done
    image=gs://cropfleet/in/sample.jpg crops=gs://cropfleet/in/crops.csv output=gs://cropfleet/crops
    corrupt=gs://cropfleet/in/corrupt.jpg past_edge=gs://cropfleet/in/past-edge.csv
    list_crops() { python3 - "$gcs" <<'PY'
import json, sys, urllib.parse, urllib.request
base, token, names = sys.argv[1], None, []
while True:
    q = {"prefix": "crops/", "maxResults": "1000", "fields": "items(name),nextPageToken"}
    if token:
        q["pageToken"] = token
    with urllib.request.urlopen(f"{base}/storage/v1/b/cropfleet/o?{urllib.parse.urlencode(q)}") as r:
        page = json.load(r)
    names += [i["name"][len("crops/"):] for i in page.get("items", [])]
    token = page.get("nextPageToken")
    if not token:
        break
print("\n".join(names))
PY
    }
  else
    image=$data/in/sample.jpg crops=$data/in/crops.csv output=$data/crops
    corrupt=$data/corrupt.jpg past_edge=$data/past-edge.csv
    list_crops() { (cd "$data/crops" 2>/dev/null && find . -type f | sed 's#^\./##') || true; }
  fi

  # Tasks through the script users enqueue with; the same image under task ids sample,
  # sample-2, … sample-N.
  t=$SECONDS
  for ((i = 0; i < tasks; i++)); do echo "$image"; done |
    scripts/enqueue.sh --via compose --list - --crops "$crops" --output "$output" --run-id "compose-$profile" \
      >"$logs/enqueue.log" 2>&1 || { cat "$logs/enqueue.log" >&2; fail "enqueue.sh"; }
  grep -q "$tasks of $tasks tasks confirmed" "$logs/enqueue.log" || { cat "$logs/enqueue.log" >&2; fail "not every task confirmed"; }
  # Poison, published verbatim: malformed JSON, a truncated JPEG, a box past the image's edge.
  local poisons=$data/poisons.jsonl
  {
    printf '{"v": 1, "id": "poison-json", "image": \n'
    printf '{"v":1,"id":"poison-truncated","image":"%s","crops":"%s","output":"%s"}\n' "$corrupt" "$crops" "$output"
    printf '{"v":1,"id":"poison-edge","image":"%s","crops":"%s","output":"%s"}\n' "$image" "$past_edge" "$output"
  } >"$poisons"
  "${dc[@]}" run --rm -T producer --manifest - --raw <"$poisons" >>"$logs/enqueue.log" 2>&1 ||
    { cat "$logs/enqueue.log" >&2; fail "publishing the poison messages"; }
  log "$profile: $tasks tasks + 3 poison messages enqueued ($(elapsed "$t"))"

  # Faults while the work is pending: a worker is struck while it holds tasks (its own /metrics
  # says how many), the broker while tasks wait; the aggregator's count paces them.
  local agg
  agg=$("${dc[@]}" ps -q aggregator)
  done_tasks() { docker logs "$agg" 2>&1 | sed -n 's/^compose-[a-z]*: \([0-9]*\) tasks,.*/\1/p' | tail -1 | grep . || echo 0; }
  wait_for() { # wait_for N SECONDS: until the aggregator has counted N tasks
    local until=$((SECONDS + $2))
    while (($(done_tasks) < $1)); do
      ((SECONDS < until)) || fail "only $(done_tasks) of $1 results after $2 s"
      sleep 0.5
    done
  }
  in_flight() {
    docker exec "$1" bash -c 'exec 3<>/dev/tcp/127.0.0.1/9090 && printf "GET /metrics HTTP/1.0\r\n\r\n" >&3 && cat <&3' 2>/dev/null |
      sed -n 's/^cropfleet_tasks_in_flight \([0-9]*\).*/\1/p' | head -1 | grep . || echo 0
  }
  busy() { # busy CONTAINER...: wait (60 s at most) until one of them holds tasks; prints "ID N"
    local until=$((SECONDS + 60)) c n
    while ((SECONDS < until)); do
      for c in "$@"; do
        n=$(in_flight "$c")
        ((n > 0)) && { echo "$c $n"; return; }
      done
      sleep 0.2
    done
    fail "no worker held a task for 60 s ($(done_tasks) results)"
  }
  t=$SECONDS
  "${dc[@]}" up -d --no-recreate --scale worker=3 worker >>"$logs/up.log" 2>&1 || fail "starting 3 workers"
  # Each worker capped at 0.3 CPU: uncapped, 3 workers finish the 100 sample tasks in about 10 s,
  # and a fault could miss the work it is meant to strike. The cap survives `docker start`.
  # shellcheck disable=SC2046
  docker update --cpus 0.3 $("${dc[@]}" ps -q worker) >/dev/null || fail "capping the workers' CPU"
  local w1 w2 n got kills=0 restarts=0 sigterm=""
  # Both faults strike whichever worker holds tasks (the Pub/Sub emulator has no flow control
  # and may hand one worker everything).
  # shellcheck disable=SC2046 # one argument per container id
  got=$(busy $("${dc[@]}" ps -q worker))
  read -r w1 n <<<"$got"
  docker kill "$w1" >/dev/null && kills=$((kills + 1))
  log "$profile: killed $(docker inspect -f '{{.Name}}' "$w1") holding $n tasks, at $(done_tasks) results"
  sleep 1
  docker start "$w1" >/dev/null
  # Preferably another worker; the restarted one too, in case redelivery hands it the rest.
  # shellcheck disable=SC2046
  got=$(busy $("${dc[@]}" ps -q worker | grep -v "^$w1") "$w1")
  read -r w2 n <<<"$got"
  local stop_t0=$SECONDS grace
  grace=$(docker inspect -f '{{.Config.StopTimeout}}' "$w2")
  log "$profile: SIGTERM to $(docker inspect -f '{{.Name}}' "$w2") holding $n tasks, at $(done_tasks) results (grace ${grace}s)"
  docker stop "$w2" >/dev/null
  local code drain=$((SECONDS - stop_t0))
  code=$(docker inspect -f '{{.State.ExitCode}}' "$w2")
  [ "$code" = 0 ] || fail "the SIGTERMed worker exited $code"
  ((drain < grace)) || fail "the SIGTERMed worker took ${drain}s, grace period ${grace}s"
  docker logs "$w2" >"$logs/worker-sigterm.log" 2>&1
  local pending
  pending=$(grep -o '"pending":[0-9]*' "$logs/worker-sigterm.log" | tail -1 | cut -d: -f2)
  sigterm="exit $code in ${drain}s after draining ${pending:-0} tasks"
  local broken=rabbitmq
  [ "$profile" = pubsub ] && broken=gcs
  wait_for $((tasks / 2)) 300
  local at
  at=$(done_tasks)
  ((at < tasks)) || fail "every task was done before the $broken restart"
  log "$profile: restarting $broken at $at results"
  "${dc[@]}" restart "$broken" >>"$logs/up.log" 2>&1 && restarts=$((restarts + 1))
  # The aggregator exits once it has counted every task.
  local until=$((SECONDS + 600))
  while [ "$(docker inspect -f '{{.State.Running}}' "$agg")" = true ]; do
    ((SECONDS < until)) || fail "the aggregator did not count $tasks tasks within 600 s (has $(done_tasks))"
    sleep 1
  done
  [ "$(docker inspect -f '{{.State.ExitCode}}' "$agg")" = 0 ] || fail "the aggregator failed"
  local run_s=$((SECONDS - t))
  log "$profile: every task counted ($run_s s after the workers started)"
  "${dc[@]}" run --rm --no-deps -T producer dead-letters --json >"$data/dead.jsonl" 2>>"$logs/enqueue.log" ||
    fail "reading the dead letters"
  list_crops >"$data/stored.txt"
  "${dc[@]}" stop --timeout 40 worker >/dev/null 2>&1
  local worker_crashes
  worker_crashes=$(for c in $("${dc[@]}" ps -aq worker); do docker inspect -f '{{.State.ExitCode}}' "$c"; done | grep -cv '^0$' || true)

  # The checks, on what is stored and what the aggregator wrote.
  local verdict
  verdict=$(python3 - "$data" "$tasks" "$profile" <<'PY'
import json, sys
data, n, profile = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ids = ["sample"] + [f"sample-{i}" for i in range(2, n + 1)]
want = {f"{i}/{k:03}.jpg" for i in ids for k in range(50)}
stored = {l.strip() for l in open(f"{data}/stored.txt") if l.strip()}
lost, unexpected = len(want - stored), len(stored - want)
runs = json.load(open(f"{data}/results/runs.json"))
counted = sum(r["tasks"] for r in runs)
dups = sum(r["duplicates"] for r in runs)
dead = [json.loads(l) for l in open(f"{data}/dead.jsonl") if l.strip()]
expect = {"poison-json": "not JSON", "poison-truncated": "corrupt or truncated JPEG",
          "poison-edge": "outside the 4000x3000 image"}
ok_dead, problems = 0, []
for pid, phrase in expect.items():
    hit = [d for d in dead if f'"{pid}"' in d["payload"]]
    if not hit:
        problems.append(f"{pid} not dead-lettered")
    elif phrase not in hit[0]["reason"]:
        problems.append(f"{pid}: reason {hit[0]['reason']!r} lacks {phrase!r}")
    else:
        ok_dead += 1
valid_dead = [d["id"] for d in dead if not any(f'"{p}"' in d["payload"] for p in expect)]
if valid_dead:
    problems.append(f"valid tasks dead-lettered: {valid_dead}")
if counted != n:
    problems.append(f"the aggregator counted {counted} tasks, not {n}")
if lost or unexpected:
    problems.append(f"{lost} crops lost, {unexpected} unexpected")
print(f"lost {lost}, unexpected {unexpected}, counted {counted}/{n} (duplicate events {dups}), "
      f"dead letters {ok_dead} of {len(expect)}" + ("" if not problems else " PROBLEMS: " + "; ".join(problems)))
sys.exit(1 if problems else 0)
PY
  ) || fail "$verdict"
  [ "$worker_crashes" = 0 ] || fail "$worker_crashes worker containers exited non-zero at the end"

  # down -v must leave nothing of the project behind.
  trap - EXIT
  "${dc[@]}" logs --no-color --timestamps >"$logs/compose.log" 2>&1 || true
  local left=""
  if ((keep)); then
    left="kept"
  else
    "${dc[@]}" down -v --remove-orphans --timeout 40 >/dev/null 2>&1 || fail "docker compose down -v"
    local label=com.docker.compose.project=$project
    left=$( {
      docker ps -aq --filter "label=$label" | sed 's/^/container /'
      docker network ls -q --filter "label=$label" | sed 's/^/network /'
      docker volume ls -q --filter "label=$label" | sed 's/^/volume /'
    } | paste -sd, -)
    [ -z "$left" ] || fail "down -v left $left"
    left="nothing left"
    rm -rf "$data"
  fi
  echo "compose-test $profile: tasks $tasks, kills $kills, restarts $restarts ($broken), sigterm $sigterm, $verdict, worker crashes $worker_crashes, down -v: $left; run ${run_s} s, total $(elapsed "$t0")"
)

IFS=',' read -r -a want <<<"$profiles"
for p in ${want[@]+"${want[@]}"}; do
  case "$p" in rabbitmq | pubsub) ;; *) log "unknown profile $p (rabbitmq, pubsub)"; exit 2 ;; esac
  # Not in a condition: bash would ignore `set -e` inside the whole function.
  set +e
  : >"$fail_reason"
  run_profile "$p" >"$tmp_summary"
  rc=$?
  set -e
  if ((rc == 0)); then
    summaries+=("$(tail -1 "$tmp_summary")")
  else
    summaries+=("$(grep . "$fail_reason" || echo "compose-test $p: FAILED (exit $rc, see above)")")
    failed=1
  fi
  echo "${summaries[-1]}"
done
if ((experiment)); then
  t=$SECONDS
  exp_data=$(mktemp -d /tmp/cropfleet-compose-experiment-XXXXXX)
  chmod 755 "$exp_data"
  port=$(free_port)
  log "experiment: replicas 1,2,3 x threads 1,2, $exp_tasks tasks each, in containers and as local processes"
  if COMPOSE_PROJECT_NAME=cropfleet-test-experiment FLEET_DATA=$exp_data RABBITMQ_PORT=$port \
    RABBITMQ_MANAGEMENT_PORT=$(free_port) GCS_PORT=$(free_port) \
    scripts/experiment.sh compose --no-build --compare-local --processes 1,2,3 --threads 1,2 \
    --tasks "$exp_tasks" --results "$results" >"$exp_data/experiment.log" 2>&1; then
    # The combined table (the last one the log holds: `report` of both sweeps).
    awk '/^ *label +proc/ {t = ""; on = 1} on {t = t $0 "\n"} /^wrote / {on = 0} END {printf "%s", t}' "$exp_data/experiment.log"
    summaries+=("compose-test experiment: 6 configurations in containers + 6 as local processes, $exp_tasks tasks each; $results/runs.csv, throughput.png ($(elapsed "$t"))")
  else
    tail -40 "$exp_data/experiment.log" >&2
    summaries+=("compose-test experiment: FAILED (log above)")
    failed=1
  fi
  COMPOSE_PROJECT_NAME=cropfleet-test-experiment FLEET_DATA=$exp_data \
    docker compose -f docker-compose.yml down -v --remove-orphans --timeout 40 >/dev/null 2>&1 || true
  rm -rf "$exp_data"
  echo "${summaries[-1]}"
fi
echo "== compose-test summary ($(elapsed "$t_all"))"
printf '%s\n' "${summaries[@]}"
exit "$failed"
