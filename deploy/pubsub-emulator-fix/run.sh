#!/bin/sh
# Start the Pub/Sub emulator with the fix ahead of its jar (the launcher script it ships runs
# `java -jar`, which ignores any class path):
#   run.sh [--host=HOST] [--port=PORT]
# Environment: PUBSUB_EMULATOR_DIR (default: the Google Cloud CLI's platform/pubsub-emulator,
# at /usr/lib/google-cloud-sdk or /google-cloud-sdk), JAVA (default java).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
dir=${PUBSUB_EMULATOR_DIR:-}
if [ -z "$dir" ]; then
  for d in /usr/lib/google-cloud-sdk/platform/pubsub-emulator /google-cloud-sdk/platform/pubsub-emulator; do
    [ -d "$d" ] && dir=$d && break
  done
fi
for jar in "${dir:?no Pub/Sub emulator found: set PUBSUB_EMULATOR_DIR}"/lib/cloud-pubsub-emulator-*.jar; do break; done
[ -f "$jar" ] || { echo "no cloud-pubsub-emulator jar in $dir/lib" >&2; exit 1; }
exec "${JAVA:-java}" -cp "$here/classes:$jar" com.google.cloud.pubsub.testing.v1.Main "$@"
