#!/usr/bin/env bash
# Enqueue crop tasks by script: from a JSONL manifest, from the images in a folder, or from a
# listing of image URIs (one per line, e.g. `gcloud storage ls 'gs://bucket/in/**.jpg'`).
# Builds a JSONL manifest (one task object per line) and hands it to `cropfleet-producer
# --manifest -`, run here, in docker compose, or in the Kubernetes cluster.
#
# Usage:
#   scripts/enqueue.sh --manifest tasks.jsonl [--via local|compose|kubectl] [--queue URI]
#   scripts/enqueue.sh --dir photos/ --crops boxes.csv --output out/ [--queue URI]
#   scripts/enqueue.sh --list images.txt --crops gs://b/boxes.csv --output gs://b/crops --via kubectl
#
# Options:
#   --manifest FILE   JSONL manifest, one task object per line ("-" = stdin); passed through.
#   --dir DIR         every .jpg/.jpeg/.png/.webp file under DIR (recursively, sorted).
#   --list FILE       image paths or URIs, one per line ("-" = stdin); blank and # lines skipped.
#   --crops SPEC      crop boxes for every image: a CSV path/URI (header x,y,w,h), inline
#                     "x,y,w,h;x,y,w,h", or a JSON array. Without it, --dir uses IMAGE.csv
#                     beside each image (photo.jpg -> photo.csv) and fails if one is missing.
#   --output PREFIX   output prefix; crops land at PREFIX/{task id}/{index:03}.jpg.
#   --quality Q       JPEG quality 1-100 for these tasks.
#   --run-id ID       run id stamped on every task (default: run-{unix ms}, set by the producer).
#   --queue URI       task queue (default: $CROPFLEET_QUEUE, else the producer's default);
#                     ignored with --via compose/kubectl, which use the fleet's own queue.
#   --via WHERE       local (default): cropfleet-producer from PATH or target/{release,debug};
#                     compose: `docker compose run --rm -T producer`;
#                     kubectl: a one-off pod in namespace $CROPFLEET_NAMESPACE (default cropfleet)
#                     with the queue URI from Secret cropfleet-queues.
#   --dry-run         print the manifest instead of enqueueing.
# Task ids are the file names without extension, made safe ([A-Za-z0-9._-]) and unique.
set -euo pipefail
cd "$(dirname "$0")/.."

manifest="" dir="" list="" crops="" output="" quality="" run_id="" queue="${CROPFLEET_QUEUE:-}"
via=local dry_run=0
die() { echo "enqueue: $*" >&2; exit 2; }
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit "${1:-0}"; }
while (($#)); do
  case "$1" in
    --manifest) manifest="${2:?--manifest needs a file}"; shift 2 ;;
    --dir) dir="${2:?--dir needs a folder}"; shift 2 ;;
    --list) list="${2:?--list needs a file}"; shift 2 ;;
    --crops) crops="${2:?--crops needs a value}"; shift 2 ;;
    --output) output="${2:?--output needs a prefix}"; shift 2 ;;
    --quality) quality="${2:?--quality needs a number}"; shift 2 ;;
    --run-id) run_id="${2:?--run-id needs an id}"; shift 2 ;;
    --queue) queue="${2:?--queue needs a URI}"; shift 2 ;;
    --via) via="${2:?--via needs local, compose or kubectl}"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h | --help) usage 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
sources=0
for s in "$manifest" "$dir" "$list"; do [ -n "$s" ] && sources=$((sources + 1)); done
[ "$sources" -eq 1 ] || die "give exactly one of --manifest, --dir, --list"
if [ -z "$manifest" ]; then
  [ -n "$output" ] || die "--dir and --list need --output"
  [ -n "$dir" ] || [ -n "$crops" ] || die "--list needs --crops"
fi
if [ -n "$quality" ] && ! [[ "$quality" =~ ^[0-9]+$ && "$quality" -ge 1 && "$quality" -le 100 ]]; then
  die "--quality must be 1-100"
fi
case "$via" in local | compose | kubectl) ;; *) die "--via must be local, compose or kubectl" ;; esac

