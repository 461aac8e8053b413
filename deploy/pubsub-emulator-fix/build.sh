#!/usr/bin/env bash
# Compile src/ into classes/ (committed: compose mounts it into the official emulator image,
# which has no compiler) against the emulator's jar. Run it after changing the source.
# Usage: deploy/pubsub-emulator-fix/build.sh [EMULATOR_JAR]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
jar=${1:-}
if [ -z "$jar" ]; then
  for jar in /usr/lib/google-cloud-sdk/platform/pubsub-emulator/lib/cloud-pubsub-emulator-*.jar; do break; done
fi
rm -rf "$here/classes"
# Java 8 bytecode: runs on whatever Java the emulator image carries.
javac --release 8 -nowarn -cp "$jar" -d "$here/classes" "$here/src/io/grpc/InternalStatus.java"
echo "built $here/classes/io/grpc/InternalStatus.class against $jar"