# JSON string literal of $1.
json_str() {
  local s=$1
  s=${s//\\/\\\\}
  s=${s//\"/\\\"}
  s=${s//$'\t'/\\t}
  s=${s//$'\r'/\\r}
  s=${s//$'\n'/\\n}
  printf '"%s"' "$s"
}

# The crops value as JSON: inline boxes and JSON arrays stay boxes, anything else is a URI.
crops_json() {
  local c=$1
  if [[ "$c" == \[* ]]; then
    printf '%s' "$c"
  elif [[ "$c" =~ ^[0-9]+,[0-9]+,[0-9]+,[0-9]+(\;[0-9]+,[0-9]+,[0-9]+,[0-9]+)*\;?$ ]]; then
    local out="[" box x y w h first=1
    IFS=';' read -r -a boxes <<<"$c"
    for box in "${boxes[@]}"; do
      [ -n "$box" ] || continue
      IFS=',' read -r x y w h <<<"$box"
      ((first)) || out+=","
      first=0
      out+="{\"x\":$x,\"y\":$y,\"w\":$w,\"h\":$h}"
    done
    printf '%s]' "$out"
  else
    json_str "$c"
  fi
}

declare -A seen=()
# A safe, unique task id from an image path or URI, in $REPLY (no subshell: $seen must persist).
task_id() {
  local base=${1##*/}
  base=${base%.*}
  base=$(printf '%s' "$base" | tr -c 'A-Za-z0-9._-' '_')
  base=${base#.}
  base=${base:0:100}
  [ -n "$base" ] || base=image
  local id=$base n=1
  while [ -n "${seen[$id]:-}" ]; do
    n=$((n + 1))
    id="$base-$n"
  done
  seen[$id]=1
  REPLY=$id
}

# One manifest line per image read from stdin.
emit_tasks() {
  local img c line
  while IFS= read -r img || [ -n "$img" ]; do
    img=${img%$'\r'}
    [[ -z "${img//[[:space:]]/}" || "$img" == \#* ]] && continue
    c=$crops
    if [ -z "$c" ]; then
      c="${img%.*}.csv"
      [ -f "$c" ] || die "no --crops given and no $c beside $img"
    fi
    task_id "$img"
    line="{\"id\":$(json_str "$REPLY"),\"image\":$(json_str "$img"),\"crops\":$(crops_json "$c"),\"output\":$(json_str "$output")"
    [ -n "$quality" ] && line+=",\"quality\":$quality"
    printf '%s}\n' "$line"
  done
}

build_manifest() {
  if [ -n "$manifest" ]; then
    if [ "$manifest" = - ]; then cat; else cat -- "$manifest"; fi
  elif [ -n "$dir" ]; then
    [ -d "$dir" ] || die "$dir is not a folder"
    local abs
    abs=$(cd "$dir" && pwd)
    find "$abs" -type f \( -iname '*.jpg' -o -iname '*.jpeg' -o -iname '*.png' -o -iname '*.webp' \) | LC_ALL=C sort | emit_tasks
  elif [ "$list" = - ]; then
    emit_tasks
  else
    [ -f "$list" ] || die "$list not found"
    emit_tasks <"$list"
  fi
}

producer_args=(--manifest -)
[ -n "$run_id" ] && producer_args+=(--run-id "$run_id")

find_producer() {
  if command -v cropfleet-producer >/dev/null 2>&1; then
    command -v cropfleet-producer
    return
  fi
  for p in target/release/cropfleet-producer target/debug/cropfleet-producer; do
    [ -x "$p" ] && { echo "$p"; return; }
  done
  die "cropfleet-producer not found: cargo build --release, or put it on PATH"
}

enqueue() {
  case "$via" in
    local)
      local bin
      bin=$(find_producer)
      if [ -n "$queue" ]; then
        "$bin" --queue "$queue" "${producer_args[@]}"
      else
        "$bin" "${producer_args[@]}"
      fi
      ;;
    compose)
      docker compose run --rm -T producer "${producer_args[@]}"
      ;;
    kubectl)
      local ns=${CROPFLEET_NAMESPACE:-cropfleet} image name overrides
      image=$(kubectl -n "$ns" get deployment cropfleet-worker -o jsonpath='{.spec.template.spec.containers[0].image}')
      name="cropfleet-enqueue-$(date +%s)"
      overrides=$(printf '{"apiVersion":"v1","spec":{"serviceAccountName":"cropfleet","securityContext":{"runAsNonRoot":true,"runAsUser":10001},"containers":[{"name":"%s","image":"%s","stdin":true,"stdinOnce":true,"command":["cropfleet-producer"],"args":%s,"env":[{"name":"CROPFLEET_QUEUE","valueFrom":{"secretKeyRef":{"name":"cropfleet-queues","key":"tasks-uri"}}}]}]}}' \
        "$name" "$image" "$(args_json "${producer_args[@]}")")
      kubectl -n "$ns" run "$name" --rm -i --quiet --restart=Never --image="$image" --overrides="$overrides"
      ;;
  esac
}

args_json() {
  local out="[" first=1 a
  for a in "$@"; do
    ((first)) || out+=","
    first=0
    out+=$(json_str "$a")
  done
  printf '%s]' "$out"
}

if ((dry_run)); then
  build_manifest
else
  tmp=$(mktemp)
  trap 'rm -f "$tmp"' EXIT
  build_manifest >"$tmp"
  n=$(grep -c . "$tmp" || true)
  [ "$n" -gt 0 ] || die "nothing to enqueue"
  echo "enqueue: $n tasks via $via" >&2
  enqueue <"$tmp"
fi
